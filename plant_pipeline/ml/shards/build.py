"""Preprocess the flower manifest into WebDataset shards once, so training never decodes a JPEG.

The parent encodes each class's prompt once with the model's processor. A process pool decodes, resizes
and crops every image exactly as that processor does (pil_geometry.py) and writes each sample's tar bytes
into shared memory; the parent writes them out as byte-identical tar shards in manifest order, split by
split, swaps them into place only when every split is complete, and writes ``index.json`` last. Reading
shards back and the checks the asset runs are in shard_checks.py.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import json
import logging
import math
import mmap
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
import uuid
from collections import defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.data.manifest import MANIFEST_COLUMNS, SPLITS
from plant_pipeline.ml.data.oxford import SOURCE as DEFAULT_SOURCE
from plant_pipeline.ml.errors import PlantPipelineError, UsageError
from plant_pipeline.ml.files import atomic_write_json
from plant_pipeline.ml.shards.format import (
    INDEX_FILE,
    INDEX_FORMAT_VERSION,
    INPUT_IDS,
    LABELS,
    META,
    PIXELS,
    Sample,
)
from plant_pipeline.ml.shards.geometry import direct_resize_and_crop, matches_processor
from plant_pipeline.ml.shards.pixels import DECODE_ERRORS, PixelFormatError, resize_and_crop, to_rgb
from plant_pipeline.ml.shards.prompts import PromptEncoder
from plant_pipeline.ml.shards.validation import (
    SampleValidationError,
    validate_key,
    validate_normalizer,
    validate_pixels,
    validate_tokens,
)

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"
START_METHODS = ("auto", "fork", "forkserver", "spawn")
# Fixed tar header fields: the same samples always give the same bytes (and sha256).
TAR_MTIME = 0
TAR_MODE = 0o444
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_TAR_END = 2 * _BLOCK  # two zero blocks close an archive
_ZEROS = bytes(_BLOCK)
# Errors PIL raises for files that are not (intact) images; anything else is a bug and stops the build.


class ShardInputError(UsageError):
    """The manifest, dataset folder or processor cannot produce shards; raised before any work starts."""


class ShardBuildError(PlantPipelineError, RuntimeError):
    """The build stopped midway (a worker died or raised); the previous shards are left as they were."""


@dataclass
class ShardConfig:
    """How flower_shards cuts and parallelises the work."""

    samples_per_shard: int = field(default=2000, metadata={"help": "Most samples in one shard file."})
    max_shard_bytes: int = field(
        default=256 * 2**20, metadata={"help": "Start a new shard before a file would exceed this many bytes."}
    )
    min_shards: int = field(
        default=1,
        metadata={"help": "Cut each split into at least this many shards when it has enough samples "
                          "(e.g. data-loader workers x ranks, so that no reader is left without a shard)."},
    )
    num_workers: int = field(
        default=0, metadata={"help": "Worker processes; 0 = one per available CPU, 1 = run in this process."}
    )
    batch_size: int = field(default=64, metadata={"help": "Images per task sent to a worker."})
    start_method: str = field(
        default="auto",
        metadata={"help": "multiprocessing start method: auto (fork on Linux, spawn elsewhere), fork, "
                          "forkserver or spawn. Workers use no torch ops, so fork is safe on Linux and starts "
                          "in milliseconds; spawn/forkserver re-import torch+transformers (~5 s)."},
    )
    pil_geometry: bool = field(
        default=True,
        metadata={"help": "Resize and crop with PIL directly where that gives the processor's exact bytes "
                          "(checked on probe images at start); False always goes through the processor."},
    )

    def __post_init__(self) -> None:
        for name in ("samples_per_shard", "min_shards", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ShardInputError(f"ShardConfig.{name} must be an integer >= 1; got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ShardInputError(f"ShardConfig.num_workers must be an integer >= 0 (0 = all CPUs); got {self.num_workers!r}")
        if not isinstance(self.max_shard_bytes, int) or self.max_shard_bytes < _RECORD:
            raise ShardInputError(
                f"ShardConfig.max_shard_bytes must be an integer >= {_RECORD} (one tar record); got {self.max_shard_bytes!r}"
            )
        if self.start_method not in START_METHODS:
            raise ShardInputError(f"ShardConfig.start_method must be one of {START_METHODS}; got {self.start_method!r}")
        if self.start_method != "auto" and self.start_method not in multiprocessing.get_all_start_methods():
            raise ShardInputError(
                f"start method {self.start_method!r} is not available on {sys.platform}; "
                f"use one of {multiprocessing.get_all_start_methods()} or 'auto'"
            )

    def workers(self) -> int:
        if self.num_workers:
            return self.num_workers
        if hasattr(os, "sched_getaffinity"):  # the CPUs this process may use (containers, taskset)
            return max(1, len(os.sched_getaffinity(0)))
        return max(1, os.cpu_count() or 1)

    def context(self):
        method = self.start_method
        if method == "auto":
            method = "fork" if sys.platform.startswith("linux") else "spawn"
        return multiprocessing.get_context(method)


@dataclass
class ShardsResult:
    """What build_shards wrote; ``index`` is the content of index.json."""

    out_dir: Path
    index: dict[str, Any]
    samples: dict[str, int]
    shards: dict[str, int]
    bytes: dict[str, int]
    quarantined: list[dict[str, Any]]
    images_per_second: float
    seconds: float
    source_bytes: int  # bytes of the source image files read (for shard size vs JPEG size)


# --- keys and rows ---------------------------------------------------------------------------------


def sample_key(image_id: int, source: str = DEFAULT_SOURCE) -> str:
    """``image_00042``; images from another source are prefixed with it so keys stay unique."""
    key = f"image_{int(image_id):05d}"
    if source and source != DEFAULT_SOURCE:
        # A dot would split the WebDataset key; keep the prefix short enough for a ustar name.
        key = f"{re.sub(r'[^A-Za-z0-9_-]+', '-', source)[:40]}_{key}"
    return key


@dataclass(frozen=True)
class _Row:
    key: str
    image_id: int
    path: str
    label: int
    split: str
    source: str


def _manifest_rows(manifest: pd.DataFrame, names: Sequence[str]) -> dict[str, list[_Row]]:
    """Validate the manifest and return its rows per split, in the fixed build order (split, image_id, source)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns and c != "source"]
    if missing:
        raise ShardInputError(f"manifest is missing columns {missing}; expected {list(MANIFEST_COLUMNS)}, "
                              f"found {list(manifest.columns)}")
    if len(manifest) == 0:
        raise ShardInputError("manifest has no rows; build the manifest (flower_manifest) first")
    frame = manifest.copy()
    if "source" not in frame.columns:
        frame["source"] = DEFAULT_SOURCE
    bad_split = sorted(set(frame["split"]) - set(SPLITS))
    if bad_split:
        raise ShardInputError(f"manifest has unknown split values {bad_split}; expected {list(SPLITS)}")
    labels = frame["label"].to_numpy()
    bad = (labels < 0) | (labels >= len(names))
    if bad.any():
        raise ShardInputError(f"manifest has {int(bad.sum())} labels outside 0..{len(names) - 1} "
                              f"(e.g. {int(labels[bad][0])}); are the category names the right list?")
    frame["split_rank"] = frame["split"].map({s: i for i, s in enumerate(SPLITS)})
    frame = frame.sort_values(["split_rank", "image_id", "source"], kind="stable")
    rows: dict[str, list[_Row]] = {}
    seen: dict[str, str] = {}
    for image_id, path, label, split, source in zip(frame["image_id"], frame["path"], frame["label"],
                                                    frame["split"], frame["source"]):
        row = _Row(sample_key(image_id, str(source)), int(image_id), str(path), int(label), str(split), str(source))
        if row.key in seen:
            raise ShardInputError(f"manifest rows {seen[row.key]!r} and {row.path!r} both give sample key "
                                  f"{row.key!r}; (source, image_id) must be unique")
        seen[row.key] = row.path
        rows.setdefault(row.split, []).append(row)
    return rows


