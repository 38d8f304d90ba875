"""Safe extraction of the release's ``102flowers.tgz``: every header is checked (paths, links, layout, size
caps) before anything is written, and only a fully extracted archive is moved into place.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from plant_pipeline.ml.data.download import format_bytes, md5sum
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json, replace_folder

logger = logging.getLogger(__name__)

EXTRACT_MARKER = ".extracted"
IMAGE_DIR = "jpg"  # the release's image folder: 102flowers.tgz holds jpg/image_00001.jpg ...
_COPY_CHUNK = 1 << 20
# tarfile's extraction filters (and FilterError) exist from Python 3.11.4 / 3.10.12 on.
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
_TAR_FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
)


class UnsafeArchiveError(UsageError):
    """An archive member would land outside the target folder, or is a link or a special file."""


class ArchiveError(UsageError):
    """An archive is truncated, corrupt, not a gzip-compressed tar, not laid out like the release, or
    expands beyond the ExtractLimits."""


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what an archive may expand to: checked from the tar headers before anything is written,
    and again on the bytes actually written. The real 102flowers.tgz (345 MB of JPEGs, which do not
    compress, in 8,190 members) stays far inside the defaults; a decompression bomb does not."""

    max_total_bytes: int = field(
        default=4 << 30, metadata={"help": "Most bytes all regular files together may expand to (4 GiB)."}
    )
    max_ratio: float = field(
        default=20.0, metadata={"help": "Most extracted bytes per archive byte, once past ratio_free_bytes."}
    )
    ratio_free_bytes: int = field(
        default=64 << 20,
        metadata={"help": "Extracted bytes up to which any ratio is accepted: small archives of text or "
                  "blank images compress far better than 20:1 and are harmless."},
    )
    max_members: int = field(default=100_000, metadata={"help": "Most members (files and folders)."})

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_members"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExtractLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_ratio >= 1:
            raise ValueError(f"ExtractLimits.max_ratio must be >= 1 (a tar never shrinks much), got {self.max_ratio}")
        if self.ratio_free_bytes < 0:
            raise ValueError(f"ExtractLimits.ratio_free_bytes must be >= 0, got {self.ratio_free_bytes}")


def _check_member(archive: Path, member: tarfile.TarInfo) -> str | None:
    """Return the member's normalized relative path (None for the root dir), or raise if unsafe."""
    name = member.name
    kind = (
        "symlink" if member.issym() else "hardlink" if member.islnk()
        else "device file" if member.ischr() or member.isblk() else "fifo" if member.isfifo()
        else None
    )
    if kind is not None or not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} is a {kind or 'special file'}; only regular files and "
            "folders are extracted. The archive is not the expected release."
        )
    if not name or name.startswith(("/", "\\")) or PureWindowsPath(name).drive or "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} contains '..' and would escape the target folder; refusing"
        )
    return str(PurePosixPath(*parts)) if parts else None


def _read_marker(marker: Path) -> dict | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def header_size(member: tarfile.TarInfo) -> int:
    """Bytes a member will write, as its header says (folders write none)."""
    return member.size if member.isreg() else 0


def _repack_hint(archive: Path) -> str:
    return f"Fetch a correct copy of {archive.name}, or repack it so that every file appears once under {IMAGE_DIR}/."


