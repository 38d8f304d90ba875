"""Taking photos in: each new photo decoded and copied into the store, then the manifest and, last, the ledger
written, so that a run killed midway leaves the previous ledger and the next run takes the same photos in."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from plant_pipeline.ml.data.categories import CategoryMap, normalise_name, oxford_map
from plant_pipeline.ml.data.incoming.ledger import (
    IMAGE_ID_BASE,
    SOURCE,
    STORE_DIR,
    IncomingError,
    ledger_path,
    manifest_path,
    read_state,
    user_manifest,
    write_ledger,
)
from plant_pipeline.ml.data.incoming.listing import NEW_LABEL, Skipped
from plant_pipeline.ml.data.incoming.reading import ChangedError, check_image, read_photo
from plant_pipeline.ml.data.incoming.scanning import DEFAULT_MAX_BYTES, DEFAULT_SETTLE_S, Found, Scan, scan_from_state
from plant_pipeline.ml.data.manifest import SPLITS, write_manifest
from plant_pipeline.ml.data.splits import content_split
from plant_pipeline.ml.files import atomic_write_bytes, sha256_file
from plant_pipeline.ml.locking import output_lock

logger = logging.getLogger(__name__)


# A folder that creates a category is taken in once it holds this many valid photos (user_photos' setting).
DEFAULT_MIN_NEW_PHOTOS = 5


@dataclass
class IngestResult:
    added: list[dict[str, Any]]  # ledger records of the photos this call took in
    photos: list[dict[str, Any]]  # the whole ledger afterwards
    scan: Scan
    rejected: list[Skipped]  # the scan's, plus files that do not decode
    waiting: list[Skipped]  # still being written, changed while being read, or too few for a new category
    ledger_path: Path
    manifest_path: Path
    categories: CategoryMap  # the map given, extended with new_categories (every existing id kept)
    new_categories: list[str] = field(default_factory=list)  # created by this call, in id order


def ingest(data_root: Path, split: str = "train", *, categories: CategoryMap | None = None,
           min_new_photos: int = DEFAULT_MIN_NEW_PHOTOS, max_bytes: int = DEFAULT_MAX_BYTES,
           settle_s: float = DEFAULT_SETTLE_S, manifests: Sequence[Path] | None = None) -> IngestResult:
    """Take every new photo under ``incoming/`` in (see intake); recorded at once."""
    with intake(data_root, split, categories=categories, min_new_photos=min_new_photos, max_bytes=max_bytes,
                settle_s=settle_s, manifests=manifests) as result:
        return result


@contextmanager
def intake(data_root: Path, split: str = "train", *, categories: CategoryMap | None = None,
           min_new_photos: int = DEFAULT_MIN_NEW_PHOTOS, max_bytes: int = DEFAULT_MAX_BYTES,
           settle_s: float = DEFAULT_SETTLE_S, manifests: Sequence[Path] | None = None) -> Iterator[IngestResult]:
    """Take every new photo under ``incoming/`` in: hash and decode it, copy it into the store; then, when the
    ``with`` block ends without an exception, rewrite the user manifest and, last, the ledger. Idempotent: a
    second call with nothing new changes nothing.

    Folders are categories of ``categories`` (Oxford's when None). A folder that names none creates a category
    when ``categories.allow_new``, once it holds ``min_new_photos`` valid photos (until then they wait); its
    photos are split by content hash (content_split), so a new category gets validation and test photos too,
    while photos of existing categories join ``split``. The caller writes ``result.categories`` (the map with
    the new categories appended) inside the block, so that a failure records neither.

    Files over ``max_bytes`` are refused from their size; files modified in the last ``settle_s`` seconds wait.
    Files whose bytes are already in the data (a file of ``manifests``, the data root's when None) are refused,
    whichever split they would join: the release's test photos never reach the train split this way.
    Each write is atomic and the ledger is the last, so a block that raises, or a run killed midway, leaves
    the previous ledger, and the next run takes the same photos in (same ids, reusing the copies made).
    """
    if split not in SPLITS:
        raise IncomingError(f"split must be one of {list(SPLITS)}; got {split!r}")
    if not isinstance(min_new_photos, int) or min_new_photos < 1:
        raise IncomingError(f"min_new_photos (photos a folder needs to create a category) must be an integer >= 1; "
                            f"got {min_new_photos!r}")
    categories = categories or oxford_map()
    data_root = Path(data_root)
    store = data_root / STORE_DIR
    # One intake at a time: two runs must not both append to the ledger.
    with output_lock(store / ".lock", owner=f"user photo intake into {split}", wait_s=600,
                     what=f"the user photo store {store}"):
        photos, seen = read_state(data_root)
        scan = scan_from_state(data_root, photos, seen, categories=categories, read=True, max_bytes=max_bytes,
                               settle_s=settle_s, manifests=manifests)
        rejected, waiting = list(scan.rejected), list(scan.waiting)
        valid: list[tuple[Found, str]] = []
        for found in scan.new:
            try:
                data = read_photo(found, found.sha256)
            except ChangedError as err:
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
            target = data_root / _stored_path(found, extension)
            # The name is the content's hash: a copy left by an interrupted run is reused once verified. (A new
            # category's photos that wait for more are copied too, and reused when the category is created.)
            if not (target.is_file() and sha256_file(target) == found.sha256):
                atomic_write_bytes(target, data)
            valid.append((found, extension))
        valid, new_names = _new_categories(valid, min_new_photos, waiting)
        extended = categories.extended(new_names)
        added: list[dict[str, Any]] = []
        next_id = max((p["image_id"] for p in photos), default=IMAGE_ID_BASE) + 1
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for found, extension in valid:
            label = extended.id_of(found.name)
            added.append({
                "image_id": next_id, "sha256": found.sha256, "label": label, "name": extended.names[label],
                "split": content_split(found.sha256) if found.label == NEW_LABEL else split, "source": SOURCE,
                "path": _stored_path(found, extension), "original": found.original,
                "original_bytes": found.size, "original_mtime_ns": found.mtime_ns, "added_at": now,
            })
            scan.seen.pop(found.original, None)  # the ledger's photos record it now
            next_id += 1
        result = IngestResult(added, photos + added, scan, rejected, waiting, ledger_path(data_root),
                              manifest_path(data_root), extended, list(new_names))
        yield result
        # The caller's block succeeded: record. Rewritten every time, so a run killed between the two writes
        # is repaired by the next one.
        write_manifest(user_manifest(result.photos), result.manifest_path)
        if added or scan.seen != seen or not result.ledger_path.is_file():
            write_ledger(data_root, result.photos, scan.seen)
    # Callers report the rejected files one by one (the asset's log, the sensor's skip reason).
    logger.info("took in %d new photos (%d duplicates, %d rejected of which %d already in the data, %d waiting, "
                "%d known, %d new categories); %d user photos in all", len(added), len(scan.duplicates),
                len(rejected), scan.in_data, len(waiting), scan.known, len(new_names), len(result.photos))


def _stored_path(found: Found, extension: str) -> str:
    return f"{STORE_DIR}/{found.sha256}{extension}"


def _new_categories(valid: list[tuple[Found, str]], min_new_photos: int,
                    waiting: list[Skipped]) -> tuple[list[tuple[Found, str]], list[str]]:
    """The photos to take in now, and the names of the categories they create (in order of first photo): a new
    category's photos wait, with the reason, while it has fewer than ``min_new_photos`` valid ones."""
    counts = Counter(normalise_name(found.name) for found, _ in valid if found.label == NEW_LABEL)
    taken, names, seen_names = [], [], set()
    for found, extension in valid:
        if found.label == NEW_LABEL:
            key = normalise_name(found.name)
            if counts[key] < min_new_photos:
                waiting.append(Skipped(found.original, f"new category {found.name!r} needs at least {min_new_photos} "
                                       f"photos, has {counts[key]}: add more, or lower min_new_photos"))
                continue
            if key not in seen_names:
                seen_names.add(key)
                names.append(found.name)
        taken.append((found, extension))
    return taken, names