def _shard_bounds(n: int, config: ShardConfig) -> list[int]:
    """Row positions where a split's shards start: at least min(min_shards, n) shards, balanced in size.

    Cut by manifest position, so a quarantined image shrinks its own shard instead of moving every
    later sample into another one.
    """
    count = max(min(config.min_shards, n), math.ceil(n / config.samples_per_shard))
    return [(j * n) // count for j in range(count)]


# --- the worker side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WorkerSpec:
    dataset_root: str
    model_source: str
    revision: str | None
    local_files_only: bool
    names: tuple[str, ...]
    pixel_shape: tuple[int, int, int]
    pil_geometry: bool  # direct_resize_and_crop applies and matched the processor on the probes
    tokens: dict[int, tuple[np.ndarray, np.ndarray]]  # (input_ids, labels) per class, encoded once per build


def _load_processor(model_source: str, revision: str | None, local_files_only: bool):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_source, revision=revision, local_files_only=local_files_only)


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _header_template() -> bytes:
    header = bytearray(_tarfile_header("x", 0))
    header[0:1] = b"\0"  # the name field, filled per member
    return bytes(header)


_HEADER_TEMPLATE = _header_template()


def _tar_header(name: str, size: int) -> bytes:
    """tarfile's ustar header for a regular file, from a template: tarfile's tobuf costs ~25 us a member."""
    encoded = name.encode("utf-8")
    if len(encoded) > 99 or not encoded.isascii():
        return _tarfile_header(name, size)
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


