"""Figures of one evaluation: the confusion matrix and per-class accuracy.

They render with matplotlib's Agg backend (no display needed) and come back as PNG bytes; given a path, the
PNG is also written atomically (a crash never leaves half a file). Every figure is at most WIDTH_PX wide: Dagster
shows a metadata picture at its natural size in a dialog about 80% of the window wide, so 800 px fits a window
of 1000 px; beyond LABELLED_UP_TO classes the figures drop per-class labels rather than shrink them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from plant_pipeline.ml.evaluation.metrics import class_label, confusion_matrix, most_confused_pairs
from plant_pipeline.ml.files import atomic_write_bytes

DPI = 100
WIDTH_PX = 800
WIDTH_IN = WIDTH_PX / DPI
# Up to this many classes every class gets a label (bars, matrix rows); beyond, the worst WORST_SHOWN do.
LABELLED_UP_TO = 30
WORST_SHOWN = 20
# Beyond this many classes a dense matrix is no picture at all: the most confused pairs replace it.
FULL_FIGURES_UP_TO = 150
LABEL_FONT = 8


def _figure_bytes(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays the one asked for
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


def _most_confused_cells(cm: np.ndarray, top: int) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of the ``top`` largest off-diagonal cells: largest first, ties by true, predicted."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off.ravel(), kind="stable")[:top]
    rows, cols = np.unravel_index(order, cm.shape)
    return [(int(r), int(c), int(off[r, c])) for r, c in zip(rows, cols) if off[r, c] > 0]


def _id_ticks(num: int) -> list[int]:
    """About ten evenly spaced class ids (a step of 1, 2 or 5 times a power of ten)."""
    raw = max(1.0, num / 11)
    magnitude = 10 ** int(np.floor(np.log10(raw)))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return list(range(0, num, int(step)))


def plot_confusion_matrix(cm: np.ndarray, names: Sequence[str], path: str | os.PathLike | None = None,
                          *, title: str = "Confusion matrix (test split)", pairs_listed: int = 5) -> bytes:
    """Rows (true class) normalised to the share of that class's images, classes in id order, colour bar.

    Up to LABELLED_UP_TO classes every row is labelled "id name", every column "id", and each cell shows its count.
    Beyond, tick labels every few ids and faint lines at them, and the ``pairs_listed`` most confused pairs named
    under the matrix: a label per class would be a few pixels tall.
    """
    plt = _pyplot()
    cm = np.asarray(cm)
    num = cm.shape[0]
    if cm.shape != (num, num) or num != len(names):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {len(names)} class names")
    totals = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    labelled = num <= LABELLED_UP_TO
    figure, axis = plt.subplots(figsize=(WIDTH_IN, 6.5 if labelled else 7.6), layout="constrained")
    image = axis.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    colorbar = figure.colorbar(image, ax=axis, fraction=0.046, pad=0.01)
    colorbar.set_label("share of the true class's test images")
    if labelled:
        axis.set_xticks(range(num))
        axis.set_xticklabels([str(i) for i in range(num)], fontsize=LABEL_FONT, rotation=90 if num > 12 else 0)
        axis.set_yticks(range(num))
        axis.set_yticklabels([class_label(i, name) for i, name in enumerate(names)], fontsize=LABEL_FONT)
        axis.set_ylabel("true class")
        for (row, col), count in np.ndenumerate(cm):
            if count:
                axis.text(col, row, str(count), ha="center", va="center", fontsize=LABEL_FONT,
                          color="black" if shares[row, col] > 0.5 else "white")
    else:
        ticks = _id_ticks(num)
        axis.set_xticks(ticks)
        axis.set_yticks(ticks)
        axis.tick_params(labelsize=9)
        for edge in ticks[1:]:  # faint lines help follow a row or column across the matrix
            axis.axhline(edge - 0.5, color="white", linewidth=0.4, alpha=0.4)
            axis.axvline(edge - 0.5, color="white", linewidth=0.4, alpha=0.4)
        axis.set_ylabel("true class id")
        cells = _most_confused_cells(cm, pairs_listed)
        if cells:
            lines = [f"{class_label(t, names[t])}  →  {class_label(p, names[p])}: {n} of {int(totals[t, 0])}"
                     for t, p, n in cells]
            figure.supxlabel("Most confused (true → predicted, test images):\n" + "\n".join(lines),
                             fontsize=LABEL_FONT + 1, x=0.02, ha="left", multialignment="left")
    correct, total = int(np.trace(cm)), int(cm.sum())
    axis.set_title(f"{title}: {correct}/{total} correct", fontsize=12)
    axis.set_xlabel("predicted class id")
    return _finish(figure, path)


def _class_bars(axis, rows: pd.DataFrame, colours) -> None:
    """Horizontal accuracy bars labelled "id name", the first row at the top, each with its correct/test images."""
    accuracy = rows["accuracy"].to_numpy()
    axis.barh(range(len(rows)), accuracy, color=colours(accuracy), edgecolor="none")
    for y, (value, hits, images) in enumerate(zip(accuracy, rows["correct"], rows["test_images"])):
        axis.text(value + 0.01, y, f"{int(hits)}/{int(images)}", va="center", fontsize=LABEL_FONT - 1)
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([class_label(i, n) for i, n in zip(rows["category_id"], rows["name"])], fontsize=LABEL_FONT)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.08)  # room for the count after a full bar
    axis.set_xlabel("accuracy")


def plot_per_class_accuracy(table: pd.DataFrame, path: str | os.PathLike | None = None,
                            *, title: str = "Per-class accuracy (test split)") -> bytes:
    """One bar per class, worst first, up to LABELLED_UP_TO scored classes; beyond, plot_accuracy_overview.
    Classes without test images are left out."""
    scored = _scored(table)
    if len(scored) > LABELLED_UP_TO:
        return plot_accuracy_overview(table, path, title=title)
    plt = _pyplot()
    num = len(scored)
    figure, axis = plt.subplots(figsize=(WIDTH_IN, max(3.0, 0.22 * num + 1.6)), layout="constrained")
    _class_bars(axis, scored, plt.get_cmap("RdYlGn"))
    macro = float(scored["accuracy"].mean())
    axis.axvline(macro, color="black", linestyle="--", linewidth=0.8)
    axis.set_xlabel(f"accuracy (dashed line: macro accuracy {macro:.3f})")  # a legend would cover a bar
    omitted = len(table) - num
    axis.set_title(title + (f" ({omitted} classes without test images omitted)" if omitted else ""))
    return _finish(figure, path)


def plot_confused_pairs(pairs: pd.DataFrame, path: str | os.PathLike | None = None,
                        *, title: str = "Most confused pairs (test split)") -> bytes:
    """Horizontal bars of most_confused_pairs' counts, labelled "true -> predicted", the largest at the top."""
    plt = _pyplot()
    num = len(pairs)
    figure, axis = plt.subplots(figsize=(WIDTH_IN, max(3.0, 0.22 * num + 1.6)), layout="constrained")
    if num:
        labels = [f"{class_label(ti, t)} → {class_label(pi, p)}" for t, ti, p, pi in
                  zip(pairs["name"], pairs["label"], pairs["predicted_name"], pairs["predicted_label"])]
        axis.barh(range(num), pairs["count"].to_numpy(), color="tab:red")
        axis.set_yticks(range(num))
        axis.set_yticklabels(labels, fontsize=LABEL_FONT)
        axis.invert_yaxis()
    else:
        axis.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("test images of the true class predicted as the other")
    axis.set_title(title)
    return _finish(figure, path)


