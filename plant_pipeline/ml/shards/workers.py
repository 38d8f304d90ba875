"""The build's worker side: processes that decode, resize and crop images into a shared-memory ring.

Each task is a batch of manifest rows; a worker writes each sample's exact tar bytes into the task's ring
slot and returns only their sizes (or a quarantine record), so the parent writes shards without copying.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import math
import mmap
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from plant_pipeline.ml.images import DECODE_ERRORS, PixelFormatError, to_rgb
from plant_pipeline.ml.shards.errors import ShardBuildError
from plant_pipeline.ml.shards.geometry import PhotoPixels
from plant_pipeline.ml.shards.prompts import load_processor
from plant_pipeline.ml.shards.rows import Row, sample_meta
from plant_pipeline.ml.shards.tar import member_bytes, meta_json, sample_frame, sample_nbytes
from plant_pipeline.ml.shards.validation import SampleValidationError, validate_key


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, sent once when it starts."""

    dataset_root: str
    model_source: str
    revision: str | None
    local_files_only: bool
    names: tuple[str, ...]
    pixel_shape: tuple[int, int, int]
    pil_geometry: bool  # direct_resize_and_crop applies and matched the processor on the probes (not probed again)
    tokens: dict[int, tuple[np.ndarray, np.ndarray]]  # (input_ids, labels) per class, encoded once per build


def slot_bytes(rows: dict[str, list[Row]], spec: WorkerSpec, batch_size: int) -> int:
    """Ring slot size: a batch of the largest sample (a SHA-256 hex digest is always 64 characters)."""
    # sample_nbytes in two parts, the class's (pixels and tokens) and the row's (its metadata member):
    # one sample_nbytes per class instead of per row.
    no_meta = member_bytes(len(meta_json({})))
    per_class = {label: sample_nbytes(spec.pixel_shape, input_ids, labels, {}) - no_meta
                 for label, (input_ids, labels) in spec.tokens.items()}
    largest = max(per_class[row.label] + member_bytes(len(meta_json(sample_meta(row, spec.names, "0" * 64))))
                  for split_rows in rows.values() for row in split_rows)
    return batch_size * largest


class Ring:
    """Shared memory that workers write samples into and the parent writes shards from, one slot per task.

    Sending each image's pixels through a pipe (pickled) or a temporary file cost the workers and the parent
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
            # by the worker that writes them, instead of all up front here.
            self.buffer = mmap.mmap(-1, size)
        else:
            # A spawned worker gets it with its initargs (multiprocessing backs it with /dev/shm, or with a
            # temporary file where /dev/shm is too small, as in a default Docker container).
            self.buffer = context.RawArray(ctypes.c_ubyte, size)

    def slot(self, task: int) -> memoryview:
        start = (task % self.slots) * self.slot_bytes
        return memoryview(self.buffer).cast("B")[start:start + self.slot_bytes]


class SlotWriter:
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


class Worker:
    """Turns manifest rows into tar members (or quarantine records); one per process."""

    def __init__(self, spec: WorkerSpec, ring: Ring, processor=None) -> None:
        self.spec, self.ring = spec, ring
        self.processor = processor or load_processor(spec.model_source, spec.revision, spec.local_files_only)
        self.image_processor = self.processor.image_processor
        self.to_pixels = PhotoPixels.of(self.image_processor, direct=spec.pil_geometry)
        self.root = Path(spec.dataset_root)
        self.pixel_bytes = math.prod(spec.pixel_shape)

    def decode(self, row: Row) -> tuple[bytes, Image.Image | None, str | None]:
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
        except DECODE_ERRORS as err:  # anything else is a bug and stops the build
            return data, None, f"cannot decode image: {type(err).__name__}: {err}"
        return data, rgb, None

    def write_sample(self, row: Row, slot: SlotWriter) -> tuple[int, str | None, int]:
        """Append ``row``'s sample to ``slot``: (its size, None, file bytes), or (0, reason, file bytes).

        The pixels go straight into their place in the slot, between the tar bytes before and after them.
        """
        data, rgb, reason = self.decode(row)
        if rgb is None:
            return 0, reason, len(data)
        input_ids, labels = self.spec.tokens[row.label]  # they passed validate_tokens in the parent
        meta = sample_meta(row, self.spec.names, hashlib.sha256(data).hexdigest())
        head, tail = sample_frame(row.key, self.spec.pixel_shape, input_ids, labels, meta)
        region = slot.reserve(len(head) + self.pixel_bytes + len(tail))
        pixels = np.frombuffer(region, np.uint8, self.pixel_bytes, len(head)).reshape(self.spec.pixel_shape)
        try:
            validate_key(row.key)
            self.to_pixels(rgb, out=pixels)  # PixelFormatError for pixels of another shape
        except PixelFormatError as err:
            return 0, f"processor rejected image: {err}", len(data)
        except SampleValidationError as err:
            return 0, f"validation failed: {err}", len(data)
        region[:len(head)] = head
        region[len(head) + self.pixel_bytes:] = tail
        return slot.commit(len(region)), None, len(data)

    def process(self, rows: Sequence[Row], task: int) -> tuple[list[int | dict], int]:
        """Write the batch's samples one after another into the ring slot of ``task``.

        Returns, per row, its size there or a quarantine record, and the source bytes read.
        """
        out: list[int | dict] = []
        total = 0
        slot = SlotWriter(self.ring.slot(task))
        for row in rows:
            size, reason, read = self.write_sample(row, slot)
            total += read
            if reason is not None:
                out.append({"image_id": row.image_id, "path": row.path, "split": row.split, "reason": reason})
            else:
                out.append(size)
        return out, total


_WORKER: Worker | None = None
# Set by the parent while its pool starts: a forked worker reuses the loaded processor instead of reloading it.
_PARENT_PROCESSOR = None


def _init_worker(spec: WorkerSpec, ring: Ring) -> None:
    global _WORKER
    import torch

    # Processes are the parallelism here. And where torchvision is installed, AutoProcessor picks the
    # torch backend, whose ops in a forked child that enters the OpenMP pool its parent started hang
    # forever (GNU libgomp): one intra-op thread, as torch's own DataLoader workers do.
    torch.set_num_threads(1)
    _WORKER = Worker(spec, ring, _PARENT_PROCESSOR)


def process_task(rows: Sequence[Row], task: int) -> tuple[list[int | dict], int]:
    """Run one task in this process's worker (set up by Runner)."""
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.process(rows, task)


class Runner:
    """Runs tasks in a process pool, or in this process when there is one worker, and owns their ring.

    ``context`` is the multiprocessing context the pool starts its workers with.
    """

    def __init__(self, workers: int, context, spec: WorkerSpec, processor, slot_bytes: int, tasks: int) -> None:
        self.workers, self.context, self.spec, self.processor = workers, context, spec, processor
        self.executor: ProcessPoolExecutor | None = None
        pool = workers > 1
        self.window = 2 * workers + 1 if pool else 1  # tasks in flight: enough that no worker waits
        # map() submits task i + window before its caller has written task i's slot out: one slot more.
        slots = min(self.window + 1, tasks) if pool else 1
        self.ring = Ring(slots, slot_bytes, context if pool else None)

    def __enter__(self) -> "Runner":
        global _WORKER, _PARENT_PROCESSOR
        if self.workers <= 1:
            _WORKER = Worker(self.spec, self.ring, self.processor)
        else:
            _PARENT_PROCESSOR = self.processor  # inherited by fork; spawned workers load their own
            self.executor = ProcessPoolExecutor(self.workers, mp_context=self.context,
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
