"""The photos already in the data, by sha256: the files of the chosen source's manifest and of the Oxford release's,
so that a photo of the release (a test photo, say) dropped into ``incoming/`` is refused rather than taken in twice.

Hashing every file of the release on each scan would read it whole, so the hashes are kept in
``user_photos/data_photos.json``, rebuilt only when a manifest's bytes change.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plant_pipeline.ml.data.incoming.ledger import STORE_DIR
from plant_pipeline.ml.data.manifest import DATASET_MANIFEST, OXFORD_MANIFEST, read_manifest
from plant_pipeline.ml.files import atomic_write_text, sha256_file

CACHE_FILE = "data_photos.json"
CACHE_FORMAT_VERSION = 1
# The data root's manifests, first wins: the chosen source's (what the shards are built from), then the Oxford
# release's.
DATA_MANIFESTS = (DATASET_MANIFEST, OXFORD_MANIFEST)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPhoto:
    """A photo of a manifest: the file a user photo with the same bytes would copy."""

    image_id: int
    split: str
    path: str  # as the manifest has it: relative to the data root, or absolute

    @property
    def reason(self) -> str:
        """Why a user photo with these bytes is refused."""
        return (f"already in the data as image {self.image_id} ({self.split} split, {self.path}): taken in again, "
                f"the same photo would be in the data twice, perhaps in two splits; delete this copy")


def cache_path(data_root: Path) -> Path:
    return Path(data_root) / STORE_DIR / CACHE_FILE


def data_manifests(data_root: Path) -> list[Path]:
    return [Path(data_root) / name for name in DATA_MANIFESTS]


def _versions(data_root: Path, manifests: Sequence[Path]) -> list[list[str]]:
    """[path, sha256] of each manifest that exists: the cache's key."""
    return [[str(m), sha256_file(m)] for m in (Path(data_root) / m for m in manifests) if m.is_file()]


def load_data_photos(data_root: Path, manifests: Sequence[Path] | None = None, *,
                     build: bool) -> dict[str, DataPhoto] | None:
    """sha256 -> the photo of the data with those bytes, for every file of ``manifests`` (the data root's,
    DATA_MANIFESTS, when None; rows of source "user" are the ledger's business and left out).

    From the cache when the manifests' bytes are those it was built from; else rebuilt (every file hashed)
    when ``build``, or None without (the sensor, which reads no photo: the run decides). Files a manifest
    names but the disk lacks are retried by each build until they appear.
    """
    data_root = Path(data_root)
    manifests = data_manifests(data_root) if manifests is None else list(manifests)
    versions = _versions(data_root, manifests)
    if not versions:
        return {}
    path = cache_path(data_root)
    cached = _read_cache(path)
    if cached is not None and cached["manifests"] == versions:
        photos = {sha: DataPhoto(*row) for sha, row in cached["photos"].items()}
        missing = [DataPhoto(*row) for row in cached["missing"]]
        if build and missing:
            found, missing = _hash_files(data_root, missing)
            if found:
                photos = {**found, **photos}
                _write_cache(path, versions, photos, missing)
        return photos
    if not build:
        return None
    started = time.monotonic()
    rows: list[DataPhoto] = []
    seen_paths: set[str] = set()
    for manifest_path, _ in versions:
        manifest = read_manifest(Path(manifest_path))
        manifest = manifest[manifest["source"] != "user"]
        for image_id, file, split in zip(manifest["image_id"], manifest["path"], manifest["split"]):
            # The chosen source is often Oxford's: its files are hashed once, under the first manifest's ids.
            if str(data_root / file) not in seen_paths:
                seen_paths.add(str(data_root / file))
                rows.append(DataPhoto(int(image_id), str(split), str(file)))
    photos, missing = _hash_files(data_root, rows)
    _write_cache(path, versions, photos, missing)
    logger.info("hashed the %d photos of %s in %.1f s (%d missing on disk); cached in %s", len(rows),
                ", ".join(v[0] for v in versions), time.monotonic() - started, len(missing), path)
    return photos


def _hash_files(data_root: Path, rows: list[DataPhoto]) -> tuple[dict[str, DataPhoto], list[DataPhoto]]:
    """The rows' files by sha256 (the first row of the same bytes wins), and the rows whose file is missing."""
    photos: dict[str, DataPhoto] = {}
    missing: list[DataPhoto] = []
    for row in rows:
        try:
            digest = sha256_file(data_root / row.path)
        except OSError:  # deleted, or never extracted: not in the data as far as the intake can tell
            missing.append(row)
            continue
        photos.setdefault(digest, row)
    return photos, missing


def _read_cache(path: Path) -> dict[str, Any] | None:
    """The cache's content, or None when it is absent or unusable (it is then rebuilt, never trusted)."""
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
        if content.get("format_version") != CACHE_FORMAT_VERSION:
            return None
        _ = content["manifests"], content["photos"].items(), list(content["missing"])
        return content
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("%s is unreadable (%s): rebuilt from the manifests", path, err)
        return None


def _write_cache(path: Path, versions: list[list[str]], photos: dict[str, DataPhoto],
                 missing: list[DataPhoto]) -> None:
    def row(photo: DataPhoto) -> list:
        return [photo.image_id, photo.split, photo.path]

    content = {"format_version": CACHE_FORMAT_VERSION, "manifests": versions,
               "photos": {sha: row(photo) for sha, photo in photos.items()}, "missing": [row(p) for p in missing]}
    atomic_write_text(path, json.dumps(content, separators=(",", ":")))
