"""Small file helpers every stage shares: content hashes, atomic writes (temp file + rename), and the one way
to swap a finished folder into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def file_digest(path: str | os.PathLike, algorithm: str, chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks so a 345 MB archive never sits in memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` so readers see the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=False).encode("utf-8"))


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old-{os.getpid()}")


def replace_folder(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the finished folder ``staged`` at ``final``, replacing what was there: the one way every stage swaps
    a folder into place. A directory cannot be renamed over a non-empty one, so the old folder is renamed
    aside first and removed only once the new one is in place; until then the old result still exists.
    ``staged`` must be on the same filesystem (make it with :func:`staging_folder`)."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        old = _aside(final)
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)  # put the old result back rather than leave nothing
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def staging_folder(final: str | os.PathLike) -> Iterator[Path]:
    """A hidden empty folder beside ``final`` to write into; on a clean exit it replaces ``final``
    (:func:`replace_folder`), on an error it is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staged
        replace_folder(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
