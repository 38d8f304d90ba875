"""The on-disk format of a shards folder: one sample inside a WebDataset shard, and the folder's ``index.json``.

A sample is four tar members sharing a ``__key__``: three ``.npy`` arrays (read with ``allow_pickle=False``,
so a shard can never execute code) and a small JSON record; every reader decodes it with ``decode_sample``.
The index lists every split's shard files with their counts, sizes and sha256; every writer goes through
``write_index`` and every reader through ``read_index``, which both check it against the schema below.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, NotRequired, Sequence, TypedDict

import numpy as np

from plant_pipeline.ml.data.categories import CategoryError, CategoryMap, oxford_map
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json, sha256_file

PIXELS = "pixels.npy"  # uint8 [3, H, W]: the image after the processor's own resize and centre crop
INPUT_IDS = "input_ids.npy"  # int32 [L]: prompt + answer token ids, image tokens expanded
LABELS = "labels.npy"  # int32 [L]: input_ids with every prompt position set to IGNORE_INDEX
META = "json"  # {"image_id", "label", "name", "split", "source", "path", "sha256" of the source file}
FIELDS = (PIXELS, INPUT_IDS, LABELS, META)
IGNORE_INDEX = -100


class ShardFormatError(UsageError):
    """A shard member or the shard index is missing something or is not what the format promises."""


@dataclass
class Sample:
    key: str
    pixels: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]


def _load_npy(data: bytes, key: str, field: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:  # object arrays need pickle: refuse them
        raise ShardFormatError(f"sample {key!r}: member {field!r} is not a plain .npy array ({err})") from err


def decode_sample(raw: Mapping[str, Any]) -> Sample:
    """A raw WebDataset sample (member name -> bytes, plus ``__key__``) -> Sample.

    Pure function used as the ``map`` stage of every reader; it never unpickles.
    """
    key = raw.get("__key__", "<no key>")
    missing = [field for field in FIELDS if field not in raw]
    if missing:
        where = raw.get("__url__", "<unknown shard>")
        raise ShardFormatError(
            f"sample {key!r} in {where}: missing members {missing}; expected {list(FIELDS)}, "
            f"found {sorted(k for k in raw if not k.startswith('__'))}. Rebuild the shards (flower_shards)."
        )
    return Sample(
        key=key,
        pixels=_load_npy(raw[PIXELS], key, PIXELS),
        input_ids=_load_npy(raw[INPUT_IDS], key, INPUT_IDS),
        labels=_load_npy(raw[LABELS], key, LABELS),
        meta=json.loads(raw[META]),
    )




# --- The shard index: <shards_dir>/index.json -------------------------------------------------------

INDEX_FILE = "index.json"
INDEX_FORMAT_VERSION = 1


class ShardEntry(TypedDict):
    """One tar file of a split."""

    file: str  # relative to the shards folder, with "/": "train/train-00000.tar"
    samples: int  # samples stored in it
    bytes: int  # its size
    sha256: str  # hex digest of its bytes: checked before training and by shards_integrity


class QuarantineEntry(TypedDict):
    """A manifest row that was not stored, and why."""

    image_id: int
    path: str  # the source image, relative to the dataset folder
    reason: str


class SplitEntry(TypedDict):
    samples: int  # the sum of its shards' samples
    bytes: int  # the sum of its shards' bytes
    quarantined: list[QuarantineEntry]
    shards: list[ShardEntry]  # in reading order


class ShardIndex(TypedDict):
    format_version: int  # INDEX_FORMAT_VERSION; readers refuse any other
    model_name: str  # the model whose processor made the pixels and token ids
    revision: NotRequired[str | None]  # its hub revision, where known
    pixel_shape: list[int]  # [3, H, W] of every stored image
    num_image_tokens: int  # image tokens in every prompt
    image_token_id: NotRequired[int]  # the tokenizer's facts the samples were validated against
    vocab_size: NotRequired[int]
    categories: NotRequired[dict[str, Any]]  # CategoryMap.to_json(); absent in an older index = Oxford's
    splits: dict[str, SplitEntry]


def shard_entry(shards_dir: str | os.PathLike, file: str, samples: int) -> ShardEntry:
    """The entry of a shard already written at ``shards_dir/file`` (its size and sha256 read from disk)."""
    path = Path(shards_dir) / file
    return {"file": file, "samples": samples, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def split_entry(shards: Sequence[ShardEntry], quarantined: Sequence[QuarantineEntry] = ()) -> SplitEntry:
    """A split's entry, its totals summed from its shards."""
    return {"samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
            "quarantined": [{"image_id": q["image_id"], "path": q["path"], "reason": q["reason"]} for q in quarantined],
            "shards": list(shards)}


def make_index(*, model_name: str, pixel_shape: Sequence[int], num_image_tokens: int,
               splits: Mapping[str, SplitEntry], revision: str | None = None,
               image_token_id: int | None = None, vocab_size: int | None = None,
               categories: Mapping[str, Any] | None = None) -> ShardIndex:
    """An index of the current format version (the tokenizer facts only where given)."""
    index: dict[str, Any] = {"format_version": INDEX_FORMAT_VERSION, "model_name": model_name, "revision": revision,
                             "pixel_shape": [int(n) for n in pixel_shape], "num_image_tokens": int(num_image_tokens)}
    if image_token_id is not None:
        index["image_token_id"] = int(image_token_id)
    if vocab_size is not None:
        index["vocab_size"] = int(vocab_size)
    if categories is not None:
        index["categories"] = dict(categories)
    index["splits"] = dict(splits)
    return index  # type: ignore[return-value]


