"""Photos users drop into ``<data>/incoming/<category>/``: validated, and taken in once each by content hash.

A taken-in photo is copied (never moved) to ``<data>/user_photos/<sha256>.<ext>`` and recorded in the ledger
``user_photos/ledger.json``, from which ``user_photos/manifest.parquet`` (the Oxford manifest's columns,
source "user") is rewritten. Files with an unknown category or that do not decode are reported and left
where they are; nothing under ``incoming/`` is ever modified.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from .categories import CATEGORY_NAMES
from .fileutil import atomic_write_bytes, atomic_write_json, sha256_file
from .flowers import MANIFEST_COLUMNS, SPLITS, read_manifest, write_manifest
from .locking import output_lock
from .pixels import to_rgb

logger = logging.getLogger(__name__)

SOURCE = "user"
INCOMING_DIR = "incoming"
STORE_DIR = "user_photos"
LEDGER_FILE = "ledger.json"
MANIFEST_FILE = "manifest.parquet"
LEDGER_FORMAT_VERSION = 1
# User photos are numbered from here, far above the release's 1..8189, so image_id stays unique in one manifest.
IMAGE_ID_BASE = 1_000_000
# Errors PIL raises for files that are not (intact) images.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}


class IncomingError(ValueError):
    """The ledger or a setting of the intake is unusable; the message says what to fix."""


class UnknownCategoryError(ValueError):
    """A folder under incoming/ names no category."""


def _normalise(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name.casefold()).strip()


_LABEL_BY_NAME = {_normalise(name): label for label, name in enumerate(CATEGORY_NAMES)}


def category_label(folder: str) -> int:
    """The 0-based label a folder under incoming/ stands for.

    A category name (case, spaces, underscores and hyphens do not matter: ``Sweet_Pea``, ``sweet pea``) or
    the manifest's 0-based label as digits (``3`` is sweet pea, as in category_map.json).
    """
    if re.fullmatch(r"[0-9]+", folder.strip()):
        label = int(folder)
        if label < len(CATEGORY_NAMES):
            return label
        raise UnknownCategoryError(
            f"category id {label} is outside 0..{len(CATEGORY_NAMES) - 1} (ids are the manifest's 0-based labels, "
            f"as in category_map.json: 0 is {CATEGORY_NAMES[0]!r}, {len(CATEGORY_NAMES) - 1} is {CATEGORY_NAMES[-1]!r})"
        )
    label = _LABEL_BY_NAME.get(_normalise(folder))
    if label is None:
        raise UnknownCategoryError(
            f"unknown category {folder!r}: not one of the {len(CATEGORY_NAMES)} names in categories.py nor an id "
            f"0..{len(CATEGORY_NAMES) - 1}; rename the folder"
        )
    return label


def check_image(data: bytes) -> str:
    """The file extension for an intact image's bytes; raises ValueError saying why the bytes are not one.

    The same decode and RGB conversion flower_shards runs, so a photo taken in is never quarantined there.
    """
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # structure and checksums, without decoding the pixels
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
            image.load()  # a truncated file fails here
            to_rgb(image).load()
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read (JPEG, PNG, WebP...); convert it") from None
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot decode image: {type(err).__name__}: {err}") from None
    return _EXTENSIONS.get(kind, "." + kind.lower() if kind else ".img")


# --- the ledger ------------------------------------------------------------------------------------


def ledger_path(data_root: Path) -> Path:
    return Path(data_root) / STORE_DIR / LEDGER_FILE


def manifest_path(data_root: Path) -> Path:
    return Path(data_root) / STORE_DIR / MANIFEST_FILE


def read_ledger(data_root: Path) -> list[dict[str, Any]]:
    """Every photo taken in so far, in the order they were taken in (empty before the first)."""
    path = ledger_path(data_root)
    if not path.is_file():
        return []
    try:
        content = json.loads(path.read_text())
        photos = content["photos"]
    except (ValueError, KeyError, TypeError) as err:
        raise IncomingError(f"{path} is not a ledger written by the user_photos asset ({err}); restore it from "
                            "a backup, or delete it with the files next to it to take every photo in afresh") from err
    return photos


def user_manifest(photos: list[dict[str, Any]]) -> pd.DataFrame:
    """The ledger as manifest rows: the same columns and dtypes as the Oxford manifest."""
    return pd.DataFrame({
        "image_id": np.array([p["image_id"] for p in photos], dtype=np.int64),
        "path": pd.Series([p["path"] for p in photos], dtype=str),
        "label": np.array([p["label"] for p in photos], dtype=np.int64),
        "split": pd.Series([p["split"] for p in photos], dtype=str),
        "source": pd.Series([p["source"] for p in photos], dtype=str),
    }, columns=list(MANIFEST_COLUMNS))


def read_user_manifest(data_root: Path) -> pd.DataFrame:
    """The user photos' manifest (no rows before the user_photos asset first ran)."""
    path = manifest_path(data_root)
    return read_manifest(path) if path.is_file() else user_manifest([])


