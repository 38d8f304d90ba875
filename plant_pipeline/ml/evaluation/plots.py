"""Figures and the written report of one evaluation: confusion matrix, per-class accuracy, report.md, predictions.

Figures render with matplotlib's Agg backend (no display needed) and come back as PNG bytes; every file is
written to ``<name>.partial`` and renamed into place, so a crash never leaves a half-written report.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from plant_pipeline.ml.files import atomic_write_bytes

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = "predictions.parquet"


def _figure_bytes(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


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
    data = _figure_bytes(figure)
    if path is not None:
        atomic_write_bytes(Path(path), data)
    return data


def plot_per_class_accuracy(table: pd.DataFrame, path: str | os.PathLike | None = None,
                            *, title: str = "Per-class accuracy (test split)") -> bytes:
    """Bars of per_class_table's accuracy, worst class first; classes without test images are left out."""
    plt = _pyplot()
    scored = table.loc[table["test_images"] > 0].sort_values(["accuracy", "category_id"], kind="stable")
    if scored.empty:
        raise ValueError("per-class table has no class with test images; nothing to plot")
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
    data = _figure_bytes(figure)
    if path is not None:
        atomic_write_bytes(Path(path), data)
    return data


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *lines])


def write_report(out_dir: str | os.PathLike, summary: Mapping, per_class: pd.DataFrame,
                 comparison: Mapping | None, images: Mapping[str, bytes | os.PathLike],
                 predictions: pd.DataFrame | None = None, *, title: str = "Model evaluation",
                 worst: int = 15) -> Path:
    """Write report.md, summary.json, per_class.csv, the PNGs and predictions.parquet into ``out_dir``.

    ``images`` maps a file name to PNG bytes (written into out_dir) or to an existing file (linked relative
    to out_dir). Returns the path of report.md. read_report reads summary and per-class back for compare().
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    links = {}
    for name, image in images.items():
        if isinstance(image, (bytes, bytearray)):
            links[name] = atomic_write_bytes(out_dir / name, bytes(image)).name
        else:
            links[name] = os.path.relpath(Path(image), out_dir)

    lines = [f"# {title}", "", "## Summary", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in summary.items()]
    lines += ["", "## Compared with the previous evaluation", ""]
    if comparison and comparison.get("has_previous"):
        lines += [f"- top-1 accuracy: {_signed(comparison.get('delta_top1'))}",
                  f"- macro accuracy: {_signed(comparison.get('delta_macro'))}",
                  f"- top-5 accuracy: {_signed(comparison.get('delta_top5'))}",
                  f"- classes worse ({len(comparison.get('classes_worse', []))}): "
                  + (", ".join(comparison.get("classes_worse", [])) or "none"),
                  f"- classes better ({len(comparison.get('classes_better', []))}): "
                  + (", ".join(comparison.get("classes_better", [])) or "none")]
    else:
        lines.append("No previous evaluation to compare with.")
    scored = per_class.loc[per_class["test_images"] > 0]
    lines += ["", f"## The {min(worst, len(scored))} worst classes", "", _markdown_table(scored.head(worst))]
    empty = per_class.loc[per_class["test_images"] == 0, "name"].tolist()
    if empty:
        lines += ["", f"Classes without test images ({len(empty)}): " + ", ".join(empty)]
    if links:
        lines += ["", "## Figures", ""] + [f"![{name}]({link})" for name, link in links.items()]
    files = [SUMMARY_FILE, PER_CLASS_FILE] + ([PREDICTIONS_FILE] if predictions is not None else [])
    lines += ["", "Data: " + ", ".join(f"[{f}]({f})" for f in files), ""]

    atomic_write_bytes(out_dir / SUMMARY_FILE, json.dumps(dict(summary), indent=2, sort_keys=True).encode())
    atomic_write_bytes(out_dir / PER_CLASS_FILE, per_class.to_csv(index=False).encode())
    if predictions is not None:
        partial = out_dir / (PREDICTIONS_FILE + ".partial")
        predictions.to_parquet(partial, index=False)
        os.replace(partial, out_dir / PREDICTIONS_FILE)
    # report.md last: its presence means the whole report is there.
    return atomic_write_bytes(out_dir / REPORT_FILE, "\n".join(lines).encode())


def read_report(out_dir: str | os.PathLike) -> tuple[dict, pd.DataFrame] | None:
    """(summary, per_class) of a report written earlier, or None where there is none."""
    out_dir = Path(out_dir)
    if not (out_dir / REPORT_FILE).exists() or not (out_dir / SUMMARY_FILE).exists():
        return None
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    per_class = pd.read_csv(out_dir / PER_CLASS_FILE, keep_default_na=False, na_values=[""])
    per_class["most_confused_with"] = per_class["most_confused_with"].fillna("")
    return summary, per_class
