"""Photos users drop into ``<data>/incoming/<category>/`` (subfolders too): validated, and taken in once each by
content hash.

A taken-in photo is copied (never moved) to ``<data>/user_photos/<sha256>.<ext>`` and recorded in the ledger
``user_photos/ledger.json``, from which ``user_photos/manifest.parquet`` (the Oxford manifest's columns,
source "user") is rewritten. Files with an unknown category, symlinks, files over the size limit, files that
do not decode and the same content under two categories are reported and left where they are; files still
being written wait; nothing under ``incoming/`` is ever modified. Listing is cheap (a stat per file) and reads no photo: the sensor does only
that; the run hashes and decodes, and the ledger remembers each file's outcome by path, size and mtime so
that an unchanged file is never read twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat as stat_module
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.data.manifest import MANIFEST_COLUMNS, SPLITS, read_manifest, write_manifest
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_bytes, atomic_write_json, sha256_file
from plant_pipeline.ml.locking import output_lock
from plant_pipeline.ml.shards.pixels import DECODE_ERRORS, to_rgb

logger = logging.getLogger(__name__)

SOURCE = "user"
INCOMING_DIR = "incoming"
STORE_DIR = "user_photos"
LEDGER_FILE = "ledger.json"
MANIFEST_FILE = "manifest.parquet"
# 2 added "seen": the outcome of files not taken in, by path, size and mtime (version 1 ledgers still read).
LEDGER_FORMAT_VERSION = 2
# Files larger than this are refused from their size alone (a video, a disk image); a setting of user_photos.
DEFAULT_MAX_BYTES = 50_000_000
# A file modified less than this long ago may still be being written (a copy, an unzip): it waits.
DEFAULT_SETTLE_S = 5.0
# How much of a file is read to tell whether it is an image at all, before it is read whole.
HEAD_BYTES = 64 * 1024
# User photos are numbered from here, far above the release's 1..8189, so image_id stays unique in one manifest.
IMAGE_ID_BASE = 1_000_000
# Errors PIL raises for files that are not (intact) images.
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}
_NOT_AN_IMAGE = "not an image Pillow can read (JPEG, PNG, WebP...); convert it"


class IncomingError(UsageError):
    """The ledger or a setting of the intake is unusable; the message says what to fix."""


class UnknownCategoryError(UsageError):
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
        raise ValueError(_NOT_AN_IMAGE) from None
    except DECODE_ERRORS as err:
        raise ValueError(f"cannot decode image: {type(err).__name__}: {err}") from None
    return _EXTENSIONS.get(kind, "." + kind.lower() if kind else ".img")


# --- the ledger ------------------------------------------------------------------------------------


def ledger_path(data_root: Path) -> Path:
    return Path(data_root) / STORE_DIR / LEDGER_FILE


def manifest_path(data_root: Path) -> Path:
    return Path(data_root) / STORE_DIR / MANIFEST_FILE


def read_ledger(data_root: Path) -> list[dict[str, Any]]:
    """Every photo taken in so far, in the order they were taken in (empty before the first)."""
    return _read_state(data_root)[0]


def _read_state(data_root: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
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


# --- listing incoming/: a stat per file, nothing read ----------------------------------------------


def display_name(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes of a name that are not UTF-8 (some unzipped archives) as ``\\xff``.

    Python hands such names over with lone surrogates, which JSON, Parquet and Dagster's event log refuse.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Listed:
    """A regular file in a category folder, as listed: where it is and its stat, not its content."""

    original: str  # relative to the data root, through display_name, e.g. "incoming/rose/trip/IMG_0001.jpg"
    path: Path
    label: int
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.original, self.size, self.mtime_ns)


@dataclass(frozen=True)
class Found:
    """A new photo under incoming/: hashed, of a known category, its content not yet taken in."""

    original: str
    sha256: str
    label: int
    size: int
    mtime_ns: int
    path: Path


@dataclass(frozen=True)
class Skipped:
    """A file under incoming/ that is not taken in, and why; it is left where it is."""

    original: str
    reason: str


@dataclass
class Scan:
    new: list[Found] = field(default_factory=list)  # hashed: the run decodes them and takes the valid ones in
    pending: list[Listed] = field(default_factory=list)  # not read yet (a listing-only scan): for the run
    duplicates: list[Skipped] = field(default_factory=list)  # same bytes as a photo taken in or found first
    rejected: list[Skipped] = field(default_factory=list)  # refused; unchanged, they are not looked at again
    waiting: list[Skipped] = field(default_factory=list)  # still being written: looked at on a later tick
    known: int = 0  # files taken in by an earlier run, still in place
    # What is known of files not taken in, by original: their size, mtime, sha256 and, when refused for their
    # content, the reason. Kept in the ledger so that no run reads an unchanged file twice.
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def to_read(self) -> list[tuple[str, int, int]]:
        """(original, size, mtime_ns) of every file a run would read: the pending and the new, sorted."""
        return sorted([p.key for p in self.pending] + [(f.original, f.size, f.mtime_ns) for f in self.new])


def _entries(folder: str | os.PathLike) -> list[os.DirEntry]:
    # Hidden entries are skipped: .DS_Store, and the partial copies many tools write before renaming.
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _refusal(entry: os.DirEntry) -> str | None:
    """Why an entry is refused for what it is rather than what it holds; None for a regular file."""
    if entry.is_symlink():  # never followed: it could take in photos from elsewhere, or read /etc/passwd
        return f"a symbolic link, not followed: copy the photo itself into {INCOMING_DIR}/"
    if not entry.is_file(follow_symlinks=False):
        return "not a regular file (a pipe, socket or device): copy a photo here instead"
    return None


def _walk(folder: str, rel: str, refused: list[Skipped]) -> Iterator[tuple[os.DirEntry, str]]:
    """The regular files under ``folder`` at any depth, with their paths relative to the data root."""
    stack = [(folder, rel)]
    while stack:
        path, rel = stack.pop()
        try:
            entries = _entries(path)
        except OSError as err:
            refused.append(Skipped(display_name(rel), f"folder unreadable: {err.strerror or err}"))
            continue
        folders = []
        for entry in entries:
            name = f"{rel}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                folders.append((entry.path, name))
            elif (reason := _refusal(entry)) is not None:
                refused.append(Skipped(display_name(name), reason))
            else:
                yield entry, name
        stack.extend(reversed(folders))


def list_incoming(data_root: Path) -> tuple[list[Listed], list[Skipped]]:
    """The files under ``incoming/<category>/`` at any depth (a subfolder's photos belong to the category
    folder above it), sorted; and the files refused for where or what they are: outside a category folder, in
    a folder that names no category, a symbolic link (never followed; ``incoming/`` itself may be one), not a
    regular file. Reads no file: one stat each.
    """
    incoming = Path(data_root) / INCOMING_DIR
    listed: list[Listed] = []
    refused: list[Skipped] = []
    if not incoming.is_dir():
        return listed, refused
    for top in _entries(incoming):
        rel = f"{INCOMING_DIR}/{top.name}"
        if top.is_symlink() or not top.is_dir(follow_symlinks=False):
            reason = _refusal(top) or (f"not in a category folder: move it into {INCOMING_DIR}/<category name or "
                                       "0-based id>/")
            refused.append(Skipped(display_name(rel), reason))
            continue
        try:
            label, unknown = category_label(display_name(top.name)), None
        except UnknownCategoryError as err:
            label, unknown = -1, str(err)
        for entry, name in _walk(top.path, rel, refused):
            original = display_name(name)
            if unknown is not None:
                refused.append(Skipped(original, unknown))
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed since it was listed
                continue
            except OSError as err:
                refused.append(Skipped(original, f"unreadable: {err.strerror or err}"))
                continue
            listed.append(Listed(original, Path(entry.path), label, stat.st_size, stat.st_mtime_ns))
    listed.sort(key=lambda item: item.original)
    return listed, refused


# --- reading a file: its header first, then its hash ------------------------------------------------


class _ChangedError(Exception):
    """The file is not the one listed any more (written to, replaced): it is looked at again later."""


def _open_file(path: Path) -> BinaryIO:
    """A file under incoming/, opened for reading: never through a symlink put in its place since it was listed,
    and without blocking on a pipe. Every read of incoming/ goes through here."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    return os.fdopen(os.open(path, flags), "rb")


