"""Figures of one evaluation: the confusion matrix and per-class accuracy.

They render with matplotlib's Agg backend (no display needed) and come back as PNG bytes; given a path, the
PNG is also written atomically (a crash never leaves half a file).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from plant_pipeline.ml.files import atomic_write_bytes


def _figure_bytes(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _finish(figure, path: str | os.PathLike | None) -> bytes:
    """The figure's PNG bytes, also written atomically to ``path`` when given."""
    data = _figure_bytes(figure)
    if path is not None:
        atomic_write_bytes(Path(path), data)
    return data


def _scored(table: pd.DataFrame) -> pd.DataFrame:
    """per_class_table's classes with test images, worst first (ties by id)."""
    scored = table.loc[table["test_images"] > 0].sort_values(["accuracy", "category_id"], kind="stable")
    if scored.empty:
        raise ValueError("per-class table has no class with test images; nothing to plot")
    return scored


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported anywhere in this process; harmless after
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: np.ndarray, names: Sequence[str], path: str | os.PathLike | None = None,
                          *, title: str = "Confusion matrix (test split)") -> bytes:
    """Rows (true class) normalised to the share of that class's images, classes in id order, colour bar.

    With many classes every row is labelled "id name" and every column "id" in a small font, so a 102-class
    matrix stays legible when zoomed; with a few classes each cell also shows its count.
    """
    plt = _pyplot()
    cm = np.asarray(cm)
    num = cm.shape[0]
    if cm.shape != (num, num) or num != len(names):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {len(names)} class names")
    totals = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    large = num > 30
    figure, axis = plt.subplots(figsize=(14, 12) if large else (8, 6), layout="constrained")
    image = axis.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    colorbar = figure.colorbar(image, ax=axis, fraction=0.046, pad=0.01)
    colorbar.set_label("share of the true class's test images")
    font = 4.5 if large else 8
    axis.set_xticks(range(num))
    axis.set_xticklabels([str(i) for i in range(num)], fontsize=font, rotation=90)
    axis.set_yticks(range(num))
    axis.set_yticklabels([f"{i} {name}" for i, name in enumerate(names)], fontsize=font)
    if large:
        # Faint lines every 10 classes help follow a row or column across the matrix.
        for edge in range(10, num, 10):
            axis.axhline(edge - 0.5, color="white", linewidth=0.3, alpha=0.5)
            axis.axvline(edge - 0.5, color="white", linewidth=0.3, alpha=0.5)
    else:
        for (row, col), count in np.ndenumerate(cm):
            if count:
                axis.text(col, row, str(count), ha="center", va="center", fontsize=8,
                          color="black" if shares[row, col] > 0.5 else "white")
    correct, total = int(np.trace(cm)), int(cm.sum())
    axis.set_title(f"{title}: {correct}/{total} correct", fontsize=12)
    axis.set_xlabel("predicted class id")
    axis.set_ylabel("true class")
    return _finish(figure, path)


def plot_per_class_accuracy(table: pd.DataFrame, path: str | os.PathLike | None = None,
                            *, title: str = "Per-class accuracy (test split)") -> bytes:
    """Bars of per_class_table's accuracy, worst class first; classes without test images are left out."""
    plt = _pyplot()
    scored = _scored(table)
    num = len(scored)
    figure, axis = plt.subplots(figsize=(max(8.0, 0.15 * num + 2), 6), layout="constrained")
    accuracy = scored["accuracy"].to_numpy()
    axis.bar(range(num), accuracy, color=plt.get_cmap("RdYlGn")(accuracy), edgecolor="none")
    macro = float(np.mean(accuracy))
    axis.axhline(macro, color="black", linestyle="--", linewidth=0.8, label=f"macro accuracy {macro:.3f}")
    axis.set_xticks(range(num))
    axis.set_xticklabels([f"{n} ({i})" for n, i in zip(scored["name"], scored["category_id"])],
                         rotation=90, fontsize=5 if num > 30 else 8)
    axis.set_xlim(-0.6, num - 0.4)
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("accuracy")
    omitted = len(table) - num
    axis.set_title(title + (f" ({omitted} classes without test images omitted)" if omitted else ""))
    axis.legend(loc="upper left", fontsize=8)
    return _finish(figure, path)


