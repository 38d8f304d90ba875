"""An image folder as a source: ``<root>/<category>/*`` or ``<root>/<split>/<category>/*``, folder names as the
categories, each distinct photo (by content) once, splits from the split folders or else from the content hash."""

from __future__ import annotations

import logging
import os
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from PIL import Image

from plant_pipeline.ml.data.categories import DEFAULT_QUESTION, CategoryError, CategoryMap, normalise_name
from plant_pipeline.ml.data.sources.common import (
    SPLIT_ALIASES,
    SourceData,
    SourceError,
    build_source_data,
    distinct_rows,
    listed,
)
from plant_pipeline.ml.data.splits import DEFAULT_FRACTIONS, check_fractions
from plant_pipeline.ml.files import sha256_file

log = logging.getLogger(__name__)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not _hidden(p.name) and p.is_dir() and not p.is_symlink())


def _files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder``, nested folders included. Symlinked files are read (they are the
    user's photos); symlinked folders are not followed, which rules out loops and photos counted twice."""
    found = []
    for here, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        found.extend(Path(here) / n for n in sorted(names) if not _hidden(n))
    return found


def _unreadable(path: Path, max_bytes: int) -> str | None:
    """Why ``path`` cannot be used as a photo, or None. The size is checked before any byte is read."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return f"{size / 2**20:.1f} MB is over the {max_bytes / 2**20:g} MB per-photo limit"
        with Image.open(path) as image:
            image.verify()  # reads the structure without decoding every pixel
    except Exception as exc:  # Pillow raises many types for damaged or non-image files
        return f"not an image Pillow can read ({type(exc).__name__}: {exc})"
    return None


def _layout(root: Path) -> list[tuple[str | None, Path]]:
    """(split or None, category folder) pairs: split folders at the top when any top folder has a split name."""
    top = _subfolders(root)
    if not top:
        raise SourceError(f"image folder {root}: no category folders; expected <root>/<category>/<photos> or "
                          f"<root>/train|validation|test/<category>/<photos>")
    split_named = [p for p in top if p.name.lower() in SPLIT_ALIASES]
    if not split_named:
        return [(None, p) for p in top]
    others = [p.name for p in top if p not in split_named]
    if others:
        raise SourceError(f"image folder {root}: top-level folders {others} are not split folders, beside split "
                          f"folders {[p.name for p in split_named]}; expected only {sorted(SPLIT_ALIASES)} at the "
                          f"top (with category folders inside), or only category folders. Rename or move them.")
    return [(SPLIT_ALIASES[s.name.lower()], c) for s in split_named for c in _subfolders(s)]


def read_image_folder(root: str | os.PathLike, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                      question: str = DEFAULT_QUESTION, source: str = "image_folder",
                      max_photo_mb: float = 50) -> SourceData:
    """Read the photos under ``root`` into a manifest (absolute paths) and a category map.

    Layouts: ``<root>/<category>/...`` (splits from each photo's content hash and ``fractions``) or
    ``<root>/{train,validation,test}/<category>/...`` (``val`` and ``valid`` also mean validation; any subset of
    the splits). Files in nested folders belong to the top category folder; hidden files and folders are skipped.
    Category names are the folder names (NFC); ids follow the sorted normalised names. The same bytes twice in one
    category are one row; the same bytes in two categories are left out (a warning names both). A photo in two
    split folders of one category gets its content split, so it is never in two splits.
    """
    fractions = check_fractions(fractions)
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        state = "does not exist" if not root.exists() else "is not a folder"
        raise SourceError(f"image folder {root} {state}; set the root to a folder of category folders")
    max_bytes = int(max_photo_mb * 2**20)
    warnings: list[str] = []
    by_sha: dict[str, list[tuple[str, str, str | None]]] = defaultdict(list)  # sha -> (category, path, split)
    skipped: list[str] = []
    folder_files: dict[str, int] = defaultdict(int)  # category -> files seen, readable or not
    first_reason: dict[str, str] = {}
    for split, folder in _layout(root):
        name = unicodedata.normalize("NFC", folder.name)
        files = _files(folder)
        folder_files[name] += len(files)
        for path in files:
            reason = _unreadable(path, max_bytes)
            if reason:
                skipped.append(f"{path} ({reason})")
                first_reason.setdefault(name, f"{path}: {reason}")
                continue
            by_sha[sha256_file(path)].append((name, str(path), split))
    readable = {name for entries in by_sha.values() for name, _, _ in entries}
    # An empty folder is left out with a warning rather than failing the run: a stray folder (or one a person has
    # just made) should not block training; a category that has files but none readable is a real problem.
    empty = sorted(name for name, count in folder_files.items() if count == 0 and name not in readable)
    if empty:
        warnings.append(f"empty category folders left out: {empty}")
    broken = sorted(name for name, count in folder_files.items() if count and name not in readable)
    if broken:
        raise SourceError(f"image folder {root}: category {broken[0]!r} has no readable photo "
                          f"({first_reason[broken[0]]}); {len(broken)} such categories: {broken}. "
                          f"Replace or remove their files")
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable files: {listed(skipped)}")
    names = sorted(readable, key=lambda n: (normalise_name(n), n))
    if len(names) < 2:
        raise SourceError(f"image folder {root}: {len(names)} category with readable photos ({names}); "
                          f"expected at least 2 category folders")
    try:
        categories = CategoryMap(tuple(names), question=question, source=source, allow_new=True)
    except CategoryError as exc:  # folder names that normalise alike: say where they are
        raise CategoryError(f"image folder {root}: {exc}") from exc
    rows = distinct_rows(by_sha, categories, fractions, warnings)
    for warning in warnings:
        log.warning("image folder %s: %s", root, warning)
    return build_source_data(rows, categories, source, warnings, f"manifest of image folder {root}")
