"""Tests of metrics.py, plots.py and report.py on hand-made predictions: per-class table, summary, confusion, comparison, report."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from plant_pipeline.ml.data.categories import CATEGORY_NAMES, NUM_CLASSES
from plant_pipeline.ml.evaluation.metrics import (
    UNMATCHED,
    compare,
    confusion_matrix,
    missing_classes,
    per_class_table,
    summary_metrics,
)
from plant_pipeline.ml.evaluation.plots import plot_confusion_matrix, plot_per_class_accuracy
from plant_pipeline.ml.evaluation.report import PREDICTIONS_FILE, read_report, write_report

NAMES = ("aster", "bluebell", "crocus", "daisy")


def predictions_frame(pairs, top5=None) -> pd.DataFrame:
    """(label, predicted_label or None) pairs -> the columns evaluate_shards produces that metrics read."""
    frame = pd.DataFrame({
        "image_id": np.arange(1, len(pairs) + 1),
        "label": [p[0] for p in pairs],
        "predicted_label": pd.array([p[1] for p in pairs], dtype="Int64"),
    })
    frame["correct"] = [p[1] is not None and p[0] == p[1] for p in pairs]
    frame["match"] = ["unmatched" if p[1] is None else "exact" for p in pairs]
    if top5 is not None:
        frame["top5"] = top5
    return frame


@pytest.fixture
def hand_made() -> pd.DataFrame:
    # aster: 3/3 right; bluebell: 0/2, both taken for crocus; crocus: 1/2, the miss unmatched; daisy: no images.
    return predictions_frame([(0, 0), (0, 0), (0, 0), (1, 2), (1, 2), (2, 2), (2, None)],
                             top5=[[0, 1], [0, 1], [0, 2], [2, 1], [2, 1], [2, 0], [3, 0]])


def test_per_class_table_counts_orders_and_names_the_confusion(hand_made):
    table = per_class_table(hand_made, NAMES)
    assert list(table["name"]) == ["bluebell", "crocus", "aster", "daisy"]  # worst first, no images last
    row = table.set_index("name")
    assert row.loc["aster", ["test_images", "correct"]].tolist() == [3, 3]
    assert row.loc["aster", "accuracy"] == 1.0 and row.loc["aster", "most_confused_with"] == ""
    assert row.loc["bluebell", "accuracy"] == 0.0 and row.loc["bluebell", "most_confused_with"] == "crocus"
    assert row.loc["crocus", "accuracy"] == 0.5 and row.loc["crocus", "most_confused_with"] == UNMATCHED
    assert row.loc["daisy", "test_images"] == 0 and math.isnan(row.loc["daisy", "accuracy"])
    assert missing_classes(table) == ["daisy"]


def test_per_class_ties_break_towards_the_lower_class_id():
    frame = predictions_frame([(0, 1), (1, 0), (2, 3), (2, 1), (3, 3)])
    table = per_class_table(frame, NAMES).set_index("name")
    assert table.loc["crocus", "most_confused_with"] == "bluebell"  # 1 vs 3, one each
    assert list(per_class_table(frame, NAMES)["name"][:3]) == ["aster", "bluebell", "crocus"]  # all 0.0, by id


def test_summary_metrics(hand_made):
    summary = summary_metrics(hand_made, NAMES)
    assert summary["top1_accuracy"] == pytest.approx(4 / 7)
    assert summary["macro_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)  # daisy has no images: not averaged
    assert summary["top5_accuracy"] == pytest.approx(6 / 7)  # only the unmatched crocus lacks its label
    assert summary["num_test_images"] == 7 and summary["num_classes_scored"] == 3
    assert summary["num_unmatched"] == 1


def test_summary_without_top5_and_on_an_empty_table(hand_made):
    assert summary_metrics(hand_made.drop(columns="top5"), NAMES)["top5_accuracy"] is None
    with pytest.raises(ValueError, match="empty"):
        summary_metrics(hand_made.iloc[:0], NAMES)


def test_confusion_matrix_rows_true_columns_predicted(hand_made):
    matrix = confusion_matrix(hand_made, len(NAMES))
    expected = np.array([[3, 0, 0, 0], [0, 0, 2, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(matrix, expected)  # the unmatched answer is in no column
    with pytest.raises(ValueError, match=r"0\.\.2; expected 0\.\.1"):
        confusion_matrix(hand_made, 2)


def test_compare_with_and_without_a_previous_run(hand_made):
    summary, table = summary_metrics(hand_made, NAMES), per_class_table(hand_made, NAMES)
    first = compare(summary, table, None)
    assert first["delta_top1"] is None and first["classes_worse"] == [] and not first["has_previous"]

    before = predictions_frame([(0, 0), (0, 1), (0, 0), (1, 1), (1, 2), (2, 2), (2, 2), (3, 3)])
    delta = compare(summary, table, summary_metrics(before, NAMES), per_class_table(before, NAMES))
    assert delta["delta_top1"] == pytest.approx(4 / 7 - 6 / 8)
    assert delta["delta_macro"] == pytest.approx(0.5 - (2 / 3 + 0.5 + 1 + 1) / 4)
    assert delta["classes_worse"] == ["bluebell", "crocus"]  # both -0.5: by id; daisy has no images now
    assert delta["classes_better"] == ["aster"]


def test_compare_lists_the_biggest_drop_first():
    now = predictions_frame([(0, 1), (0, 0), (1, 0), (1, 0)])
    before = predictions_frame([(0, 0), (0, 0), (1, 1), (1, 1)])
    delta = compare(summary_metrics(now, NAMES), per_class_table(now, NAMES),
                    summary_metrics(before, NAMES), per_class_table(before, NAMES))
    assert delta["classes_worse"] == ["bluebell", "aster"]  # -1.0, then -0.5


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def test_confusion_matrix_plot_of_102_classes(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(NUM_CLASSES), 3)
    predicted = np.where(rng.random(len(labels)) < 0.7, labels, rng.integers(0, NUM_CLASSES, len(labels)))
    frame = predictions_frame(list(zip(labels.tolist(), predicted.tolist())))
    data = plot_confusion_matrix(confusion_matrix(frame, NUM_CLASSES), CATEGORY_NAMES, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes() == data
    assert _png_size(data) == (1400, 1200)
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion_matrix(np.zeros((3, 3)), NAMES)


def test_per_class_accuracy_plot(hand_made, tmp_path):
    data = plot_per_class_accuracy(per_class_table(hand_made, NAMES), tmp_path / "acc.png")
    width, height = _png_size((tmp_path / "acc.png").read_bytes())
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 600 <= width <= 4000 and height == 600


def test_write_report_and_read_it_back(hand_made, tmp_path):
    summary, table = summary_metrics(hand_made, NAMES), per_class_table(hand_made, NAMES)
    comparison = compare(summary, table, {**summary, "top1_accuracy": 0.9}, table)
    images = {"confusion_matrix.png": plot_confusion_matrix(confusion_matrix(hand_made, 4), NAMES)}
    existing = tmp_path / "elsewhere.png"
    existing.write_bytes(plot_per_class_accuracy(table))
    report = write_report(tmp_path / "report", summary, table, comparison,
                          {**images, "per_class_accuracy.png": existing}, hand_made)

    text = report.read_text()
    assert report.name == "report.md"
    assert "| top1_accuracy | 0.5714 |" in text and f"top-1 accuracy: {4 / 7 - 0.9:+.4f}" in text
    assert "](confusion_matrix.png)" in text and "](../elsewhere.png)" in text
    assert text.index("| bluebell |") < text.index("| aster |")  # worst class first
    assert "Classes without test images (1): daisy" in text
    assert _png_size((tmp_path / "report" / "confusion_matrix.png").read_bytes())[0] > 100
    assert not list((tmp_path / "report").glob("*.partial"))

    predictions = pd.read_parquet(tmp_path / "report" / PREDICTIONS_FILE)
    assert len(predictions) == 7 and list(predictions["top5"][0]) == [0, 1]
    summary_back, table_back = read_report(tmp_path / "report")
    assert summary_back == json.loads(json.dumps(summary))
    pd.testing.assert_frame_equal(table_back, table, check_dtype=False)
    assert read_report(tmp_path / "nothing") is None


def test_report_without_a_previous_run(hand_made, tmp_path):
    summary, table = summary_metrics(hand_made, NAMES), per_class_table(hand_made, NAMES)
    text = write_report(tmp_path, summary, table, compare(summary, table, None), {}).read_text()
    assert "No previous evaluation to compare with." in text
    assert not (tmp_path / PREDICTIONS_FILE).exists()


def test_a_predictions_write_that_fails_halfway_keeps_the_previous_file(hand_made, tmp_path, monkeypatch):
    summary, table = summary_metrics(hand_made, NAMES), per_class_table(hand_made, NAMES)
    write_report(tmp_path, summary, table, None, {}, hand_made)
    before = (tmp_path / PREDICTIONS_FILE).read_bytes()

    def half_then_fail(frame, target, **kwargs):
        if isinstance(target, (str, os.PathLike)):
            target = open(target, "wb")  # noqa: SIM115 (left open, as a crash would)
        target.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, summary, table, None, {}, hand_made)
    assert (tmp_path / PREDICTIONS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.md", "summary.json", "per_class.csv",
                                                                  PREDICTIONS_FILE]), "a partial file was left"