# Beyond this many classes a full matrix or one bar per class is unreadable: show the worst and a distribution.
FULL_FIGURES_UP_TO = 150
WORST_SHOWN = 30


def plot_confused_pairs(pairs: pd.DataFrame, path: str | os.PathLike | None = None,
                        *, title: str = "Most confused pairs (test split)") -> bytes:
    """Horizontal bars of most_confused_pairs' counts, labelled "true -> predicted", the largest at the top."""
    plt = _pyplot()
    num = len(pairs)
    figure, axis = plt.subplots(figsize=(10, max(3.0, 0.25 * num + 1.5)), layout="constrained")
    if num:
        labels = [f"{t} ({ti}) -> {p} ({pi})" for t, ti, p, pi in
                  zip(pairs["name"], pairs["label"], pairs["predicted_name"], pairs["predicted_label"])]
        axis.barh(range(num), pairs["count"].to_numpy(), color="tab:red")
        axis.set_yticks(range(num))
        axis.set_yticklabels(labels, fontsize=7)
        axis.invert_yaxis()
    else:
        axis.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("test images of the true class predicted as the other")
    axis.set_title(title)
    return _finish(figure, path)


def plot_accuracy_overview(table: pd.DataFrame, path: str | os.PathLike | None = None,
                           *, title: str = "Per-class accuracy (test split)") -> bytes:
    """For many classes: bars of the WORST_SHOWN worst classes beside a histogram of every class's accuracy."""
    plt = _pyplot()
    scored = _scored(table)
    worst = scored.head(WORST_SHOWN)
    figure, (bars, hist) = plt.subplots(1, 2, figsize=(14, 7), layout="constrained", width_ratios=(3, 2))
    accuracy = worst["accuracy"].to_numpy()
    bars.barh(range(len(worst)), accuracy, color=plt.get_cmap("RdYlGn")(accuracy))
    bars.set_yticks(range(len(worst)))
    bars.set_yticklabels([f"{n} ({i})" for n, i in zip(worst["name"], worst["category_id"])], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlim(0, 1.02)
    bars.set_xlabel("accuracy")
    bars.set_title(f"worst {len(worst)} of {len(scored)} classes")
    hist.hist(scored["accuracy"].to_numpy(), bins=20, range=(0, 1), color="tab:blue")
    hist.set_xlabel("accuracy")
    hist.set_ylabel("classes")
    macro = float(scored["accuracy"].mean())
    hist.axvline(macro, color="black", linestyle="--", linewidth=0.8, label=f"macro accuracy {macro:.3f}")
    hist.legend(loc="upper left", fontsize=8)
    omitted = len(table) - len(scored)
    hist.set_title("all classes" + (f" ({omitted} without test images omitted)" if omitted else ""))
    figure.suptitle(title)
    return _finish(figure, path)


def evaluation_figures(predictions: pd.DataFrame, table: pd.DataFrame, names: Sequence[str]) -> dict[str, bytes]:
    """PNG file name -> bytes: the full confusion matrix and one bar per class up to FULL_FIGURES_UP_TO classes;
    beyond, the most confused pairs and the worst classes with a histogram, so pictures stay readable and small."""
    from plant_pipeline.ml.evaluation.metrics import confusion_matrix, most_confused_pairs

    if len(names) <= FULL_FIGURES_UP_TO:
        return {"confusion_matrix.png": plot_confusion_matrix(confusion_matrix(predictions, len(names)), names),
                "per_class_accuracy.png": plot_per_class_accuracy(table)}
    return {"confused_pairs.png": plot_confused_pairs(most_confused_pairs(predictions, names, WORST_SHOWN)),
            "per_class_accuracy.png": plot_accuracy_overview(table)}