def write_sample(file, sample: Sample) -> int:
    """Append one sample's four tar members to ``file``; returns the bytes written.

    The same bytes as shard_format.encode_sample's members in a ustar archive with fixed headers, but the
    pixels go from the array to the file without being copied into intermediate buffers (they are 98% of
    a sample); test_shards checks the two stay identical. Raises SampleValidationError for a key that would
    not read back as one sample.
    """
    validate_key(sample.key)
    pixels = np.ascontiguousarray(sample.pixels, dtype=np.uint8)
    head, tail = _sample_frame(sample.key, pixels.shape, sample.input_ids, sample.labels, sample.meta)
    file.write(head)
    file.write(memoryview(pixels).cast("B"))
    file.write(tail)
    return len(head) + pixels.nbytes + len(tail)


# The order webdataset's TarWriter writes members in. Pixels come last, so a sample's tar bytes are a
# small head, the raw pixel bytes, and the pixel member's padding: workers write the pixels in between.
_MEMBER_ORDER = sorted((INPUT_IDS, LABELS, META, PIXELS))
assert _MEMBER_ORDER[-1] == PIXELS


def _sample_frame(key: str, pixel_shape: Sequence[int], input_ids: np.ndarray, labels: np.ndarray,
                  meta: dict[str, Any]) -> tuple[bytes, bytes]:
    """A uint8 sample's tar bytes before its raw pixel data and after it."""
    small = {INPUT_IDS: _npy_small(input_ids.astype(np.int32, copy=False)),
             LABELS: _npy_small(labels.astype(np.int32, copy=False)), META: _meta_json(meta)}
    head = bytearray()
    for member in _MEMBER_ORDER[:-1]:
        data = small[member]
        head += _tar_header(f"{key}.{member}", len(data)) + data + _ZEROS[: -len(data) % _BLOCK]
    pixel_header = _npy_header(tuple(pixel_shape), "|u1")
    pixel_size = len(pixel_header) + math.prod(pixel_shape)
    head += _tar_header(f"{key}.{PIXELS}", pixel_size) + pixel_header
    return bytes(head), _ZEROS[: -pixel_size % _BLOCK]


def _meta_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True).encode("utf-8")


def _member_bytes(size: int) -> int:
    """What a member of ``size`` bytes takes in the archive: its header and its data padded to whole blocks."""
    return _BLOCK + size + (-size % _BLOCK)


