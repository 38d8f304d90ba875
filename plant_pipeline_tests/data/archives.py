"""Tar archives built member by member for the extraction tests: good ones, and ones with hostile or
malformed members that no ordinary ``tar`` would write."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

Member = tuple[tarfile.TarInfo, "bytes | None"]


def tar_file(name: str, data: bytes) -> Member:
    """A regular file member."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def tar_folder(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


def tar_special(name: str, kind: bytes, linkname: str = "") -> Member:
    """A link, device or fifo member (``kind`` is a tarfile type such as tarfile.SYMTYPE)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def make_tgz(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def good_members(tag: bytes = b"A", n: int = 3) -> list[Member]:
    """The release's layout in miniature: ``jpg/`` and ``n`` images whose bytes start with ``tag``."""
    return [tar_folder("jpg")] + [tar_file(f"jpg/image_{i:05d}.jpg", tag * 1000 + bytes([i])) for i in range(1, n + 1)]
