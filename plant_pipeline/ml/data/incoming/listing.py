"""Listing ``incoming/``: the files under each category folder, with their stat, and those refused for where or
what they are. A stat per file, no file opened: the sensor runs only this."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plant_pipeline.ml.data.categories import CategoryMap, normalise_name, oxford_map
from plant_pipeline.ml.errors import UsageError

INCOMING_DIR = "incoming"
# A folder that names no category but may create one (CategoryMap.allow_new) is listed with this label.
NEW_LABEL = -1


class UnknownCategoryError(UsageError):
    """A folder under incoming/ names no category."""


def category_label(folder: str, categories: CategoryMap | None = None) -> int:
    """The 0-based id a folder under incoming/ stands for in ``categories`` (Oxford's when None).

    A category name (case, spaces, underscores and hyphens do not matter: ``Sweet_Pea``, ``sweet pea``) or
    the 0-based id as digits (``3`` is sweet pea for Oxford, as in category_map.json).
    """
    categories = categories or oxford_map()
    names, last = categories.names, len(categories) - 1
    if re.fullmatch(r"[0-9]+", folder.strip()):
        label = int(folder)
        if label <= last:
            return label
        raise UnknownCategoryError(
            f"category id {label} is outside 0..{last} (ids are the manifest's 0-based labels, "
            f"as in category_map.json: 0 is {names[0]!r}, {last} is {names[-1]!r})"
        )
    label = categories.id_of(folder)
    if label is None:
        raise UnknownCategoryError(
            f"unknown category {folder!r}: not one of the {len(names)} categories of source {categories.source!r} "
            f"(category_map.json) nor an id 0..{last}; "
            + ("rename the folder: a new category needs a name with letters" if categories.allow_new
               else "rename the folder, or use a source that allows new categories")
        )
    return label


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
    label: int  # the category's id, or NEW_LABEL for a folder that creates a category
    size: int
    mtime_ns: int
    name: str = ""  # the category's name: the map's, or the folder's for a new category

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.original, self.size, self.mtime_ns)



@dataclass(frozen=True)
class Skipped:
    """A file under incoming/ that is not taken in, and why; it is left where it is."""

    original: str
    reason: str



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


def new_category_folders(data_root: Path, categories: CategoryMap) -> list[str]:
    """The folders under incoming/ that would create a category (none unless ``categories.allow_new``). One
    listing of incoming/ itself: the sensor names them without looking inside."""
    incoming = Path(data_root) / INCOMING_DIR
    if not categories.allow_new or not incoming.is_dir():
        return []
    return [display_name(top.name) for top in _entries(incoming)
            if top.is_dir(follow_symlinks=False) and not top.is_symlink()
            and _folder_category(display_name(top.name), categories)[0] == NEW_LABEL]


def _folder_category(folder: str, categories: CategoryMap) -> tuple[int, str, str | None]:
    """(label, category name, why refused) of a top folder under incoming/."""
    try:
        label = category_label(folder, categories)
        return label, categories.names[label], None
    except UnknownCategoryError as err:
        # Digits are ids, never names; a name of only spaces, "_" and "-" names nothing.
        if categories.allow_new and not re.fullmatch(r"[0-9]+", folder.strip()) and normalise_name(folder):
            return NEW_LABEL, re.sub(r"[\s_]+", " ", folder).strip(), None
        return NEW_LABEL, "", str(err)


def list_incoming(data_root: Path, categories: CategoryMap | None = None) -> tuple[list[Listed], list[Skipped]]:
    """The files under ``incoming/<category>/`` at any depth (a subfolder's photos belong to the category
    folder above it), sorted; and the files refused for where or what they are: outside a category folder, in
    a folder that names no category (unless ``categories.allow_new``: it creates one), a symbolic link (never
    followed; ``incoming/`` itself may be one), not a regular file. Reads no file: one stat each.
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
        label, category, unknown = _folder_category(display_name(top.name), categories or oxford_map())
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
            listed.append(Listed(original, Path(entry.path), label, stat.st_size, stat.st_mtime_ns, category))
    listed.sort(key=lambda item: item.original)
    return listed, refused