def sample_nbytes(pixel_shape: Sequence[int], input_ids: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> int:
    """``len(tar_sample(sample))`` for a sample with these fields, computed without its pixels."""
    head, tail = _sample_frame("k", pixel_shape, input_ids, labels, meta)  # headers are 512 B whatever the key
    return len(head) + math.prod(pixel_shape) + len(tail)


def _sample_meta(row: _Row, names: Sequence[str], sha256: str) -> dict[str, Any]:
    return {"image_id": row.image_id, "label": row.label, "name": names[row.label], "split": row.split,
            "source": row.source, "path": row.path, "sha256": sha256}


class _Ring:
    """Shared memory that workers write samples into and the parent writes shards from, one slot per task.

    Sending ~350 kB per image through a pipe (pickled) or a temporary file cost the workers and the parent
    about as much CPU as resizing it; a slot is written once by a worker and read once by the parent, with
    no copy in between.
    """

    def __init__(self, slots: int, slot_bytes: int, context=None) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        size = slots * slot_bytes
        if context is None:  # the worker runs in this process
            self.buffer = bytearray(size)
        elif context.get_start_method() == "fork":
            # Anonymous shared memory that forked workers inherit; its pages are zeroed as first touched,
            # by the worker that writes them, instead of all up front here (0.1 s per 100 MB).
            self.buffer = mmap.mmap(-1, size)
        else:
            # A spawned worker gets it with its initargs (multiprocessing backs it with /dev/shm, or with a
            # temporary file where /dev/shm is too small, as in a default Docker container).
            self.buffer = context.RawArray(ctypes.c_ubyte, size)

    def slot(self, task: int) -> memoryview:
        start = (task % self.slots) * self.slot_bytes
        return memoryview(self.buffer).cast("B")[start:start + self.slot_bytes]


class _SlotWriter:
    """The ``write`` of a file, into one ring slot; or ``reserve`` a region, fill it, and ``commit`` it."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.position = view, 0

    def reserve(self, size: int) -> memoryview:
        end = self.position + size
        if end > len(self.view):
            raise ShardBuildError(f"a batch needs more than the {len(self.view)} bytes sized for it; this is a bug "
                                  "in sample_nbytes (please report it)")
        return self.view[self.position:end]

    def commit(self, size: int) -> int:
        self.position += size
        return size

    def write(self, data: bytes | memoryview) -> int:
        self.reserve(len(data))[:] = data
        return self.commit(len(data))


def tar_sample(sample: Sample) -> bytes:
    """One sample as the exact bytes of its four tar members (headers included), as stored in a shard."""
    buffer = io.BytesIO()
    write_sample(buffer, sample)
    return buffer.getvalue()


class _Worker:
    """Turns manifest rows into tar members (or quarantine records); one per process."""

    def __init__(self, spec: _WorkerSpec, ring: _Ring, processor=None) -> None:
        self.spec, self.ring = spec, ring
        self.processor = processor or _load_processor(spec.model_source, spec.revision, spec.local_files_only)
        self.image_processor = self.processor.image_processor
        self.direct = direct_resize_and_crop(self.image_processor) if spec.pil_geometry else None
        self.root = Path(spec.dataset_root)
        self.pixel_bytes = math.prod(spec.pixel_shape)

    def decode(self, row: _Row) -> tuple[bytes, Image.Image | None, str | None]:
        """(file bytes, RGB image, None), or (file bytes, None, reason) for a per-image problem."""
        try:
            data = (self.root / row.path).read_bytes()
        except FileNotFoundError:
            return b"", None, "missing file"
        except OSError as err:
            return b"", None, f"unreadable file: {err.strerror or err}"
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = to_rgb(image)  # greyscale, CMYK, palette: converted, not quarantined
                rgb.load()
        except UnidentifiedImageError:
            return data, None, "not a recognised image format"
        except DECODE_ERRORS as err:
            return data, None, f"cannot decode image: {type(err).__name__}: {err}"
        return data, rgb, None

    def pixels_into(self, key: str, rgb: Image.Image, out: np.ndarray) -> None:
        """The processor's resize and crop of ``rgb``, checked, written into ``out``."""
        if self.direct is not None:
            self.direct(rgb, out=out)  # refuses an image whose pixels do not have out's shape
            return
        pixels = resize_and_crop(self.image_processor, rgb)
        validate_pixels(key, pixels, self.spec.pixel_shape)
        out[...] = pixels

    def write_sample(self, row: _Row, slot: _SlotWriter) -> tuple[int, str | None, int]:
        """Append ``row``'s sample to ``slot``: (its size, None, file bytes), or (0, reason, file bytes).

        The pixels go straight into their place in the slot, between the tar bytes before and after them.
        """
        data, rgb, reason = self.decode(row)
        if rgb is None:
            return 0, reason, len(data)
        input_ids, labels = self.spec.tokens[row.label]  # they passed validate_tokens in the parent
        meta = _sample_meta(row, self.spec.names, hashlib.sha256(data).hexdigest())
        head, tail = _sample_frame(row.key, self.spec.pixel_shape, input_ids, labels, meta)
        region = slot.reserve(len(head) + self.pixel_bytes + len(tail))
        pixels = np.frombuffer(region, np.uint8, self.pixel_bytes, len(head)).reshape(self.spec.pixel_shape)
        try:
            validate_key(row.key)
            self.pixels_into(row.key, rgb, pixels)
        except PixelFormatError as err:
            return 0, f"processor rejected image: {err}", len(data)
        except SampleValidationError as err:
            return 0, f"validation failed: {err}", len(data)
        region[:len(head)] = head
        region[len(head) + self.pixel_bytes:] = tail
        return slot.commit(len(region)), None, len(data)

    def process(self, rows: Sequence[_Row], task: int) -> tuple[list[int | dict], int]:
        """Write the batch's samples one after another into the ring slot of ``task``.

        Returns, per row, its size there or a quarantine record, and the source bytes read.
        """
        out: list[int | dict] = []
        total = 0
        slot = _SlotWriter(self.ring.slot(task))
        for row in rows:
            size, reason, read = self.write_sample(row, slot)
            total += read
            if reason is not None:
                out.append({"image_id": row.image_id, "path": row.path, "split": row.split, "reason": reason})
            else:
                out.append(size)
        return out, total


_WORKER: _Worker | None = None
# Set by the parent while its pool starts: a forked worker reuses the loaded processor instead of reloading it.
_PARENT_PROCESSOR = None


def _init_worker(spec: _WorkerSpec, ring: _Ring) -> None:
    global _WORKER
    import torch

    # Processes are the parallelism here. And where torchvision is installed, AutoProcessor picks the
    # torch backend, whose ops in a forked child that enters the OpenMP pool its parent started hang
    # forever (GNU libgomp): one intra-op thread, as torch's own DataLoader workers do.
    torch.set_num_threads(1)
    _WORKER = _Worker(spec, ring, _PARENT_PROCESSOR)


def _process_task(rows: Sequence[_Row], task: int) -> tuple[list[int | dict], int]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.process(rows, task)


class _Runner:
    """Runs batches in a process pool, or in this process when there is one worker, and owns their ring."""

    def __init__(self, workers: int, config: ShardConfig, spec: _WorkerSpec, processor, slot_bytes: int,
                 tasks: int) -> None:
        self.workers, self.config, self.spec, self.processor = workers, config, spec, processor
        self.executor: ProcessPoolExecutor | None = None
        pool = workers > 1
        self.window = 2 * workers + 1 if pool else 1  # tasks in flight: enough that no worker waits
        # map() submits task i + window before its caller has written task i's slot out: one slot more.
        slots = min(self.window + 1, tasks) if pool else 1
        self.ring = _Ring(slots, slot_bytes, config.context() if pool else None)

    def __enter__(self) -> "_Runner":
        global _WORKER, _PARENT_PROCESSOR
        if self.workers <= 1:
            _WORKER = _Worker(self.spec, self.ring, self.processor)
        else:
            _PARENT_PROCESSOR = self.processor  # inherited by fork; spawned workers load their own
            self.executor = ProcessPoolExecutor(self.workers, mp_context=self.config.context(),
                                                initializer=_init_worker, initargs=(self.spec, self.ring))
        return self

    def __exit__(self, *exc_info) -> None:
        global _WORKER, _PARENT_PROCESSOR
        if self.executor is not None:
            # Cancel what has not started; at most one batch per worker is still finishing.
            self.executor.shutdown(wait=True, cancel_futures=True)
        else:
            _WORKER = None
        _PARENT_PROCESSOR = None

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator:
        """``fn(*task)`` for every task, results in task order, at most ``self.window`` tasks in flight."""
        if self.executor is None:
            yield from (fn(*task) for task in tasks)
            return
        window = self.window
        pending: deque = deque()
        tasks = iter(tasks)
        for task in tasks:
            pending.append(self.executor.submit(fn, *task))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            task = next(tasks, None)
            if task is not None:
                pending.append(self.executor.submit(fn, *task))
            yield result


# --- the parent side -------------------------------------------------------------------------------


def _closed_size(written: int) -> int:
    """File size of a shard holding ``written`` bytes of members once its end blocks and padding are added."""
    return math.ceil((written + _TAR_END) / _RECORD) * _RECORD


class _SplitWriter:
    """Writes one split's shards into a temporary folder, cutting by position bounds and by bytes."""

    def __init__(self, folder: Path, split: str, bounds: list[int], max_bytes: int) -> None:
        self.folder, self.split, self.max_bytes = folder, split, max_bytes
        self.next_bounds = deque(bounds[1:])
        self.shards: list[dict[str, Any]] = []
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.tar"
        self._file = open(self.folder / name, "wb")
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._samples = 0
        self.shards.append({"file": f"{self.split}/{name}"})

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def _close(self) -> None:
        if self._file is None:
            return
        self._write(b"\0" * (_closed_size(self._bytes) - self._bytes))  # end blocks + record padding, as tarfile
        self._file.close()
        self._file = None
        self.shards[-1].update(samples=self._samples, bytes=self._bytes, sha256=self._hash.hexdigest())

    def add(self, position: int, blob: bytes | memoryview | None) -> None:
        """Row ``position`` of the split: its tar bytes, or None when it was quarantined."""
        if self.next_bounds and position >= self.next_bounds[0]:
            self.next_bounds.popleft()
            self._close()
        if blob is None:
            return
        if self._file is not None and self._samples and _closed_size(self._bytes + len(blob)) > self.max_bytes:
            self._close()
        if self._file is None:
            self._open()
        self._write(blob)
        self._samples += 1

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temp_dirs(out_dir: Path) -> None:
    """Temp folders of builds that were killed (their pid is in the name and no longer runs)."""
    for path in out_dir.glob(".tmp-*"):
        match = re.match(r"\.tmp-.+-(\d+)-[0-9a-f]+$", path.name)
        if path.is_dir() and match and not _alive(int(match.group(1))):
            logger.info("removing %s left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


def _probe_pixel_shape(image_processor) -> tuple[int, int, int]:
    """The fixed [3, H, W] the processor produces; a processor whose output size varies cannot be stored."""
    shapes = {tuple(resize_and_crop(image_processor, Image.new("RGB", size)).shape) for size in ((97, 61), (61, 97))}
    if len(shapes) != 1:
        raise ShardInputError(
            f"the processor's resize/crop gives different shapes {sorted(shapes)} for portrait and landscape "
            "images; shards need one fixed pixel shape (use a processor with a centre crop or a fixed size)"
        )
    return shapes.pop()


def _token_facts(encoder: PromptEncoder) -> dict[str, int]:
    return {"num_image_tokens": encoder.num_image_tokens, "image_token_id": int(encoder.image_token_id),
            "vocab_size": len(encoder.processor.tokenizer)}


def _encode_labels(encoder: PromptEncoder, labels: set[int], names: Sequence[str], facts: dict[str, int]) -> dict:
    """Token ids of every class in the manifest, each checked once here.

    They are the same for every image of a class, and their lengths size the ring, so they are encoded
    before the workers start; a bad encoding is not an image problem, so it stops the build.
    """
    ordered = sorted(labels)
    tokens = dict(zip(ordered, encoder.encode_categories([names[label] for label in ordered])))
    for label, (input_ids, label_ids) in tokens.items():
        try:
            validate_tokens(f"class {label} ({names[label]})", input_ids, label_ids, **facts)
        except SampleValidationError as err:
            raise ShardInputError(f"the processor's prompt encoding is unusable: {err}; check its chat template "
                                  "and tokenizer") from err
    return tokens


def _slot_bytes(rows: dict[str, list[_Row]], spec: _WorkerSpec, batch_size: int) -> int:
    """Ring slot size: a batch of the largest sample (a SHA-256 hex digest is always 64 characters)."""
    # sample_nbytes in two parts, the class's (pixels and tokens) and the row's (its metadata member):
    # one sample_nbytes per class instead of per row.
    no_meta = _member_bytes(len(_meta_json({})))
    per_class = {label: sample_nbytes(spec.pixel_shape, input_ids, labels, {}) - no_meta
                 for label, (input_ids, labels) in spec.tokens.items()}
    largest = max(per_class[row.label] + _member_bytes(len(_meta_json(_sample_meta(row, spec.names, "0" * 64))))
                  for split_rows in rows.values() for row in split_rows)
    return batch_size * largest


def _batches(rows: dict[str, list[_Row]], batch_size: int, workers: int) -> list[tuple[str, int, list[_Row]]]:
    """(split, first position, rows) of every task, in manifest order.

    The last ``workers`` batches' worth of rows go out in quarter batches, so that the workers finish
    within a quarter batch of each other instead of one idling through the other's last full batch.
    """
    batches = [(split, start, split_rows[start:start + batch_size])
               for split, split_rows in rows.items() for start in range(0, len(split_rows), batch_size)]
    small, tail, tail_rows = max(1, batch_size // 4), [], 0
    while batches and workers > 1 and tail_rows < workers * batch_size:
        split, start, batch = batches.pop()
        tail[:0] = [(split, start + i, batch[i:i + small]) for i in range(0, len(batch), small)]
        tail_rows += len(batch)
    return batches + tail


def _write_splits(
    rows: dict[str, list[_Row]],
    temp_dirs: dict[str, Path],
    spec: _WorkerSpec,
    config: ShardConfig,
    processor,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[dict[str, list[dict]], dict[str, list[dict]], int]:
    """Process every batch (in a pool, or here when one worker) and write the shards in manifest order."""
    writers = {split: _SplitWriter(temp_dirs[split], split, _shard_bounds(len(split_rows), config),
                                   config.max_shard_bytes) for split, split_rows in rows.items()}
    batches = _batches(rows, config.batch_size, config.workers())
    workers = min(config.workers(), len(batches))
    logger.info("building shards for %d images (%s) with %d worker(s)",
                sum(map(len, rows.values())), {s: len(r) for s, r in rows.items()}, workers)
    quarantined: dict[str, list[dict]] = defaultdict(list)
    source_bytes = 0
    try:
        slot_bytes = _slot_bytes(rows, spec, config.batch_size)
        with _Runner(workers, config, spec, processor, slot_bytes, len(batches)) as runner:
            tasks = ((batch, task) for task, (_, _, batch) in enumerate(batches))
            results = runner.map(_process_task, tasks)
            for task, ((split, start, batch), (items, read)) in enumerate(zip(batches, results)):
                source_bytes += read
                writer, slot, offset = writers[split], runner.ring.slot(task), 0
                for position, item in enumerate(items, start):
                    if isinstance(item, dict):
                        quarantined[split].append(item)
                        logger.warning("quarantined %s (%s): %s", item["path"], split, item["reason"])
                        writer.add(position, None)
                        continue
                    writer.add(position, slot[offset:offset + item])
                    offset += item
                if progress is not None:
                    progress(split, start + len(batch), len(rows[split]))
        return {split: writer.finish() for split, writer in writers.items()}, quarantined, source_bytes
    except BrokenProcessPool as err:
        raise ShardBuildError(f"a shard worker process died ({err}); out of memory? The previous shards are "
                              "untouched. Retry with fewer workers or a smaller batch_size.") from err
    finally:
        for writer in writers.values():
            writer.abort()


def _swap_in(out_dir: Path, temp_dirs: dict[str, Path], tag: str) -> None:
    """Every split is complete: replace the old split folders with the new ones, one rename each."""
    try:
        for split, folder in temp_dirs.items():
            final = out_dir / split
            old = out_dir / f".tmp-old-{split}-{tag}"
            if final.exists():
                os.replace(final, old)
            os.replace(folder, final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        for folder in temp_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)
    for stale in set(SPLITS) - set(temp_dirs):
        shutil.rmtree(out_dir / stale, ignore_errors=True)  # a split the manifest no longer has


def build_shards(
    manifest: pd.DataFrame,
    dataset_root: Path,
    model_source: str,
    out_dir: Path,
    *,
    config: ShardConfig | None = None,
    names: Sequence[str] = CATEGORY_NAMES,
    model_name: str | None = None,
    local_files_only: bool = True,
    revision: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ShardsResult:
    """Write ``out_dir/<split>/<split>-NNNNN.tar``, ``quarantine.json`` and ``index.json`` from ``manifest``.

    ``model_source`` is what ``AutoProcessor.from_pretrained`` takes (a folder or a hub id); every worker
    loads it once. Unreadable images are quarantined with a reason; any other error stops the build and
    leaves the previous shards and index untouched. ``progress(split, done, total)`` is called per batch.
    """
    config = config or ShardConfig()
    dataset_root, out_dir = Path(dataset_root), Path(out_dir)
    started = time.perf_counter()
    if not dataset_root.is_dir():
        raise ShardInputError(f"dataset root {dataset_root} is not a folder; fetch the images first")
    rows = _manifest_rows(manifest, names)

    processor = _load_processor(str(model_source), revision, local_files_only)
    from plant_pipeline.ml.shards.pixels import PixelNormalizer  # torch is imported by transformers already

    validate_normalizer(PixelNormalizer.from_processor(processor.image_processor))
    encoder = PromptEncoder(processor)
    facts = _token_facts(encoder)
    tokens = _encode_labels(encoder, {row.label for split_rows in rows.values() for row in split_rows}, names, facts)
    fast = direct_resize_and_crop(processor.image_processor) if config.pil_geometry else None
    pil_geometry = fast is not None and matches_processor(processor.image_processor, fast)
    spec = _WorkerSpec(
        dataset_root=str(dataset_root), model_source=str(model_source), revision=revision,
        local_files_only=local_files_only, names=tuple(names),
        pixel_shape=_probe_pixel_shape(processor.image_processor), pil_geometry=pil_geometry, tokens=tokens,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out_dir)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp_dirs = {split: out_dir / f".tmp-{split}-{tag}" for split in rows}
    done = False
    try:
        for folder in temp_dirs.values():
            folder.mkdir()
        shards, quarantined, source_bytes = _write_splits(rows, temp_dirs, spec, config, processor, progress)
        done = True
    finally:
        if not done:
            for folder in temp_dirs.values():
                shutil.rmtree(folder, ignore_errors=True)
    _swap_in(out_dir, temp_dirs, tag)

    index = {
        "format_version": INDEX_FORMAT_VERSION,
        "model_name": model_name or str(model_source),
        "revision": revision,
        "pixel_shape": list(spec.pixel_shape),
        **facts,
        "splits": {
            split: {
                "samples": sum(s["samples"] for s in shards[split]),
                "bytes": sum(s["bytes"] for s in shards[split]),
                "quarantined": [{k: q[k] for k in ("image_id", "path", "reason")} for q in quarantined[split]],
                "shards": shards[split],
            }
            for split in rows
        },
    }
    all_quarantined = [q for split in rows for q in quarantined[split]]
    atomic_write_json(out_dir / QUARANTINE_FILE, all_quarantined)
    atomic_write_json(out_dir / INDEX_FILE, index)
    seconds = time.perf_counter() - started
    total = sum(map(len, rows.values()))
    result = ShardsResult(
        out_dir=out_dir, index=index,
        samples={s: v["samples"] for s, v in index["splits"].items()},
        shards={s: len(v["shards"]) for s, v in index["splits"].items()},
        bytes={s: v["bytes"] for s, v in index["splits"].items()},
        quarantined=all_quarantined, images_per_second=total / seconds if seconds > 0 else 0.0,
        seconds=seconds, source_bytes=source_bytes,
    )
    logger.info("wrote %s samples in %s shards (%d quarantined) in %.1f s, %.0f images/s",
                result.samples, result.shards, len(all_quarantined), seconds, result.images_per_second)
    return result
