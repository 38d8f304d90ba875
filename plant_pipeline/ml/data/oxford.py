"""Read the Oxford Flowers 102 label and split files and build the one-row-per-image manifest.

``imagelabels.mat`` holds 1-based labels (index i is image_id i+1); ``setid.mat`` holds the 1-based
image ids of each split. The manifest stores 0-based labels and paths relative to the dataset root.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from plant_pipeline.ml.data.categories import NUM_CLASSES
from plant_pipeline.ml.data.manifest import SPLITS, DatasetFormatError

logger = logging.getLogger(__name__)

SOURCE = "oxford_flowers"
SPLIT_VARS: dict[str, str] = {"train": "trnid", "validation": "valid", "test": "tstid"}
_EXAMPLES = 5


def image_relpath(image_id: int, image_dir: str = "jpg") -> str:
    """The release's file name for an image id: 1 -> "jpg/image_00001.jpg"."""
    return f"{image_dir}/image_{image_id:05d}.jpg"


def _load_mat(mat_path: Path) -> dict[str, object]:
    mat_path = Path(mat_path)
    if not mat_path.is_file():
        raise DatasetFormatError(f"{mat_path} does not exist; fetch the release first")
    try:
        data = scipy.io.loadmat(mat_path)
    except Exception as exc:  # scipy raises ValueError, MatReadError, TypeError... for non-.mat input
        raise DatasetFormatError(
            f"{mat_path} is not a readable MATLAB .mat file ({type(exc).__name__}: {exc})"
        ) from exc
    return {key: value for key, value in data.items() if not key.startswith("__")}


def _int_vector(mat_path: Path, name: str, value: object) -> np.ndarray:
    """Flatten a (1, N) / (N, 1) / (N,) numeric variable to int64, refusing fractions and matrices."""
    array = np.asarray(value)
    if array.ndim > 2 or (array.ndim == 2 and min(array.shape) > 1) or array.size == 0:
        raise DatasetFormatError(
            f"{mat_path}: variable {name!r} should be a non-empty vector, got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DatasetFormatError(f"{mat_path}: variable {name!r} should be numeric, got {array.dtype}")
    flat = array.reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        bad = ~np.isfinite(flat) | (flat != np.round(flat))
        if bad.any():
            raise DatasetFormatError(
                f"{mat_path}: variable {name!r} holds {int(bad.sum())} non-integer values, "
                f"e.g. {flat[bad][0].item()!r} at position {int(np.flatnonzero(bad)[0])}"
            )
    return flat.astype(np.int64)


def _examples(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:_EXAMPLES])
    return shown + (", ..." if len(values) > _EXAMPLES else "")


def read_labels(mat_path: Path) -> np.ndarray:
    """0-based int64 labels from ``imagelabels.mat``; element i is the label of image_id i+1."""
    variables = _load_mat(mat_path)
    if "labels" not in variables:
        raise DatasetFormatError(
            f"{mat_path}: no variable 'labels' (found {sorted(variables) or 'none'}); "
            "this is not imagelabels.mat from the Oxford Flowers release"
        )
    labels = _int_vector(mat_path, "labels", variables["labels"])
    bad = (labels < 1) | (labels > NUM_CLASSES)
    if bad.any():
        positions = np.flatnonzero(bad)
        raise DatasetFormatError(
            f"{mat_path}: {len(positions)} labels outside 1..{NUM_CLASSES}, e.g. value "
            f"{int(labels[positions[0]])} for image_id {int(positions[0]) + 1} "
            f"(bad values: {_examples(np.unique(labels[positions]))})"
        )
    return labels - 1


