"""A Hugging Face ``datasets`` dataset as a source: a ``save_to_disk`` folder, a local ``imagefolder`` folder or a hub
id. Its ClassLabel names become the categories; its images are exported as files named by their content hash."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from plant_pipeline.ml.data.categories import DEFAULT_QUESTION, CategoryError, CategoryMap
from plant_pipeline.ml.data.sources.common import (
    SPLIT_ALIASES,
    SourceData,
    SourceError,
    build_source_data,
    distinct_rows,
    listed,
)
from plant_pipeline.ml.data.splits import DEFAULT_FRACTIONS, check_fractions
from plant_pipeline.ml.files import atomic_write_bytes

log = logging.getLogger(__name__)
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


def _hub_unreachable(location: str, reason: str) -> SourceError:
    return SourceError(f"dataset {location!r} is neither a local folder nor reachable on the Hugging Face hub "
                       f"({reason}). On a machine with internet access run `datasets.load_dataset({location!r})"
                       f".save_to_disk(FOLDER)`, copy FOLDER here and set the dataset to that folder")


def _load(location: str, revision: str | None, cache_dir: str | None) -> Any:
    """A Dataset or DatasetDict from a save_to_disk folder, an imagefolder folder, or the hub."""
    import datasets  # heavy; only this source needs it

    folder = Path(location).expanduser()
    if folder.is_dir():
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            return datasets.load_from_disk(str(folder))
        return datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir)
    if folder.exists() or location.startswith((".", "/", "~")) or location.count("/") > 1:
        raise SourceError(f"dataset {location!r}: not a folder; expected a save_to_disk folder, an imagefolder "
                          f"folder or a hub id such as 'owner/name'")
    if datasets.config.HF_HUB_OFFLINE:
        raise _hub_unreachable(location, "HF_HUB_OFFLINE is set, so the hub is not contacted")
    try:
        return datasets.load_dataset(location, revision=revision, cache_dir=cache_dir)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise _hub_unreachable(location, f"{type(exc).__name__}: {exc}") from exc


def _splits(loaded: Any, location: str) -> list[tuple[str | None, Any]]:
    """(manifest split or None, Dataset) pairs: named train/validation/test splits are used; a Dataset alone, or
    a DatasetDict with only a train split, gets content-hash splits."""
    if not hasattr(loaded, "keys"):
        return [(None, loaded)]
    unknown = [name for name in loaded.keys() if name.lower() not in SPLIT_ALIASES]
    if unknown:
        raise SourceError(f"dataset {location!r}: unknown splits {unknown}; expected {sorted(SPLIT_ALIASES)}. "
                          f"Rename them (DatasetDict keys) or save the splits you want")
    pairs = [(SPLIT_ALIASES[name.lower()], loaded[name]) for name in sorted(loaded.keys())]
    if {split for split, _ in pairs} == {"train"}:
        return [(None, ds) for _, ds in pairs]
    return pairs


def _image_bytes(value: Any) -> bytes:
    """The original file bytes of an undecoded Image value; a decoded PIL image is re-encoded as PNG."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        raise ValueError("the image has neither bytes nor a path")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ValueError(f"unexpected image value of type {type(value).__name__}")


def _export(data: bytes, export_dir: Path) -> tuple[str, Path]:
    """Write ``data`` as export_dir/<sha[:2]>/<sha>.<ext> (atomically, unless already there); Pillow must read it."""
    with Image.open(io.BytesIO(data)) as image:
        kind = image.format
        image.verify()
    sha = hashlib.sha256(data).hexdigest()
    path = export_dir / sha[:2] / f"{sha}.{_EXTENSIONS.get(kind or '', (kind or 'img').lower())}"
    if not path.is_file():
        atomic_write_bytes(path, data)
    return sha, path


def read_datasets_source(location: str, export_dir: str | os.PathLike, *, data_root: str | os.PathLike,
                         image_column: str = "image", label_column: str = "label", revision: str | None = None,
                         fractions: Sequence[float] = DEFAULT_FRACTIONS, question: str = DEFAULT_QUESTION,
                         source: str = "hf_dataset", cache_dir: str | None = None) -> SourceData:
    """Read a ``datasets`` dataset into a manifest (paths relative to ``data_root`` where the exported files lie
    under it) and a category map from the ``label_column`` ClassLabel names, in ClassLabel order.

    ``location``: a ``save_to_disk`` folder (Dataset or DatasetDict), a folder for the ``imagefolder`` builder, or a
    hub id (``revision`` pins it). DatasetDict splits train/validation/test (``val``/``valid`` too) are kept; a
    Dataset alone or a train split only gets content-hash splits. Unreadable images are left out with a warning.
    """
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    fractions = check_fractions(fractions)
    export_dir, data_root = Path(export_dir).absolute(), Path(data_root).absolute()
    parts = _splits(_load(location, revision, cache_dir), location)
    names: tuple[str, ...] | None = None
    by_sha: dict[str, list[tuple[str, str, str | None]]] = defaultdict(list)
    skipped: list[str] = []
    for split, ds in parts:
        where = f"dataset {location!r}" + (f" split {split!r}" if split else "")
        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if missing:
            raise SourceError(f"{where}: no column {missing}; columns found: {ds.column_names}. Set the image and "
                              f"label column names to the dataset's")
        feature = ds.features[label_column]
        if not isinstance(feature, ClassLabel):
            raise SourceError(f"{where}: column {label_column!r} is {type(feature).__name__}, expected a ClassLabel "
                              f"whose names are the categories; cast it with ds.cast_column({label_column!r}, "
                              f"ClassLabel(names=[...]))")
        if names is None:
            names = tuple(feature.names)
        elif tuple(feature.names) != names:
            raise SourceError(f"{where}: ClassLabel names {list(feature.names)[:5]}... differ from another split's "
                              f"{list(names)[:5]}...; every split must share one ClassLabel")
        if isinstance(ds.features[image_column], ImageFeature):
            ds = ds.cast_column(image_column, ImageFeature(decode=False))  # the original bytes, not re-encoded
        # In batches: a column read whole would hold every image's bytes in memory at once.
        pairs = ((v, lab) for b in ds.select_columns([image_column, label_column]).iter(batch_size=256)
                 for v, lab in zip(b[image_column], b[label_column]))
        for row, (value, label) in enumerate(pairs):
            if label is None or not 0 <= label < len(names):
                raise SourceError(f"{where}: row {row} has label {label}, outside the ClassLabel range "
                                  f"0..{len(names) - 1}; fix or drop that row")
            try:
                sha, path = _export(_image_bytes(value), export_dir)
            except Exception as exc:  # damaged images are many exception types in Pillow
                skipped.append(f"row {row}{' of ' + split if split else ''} ({type(exc).__name__}: {exc})")
                continue
            shown = str(path.relative_to(data_root)) if path.is_relative_to(data_root) else str(path)
            by_sha[sha].append((names[label], shown, split))
    if names is None or len(names) < 2:
        raise SourceError(f"dataset {location!r}: ClassLabel {label_column!r} has {0 if names is None else len(names)}"
                          f" names; expected at least 2 categories")
    try:
        categories = CategoryMap(names, question=question, source=source, allow_new=True)
    except CategoryError as exc:
        raise CategoryError(f"dataset {location!r}: {exc}") from exc
    warnings: list[str] = []
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable images: {listed(skipped)}")
    rows = distinct_rows(by_sha, categories, fractions, warnings)
    for warning in warnings:
        log.warning("dataset %s: %s", location, warning)
    return build_source_data(rows, categories, source, warnings, f"manifest of dataset {location!r}")