def _check_unchanged(handle: BinaryIO, item: Listed | Found) -> None:
    now = os.fstat(handle.fileno())
    if not stat_module.S_ISREG(now.st_mode) or (now.st_size, now.st_mtime_ns) != (item.size, item.mtime_ns):
        raise _ChangedError("changed while being read: looked at again once it has stopped changing")


def _sniff(head: bytes) -> str | None:
    """Why a file starting with ``head`` is not an image Pillow reads; None when it may be one."""
    try:
        with Image.open(io.BytesIO(head)):
            return None
    except UnidentifiedImageError:
        Image.init()
        # A known signature whose header runs past the head (a JPEG with a large EXIF block): the decode decides.
        if any(accept is not None and accept(head[:16]) for _, accept in Image.OPEN.values()):
            return None
        return _NOT_AN_IMAGE
    except DECODE_ERRORS:
        return None


def _hash_file(item: Listed) -> str:
    """The file's sha256, read once in blocks; raises ValueError if its header is no image's."""
    with _open_file(item.path) as handle:
        _check_unchanged(handle, item)
        head = handle.read(HEAD_BYTES)
        reason = _sniff(head)
        if reason is not None:
            raise ValueError(reason)
        digest = hashlib.sha256(head)
        while block := handle.read(1 << 20):
            digest.update(block)
        _check_unchanged(handle, item)
    return digest.hexdigest()