# --- scanning incoming/ ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """A new photo under incoming/: valid, of a known category, its content not yet taken in."""

    original: str  # relative to the data root, e.g. "incoming/rose/IMG_0001.jpg"
    sha256: str
    label: int
    extension: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    """A file under incoming/ that is not taken in, and why; it is left where it is."""

    original: str
    reason: str


@dataclass
class Scan:
    new: list[Found] = field(default_factory=list)
    duplicates: list[Skipped] = field(default_factory=list)  # same bytes as a photo taken in or found first
    rejected: list[Skipped] = field(default_factory=list)  # unknown category, not an image, unreadable
    known: int = 0  # files taken in by an earlier run, still in place

    @property
    def new_hashes(self) -> list[str]:
        return sorted(f.sha256 for f in self.new)


def _visible(path: Path) -> bool:
    # Hidden files: .DS_Store, and the partial copies many tools write before renaming.
    return not path.name.startswith(".")


def scan_incoming(data_root: Path, photos: list[dict[str, Any]] | None = None) -> Scan:
    """Look at every file under ``incoming/<category>/`` (one level, sorted by name); changes nothing.

    Content already in the ledger (``photos``, read from ``data_root`` when None) or already found earlier in
    this scan is a duplicate, whatever the file's name. A file still at the path, size and mtime it was taken
    in from is counted as known without being read again, so a tick costs a stat per known photo.
    """
    data_root = Path(data_root)
    incoming = data_root / INCOMING_DIR
    photos = read_ledger(data_root) if photos is None else photos
    taken = {p["sha256"]: p for p in photos}
    unchanged = {(p["original"], p["original_bytes"], p["original_mtime_ns"]): p["sha256"] for p in photos}
    scan = Scan()
    first: dict[str, str] = {}  # sha256 -> original, for files found in this scan
    if not incoming.is_dir():
        return scan
    for entry in sorted(filter(_visible, incoming.iterdir())):
        if not entry.is_dir():
            scan.rejected.append(Skipped(_rel(entry, data_root), f"not in a category folder: move it into "
                                         f"{INCOMING_DIR}/<category name or 0-based id>/"))
            continue
        try:
            label = category_label(entry.name)
        except UnknownCategoryError as err:
            files = [f for f in sorted(entry.iterdir()) if _visible(f) and f.is_file()]
            scan.rejected.extend(Skipped(_rel(f, data_root), str(err)) for f in files)
            continue
        for file in sorted(filter(_visible, entry.iterdir())):
            if file.is_file():
                _examine(file, label, data_root, scan, taken, unchanged, first)
    return scan


def _rel(path: Path, data_root: Path) -> str:
    return path.relative_to(data_root).as_posix()


