"""The manifest: one row per image with its path, 0-based label, split and source, stored as parquet.

Every source (the Oxford release, photos from users) produces a manifest with these columns; the shards
are built from their combination. The splits and columns are defined here once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from plant_pipeline.ml.errors import UsageError

SPLITS: tuple[str, ...] = ("train", "validation", "test")
MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "path", "label", "split", "source")
# Where the data root keeps its manifests: the chosen source's, labelled with category_map.json's ids (what the shards
# are built from), and the Oxford release's, labelled with Oxford's ids.
DATASET_MANIFEST = "manifest.parquet"
OXFORD_MANIFEST = "oxford_flowers/manifest.parquet"


class DatasetFormatError(UsageError):
    """A label/split file or manifest does not have the layout of the Oxford Flowers release."""


def validate_manifest(df: pd.DataFrame, where: str = "manifest", num_classes: int | None = None) -> None:
    """Raise DatasetFormatError unless ``df`` has the manifest's columns, dtypes and value ranges (labels
    0..num_classes-1 where ``num_classes`` is given: a source's manifest is checked against its category map)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetFormatError(f"{where}: missing columns {missing} (found {list(df.columns)})")
    for column in ("image_id", "label"):
        if df[column].dtype != np.int64:
            raise DatasetFormatError(f"{where}: column {column!r} should be int64, got {df[column].dtype}")
    for column in ("path", "split", "source"):
        if not pd.api.types.is_string_dtype(df[column]):
            raise DatasetFormatError(f"{where}: column {column!r} should hold strings, got {df[column].dtype}")
    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise DatasetFormatError(f"{where}: unknown split values {bad_split}; expected {list(SPLITS)}")
    upper = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad_label = df["label"][(df["label"] < 0) | (df["label"] >= upper)]
    if len(bad_label):
        expected = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise DatasetFormatError(f"{where}: {len(bad_label)} labels outside {expected}, e.g. {int(bad_label.iloc[0])}")
    if df["image_id"].duplicated().any():
        dup = df["image_id"][df["image_id"].duplicated()]
        raise DatasetFormatError(f"{where}: {len(dup)} duplicate image_id values, e.g. {int(dup.iloc[0])}")


def write_manifest(df: pd.DataFrame, path: Path) -> Path:
    """Validate and write the manifest as parquet, atomically (``<name>.partial`` then rename)."""
    path = Path(path)
    validate_manifest(df, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        df.loc[:, list(MANIFEST_COLUMNS)].to_parquet(partial, index=False)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by write_manifest and check its columns and dtypes."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path} does not exist; build the manifest first")
    df = pd.read_parquet(path)
    validate_manifest(df, str(path))
    return df


def combine_manifests(*frames: pd.DataFrame) -> pd.DataFrame:
    """One manifest from several sources (the release, user photos), validated: image_id stays unique."""
    columns = list(MANIFEST_COLUMNS)
    # Empty frames are left out: pandas 2 warns about (and may change the dtypes of) a concat with empty frames.
    parts = [df.loc[:, columns] for df in frames if len(df)] or [frames[0].loc[:, columns]]
    combined = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    validate_manifest(combined, f"manifest combined from sources {sorted(set(combined['source']))}")
    return combined


def summarize_manifest(df: pd.DataFrame) -> dict[str, int]:
    """Counts for logs and asset metadata: images per split, classes, images per class."""
    per_class = df["label"].value_counts()
    per_split = df["split"].value_counts()
    summary = {f"images_{split}": int(per_split.get(split, 0)) for split in SPLITS}
    summary.update(
        num_classes=int(df["label"].nunique()),
        images_per_class_min=int(per_class.min()) if len(per_class) else 0,
        images_per_class_max=int(per_class.max()) if len(per_class) else 0,
        num_images=int(len(df)),
    )
    return summary
