"""Tests of metrics.py on hand-made predictions: per-class table, summary, confusion, comparison.

predictions_frame and hand_made_predictions are shared with test_plots.py and test_report.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from plant_pipeline.ml.evaluation.metrics import (
    UNMATCHED,
    class_label,
    compare,
    confusion_matrix,
    missing_classes,
    per_class_table,
    summary_metrics,
)

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


def hand_made_predictions() -> pd.DataFrame:
    # aster: 3/3 right; bluebell: 0/2, both taken for crocus; crocus: 1/2, the miss unmatched; daisy: no images.
    return predictions_frame([(0, 0), (0, 0), (0, 0), (1, 2), (1, 2), (2, 2), (2, None)],
                             top5=[[0, 1], [0, 1], [0, 2], [2, 1], [2, 1], [2, 0], [3, 0]])


@pytest.fixture
def hand_made() -> pd.DataFrame:
    return hand_made_predictions()


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
    assert first["classes_worse_ids"] == [] and first["classes_better_ids"] == []

    before = predictions_frame([(0, 0), (0, 1), (0, 0), (1, 1), (1, 2), (2, 2), (2, 2), (3, 3)])
    delta = compare(summary, table, summary_metrics(before, NAMES), per_class_table(before, NAMES))
    assert delta["delta_top1"] == pytest.approx(4 / 7 - 6 / 8)
    assert delta["delta_macro"] == pytest.approx(0.5 - (2 / 3 + 0.5 + 1 + 1) / 4)
    assert delta["classes_worse"] == ["bluebell", "crocus"]  # both -0.5: by id; daisy has no images now
    assert delta["classes_worse_ids"] == [1, 2]
    assert delta["classes_better"] == ["aster"] and delta["classes_better_ids"] == [0]


def test_compare_lists_the_biggest_drop_first():
    now = predictions_frame([(0, 1), (0, 0), (1, 0), (1, 0)])
    before = predictions_frame([(0, 0), (0, 0), (1, 1), (1, 1)])
    delta = compare(summary_metrics(now, NAMES), per_class_table(now, NAMES),
                    summary_metrics(before, NAMES), per_class_table(before, NAMES))
    assert delta["classes_worse"] == ["bluebell", "aster"]  # -1.0, then -0.5
    assert [class_label(i, n) for i, n in zip(delta["classes_worse_ids"], delta["classes_worse"])] == \
        ["1 bluebell", "0 aster"]
