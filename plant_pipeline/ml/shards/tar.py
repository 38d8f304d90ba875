"""The tar framing of a shard: fixed ustar headers, ``.npy`` member bytes, and a sample's size before its pixels.

A sample is its four members in the order webdataset's TarWriter writes them, with fixed header fields, so the
same samples always give the same bytes (and sha256). Pixels come last, so a sample's bytes are a small head,
the raw pixel bytes, and the pixel member's padding: workers write the pixels in between, in place.
"""

from __future__ import annotations

import functools
import io
import json
import math
import tarfile
from typing import Any, Sequence

import numpy as np

from plant_pipeline.ml.shards.format import INPUT_IDS, LABELS, META, PIXELS, Sample
from plant_pipeline.ml.shards.validation import validate_key

TAR_MTIME = 0
TAR_MODE = 0o444
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_TAR_END = 2 * BLOCK  # two zero blocks close an archive
_ZEROS = bytes(BLOCK)
_MEMBER_ORDER = sorted((INPUT_IDS, LABELS, META, PIXELS))
assert _MEMBER_ORDER[-1] == PIXELS


def tarfile_header(name: str, size: int) -> bytes:
    """tarfile's own ustar header for a regular file with the fixed fields."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _header_template() -> bytes:
    header = bytearray(tarfile_header("x", 0))
    header[0:1] = b"\0"  # the name field, filled per member
    return bytes(header)


_HEADER_TEMPLATE = _header_template()


def tar_header(name: str, size: int) -> bytes:
    """tarfile_header's bytes, filled into a template: tarfile's tobuf is slow enough to show per member."""
    encoded = name.encode("utf-8")
    if len(encoded) > 99 or not encoded.isascii():
        return tarfile_header(name, size)
    header = bytearray(_HEADER_TEMPLATE)
    header[: len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "  # the checksum is computed with its own field as spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


@functools.lru_cache(maxsize=16)
def _npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    """The header np.save writes for a C-ordered array of this shape and dtype (format version 1.0)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _npy_small(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    return _npy_cached(array.tobytes(), array.dtype.str, array.shape)


@functools.lru_cache(maxsize=1024)
def _npy_cached(data: bytes, dtype: str, shape: tuple[int, ...]) -> bytes:
    # Token ids repeat for every image of a class: encode each distinct array once.
    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(data, dtype=dtype).reshape(shape), allow_pickle=False)
    return buffer.getvalue()


def meta_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True).encode("utf-8")


def sample_frame(key: str, pixel_shape: Sequence[int], input_ids: np.ndarray, labels: np.ndarray,
                 meta: dict[str, Any]) -> tuple[bytes, bytes]:
    """A uint8 sample's tar bytes before its raw pixel data and after it."""
    small = {INPUT_IDS: _npy_small(input_ids.astype(np.int32, copy=False)),
             LABELS: _npy_small(labels.astype(np.int32, copy=False)), META: meta_json(meta)}
    head = bytearray()
    for member in _MEMBER_ORDER[:-1]:
        data = small[member]
        head += tar_header(f"{key}.{member}", len(data)) + data + _ZEROS[: -len(data) % BLOCK]
    pixel_header = _npy_header(tuple(pixel_shape), "|u1")
    pixel_size = len(pixel_header) + math.prod(pixel_shape)
    head += tar_header(f"{key}.{PIXELS}", pixel_size) + pixel_header
    return bytes(head), _ZEROS[: -pixel_size % BLOCK]


def member_bytes(size: int) -> int:
    """What a member of ``size`` bytes takes in the archive: its header and its data padded to whole blocks."""
    return BLOCK + size + (-size % BLOCK)


def sample_nbytes(pixel_shape: Sequence[int], input_ids: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> int:
    """The bytes ``write_sample`` writes for a sample with these fields, computed without its pixels."""
    head, tail = sample_frame("k", pixel_shape, input_ids, labels, meta)  # headers are 512 B whatever the key
    return len(head) + math.prod(pixel_shape) + len(tail)


def closed_size(written: int) -> int:
    """File size of a shard holding ``written`` bytes of members once its end blocks and padding are added."""
    return math.ceil((written + _TAR_END) / RECORD) * RECORD


def write_sample(file, sample: Sample) -> int:
    """Append one sample's four tar members to ``file``; returns the bytes written.

    The same members as webdataset's TarWriter would write, with fixed headers, but the pixels go from the
    array to the file without being copied into intermediate buffers (they are nearly all of a sample).
    Raises SampleValidationError for a key that would not read back as one sample.
    """
    validate_key(sample.key)
    pixels = np.ascontiguousarray(sample.pixels, dtype=np.uint8)
    head, tail = sample_frame(sample.key, pixels.shape, sample.input_ids, sample.labels, sample.meta)
    file.write(head)
    file.write(memoryview(pixels).cast("B"))
    file.write(tail)
    return len(head) + pixels.nbytes + len(tail)
