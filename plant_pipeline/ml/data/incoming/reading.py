"""Reading a file under ``incoming/``: never through a symlink or into a pipe, its header sniffed before it is
hashed, and checked not to have changed since it was listed; and the full decode a photo must pass."""

from __future__ import annotations

import hashlib
import io
import os
import stat as stat_module
from pathlib import Path
from typing import BinaryIO, Protocol

from PIL import Image, UnidentifiedImageError

from plant_pipeline.ml.images import DECODE_ERRORS, to_rgb

# How much of a file is read to tell whether it is an image at all, before it is read whole.
HEAD_BYTES = 64 * 1024
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}
NOT_AN_IMAGE = "not an image Pillow can read (JPEG, PNG, WebP...); convert it"


class ChangedError(Exception):
    """The file is not the one listed any more (written to, replaced): it is looked at again later."""


class Stat(Protocol):
    """What was listed of a file (a Listed or a Found): a file whose size or mtime differ is not that file."""

    @property
    def path(self) -> Path: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...


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
        raise ValueError(NOT_AN_IMAGE) from None
    except DECODE_ERRORS as err:
        raise ValueError(f"cannot decode image: {type(err).__name__}: {err}") from None
    return _EXTENSIONS.get(kind, "." + kind.lower() if kind else ".img")


def open_photo(path: Path) -> BinaryIO:
    """A file under incoming/, opened for reading: never through a symlink put in its place since it was listed,
    and without blocking on a pipe. Every read of incoming/ goes through here."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    return os.fdopen(os.open(path, flags), "rb")


def _check_unchanged(handle: BinaryIO, item: Stat) -> None:
    now = os.fstat(handle.fileno())
    if not stat_module.S_ISREG(now.st_mode) or (now.st_size, now.st_mtime_ns) != (item.size, item.mtime_ns):
        raise ChangedError("changed while being read: looked at again once it has stopped changing")


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
        return NOT_AN_IMAGE
    except DECODE_ERRORS:
        return None


def hash_photo(item: Stat) -> str:
    """The file's sha256, read once in blocks; raises ValueError if its header is no image's."""
    with open_photo(item.path) as handle:
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


def read_photo(found: Stat, sha256: str) -> bytes:
    """The whole file, as hashed when it was found; raises ChangedError if it changed since."""
    with open_photo(found.path) as handle:
        _check_unchanged(handle, found)
        data = handle.read()
        _check_unchanged(handle, found)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ChangedError("changed while being taken in: taken in once it has stopped changing")
    return data