def _read_whole(found: Found) -> bytes:
    with _open_file(found.path) as handle:
        _check_unchanged(handle, found)
        data = handle.read()
        _check_unchanged(handle, found)
    if hashlib.sha256(data).hexdigest() != found.sha256:
        raise _ChangedError("changed while being taken in: taken in once it has stopped changing")
    return data


# --- scanning incoming/ ----------------------------------------------------------------------------


def _check_limits(max_bytes: int, settle_s: float) -> None:
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise IncomingError(f"max_bytes (the largest photo taken in) must be a positive number of bytes; "
                            f"got {max_bytes!r}")
    if not settle_s >= 0:
        raise IncomingError(f"settle_s (how long a file must be unchanged) must be >= 0 seconds; got {settle_s!r}")


def scan_incoming(data_root: Path, *, read: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
                  settle_s: float = DEFAULT_SETTLE_S) -> Scan:
    """Look at every file under ``incoming/<category>/``; changes nothing.

    With ``read=False`` (the sensor) no file under incoming/ is opened: files are recognised by path, size
    and mtime from the ledger (taken in, or seen by an earlier run), and the rest are ``pending``. With
    ``read=True`` (the run) each pending file's header is sniffed and its content hashed. Content already in
    the ledger or found earlier in this scan is a duplicate, whatever the file's name; the same content under
    two categories is refused in all its places until a person removes the wrong copies.
    """
    photos, seen = _read_state(data_root)
    return _scan(Path(data_root), photos, seen, read=read, max_bytes=max_bytes, settle_s=settle_s)