def _examine(file: Path, label: int, data_root: Path, scan: Scan, taken: dict, unchanged: dict, first: dict) -> None:
    original = _rel(file, data_root)
    try:
        stat = file.stat()
        digest = unchanged.get((original, stat.st_size, stat.st_mtime_ns))
        if digest is not None:
            scan.known += 1
            return
        data = file.read_bytes()
    except OSError as err:
        scan.rejected.append(Skipped(original, f"unreadable: {err.strerror or err}"))
        return
    digest = hashlib.sha256(data).hexdigest()
    if digest in taken:
        photo = taken[digest]
        if photo["original"] == original:  # the same file, touched since: nothing new
            scan.known += 1
        else:
            scan.duplicates.append(Skipped(original, f"same content as {photo['original']}, taken in on "
                                           f"{photo['added_at'][:10]} as {photo['name']!r}"))
        return
    if digest in first:
        scan.duplicates.append(Skipped(original, f"same content as {first[digest]}, which is taken in instead"))
        return
    try:
        extension = check_image(data)
    except ValueError as err:
        scan.rejected.append(Skipped(original, str(err)))
        return
    first[digest] = original
    scan.new.append(Found(original, digest, label, extension, len(data), stat.st_mtime_ns))


# --- taking photos in ------------------------------------------------------------------------------


@dataclass
class IngestResult:
    added: list[dict[str, Any]]  # ledger records of the photos this call took in
    photos: list[dict[str, Any]]  # the whole ledger afterwards
    scan: Scan
    rejected: list[Skipped]  # the scan's, plus files that changed while being taken in
    ledger_path: Path
    manifest_path: Path


def ingest(data_root: Path, split: str = "train") -> IngestResult:
    """Take every new photo under ``incoming/`` in: copy it into the store, append it to the ledger,
    rewrite the user manifest. Idempotent: a second call with nothing new changes nothing.

    Each write is atomic and the ledger is written after the copies, so a run killed midway leaves the
    previous ledger, and the next run takes the same photos in (reusing the copies already made).
    """
    if split not in SPLITS:
        raise IncomingError(f"split must be one of {list(SPLITS)}; got {split!r}")
    data_root = Path(data_root)
    store = data_root / STORE_DIR
    # One intake at a time: two runs must not both append to the ledger.
    with output_lock(store / ".lock", owner=f"user photo intake into {split}", wait_s=600,
                     what=f"the user photo store {store}"):
        photos = read_ledger(data_root)
        scan = scan_incoming(data_root, photos)
        rejected = list(scan.rejected)
        added: list[dict[str, Any]] = []
        next_id = max((p["image_id"] for p in photos), default=IMAGE_ID_BASE) + 1
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for found in scan.new:
            try:
                data = (data_root / found.original).read_bytes()
            except OSError as err:
                rejected.append(Skipped(found.original, f"unreadable: {err.strerror or err}"))
                continue
            if hashlib.sha256(data).hexdigest() != found.sha256:
                rejected.append(Skipped(found.original, "changed while being taken in; taken in on the next run"))
                continue
            path = f"{STORE_DIR}/{found.sha256}{found.extension}"
            target = data_root / path
            # The name is the content's hash: a copy left by an interrupted run is reused once verified.
            if not (target.is_file() and sha256_file(target) == found.sha256):
                atomic_write_bytes(target, data)
            added.append({
                "image_id": next_id, "sha256": found.sha256, "label": found.label, "name": CATEGORY_NAMES[found.label],
                "split": split, "source": SOURCE, "path": path, "original": found.original,
                "original_bytes": found.size, "original_mtime_ns": found.mtime_ns, "added_at": now,
            })
            next_id += 1
        photos = photos + added
        if added or not ledger_path(data_root).is_file():
            atomic_write_json(ledger_path(data_root), {"format_version": LEDGER_FORMAT_VERSION, "photos": photos})
        # Rewritten every time, so a run killed between the two writes is repaired by the next one.
        write_manifest(user_manifest(photos), manifest_path(data_root))
    # Callers report the rejected files one by one (the asset's log, the sensor's skip reason).
    logger.info("took in %d new photos (%d duplicates, %d rejected, %d known); %d user photos in all",
                len(added), len(scan.duplicates), len(rejected), scan.known, len(photos))
    return IngestResult(added, photos, scan, rejected, ledger_path(data_root), manifest_path(data_root))
