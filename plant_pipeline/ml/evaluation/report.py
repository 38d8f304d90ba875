"""The written report of one evaluation: report.md, summary.json, per_class.csv, the figures and
predictions.parquet in one folder, and reading the summary and per-class table back for the next comparison.

Every file is written atomically and report.md last, so a crash never leaves a report that looks whole.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from plant_pipeline.ml.evaluation.metrics import class_label
from plant_pipeline.ml.files import atomic_write_bytes

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = "predictions.parquet"


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


def _classes(comparison: Mapping, key: str) -> str:
    names = comparison.get(key, [])
    ids = comparison.get(f"{key}_ids") or [None] * len(names)
    shown = [name if i is None else class_label(i, name) for i, name in zip(ids, names)]
    return f"({len(shown)}): " + (", ".join(shown) or "none")


def report_markdown(summary: Mapping, per_class: pd.DataFrame, comparison: Mapping | None, *,
                    title: str = "Model evaluation", worst: int = 15, figures: Mapping[str, str] | None = None,
                    files: Sequence[str] | None = None, footer: str = "") -> str:
    """The report as Markdown: summary, change since the previous evaluation, the ``worst`` classes.

    ``figures`` (name -> link) and ``files`` (links) are listed only when given, so a caller that shows the
    report where relative links lead nowhere (Dagster's UI) leaves them out and says in ``footer`` where to look.
    """
    lines = [f"# {title}", "", "## Summary", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in summary.items()]
    lines += ["", "## Compared with the previous evaluation", ""]
    if comparison and comparison.get("has_previous"):
        lines += [f"- top-1 accuracy: {_signed(comparison.get('delta_top1'))}",
                  f"- macro accuracy: {_signed(comparison.get('delta_macro'))}",
                  f"- top-5 accuracy: {_signed(comparison.get('delta_top5'))}",
                  "- classes worse " + _classes(comparison, "classes_worse"),
                  "- classes better " + _classes(comparison, "classes_better")]
    else:
        lines.append("No previous evaluation to compare with.")
    scored = per_class.loc[per_class["test_images"] > 0]
    lines += ["", f"## The {min(worst, len(scored))} worst classes", "", _markdown_table(scored.head(worst))]
    empty = per_class.loc[per_class["test_images"] == 0, "name"].tolist()
    if empty:
        lines += ["", f"Classes without test images ({len(empty)}): " + ", ".join(empty)]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{name}]({link})" for name, link in figures.items()]
    if files:
        lines += ["", "Data: " + ", ".join(f"[{f}]({f})" for f in files)]
    if footer:
        lines += ["", footer]
    return "\n".join(lines + [""])


def write_report(out_dir: str | os.PathLike, summary: Mapping, per_class: pd.DataFrame,
                 comparison: Mapping | None, images: Mapping[str, bytes | os.PathLike],
                 predictions: pd.DataFrame | None = None, *, title: str = "Model evaluation",
                 worst: int = 15) -> Path:
    """Write report.md, summary.json, per_class.csv, the PNGs and predictions.parquet into ``out_dir``.

    ``images`` maps a file name to PNG bytes (written into out_dir) or to an existing file (linked relative
    to out_dir). Returns the path of report.md, whose links are relative (they work in the folder, not in
    Dagster's UI: see report_markdown). read_report reads summary and per-class back for compare().
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    links = {}
    for name, image in images.items():
        if isinstance(image, (bytes, bytearray)):
            links[name] = atomic_write_bytes(out_dir / name, bytes(image)).name
        else:
            links[name] = os.path.relpath(Path(image), out_dir)
    files = [SUMMARY_FILE, PER_CLASS_FILE] + ([PREDICTIONS_FILE] if predictions is not None else [])
    text = report_markdown(summary, per_class, comparison, title=title, worst=worst, figures=links, files=files)

    atomic_write_bytes(out_dir / SUMMARY_FILE, json.dumps(dict(summary), indent=2, sort_keys=True).encode())
    atomic_write_bytes(out_dir / PER_CLASS_FILE, per_class.to_csv(index=False).encode())
    if predictions is not None:
        buffer = io.BytesIO()
        predictions.to_parquet(buffer, index=False)
        atomic_write_bytes(out_dir / PREDICTIONS_FILE, buffer.getvalue())
    # report.md last: its presence means the whole report is there.
    return atomic_write_bytes(out_dir / REPORT_FILE, text.encode())


def read_report(out_dir: str | os.PathLike) -> tuple[dict, pd.DataFrame] | None:
    """(summary, per_class) of a report written earlier, or None where there is none."""
    out_dir = Path(out_dir)
    if not (out_dir / REPORT_FILE).exists() or not (out_dir / SUMMARY_FILE).exists():
        return None
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    per_class = pd.read_csv(out_dir / PER_CLASS_FILE, keep_default_na=False, na_values=[""])
    per_class["most_confused_with"] = per_class["most_confused_with"].fillna("")
    return summary, per_class
