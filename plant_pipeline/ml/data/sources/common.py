"""What every source of a person's own photos returns (``SourceData``), and the pieces they share: content-derived
image ids and data versions, the split names accepted, and the manifest built from (sha256, path, category, split)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.data.manifest import MANIFEST_COLUMNS, validate_manifest
from plant_pipeline.ml.data.splits import content_split
from plant_pipeline.ml.errors import UsageError

# Split folder / DatasetDict split names accepted, and the manifest split each stands for.
SPLIT_ALIASES: dict[str, str] = {"train": "train", "validation": "validation", "valid": "validation",
                                 "val": "validation", "test": "test"}


class SourceError(UsageError):
    """A source of photos (an image folder, a ``datasets`` dataset) that cannot be read as given."""


@dataclass
class SourceData:
    manifest: pd.DataFrame  # MANIFEST_COLUMNS plus "sha256" (hex of the file's bytes)
    categories: CategoryMap  # names in id order; manifest["label"] are ids into it
    warnings: list[str] = field(default_factory=list)
    content_version: str = ""  # 16 hex over the sorted (sha256, category name, split): paths and ids play no part


def content_image_id(sha256_hex: str) -> int:
    """A stable int64 image_id from the photo's bytes (60 bits, so always positive)."""
    return int(sha256_hex[:15], 16)


def content_version(triples: Iterable[tuple[str, str, str]]) -> str:
    """16 hex over the sorted (sha256, category name, split) triples: the same photos give the same version."""
    digest = hashlib.sha256()
    for sha, name, split in sorted(triples):
        digest.update(f"{sha}\t{name}\t{split}\n".encode())
    return digest.hexdigest()[:16]


def build_source_data(rows: list[tuple[str, str, int, str]], categories: CategoryMap, source: str,
                      warnings: list[str], where: str) -> SourceData:
    """``rows`` of (sha256, path, label, split), one per distinct photo, as a validated ``SourceData``."""
    manifest = pd.DataFrame({
        "image_id": np.array([content_image_id(sha) for sha, _, _, _ in rows], dtype=np.int64),
        "path": pd.Series([path for _, path, _, _ in rows], dtype=object),
        "label": np.array([label for _, _, label, _ in rows], dtype=np.int64),
        "split": pd.Series([split for _, _, _, split in rows], dtype=object),
        "source": pd.Series([source] * len(rows), dtype=object),
        "sha256": pd.Series([sha for sha, _, _, _ in rows], dtype=object),
    }, columns=[*MANIFEST_COLUMNS, "sha256"])
    manifest = manifest.sort_values("image_id", kind="stable").reset_index(drop=True)
    validate_manifest(manifest, where, num_classes=len(categories))
    version = content_version((sha, categories.names[label], split) for sha, _, label, split in rows)
    return SourceData(manifest=manifest, categories=categories, warnings=warnings, content_version=version)


_SHOWN = 5  # items listed in one warning; the count says how many more


def listed(items: Sequence[object]) -> str:
    shown = ", ".join(str(p) for p in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def distinct_rows(by_sha: Mapping[str, list[tuple[str, str, str | None]]], categories: CategoryMap,
                  fractions: Sequence[float], warnings: list[str]) -> list[tuple[str, str, int, str]]:
    """(sha256, path, label, split) rows, one per distinct photo, from ``by_sha``: sha -> [(category, path, split
    or None)]. The same bytes in one category are kept once; in two categories, neither is taken (no guessing which
    label is right); a photo given two splits, or none, gets its content split, so it can never leak across splits.
    Appends a named warning for each kind of case found."""
    rows, duplicates, conflicts, moved = [], [], [], []
    for sha, entries in sorted(by_sha.items()):
        entries = sorted(entries, key=lambda e: e[1])
        if len({name for name, _, _ in entries}) > 1:
            conflicts.append(" vs ".join(f"{path} ({name})" for name, path, _ in entries))
            continue
        name, path, split = entries[0]
        if len(entries) > 1:
            duplicates.append(" = ".join(p for _, p, _ in entries))
        splits = {s for _, _, s in entries}
        if None in splits or len(splits) > 1:
            if len(splits) > 1:
                moved.append(path)
            split = content_split(sha, fractions)
        rows.append((sha, path, categories.id_of(name), split))
    if duplicates:
        warnings.append(f"duplicate photos kept once: {len(duplicates)}, e.g. {listed(duplicates)}")
    if conflicts:
        warnings.append(f"the same photo under two categories, neither taken: {len(conflicts)}, {listed(conflicts)}")
    if moved:
        warnings.append(f"photos given two splits, placed by their content hash instead: {listed(moved)}")
    return rows
