"""The store of photos taken in, ``<data>/user_photos/``: the ledger (what was taken in, and what is known of
the files that were not) and the manifest rewritten from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, overload

import numpy as np
import pandas as pd

from plant_pipeline.ml.data.categories import CATEGORY_NAMES, CategoryMap
from plant_pipeline.ml.data.manifest import MANIFEST_COLUMNS, read_manifest
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json

SOURCE = "user"
STORE_DIR = "user_photos"
LEDGER_FILE = "ledger.json"
MANIFEST_FILE = "manifest.parquet"
# 2 added "seen": the outcome of files not taken in, by path, size and mtime (version 1 ledgers still read).
# 3: labels are ids of the data's category map (category_map.json), no longer always Oxford's; "name" is the
# category's name, by which readers relabel. Versions 1 and 2 (Oxford's ids and names) still read.
LEDGER_FORMAT_VERSION = 3
# User photos are numbered from here, far above the release's 1..8189, so image_id stays unique in one manifest.
IMAGE_ID_BASE = 1_000_000

logger = logging.getLogger(__name__)


class IncomingError(UsageError):
    """The ledger or a setting of the intake is unusable; the message says what to fix."""


def ledger_path(data_root: Path) -> Path:
    return Path(data_root) / STORE_DIR / LEDGER_FILE


def manifest_path(data_root: Path) -> Path:
    return Path(data_root) / STORE_DIR / MANIFEST_FILE


def read_ledger(data_root: Path) -> list[dict[str, Any]]:
    """Every photo taken in so far, in the order they were taken in (empty before the first)."""
    return read_state(data_root)[0]


def read_state(data_root: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The ledger's photos, and what earlier runs learnt of the files they did not take in ("seen")."""
    path = ledger_path(data_root)
    if not path.is_file():
        return [], {}
    try:
        content = json.loads(path.read_text())
        photos, seen = content["photos"], content.get("seen", {})
        if not isinstance(photos, list) or not isinstance(seen, dict):
            raise TypeError("photos must be a list and seen an object")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise IncomingError(f"{path} is not a ledger written by the user_photos asset ({err}); restore it from "
                            "a backup, or delete it with the files next to it to take every photo in afresh") from err
    return photos, seen


def write_ledger(data_root: Path, photos: list[dict[str, Any]], seen: dict[str, dict[str, Any]]) -> Path:
    """Record the photos taken in and what is known of the other files, atomically."""
    return atomic_write_json(ledger_path(data_root),
                             {"format_version": LEDGER_FORMAT_VERSION, "photos": photos, "seen": seen})


def user_manifest(photos: list[dict[str, Any]]) -> pd.DataFrame:
    """The ledger as manifest rows: the same columns and dtypes as the Oxford manifest."""
    return pd.DataFrame({
        "image_id": np.array([p["image_id"] for p in photos], dtype=np.int64),
        "path": pd.Series([p["path"] for p in photos], dtype=str),
        "label": np.array([p["label"] for p in photos], dtype=np.int64),
        "split": pd.Series([p["split"] for p in photos], dtype=str),
        "source": pd.Series([p["source"] for p in photos], dtype=str),
    }, columns=list(MANIFEST_COLUMNS))


def photo_name(photo: dict[str, Any]) -> str:
    """A ledger record's category name (records of the first ledgers may lack it: their labels are Oxford's)."""
    return photo["name"] if "name" in photo else CATEGORY_NAMES[int(photo["label"])]


def relabelled_manifest(photos: list[dict[str, Any]], categories: CategoryMap) -> tuple[pd.DataFrame, list[str]]:
    """The ledger's photos as manifest rows labelled BY NAME with ``categories``' ids, and the names (sorted,
    once each) of the photos left out because ``categories`` lacks them."""
    kept, left_out = [], set()
    for photo in photos:
        category_id = categories.id_of(photo_name(photo))
        if category_id is None:
            left_out.add(photo_name(photo))
        else:
            kept.append({**photo, "label": category_id})
    return user_manifest(kept), sorted(left_out)


@overload
def read_user_manifest(data_root: Path) -> pd.DataFrame: ...
@overload
def read_user_manifest(data_root: Path, categories: CategoryMap) -> tuple[pd.DataFrame, list[str]]: ...


def read_user_manifest(data_root: Path, categories: CategoryMap | None = None):
    """The user photos' manifest (no rows before the user_photos asset first ran).

    With ``categories``: (the manifest labelled by name with its ids, from the ledger; the names of the photos'
    categories it lacks, whose photos are left out), as relabelled_manifest; the left-out names are logged too.
    """
    if categories is not None:
        manifest, left_out = relabelled_manifest(read_ledger(data_root), categories)
        if left_out:
            logger.warning("%d user photo categories are not in the category map of source %r and are left out: %s",
                           len(left_out), categories.source, ", ".join(repr(n) for n in left_out[:20]))
        return manifest, left_out
    path = manifest_path(data_root)
    return read_manifest(path) if path.is_file() else user_manifest([])
