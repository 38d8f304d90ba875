"""Accuracy from a predictions table (one row per test image): overall, per class, confusion, and change since last run.

Pure pandas/numpy. The table needs columns label, predicted_label (nullable: an unmatched generated answer has
none) and correct; top5 (a list of labels per row) is optional.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

PER_CLASS_COLUMNS = ("category_id", "name", "test_images", "correct", "accuracy", "most_confused_with")
UNMATCHED = "(unmatched answer)"


def class_label(category_id: int, name: str) -> str:
    """How a class is named where people read it: "12 sunflower" (the id finds its row; the name says what it is)."""
    return f"{int(category_id)} {name}"


def _check_columns(predictions: pd.DataFrame, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions table lacks columns {missing}; it has {list(predictions.columns)}")


def per_class_table(predictions: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """One row per class in ``names``, worst accuracy first (then category_id); classes without test images
    have test_images 0 and accuracy NaN and come last."""
    _check_columns(predictions, ("label", "predicted_label", "correct"))
    labels = predictions["label"].to_numpy(dtype=np.int64)
    correct = predictions["correct"].to_numpy(dtype=bool)
    images = np.bincount(labels, minlength=len(names))[: len(names)]
    hits = np.bincount(labels[correct], minlength=len(names))[: len(names)]
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(images > 0, hits / np.maximum(images, 1), np.nan)

    confused = [""] * len(names)
    wrong = predictions.loc[~predictions["correct"].astype(bool), ["label", "predicted_label"]]
    for label, group in wrong.groupby("label"):
        counts = group["predicted_label"].value_counts(dropna=False)
        # Most frequent wrong answer; ties go to the lowest label, an unmatched answer last.
        top = max(counts.items(), key=lambda kv: (kv[1], -(kv[0] if pd.notna(kv[0]) else len(names))))[0]
        confused[int(label)] = UNMATCHED if pd.isna(top) else names[int(top)]

    table = pd.DataFrame({
        "category_id": np.arange(len(names), dtype=np.int64),
        "name": list(names),
        "test_images": images.astype(np.int64),
        "correct": hits.astype(np.int64),
        "accuracy": accuracy.astype(np.float64),
        "most_confused_with": confused,
    })
    return table.sort_values(["accuracy", "category_id"], na_position="last", kind="stable").reset_index(drop=True)


def missing_classes(table: pd.DataFrame) -> list[str]:
    """Names of the classes that had no test image (from per_class_table)."""
    return table.loc[table["test_images"] == 0].sort_values("category_id")["name"].tolist()


def summary_metrics(predictions: pd.DataFrame, names: Sequence[str]) -> dict:
    """top1/macro/top5 accuracy and counts; raises on an empty table rather than reporting a 0.0."""
    _check_columns(predictions, ("label", "predicted_label", "correct"))
    if len(predictions) == 0:
        raise ValueError("no predictions to summarise: the evaluated split was empty")
    table = per_class_table(predictions, names)
    scored = table["test_images"] > 0
    top5 = None
    if "top5" in predictions.columns and predictions["top5"].notna().all():
        top5 = float(np.mean([int(label) in set(map(int, cands))
                              for label, cands in zip(predictions["label"], predictions["top5"])]))
    summary = {
        "top1_accuracy": float(predictions["correct"].astype(bool).mean()),
        "macro_accuracy": float(table.loc[scored, "accuracy"].mean()),
        "top5_accuracy": top5,
        "num_test_images": int(len(predictions)),
        "num_classes_scored": int(scored.sum()),
    }
    if "match" in predictions.columns:
        summary["num_unmatched"] = int((predictions["match"] == "unmatched").sum())
    return summary


# A dense matrix beyond this many classes is neither readable nor small (10,000 classes: 800 MB of int64).
DENSE_CONFUSION_LIMIT = 2000


def confusion_counts(predictions: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """The non-zero cells of the confusion matrix: columns label, predicted_label, count (int64), by label then
    predicted label; memory grows with the images, not with num_classes squared. Unmatched answers are left out."""
    _check_columns(predictions, ("label", "predicted_label"))
    matched = predictions["predicted_label"].notna()
    true = predictions.loc[matched, "label"].to_numpy(dtype=np.int64)
    pred = predictions.loc[matched, "predicted_label"].to_numpy(dtype=np.int64)
    for what, values in (("label", true), ("predicted_label", pred)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{what} values span {values.min()}..{values.max()}; expected 0..{num_classes - 1}")
    cells, counts = np.unique(true * num_classes + pred, return_counts=True)
    return pd.DataFrame({"label": cells // num_classes, "predicted_label": cells % num_classes,
                         "count": counts.astype(np.int64)})


def confusion_matrix(predictions: pd.DataFrame, num_classes: int) -> np.ndarray:
    """int64 [C, C], rows the true class, columns the predicted one; unmatched answers appear in no column.

    Refuses more than DENSE_CONFUSION_LIMIT classes: use confusion_counts or most_confused_pairs then.
    """
    if num_classes > DENSE_CONFUSION_LIMIT:
        raise ValueError(f"a dense confusion matrix of {num_classes} classes is too large (limit "
                         f"{DENSE_CONFUSION_LIMIT}); use confusion_counts or most_confused_pairs")
    cells = confusion_counts(predictions, num_classes)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    matrix[cells["label"].to_numpy(), cells["predicted_label"].to_numpy()] = cells["count"].to_numpy()
    return matrix


def most_confused_pairs(predictions: pd.DataFrame, names: Sequence[str], top: int = 30) -> pd.DataFrame:
    """The ``top`` largest off-diagonal cells, counted sparsely: columns label, name, predicted_label,
    predicted_name, count, share (of the true class's test images); largest count first, ties by label ids."""
    cells = confusion_counts(predictions, len(names))
    totals = predictions["label"].value_counts()
    wrong = cells.loc[cells["label"] != cells["predicted_label"]]
    wrong = wrong.sort_values(["count", "label", "predicted_label"], ascending=[False, True, True]).head(top)
    return pd.DataFrame({
        "label": wrong["label"].to_numpy(dtype=np.int64),
        "name": [names[i] for i in wrong["label"]],
        "predicted_label": wrong["predicted_label"].to_numpy(dtype=np.int64),
        "predicted_name": [names[i] for i in wrong["predicted_label"]],
        "count": wrong["count"].to_numpy(dtype=np.int64),
        "share": (wrong["count"] / totals.reindex(wrong["label"]).to_numpy()).to_numpy(dtype=np.float64),
    })


def compare(current_summary: Mapping, current_per_class: pd.DataFrame,
            previous_summary: Mapping | None = None, previous_per_class: pd.DataFrame | None = None) -> dict:
    """Change since the previous evaluation; deltas are None and lists empty when there is none.

    classes_worse/classes_better hold names and classes_worse_ids/classes_better_ids the matching category ids.
    """
    result = {"has_previous": previous_summary is not None, "delta_top1": None, "delta_macro": None,
              "delta_top5": None, "classes_worse": [], "classes_better": [], "classes_worse_ids": [],
              "classes_better_ids": []}
    if previous_summary is None:
        return result
    for key, delta in (("top1_accuracy", "delta_top1"), ("macro_accuracy", "delta_macro"),
                       ("top5_accuracy", "delta_top5")):
        now, before = current_summary.get(key), previous_summary.get(key)
        if now is not None and before is not None and not (pd.isna(now) or pd.isna(before)):
            result[delta] = float(now) - float(before)
    if previous_per_class is not None:
        joined = current_per_class[["category_id", "name", "accuracy"]].merge(
            previous_per_class[["category_id", "accuracy"]], on="category_id", suffixes=("", "_previous"))
        joined = joined.dropna(subset=["accuracy", "accuracy_previous"])
        joined["change"] = joined["accuracy"] - joined["accuracy_previous"]
        # Biggest drop (or gain) first, so the report's first names are the ones to look at.
        worse = joined.loc[joined["change"] < 0].sort_values(["change", "category_id"])
        better = joined.loc[joined["change"] > 0].sort_values(["change", "category_id"], ascending=[False, True])
        for key, rows in (("classes_worse", worse), ("classes_better", better)):
            result[key] = rows["name"].tolist()
            result[f"{key}_ids"] = [int(i) for i in rows["category_id"]]
    return result
