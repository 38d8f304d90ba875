"""The on-disk format of one preprocessed sample inside a WebDataset shard.

A sample is four tar members sharing a ``__key__``: three ``.npy`` arrays (read with
``allow_pickle=False``, so a shard can never execute code) and a small JSON record.
The writer (shards.py), the training stream and the evaluator all go through these two functions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from plant_pipeline.ml.errors import UsageError

PIXELS = "pixels.npy"  # uint8 [3, H, W]: the image after the processor's own resize and centre crop
INPUT_IDS = "input_ids.npy"  # int32 [L]: prompt + answer token ids, image tokens expanded
LABELS = "labels.npy"  # int32 [L]: input_ids with every prompt position set to IGNORE_INDEX
META = "json"  # {"image_id", "label", "name", "split", "source", "path", "sha256" of the source file}
FIELDS = (PIXELS, INPUT_IDS, LABELS, META)
IGNORE_INDEX = -100


class ShardFormatError(UsageError):
    """A shard member is missing or not what the format promises."""


@dataclass
class Sample:
    key: str
    pixels: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes, key: str, field: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:  # object arrays need pickle: refuse them
        raise ShardFormatError(f"sample {key!r}: member {field!r} is not a plain .npy array ({err})") from err


def encode_sample(sample: Sample) -> dict[str, Any]:
    """Sample -> the dict ``webdataset.TarWriter.write`` takes (bytes per member).

    Raises validation.SampleValidationError for a key that would not read back as one sample.
    """
    from plant_pipeline.ml.shards.validation import validate_key  # validation imports this module

    validate_key(sample.key)
    return {
        "__key__": sample.key,
        PIXELS: _npy_bytes(sample.pixels.astype(np.uint8, copy=False)),
        INPUT_IDS: _npy_bytes(sample.input_ids.astype(np.int32, copy=False)),
        LABELS: _npy_bytes(sample.labels.astype(np.int32, copy=False)),
        META: json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }


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
# {"format_version": 1, "model_name": str, "pixel_shape": [3, H, W], "num_image_tokens": int,
#  "splits": {split: {"samples": int, "bytes": int, "quarantined": [{"image_id", "path", "reason"}],
#                     "shards": [{"file": "train/train-00000.tar", "samples": int, "bytes": int, "sha256": str}]}}}
INDEX_FILE = "index.json"
INDEX_FORMAT_VERSION = 1


def read_index(shards_dir: str | Path) -> dict[str, Any]:
    path = Path(shards_dir) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"no shard index at {path}; materialise flower_shards first")
    index = json.loads(path.read_text())
    if index.get("format_version") != INDEX_FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format_version {index.get('format_version')!r}, expected {INDEX_FORMAT_VERSION}; rebuild the shards"
        )
    return index


def split_shard_paths(shards_dir: str | Path, split: str) -> list[Path]:
    """The shard files of one split, in index order."""
    index = read_index(shards_dir)
    if split not in index["splits"]:
        raise ShardFormatError(f"{Path(shards_dir) / INDEX_FILE} has no split {split!r}; it has {sorted(index['splits'])}")
    return [Path(shards_dir) / shard["file"] for shard in index["splits"][split]["shards"]]
