"""Scanning ``incoming/``: each listed file sorted into known, new, duplicate, refused or waiting, from the
ledger's memory of it where possible, so that an unchanged file is never read twice."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plant_pipeline.ml.data.categories import CategoryMap, normalise_name
from plant_pipeline.ml.data.incoming.in_data import DataPhoto, load_data_photos
from plant_pipeline.ml.data.incoming.ledger import IncomingError, read_state
from plant_pipeline.ml.data.incoming.listing import Listed, Skipped, list_incoming
from plant_pipeline.ml.data.incoming.reading import ChangedError, hash_photo

# Files larger than this are refused from their size alone (a video, a disk image); a setting of user_photos.
DEFAULT_MAX_BYTES = 50_000_000
# A file modified less than this long ago may still be being written (a copy, an unzip): it waits.
DEFAULT_SETTLE_S = 5.0


@dataclass(frozen=True)
class Found:
    """A new photo under incoming/: hashed, of a known category, its content not yet taken in."""

    original: str
    sha256: str
    label: int
    size: int
    mtime_ns: int
    path: Path
    name: str = ""  # the category's name; label is NEW_LABEL when the folder creates the category


@dataclass
class Scan:
    """Every file under incoming/, sorted by what becomes of it."""

    new: list[Found] = field(default_factory=list)  # hashed: the run decodes them and takes the valid ones in
    pending: list[Listed] = field(default_factory=list)  # not read yet (a listing-only scan): for the run
    duplicates: list[Skipped] = field(default_factory=list)  # same bytes as a photo taken in or found first
    rejected: list[Skipped] = field(default_factory=list)  # refused; unchanged, they are not looked at again
    waiting: list[Skipped] = field(default_factory=list)  # still being written: looked at on a later tick
    known: int = 0  # files taken in by an earlier run, still in place
    in_data: int = 0  # of the rejected, files whose bytes are already in the data (the release's photos)
    # What is known of files not taken in, by original: their size, mtime, sha256 and, when refused for their
    # content, the reason. Kept in the ledger so that no run reads an unchanged file twice.
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def to_read(self) -> list[tuple[str, int, int]]:
        """(original, size, mtime_ns) of every file a run would read: the pending and the new, sorted."""
        return sorted([p.key for p in self.pending] + [(f.original, f.size, f.mtime_ns) for f in self.new])


def _check_limits(max_bytes: int, settle_s: float) -> None:
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise IncomingError(f"max_bytes (the largest photo taken in) must be a positive number of bytes; "
                            f"got {max_bytes!r}")
    if not settle_s >= 0:
        raise IncomingError(f"settle_s (how long a file must be unchanged) must be >= 0 seconds; got {settle_s!r}")


def scan_incoming(data_root: Path, *, categories: CategoryMap | None = None, read: bool = False,
                  max_bytes: int = DEFAULT_MAX_BYTES, settle_s: float = DEFAULT_SETTLE_S,
                  manifests: Sequence[Path] | None = None) -> Scan:
    """Look at every file under ``incoming/<category>/``; changes nothing.

    With ``read=False`` (the sensor) no file under incoming/ is opened: files are recognised by path, size
    and mtime from the ledger (taken in, or seen by an earlier run), and the rest are ``pending``. With
    ``read=True`` (the run) each pending file's header is sniffed and its content hashed. Content already in
    the ledger or found earlier in this scan is a duplicate, whatever the file's name; the same content under
    two categories is refused in all its places until a person removes the wrong copies. Content already in
    the data (a file of ``manifests``, the data root's when None: see in_data) is refused, so that no photo of
    the release, a test photo say, is taken in a second time. ``categories`` (Oxford's when None) names the
    folders; one that names none creates a category when ``categories.allow_new``.
    """
    photos, seen = read_state(data_root)
    return scan_from_state(Path(data_root), photos, seen, categories=categories, read=read, max_bytes=max_bytes,
                           settle_s=settle_s, manifests=manifests)


def scan_from_state(data_root: Path, photos: list[dict[str, Any]], seen: dict[str, dict[str, Any]], *,
                    categories: CategoryMap | None, read: bool, max_bytes: int, settle_s: float,
                    manifests: Sequence[Path] | None = None) -> Scan:
    """scan_incoming against a ledger already read (the intake reads it once, under its lock)."""
    _check_limits(max_bytes, settle_s)
    taken = {p["sha256"]: p for p in photos}
    unchanged = {(p["original"], p["original_bytes"], p["original_mtime_ns"]) for p in photos}
    listed, refused = list_incoming(data_root, categories)
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
                digest = hash_photo(item)
            except ValueError as err:  # not an image: remembered, so it is not read again while unchanged
                scan.seen[item.original] = {"bytes": item.size, "mtime_ns": item.mtime_ns, "reason": str(err)}
                scan.rejected.append(Skipped(item.original, str(err)))
                continue
            except ChangedError as err:
                scan.waiting.append(Skipped(item.original, str(err)))
                continue
            except OSError as err:  # not remembered: it may pass
                scan.rejected.append(Skipped(item.original, f"unreadable: {err.strerror or err}"))
                continue
            scan.seen[item.original] = {"bytes": item.size, "mtime_ns": item.mtime_ns, "sha256": digest}
            hashed.append((item, digest))
    in_data: dict[str, DataPhoto] = {}
    if any(digest not in taken for _, digest in hashed):
        # Only the run builds the cache (it may hash the whole release); a sensor tick without a fresh one
        # leaves the files new, and the run it launches refuses them.
        in_data = load_data_photos(data_root, manifests, build=read) or {}
    _sort_by_content(hashed, taken, in_data, scan)
    return scan


def _remembered(seen: dict[str, dict[str, Any]], item: Listed) -> dict[str, Any] | None:
    """What an earlier run learnt of this file (its hash, or why it was refused), if it has not changed since."""
    memo = seen.get(item.original)
    if not isinstance(memo, dict) or (memo.get("bytes"), memo.get("mtime_ns")) != (item.size, item.mtime_ns):
        return None
    return memo if memo.get("reason") or memo.get("sha256") else None


def _sort_by_content(hashed: list[tuple[Listed, str]], taken: dict[str, dict[str, Any]],
                     in_data: dict[str, DataPhoto], scan: Scan) -> None:
    """New, duplicate, already in the data or conflicting: each hashed file, by its content."""
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
                if normalise_name(item.name) != normalise_name(photo.get("name", item.name)):
                    reason += f" (this copy's folder says {item.name!r})"
                scan.duplicates.append(Skipped(item.original, reason))
            continue
        # Refused rather than sent to the release photo's split: even there it would count twice.
        if (release_photo := in_data.get(digest)) is not None:
            scan.rejected.extend(Skipped(item.original, release_photo.reason) for item in items)
            scan.in_data += len(items)
            continue
        # By name: a photo under a known and a new category, or two new ones, is a conflict too.
        if len({normalise_name(item.name) for item in items}) > 1:
            places = ", ".join(f"{item.original} ({item.name})" for item in items)
            for item in items:
                scan.rejected.append(Skipped(item.original, f"the same content is in two categories: {places}; "
                                             "delete or move the wrong copies: until then none is taken in"))
            continue
        first, *rest = items
        scan.new.append(Found(first.original, digest, first.label, first.size, first.mtime_ns, first.path,
                             first.name))
        scan.duplicates.extend(Skipped(item.original, f"same content as {first.original}, which is taken in instead")
                               for item in rest)