def _scan(data_root: Path, photos: list[dict[str, Any]], seen: dict[str, dict[str, Any]], *, read: bool,
          max_bytes: int, settle_s: float) -> Scan:
    _check_limits(max_bytes, settle_s)
    taken = {p["sha256"]: p for p in photos}
    unchanged = {(p["original"], p["original_bytes"], p["original_mtime_ns"]) for p in photos}
    listed, refused = list_incoming(data_root)
    scan = Scan(rejected=refused)
    now, settle_ns = time.time_ns(), int(settle_s * 1e9)
    hashed: list[tuple[Listed, str]] = []
    for item in listed:
        if item.key in unchanged:
            scan.known += 1
        elif item.size > max_bytes:
            scan.rejected.append(Skipped(item.original, f"{item.size / 1e6:.1f} MB, larger than the "
                                         f"{max_bytes / 1e6:g} MB limit for a photo (user_photos' max_photo_mb); "
                                         "shrink it, or raise the limit for a run"))
        elif item.size == 0:
            scan.rejected.append(Skipped(item.original, "empty file"))
        # Modified within settle_s of now: a writer may still be at it. (An mtime far in the future is a
        # preserved, wrong timestamp, not a file being written; the read checks the file did not change.)
        elif abs(now - item.mtime_ns) < settle_ns:
            scan.waiting.append(Skipped(item.original, f"modified in the last {settle_s:g} s, perhaps still being "
                                        "written: looked at once it has stopped changing"))
        elif (memo := _remembered(seen, item)) is not None:
            scan.seen[item.original] = memo
            if memo.get("reason"):
                scan.rejected.append(Skipped(item.original, memo["reason"]))
            else:
                hashed.append((item, memo["sha256"]))
        elif not read:
            scan.pending.append(item)
        else:
            try:
                digest = _hash_file(item)
            except ValueError as err:  # not an image: remembered, so it is not read again while unchanged
                scan.seen[item.original] = {"bytes": item.size, "mtime_ns": item.mtime_ns, "reason": str(err)}
                scan.rejected.append(Skipped(item.original, str(err)))
                continue
            except _ChangedError as err:
                scan.waiting.append(Skipped(item.original, str(err)))
                continue
            except OSError as err:  # not remembered: it may pass
                scan.rejected.append(Skipped(item.original, f"unreadable: {err.strerror or err}"))
                continue
            scan.seen[item.original] = {"bytes": item.size, "mtime_ns": item.mtime_ns, "sha256": digest}
            hashed.append((item, digest))
    _sort_by_content(hashed, taken, scan)
    return scan


def _remembered(seen: dict[str, dict[str, Any]], item: Listed) -> dict[str, Any] | None:
    """What an earlier run learnt of this file (its hash, or why it was refused), if it has not changed since."""
    memo = seen.get(item.original)
    if not isinstance(memo, dict) or (memo.get("bytes"), memo.get("mtime_ns")) != (item.size, item.mtime_ns):
        return None
    return memo if memo.get("reason") or memo.get("sha256") else None


def _sort_by_content(hashed: list[tuple[Listed, str]], taken: dict[str, dict[str, Any]], scan: Scan) -> None:
    """New, duplicate or conflicting: each hashed file, by its content."""
    by_digest: dict[str, list[Listed]] = {}
    for item, digest in hashed:
        by_digest.setdefault(digest, []).append(item)
    for digest, items in by_digest.items():
        photo = taken.get(digest)
        if photo is not None:
            for item in items:
                if photo["original"] == item.original:  # the same file, touched since: nothing new
                    scan.known += 1
                    continue
                reason = (f"same content as {photo['original']}, taken in on {photo['added_at'][:10]} as "
                          f"{photo['name']!r}")
                if item.label != photo["label"]:
                    reason += f" (this copy's folder says {CATEGORY_NAMES[item.label]!r})"
                scan.duplicates.append(Skipped(item.original, reason))
            continue
        if len({item.label for item in items}) > 1:
            places = ", ".join(f"{item.original} ({CATEGORY_NAMES[item.label]})" for item in items)
            for item in items:
                scan.rejected.append(Skipped(item.original, f"the same content is in two categories: {places}; "
                                             "delete or move the wrong copies: until then none is taken in"))
            continue
        first, *rest = items
        scan.new.append(Found(first.original, digest, first.label, first.size, first.mtime_ns, first.path))
        scan.duplicates.extend(Skipped(item.original, f"same content as {first.original}, which is taken in instead")
                               for item in rest)


# --- taking photos in ------------------------------------------------------------------------------


@dataclass
class IngestResult:
    added: list[dict[str, Any]]  # ledger records of the photos this call took in
    photos: list[dict[str, Any]]  # the whole ledger afterwards
    scan: Scan
    rejected: list[Skipped]  # the scan's, plus files that do not decode
    waiting: list[Skipped]  # still being written, or changed while being read: for a later run
    ledger_path: Path
    manifest_path: Path