def plot_accuracy_overview(table: pd.DataFrame, path: str | os.PathLike | None = None,
                           *, title: str = "Per-class accuracy (test split)") -> bytes:
    """For many classes: bars of the WORST_SHOWN worst classes above a histogram of every class's accuracy."""
    plt = _pyplot()
    scored = _scored(table)
    worst = scored.head(WORST_SHOWN)
    figure, (bars, hist) = plt.subplots(2, 1, figsize=(WIDTH_IN, 0.2 * len(worst) + 3.8), layout="constrained",
                                        height_ratios=(0.2 * len(worst) + 0.6, 1.6))
    _class_bars(bars, worst, plt.get_cmap("RdYlGn"))
    bars.set_title(f"the {len(worst)} worst of {len(scored)} classes", fontsize=10)
    hist.hist(scored["accuracy"].to_numpy(), bins=20, range=(0, 1), color="tab:blue")
    hist.set_xlim(0, 1.02)
    hist.set_xlabel("accuracy")
    hist.set_ylabel("classes")
    macro = float(scored["accuracy"].mean())
    hist.axvline(macro, color="black", linestyle="--", linewidth=0.8, label=f"macro accuracy {macro:.3f}")
    hist.legend(loc="best", fontsize=LABEL_FONT)
    omitted = len(table) - len(scored)
    hist.set_title("all classes" + (f" ({omitted} without test images omitted)" if omitted else ""), fontsize=10)
    figure.suptitle(title)
    return _finish(figure, path)


def evaluation_figures(predictions: pd.DataFrame, table: pd.DataFrame, names: Sequence[str]) -> dict[str, bytes]:
    """PNG file name -> bytes: the confusion matrix and per-class accuracy up to FULL_FIGURES_UP_TO classes; beyond,
    the most confused pairs instead of the matrix. Every figure is at most WIDTH_PX wide."""
    if len(names) <= FULL_FIGURES_UP_TO:
        return {"confusion_matrix.png": plot_confusion_matrix(confusion_matrix(predictions, len(names)), names),
                "per_class_accuracy.png": plot_per_class_accuracy(table)}
    return {"confused_pairs.png": plot_confused_pairs(most_confused_pairs(predictions, names, WORST_SHOWN)),
            "per_class_accuracy.png": plot_per_class_accuracy(table)}
