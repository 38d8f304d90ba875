"""Manifest rows in build order, their sample keys and metadata, and where shards and worker tasks are cut.

The build's output depends on the manifest's content only, never on its row order or on the number of workers:
rows are sorted, shards are cut by row position, and tasks never cross a split.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from plant_pipeline.ml.data.manifest import MANIFEST_COLUMNS, SPLITS
from plant_pipeline.ml.data.oxford import SOURCE as DEFAULT_SOURCE
from plant_pipeline.ml.shards.errors import ShardInputError


def sample_key(image_id: int, source: str = DEFAULT_SOURCE) -> str:
    """``image_00042``; images from another source are prefixed with it so keys stay unique."""
    key = f"image_{int(image_id):05d}"
    if source and source != DEFAULT_SOURCE:
        # A dot would split the WebDataset key; keep the prefix short enough for a ustar name.
        key = f"{re.sub(r'[^A-Za-z0-9_-]+', '-', source)[:40]}_{key}"
    return key


@dataclass(frozen=True)
class Row:
    """One manifest row, as the build uses it."""

    key: str
    image_id: int
    path: str
    label: int
    split: str
    source: str


def sample_meta(row: Row, names: Sequence[str], sha256: str) -> dict[str, Any]:
    """A stored sample's JSON member; ``sha256`` is the source file's, so leaks across splits can be found."""
    return {"image_id": row.image_id, "label": row.label, "name": names[row.label], "split": row.split,
            "source": row.source, "path": row.path, "sha256": sha256}


def manifest_rows(manifest: pd.DataFrame, names: Sequence[str]) -> dict[str, list[Row]]:
    """Validate the manifest and return its rows per split, in the fixed build order (split, image_id, source)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns and c != "source"]
    if missing:
        raise ShardInputError(f"manifest is missing columns {missing}; expected {list(MANIFEST_COLUMNS)}, "
                              f"found {list(manifest.columns)}")
    if len(manifest) == 0:
        raise ShardInputError("manifest has no rows; build the manifest (flower_manifest) first")
    frame = manifest.copy()
    if "source" not in frame.columns:
        frame["source"] = DEFAULT_SOURCE
    bad_split = sorted(set(frame["split"]) - set(SPLITS))
    if bad_split:
        raise ShardInputError(f"manifest has unknown split values {bad_split}; expected {list(SPLITS)}")
    labels = frame["label"].to_numpy()
    bad = (labels < 0) | (labels >= len(names))
    if bad.any():
        raise ShardInputError(f"manifest has {int(bad.sum())} labels outside 0..{len(names) - 1} "
                              f"(e.g. {int(labels[bad][0])}); are the category names the right list?")
    frame["split_rank"] = frame["split"].map({s: i for i, s in enumerate(SPLITS)})
    frame = frame.sort_values(["split_rank", "image_id", "source"], kind="stable")
    rows: dict[str, list[Row]] = {}
    seen: dict[str, str] = {}
    for image_id, path, label, split, source in zip(frame["image_id"], frame["path"], frame["label"],
                                                    frame["split"], frame["source"]):
        row = Row(sample_key(image_id, str(source)), int(image_id), str(path), int(label), str(split), str(source))
        if row.key in seen:
            raise ShardInputError(f"manifest rows {seen[row.key]!r} and {row.path!r} both give sample key "
                                  f"{row.key!r}; (source, image_id) must be unique")
        seen[row.key] = row.path
        rows.setdefault(row.split, []).append(row)
    return rows


def shard_bounds(n: int, samples_per_shard: int, min_shards: int) -> list[int]:
    """Row positions where a split's shards start: at least min(min_shards, n) shards, balanced in size.

    Cut by manifest position, so a quarantined image shrinks its own shard instead of moving every
    later sample into another one.
    """
    count = max(min(min_shards, n), math.ceil(n / samples_per_shard))
    return [(j * n) // count for j in range(count)]


def plan_batches(rows: dict[str, list], batch_size: int, workers: int) -> list[tuple[str, int, list]]:
    """(split, first position, rows) of every task, in manifest order.

    The last ``workers`` batches' worth of rows go out in quarter batches, so that the workers finish
    within a quarter batch of each other instead of one idling through the other's last full batch.
    """
    batches = [(split, start, split_rows[start:start + batch_size])
               for split, split_rows in rows.items() for start in range(0, len(split_rows), batch_size)]
    small, tail, tail_rows = max(1, batch_size // 4), [], 0
    while batches and workers > 1 and tail_rows < workers * batch_size:
        split, start, batch = batches.pop()
        tail[:0] = [(split, start + i, batch[i:i + small]) for i in range(0, len(batch), small)]
        tail_rows += len(batch)
    return batches + tail