class _Layout:
    """What an archive's headers say, checked member by member before anything is written."""

    def __init__(self, archive: Path, limits: ExtractLimits, reserved: frozenset[str]):
        self.archive, self.limits, self.reserved = archive, limits, reserved
        self.compressed = archive.stat().st_size
        self.entries: list[tuple[str, str | None]] = []  # (member name, normalized path or None), in order
        self.files: dict[str, str] = {}  # normalized path -> member name
        self.folders: dict[str, str] = {}  # normalized path -> the member that made it a folder
        self.total = 0  # regular files' bytes, as the headers say
        self.backslashes = 0

    def add(self, member: tarfile.TarInfo) -> None:
        archive = self.archive
        rel = _check_member(archive, member)
        self.entries.append((member.name, rel))
        if len(self.entries) > self.limits.max_members:
            raise ArchiveError(
                f"{archive} holds more than {self.limits.max_members:,} members (the release has 8,190); "
                "refusing to extract it. Raise ExtractLimits.max_members only for an archive you trust."
            )
        if rel is None:
            return
        if _HAS_DATA_FILTER:  # the stdlib's view of the same member, as a second line of defence
            try:
                tarfile.data_filter(member.replace(name=rel, deep=False), str(archive.parent))
            except _TAR_FILTER_ERRORS as exc:
                raise UnsafeArchiveError(f"{archive}: unsafe member refused by tarfile's data filter: {exc}") from exc
        if rel.split("/")[0] in self.reserved:
            raise UnsafeArchiveError(
                f"{archive}: member {member.name!r} would overwrite the extraction's own bookkeeping "
                f"({rel.split('/')[0]}); refusing. The archive is not the expected release."
            )
        if "\\" in member.name:
            self.backslashes += 1
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in self.files:
                self._clash(parent, self.files[parent], member.name)
            self.folders.setdefault(parent, member.name)
        if member.isdir():
            if rel in self.files:
                self._clash(rel, self.files[rel], member.name)
            self.folders.setdefault(rel, member.name)
            return
        if rel in self.files:
            raise ArchiveError(
                f"{archive} holds {rel} 2 times (members {self.files[rel]!r} and {member.name!r}); "
                f"expected every path once, while extracting would silently keep only the last copy. "
                + _repack_hint(archive)
            )
        if rel in self.folders:
            self._clash(rel, member.name, self.folders[rel])
        self.files[rel] = member.name
        self.total += header_size(member)
        self.check_size(self.total, member.name, "from the tar headers")

    def _clash(self, path: str, file_member: str, folder_member: str) -> None:
        raise ArchiveError(
            f"{self.archive}: {path!r} is a regular file in the archive (member {file_member!r}) and also "
            f"a folder (member {folder_member!r} lies in it); expected only folders and the files inside "
            "them. " + _repack_hint(self.archive)
        )

    def check_size(self, total: int, name: str, how: str) -> None:
        """Raise unless ``total`` extracted bytes, reached at member ``name``, are within the limits."""
        limits, archive = self.limits, self.archive
        if total > limits.max_total_bytes:
            raise ArchiveError(
                f"{archive}: the files up to member {name!r} expand to {total:,} bytes ({how}), more than "
                f"the cap of {limits.max_total_bytes:,} bytes ({format_bytes(limits.max_total_bytes)}; the "
                "real release expands to about 345 MB); nothing was extracted. If the archive is trusted "
                "and really this large, raise max_extracted_gib in the oxford_flowers config "
                "(ExtractLimits.max_total_bytes); otherwise fetch a correct copy."
            )
        if total > limits.ratio_free_bytes and total > limits.max_ratio * self.compressed:
            raise ArchiveError(
                f"{archive}: the files up to member {name!r} expand to {total:,} bytes ({how}) from "
                f"{self.compressed:,} compressed bytes, a compression ratio of more than "
                f"{total / self.compressed:.0f}:1 where the cap is {limits.max_ratio:g}:1 (the release's "
                "JPEGs barely compress); this looks like a decompression bomb and nothing was extracted. "
                "Fetch a correct copy, or raise max_compression_ratio in the oxford_flowers config "
                "(ExtractLimits.max_ratio) for an archive you trust."
            )

    def check_folder(self, folder: str) -> None:
        """Raise unless some regular file lies under ``folder``/."""
        if any(rel.startswith(folder + "/") for rel in self.files):
            return
        tops: dict[str, bool] = {}  # top-level entry -> is a folder
        for _, rel in self.entries:
            if rel is not None:
                top = rel.split("/")[0]
                tops[top] = tops.get(top, False) or top in self.folders
        found = ", ".join(f"{t}/ (a folder)" if d else f"{t} (a file)" for t, d in sorted(tops.items()))
        raise ArchiveError(
            f"{self.archive} holds no regular files under {folder}/, where the release keeps its images; "
            f"found: {found or 'nothing'}. Expected {folder}/image_00001.jpg and so on at the top of the "
            f"archive: fetch a correct copy, or repack it with the images under {folder}/."
        )


def _scan(archive: Path, limits: ExtractLimits, reserved: frozenset[str], expect_folder: str | None) -> _Layout:
    """Check every header (safety, names, layout, size caps) and the gzip CRC; write nothing."""
    layout = _Layout(archive, limits, reserved)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            layout.add(member)
        # tarfile stops at the end-of-archive block, before gzip's CRC trailer; read on to the end
        # so a corrupt byte inside a member is caught before anything is written.
        while tar.fileobj.read(_COPY_CHUNK):
            pass
    if not layout.files:
        raise ArchiveError(f"{archive} holds no regular files; it is not the expected release")
    if expect_folder is not None:
        layout.check_folder(expect_folder)
    if layout.backslashes:
        logger.warning("%s: %d member names use backslashes (an archive made on Windows); they are read as "
                       "folder separators", archive, layout.backslashes)
    return layout