def ingest(data_root: Path, split: str = "train", *, max_bytes: int = DEFAULT_MAX_BYTES,
           settle_s: float = DEFAULT_SETTLE_S) -> IngestResult:
    """Take every new photo under ``incoming/`` in (see intake); recorded at once."""
    with intake(data_root, split, max_bytes=max_bytes, settle_s=settle_s) as result:
        return result


@contextmanager
def intake(data_root: Path, split: str = "train", *, max_bytes: int = DEFAULT_MAX_BYTES,
           settle_s: float = DEFAULT_SETTLE_S) -> Iterator[IngestResult]:
    """Take every new photo under ``incoming/`` in: hash and decode it, copy it into the store; then, when the
    ``with`` block ends without an exception, rewrite the user manifest and, last, the ledger. Idempotent: a
    second call with nothing new changes nothing.

    Files over ``max_bytes`` are refused from their size; files modified in the last ``settle_s`` seconds wait.
    Each write is atomic and the ledger is the last, so a block that raises, or a run killed midway, leaves
    the previous ledger, and the next run takes the same photos in (same ids, reusing the copies made).
    """
    if split not in SPLITS:
        raise IncomingError(f"split must be one of {list(SPLITS)}; got {split!r}")
    data_root = Path(data_root)
    store = data_root / STORE_DIR
    # One intake at a time: two runs must not both append to the ledger.
    with output_lock(store / ".lock", owner=f"user photo intake into {split}", wait_s=600,
                     what=f"the user photo store {store}"):
        photos, seen = _read_state(data_root)
        scan = _scan(data_root, photos, seen, read=True, max_bytes=max_bytes, settle_s=settle_s)
        rejected, waiting = list(scan.rejected), list(scan.waiting)
        added: list[dict[str, Any]] = []
        next_id = max((p["image_id"] for p in photos), default=IMAGE_ID_BASE) + 1
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for found in scan.new:
            try:
                data = _read_whole(found)
            except _ChangedError as err:
                scan.seen.pop(found.original, None)
                waiting.append(Skipped(found.original, str(err)))
                continue
            except OSError as err:
                rejected.append(Skipped(found.original, f"unreadable: {err.strerror or err}"))
                continue
            try:
                extension = check_image(data)
            except ValueError as err:
                scan.seen[found.original] = {"bytes": found.size, "mtime_ns": found.mtime_ns,
                                             "sha256": found.sha256, "reason": str(err)}
                rejected.append(Skipped(found.original, str(err)))
                continue
            path = f"{STORE_DIR}/{found.sha256}{extension}"
            target = data_root / path
            # The name is the content's hash: a copy left by an interrupted run is reused once verified.
            if not (target.is_file() and sha256_file(target) == found.sha256):
                atomic_write_bytes(target, data)
            added.append({
                "image_id": next_id, "sha256": found.sha256, "label": found.label, "name": CATEGORY_NAMES[found.label],
                "split": split, "source": SOURCE, "path": path, "original": found.original,
                "original_bytes": found.size, "original_mtime_ns": found.mtime_ns, "added_at": now,
            })
            scan.seen.pop(found.original, None)  # the ledger's photos record it now
            next_id += 1
        result = IngestResult(added, photos + added, scan, rejected, waiting, ledger_path(data_root),
                              manifest_path(data_root))
        yield result
        # The caller's block succeeded: record. Rewritten every time, so a run killed between the two writes
        # is repaired by the next one.
        write_manifest(user_manifest(result.photos), result.manifest_path)
        if added or scan.seen != seen or not result.ledger_path.is_file():
            atomic_write_json(result.ledger_path, {"format_version": LEDGER_FORMAT_VERSION, "photos": result.photos,
                                                   "seen": scan.seen})
    # Callers report the rejected files one by one (the asset's log, the sensor's skip reason).
    logger.info("took in %d new photos (%d duplicates, %d rejected, %d waiting, %d known); %d user photos in all",
                len(added), len(scan.duplicates), len(rejected), len(waiting), scan.known, len(result.photos))