def write_index(shards_dir: str | os.PathLike, index: ShardIndex) -> Path:
    """Check ``index`` against the schema, then write it atomically as ``shards_dir/index.json``.

    Written last by every writer: readers see the old index or the complete new one.
    """
    path = Path(shards_dir) / INDEX_FILE
    validate_index(index, path)
    return atomic_write_json(path, index)


def read_categories(shards_dir: str | os.PathLike) -> CategoryMap:
    """The categories (names by id, question) the shards were built with; Oxford's for an index written before
    categories were data."""
    data = read_index(shards_dir).get("categories")
    return oxford_map() if data is None else CategoryMap.from_json(data, f"{Path(shards_dir) / INDEX_FILE}: categories")


def read_index(shards_dir: str | os.PathLike) -> ShardIndex:
    """The index of a shards folder, checked against the schema; ShardFormatError names what is wrong."""
    path = Path(shards_dir) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"no shard index at {path}; materialise flower_shards first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"{path}: not a JSON shard index ({err}); rebuild the shards (flower_shards)") from err
    return validate_index(index, path)


def split_shard_paths(shards_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shard files of one split, in index order."""
    index = read_index(shards_dir)
    if split not in index["splits"]:
        raise ShardFormatError(f"{Path(shards_dir) / INDEX_FILE} has no split {split!r}; it has {sorted(index['splits'])}")
    return [Path(shards_dir) / shard["file"] for shard in index["splits"][split]["shards"]]


_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Checker:
    """Raises ShardFormatError naming the index file, the field, what was expected and what was found."""

    def __init__(self, where: str | os.PathLike) -> None:
        self.where = where

    def fail(self, field: str, expected: str, value: Any) -> None:
        raise ShardFormatError(f"{self.where}: field {field!r} is {value!r}; expected {expected}. "
                               "Rebuild the shards (materialise flower_shards)")

    def integer(self, field: str, value: Any, low: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.fail(field, f"an integer >= {low}", value)
        return value

    def text(self, field: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, "a non-empty string", value)
        return value

    def mapping(self, field: str, value: Any, keys: Sequence[str]) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"an object with {list(keys)}", value)
        missing = [key for key in keys if key not in value]
        if missing:
            self.fail(field, f"an object with {list(keys)} (missing {missing})", value)
        return value

    def listing(self, field: str, value: Any) -> list:
        if not isinstance(value, list):
            self.fail(field, "a list", value)
        return value


def validate_index(index: Any, where: str | os.PathLike = INDEX_FILE) -> ShardIndex:
    """``index`` if it follows the schema (ShardIndex) and its totals add up; else ShardFormatError."""
    check = _Checker(where)
    check.mapping("(index)", index, ["format_version", "model_name", "pixel_shape", "num_image_tokens", "splits"])
    if index["format_version"] != INDEX_FORMAT_VERSION:
        check.fail("format_version", str(INDEX_FORMAT_VERSION), index["format_version"])
    check.text("model_name", index["model_name"])
    if index.get("revision") is not None:
        check.text("revision", index["revision"])
    shape = index["pixel_shape"]
    if (not isinstance(shape, list) or len(shape) != 3 or shape[0] != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        check.fail("pixel_shape", "[3, H, W] with H and W positive integers", shape)
    check.integer("num_image_tokens", index["num_image_tokens"], 1)
    for field in ("image_token_id", "vocab_size"):
        if field in index:
            check.integer(field, index[field])
    if "categories" in index:
        try:
            CategoryMap.from_json(check.mapping("categories", index["categories"], ["id_to_name"]), f"{where}: categories")
        except CategoryError as err:
            raise ShardFormatError(f"{err}; rebuild the shards (flower_shards)") from err
    splits = index["splits"]
    if not isinstance(splits, dict) or not splits:
        check.fail("splits", "an object with at least one split", splits)
    for split, info in splits.items():
        at = f"splits.{split}"
        check.mapping(at, info, list(SplitEntry.__annotations__))
        for i, q in enumerate(check.listing(f"{at}.quarantined", info["quarantined"])):
            check.mapping(f"{at}.quarantined[{i}]", q, list(QuarantineEntry.__annotations__))
            check.integer(f"{at}.quarantined[{i}].image_id", q["image_id"])
            check.text(f"{at}.quarantined[{i}].path", q["path"])
            check.text(f"{at}.quarantined[{i}].reason", q["reason"])
        for i, shard in enumerate(check.listing(f"{at}.shards", info["shards"])):
            field = f"{at}.shards[{i}]"
            check.mapping(field, shard, list(ShardEntry.__annotations__))
            file = PurePosixPath(check.text(f"{field}.file", shard["file"]))
            if file.is_absolute() or ".." in file.parts or "\\" in shard["file"]:
                check.fail(f"{field}.file", "a path inside the shards folder, with '/'", shard["file"])
            check.integer(f"{field}.samples", shard["samples"])
            check.integer(f"{field}.bytes", shard["bytes"])
            if not isinstance(shard["sha256"], str) or not _SHA256.fullmatch(shard["sha256"]):
                check.fail(f"{field}.sha256", "64 lowercase hex digits", shard["sha256"])
        for total in ("samples", "bytes"):
            expected = sum(shard[total] for shard in info["shards"])
            if check.integer(f"{at}.{total}", info[total]) != expected:
                check.fail(f"{at}.{total}", f"{expected}, the sum of its shards' {total}", info[total])
    return index