def read_splits(mat_path: Path, num_images: int) -> dict[str, np.ndarray]:
    """1-based int64 image ids per split from ``setid.mat`` (trnid, valid, tstid).

    The splits must lie within 1..num_images, hold no duplicates, be disjoint and together cover
    every labelled image.
    """
    variables = _load_mat(mat_path)
    missing = [var for var in SPLIT_VARS.values() if var not in variables]
    if missing:
        raise DatasetFormatError(
            f"{mat_path}: missing split variables {missing} (found {sorted(variables) or 'none'}); "
            f"expected {list(SPLIT_VARS.values())}"
        )
    splits: dict[str, np.ndarray] = {}
    for split in SPLITS:
        var = SPLIT_VARS[split]
        ids = _int_vector(mat_path, var, variables[var])
        bad = (ids < 1) | (ids > num_images)
        if bad.any():
            raise DatasetFormatError(
                f"{mat_path}: {var} ({split}) has {int(bad.sum())} image ids outside 1..{num_images} "
                f"(the number of labels), e.g. {_examples(ids[bad])}"
            )
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DatasetFormatError(
                f"{mat_path}: {var} ({split}) lists {int((counts > 1).sum())} image ids more than once, "
                f"e.g. {_examples(unique[counts > 1])}"
            )
        splits[split] = ids

    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            shared = np.intersect1d(splits[first], splits[second])
            if len(shared):
                raise DatasetFormatError(
                    f"{mat_path}: splits {first} ({SPLIT_VARS[first]}) and {second} "
                    f"({SPLIT_VARS[second]}) share {len(shared)} image ids, e.g. {_examples(shared)}"
                )
    covered = np.concatenate([splits[s] for s in SPLITS])
    uncovered = np.setdiff1d(np.arange(1, num_images + 1), covered)
    if len(uncovered):
        raise DatasetFormatError(
            f"{mat_path}: {len(uncovered)} of {num_images} labelled images are in no split, "
            f"e.g. image ids {_examples(uncovered)}"
        )
    return splits


def build_manifest(
    dataset_root: Path, labels_mat: Path, setid_mat: Path, image_dir: str = "jpg"
) -> pd.DataFrame:
    """One row per image: image_id, path (relative to dataset_root), label (0-based), split, source.

    Every image file must exist under ``dataset_root/image_dir``.
    """
    dataset_root = Path(dataset_root)
    labels = read_labels(labels_mat)
    splits = read_splits(setid_mat, len(labels))

    image_ids = np.arange(1, len(labels) + 1, dtype=np.int64)
    split_of = np.empty(len(labels), dtype=object)
    for split, ids in splits.items():
        split_of[ids - 1] = split
    paths = [image_relpath(int(i), image_dir) for i in image_ids]

    folder = dataset_root / image_dir
    if not folder.is_dir():
        # A missing folder is a layout problem (an archive without jpg/, a wrong root), not missing images.
        entries = sorted(os.listdir(dataset_root)) if dataset_root.is_dir() else []
        held = ", ".join(e + "/" if (dataset_root / e).is_dir() else e for e in entries if not e.startswith("."))
        raise DatasetFormatError(
            f"{folder} does not exist, so none of the {len(paths)} images can be found; {dataset_root} "
            f"holds: {held or 'nothing'}. The release's images must lie in {image_dir}/ directly under "
            "the dataset root: check the archive's layout or the dataset root given."
        )
    # One directory listing instead of 8,189 stat calls.
    present = set(os.listdir(folder))
    missing = [p for p in paths if p.rsplit("/", 1)[-1] not in present]
    if missing:
        shown = ", ".join(missing[:_EXAMPLES]) + (", ..." if len(missing) > _EXAMPLES else "")
        raise DatasetFormatError(
            f"{len(missing)} of {len(paths)} images are missing under {dataset_root}: {shown}. "
            "Extract 102flowers.tgz into the dataset root first."
        )

    frame = pd.DataFrame(
        {
            "image_id": image_ids,
            "path": pd.Series(paths, dtype=str),
            "label": labels.astype(np.int64),
            "split": pd.Series(split_of, dtype=str),
            "source": pd.Series([SOURCE] * len(labels), dtype=str),
        }
    )
    logger.info("manifest: %d images, %s", len(frame), frame["split"].value_counts().to_dict())
    return frame
