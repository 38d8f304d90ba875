"""Tests of report.py (report.md and its files on disk, read back) and of what Dagster's UI shows of a report:
Markdown without links that lead nowhere there, and numbers rounded for reading."""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest
from dagster import MetadataValue

from plant_pipeline.defs.assets.evaluation import _labelled, _summary_line, _ui_report
from plant_pipeline.defs.assets.training import _shown
from plant_pipeline.defs.metadata import rounded, table
from plant_pipeline.ml.evaluation.metrics import compare, confusion_matrix, per_class_table, summary_metrics
from plant_pipeline.ml.evaluation.plots import plot_confusion_matrix, plot_per_class_accuracy
from plant_pipeline.ml.evaluation.report import PREDICTIONS_FILE, read_report, report_markdown, write_report
from plant_pipeline_tests.evaluation.test_metrics import NAMES, hand_made_predictions

# A Markdown image or link whose target is a file name or relative path (data: and http(s): URIs excluded).
RELATIVE_LINK = re.compile(r"\]\((?!data:|https?:)[^)]*\)")


@pytest.fixture
def hand_made() -> pd.DataFrame:
    return hand_made_predictions()


@pytest.fixture
def evaluated(hand_made):
    """summary, per-class table and a comparison with a better previous run in which bluebell was right."""
    summary, per_class = summary_metrics(hand_made, NAMES), per_class_table(hand_made, NAMES)
    before = per_class.assign(accuracy=per_class["accuracy"].where(per_class["name"] != "bluebell", 1.0))
    return summary, per_class, compare(summary, per_class, {**summary, "top1_accuracy": 0.9}, before)


def test_write_report_and_read_it_back(hand_made, evaluated, tmp_path):
    summary, per_class, comparison = evaluated
    images = {"confusion_matrix.png": plot_confusion_matrix(confusion_matrix(hand_made, 4), NAMES)}
    existing = tmp_path / "elsewhere.png"
    existing.write_bytes(plot_per_class_accuracy(per_class))
    report = write_report(tmp_path / "report", summary, per_class, comparison,
                          {**images, "per_class_accuracy.png": existing}, hand_made, title="Evaluation of m1")

    text = report.read_text()
    assert report.name == "report.md" and text.startswith("# Evaluation of m1\n")
    assert "| top1_accuracy | 0.5714 |" in text and f"top-1 accuracy: {4 / 7 - 0.9:+.4f}" in text
    # On disk the links are relative: they work beside the files.
    assert "](confusion_matrix.png)" in text and "](../elsewhere.png)" in text
    assert f"[{PREDICTIONS_FILE}]({PREDICTIONS_FILE})" in text
    assert "classes worse (1): 1 bluebell" in text
    assert text.index("| bluebell |") < text.index("| aster |")  # worst class first
    assert "Classes without test images (1): daisy" in text
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 1000
    assert not list((tmp_path / "report").glob("*.partial"))

    predictions = pd.read_parquet(tmp_path / "report" / PREDICTIONS_FILE)
    assert len(predictions) == 7 and list(predictions["top5"][0]) == [0, 1]
    summary_back, table_back = read_report(tmp_path / "report")
    assert summary_back == json.loads(json.dumps(summary))  # exact, not rounded: comparisons read it
    pd.testing.assert_frame_equal(table_back, per_class, check_dtype=False)
    assert read_report(tmp_path / "nothing") is None


def test_report_without_a_previous_run(hand_made, tmp_path):
    summary, per_class = summary_metrics(hand_made, NAMES), per_class_table(hand_made, NAMES)
    text = write_report(tmp_path, summary, per_class, compare(summary, per_class, None), {}).read_text()
    assert "No previous evaluation to compare with." in text
    assert not (tmp_path / PREDICTIONS_FILE).exists()


def test_the_report_shown_in_the_ui_has_no_link_that_leads_nowhere(evaluated):
    summary, per_class, comparison = evaluated
    text = _ui_report(summary, per_class, comparison, "Evaluation of m1", ["confusion_matrix", "per_class_accuracy"],
                      ["summary_path", "per_class_path", "predictions_path"])
    assert text.startswith("# Evaluation of m1\n")
    assert not RELATIVE_LINK.search(text) and "<img" not in text and "![" not in text
    assert "**confusion_matrix** and **per_class_accuracy** entries" in text and "**predictions_path**" in text
    # The same sections as report.md: only the links differ.
    assert "| top1_accuracy | 0.5714 |" in text and "classes worse (1): 1 bluebell" in text
    assert RELATIVE_LINK.search(report_markdown(summary, per_class, comparison, files=["summary.json"]))


def test_what_people_read_is_rounded_and_classes_carry_their_id(evaluated):
    summary, per_class, comparison = evaluated
    assert _summary_line(summary) == "top-1 0.5714, macro 0.5000, top-5 0.8571 on 7 test images"
    assert _summary_line({**summary, "top5_accuracy": None}) == "top-1 0.5714, macro 0.5000 on 7 test images"
    assert rounded(4 / 7 - 0.9) == -0.3286 and rounded(None) is None
    assert _labelled(comparison["classes_worse"], comparison["classes_worse_ids"]) == ["1 bluebell"]

    shown = table(per_class.assign(accuracy=per_class["accuracy"] * 2 / 3), digits=4)
    accuracy = {record.data["name"]: record.data["accuracy"] for record in shown.records}
    assert accuracy == {"bluebell": 0.0, "crocus": 0.3333, "aster": 0.6667, "daisy": None}
    exact = table(per_class.assign(accuracy=per_class["accuracy"] * 2 / 3))
    assert exact.records[1].data["accuracy"] == 1 / 3  # without digits a table keeps the value as it is

    # trained_model's metadata as the training process reports it: losses to 4 decimals, memory to 1, rest as is.
    assert _shown("final_validation_loss", MetadataValue.float(4.605170185988091)) == 4.6052
    assert _shown("peak_memory_mb", 1234.5678) == 1234.6
    steps = MetadataValue.int(7)
    assert _shown("steps", steps) is steps and _shown("samples_per_second", 12.3456) == 12.3456


def test_a_predictions_write_that_fails_halfway_keeps_the_previous_file(hand_made, tmp_path, monkeypatch):
    summary, per_class = summary_metrics(hand_made, NAMES), per_class_table(hand_made, NAMES)
    write_report(tmp_path, summary, per_class, None, {}, hand_made)
    before = (tmp_path / PREDICTIONS_FILE).read_bytes()

    def half_then_fail(frame, target, **kwargs):
        if isinstance(target, (str, os.PathLike)):
            target = open(target, "wb")  # noqa: SIM115 (left open, as a crash would)
        target.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, summary, per_class, None, {}, hand_made)
    assert (tmp_path / PREDICTIONS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.md", "summary.json", "per_class.csv",
                                                                  PREDICTIONS_FILE]), "a partial file was left"