def _write_members(archive: Path, tmp: Path, layout: _Layout) -> list[str]:
    """Write the scanned members under ``tmp``, counting the bytes against the limits again; return the files."""
    written = count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name, rel = layout.entries[count] if count < len(layout.entries) else (None, None)
            count += 1
            if member.name != name:
                raise ArchiveError(f"{archive} changed while it was being extracted; re-run")
            if rel is None:
                continue
            target = tmp / rel
            try:
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                # "x": a second member landing on the same file fails instead of overwriting it.
                with source, open(target, "xb") as out:
                    while chunk := source.read(_COPY_CHUNK):
                        written += len(chunk)
                        layout.check_size(written, member.name, "counted while writing")
                        out.write(chunk)
            except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
                raise ArchiveError(
                    f"{archive}: member {member.name!r} collides with another member on this file system "
                    f"({exc.strerror}); names that differ only in case are one file on macOS and Windows. "
                    + _repack_hint(archive)
                ) from None
    if count != len(layout.entries):
        raise ArchiveError(f"{archive} changed while it was being extracted; re-run")
    return sorted(layout.files)


def safe_extract_tgz(
    archive: Path,
    dest_dir: Path,
    *,
    expect_folder: str | None = IMAGE_DIR,
    limits: ExtractLimits | None = None,
) -> list[Path]:
    """Extract a .tgz into ``dest_dir`` safely and idempotently; return the regular files extracted.

    Every header is checked before anything is written: absolute paths, ``..``, links and special
    files raise UnsafeArchiveError; a truncated or corrupt archive, a path listed twice, a path that is
    both a file and a folder, no files under ``expect_folder`` (the release's ``jpg/``; None to skip)
    or more than ``limits`` allow (size, compression ratio, members) raise ArchiveError. Backslashes in
    member names are read as folder separators. The size caps are enforced again while writing.
    Members go to a hidden temporary folder inside ``dest_dir`` first, and only a fully extracted
    archive is moved in: each top-level entry of the archive (e.g. ``jpg/``) replaces any older entry
    of that name, while other content of ``dest_dir`` is left alone. A marker file records the
    archive's md5, so a re-run with the same archive skips the work and a different archive is
    extracted afresh.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    limits = limits or ExtractLimits()
    if not archive.is_file():
        raise ArchiveError(f"{archive} does not exist; fetch the release first")
    archive_md5 = md5sum(archive)
    marker = dest_dir / EXTRACT_MARKER
    previous = _read_marker(marker) if marker.exists() else None
    if previous and previous.get("md5") == archive_md5:
        paths = [dest_dir / rel for rel in previous.get("files", [])]
        if paths and all(p.is_file() for p in paths):
            logger.info("%s already extracted into %s (%d files); skipping", archive, dest_dir, len(paths))
            return paths
        logger.warning("%s: files listed in %s are missing; extracting again", dest_dir, marker)

    tmp = dest_dir / f".{archive.name}.extracting"
    reserved = frozenset({EXTRACT_MARKER, tmp.name})
    logger.info("extracting %s into %s", archive, dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        layout = _scan(archive, limits, reserved, expect_folder)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a killed run
        tmp.mkdir()
        files = _write_members(archive, tmp, layout)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArchiveError(
            f"{archive} is truncated or corrupt ({type(exc).__name__}: {exc}); nothing was "
            "extracted. Delete it and fetch it again."
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-extracted stays behind
        raise
    # Drop the marker first and write it last: if we die while moving entries in, the next run extracts again.
    marker.unlink(missing_ok=True)
    for entry in sorted(os.listdir(tmp)):
        replace_folder(tmp / entry, dest_dir / entry)  # each top-level entry replaces its namesake only
    tmp.rmdir()
    atomic_write_json(marker, {"archive": archive.name, "md5": archive_md5, "files": files})
    logger.info("extracted %d files from %s into %s", len(files), archive, dest_dir)
    return [dest_dir / rel for rel in files]
