"""Preprocess the flower manifest into WebDataset shards once, so training never decodes a JPEG.

The parent encodes each class's prompt once with the model's processor. A process pool (workers.py) decodes,
resizes and crops every image exactly as that processor does (geometry.py) and writes each sample's tar bytes
(tar.py) into shared memory; the parent writes them out as byte-identical tar shards in manifest order, split
by split, swaps them into place only when every split is complete, and writes ``index.json`` last. The checks
that read shards back are in checks.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from collections import defaultdict, deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from PIL import Image

from plant_pipeline.ml.data.categories import CategoryMap, oxford_map
from plant_pipeline.ml.data.manifest import SPLITS
from plant_pipeline.ml.files import atomic_write_json, replace_folder
from plant_pipeline.ml.shards.errors import ShardBuildError, ShardInputError
from plant_pipeline.ml.shards.format import (
    ShardEntry,
    ShardFormatError,
    ShardIndex,
    make_index,
    read_index,
    split_entry,
    write_index,
)
from plant_pipeline.ml.shards.geometry import direct_resize_and_crop, matches_processor
from plant_pipeline.ml.shards.incremental import plan_update, row_facts
from plant_pipeline.ml.shards.pixels import PixelNormalizer, resize_and_crop
from plant_pipeline.ml.shards.prompts import PromptEncoder, load_processor
from plant_pipeline.ml.shards.rows import Row, manifest_rows, plan_batches, shard_bounds
from plant_pipeline.ml.shards.tar import RECORD, closed_size
from plant_pipeline.ml.shards.validation import SampleValidationError, validate_normalizer, validate_tokens
from plant_pipeline.ml.shards.workers import Runner, WorkerSpec, process_task, slot_bytes

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"
START_METHODS = ("auto", "fork", "forkserver", "spawn")
_MIB = 2**20


@dataclass
class ShardConfig:
    """How flower_shards cuts and parallelises the work; its Launchpad config is generated from these fields."""

    samples_per_shard: int = field(default=2000, metadata={"help": "Most samples in one shard (tar file)."})
    max_shard_mb: float = field(
        default=256, metadata={"help": "Most MiB in one shard: a new shard starts before a file would exceed this."}
    )
    min_shards: int = field(
        default=4,
        metadata={"help": "Cut each split into at least this many shards when it has enough samples: at least the "
                          "trainer's data-loader workers times its processes, so every worker has a shard to read."},
    )
    num_workers: int = field(
        default=0, metadata={"help": "Preprocessing processes; 0 = one per available CPU, 1 = run in this process."}
    )
    batch_size: int = field(
        default=64, metadata={"help": "Images a worker processes per task; bounds the memory in flight."}
    )
    start_method: str = field(
        default="auto",
        metadata={"help": "multiprocessing start method: auto (fork on Linux, spawn elsewhere), fork, forkserver "
                          "or spawn. Workers use no torch ops, so fork is safe on Linux and starts fastest; spawn "
                          "and forkserver re-import torch and transformers in every worker."},
    )
    pil_geometry: bool = field(
        default=True,
        metadata={"help": "Resize and crop with PIL directly where that gives the processor's exact bytes "
                          "(checked on probe images at start); False always goes through the processor."},
    )

    def __post_init__(self) -> None:
        for name in ("samples_per_shard", "min_shards", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShardInputError(f"ShardConfig.{name} must be an integer >= 1; got {value!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ShardInputError(f"ShardConfig.num_workers must be an integer >= 0 (0 = all CPUs); got {self.num_workers!r}")
        mb = self.max_shard_mb
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb) or mb * _MIB < RECORD:
            raise ShardInputError(f"ShardConfig.max_shard_mb must be a number >= {RECORD / _MIB} ({RECORD} bytes, "
                                  f"one tar record); got {mb!r}")
        if self.start_method not in START_METHODS:
            raise ShardInputError(f"ShardConfig.start_method must be one of {START_METHODS}; got {self.start_method!r}")
        if self.start_method != "auto" and self.start_method not in multiprocessing.get_all_start_methods():
            raise ShardInputError(
                f"start method {self.start_method!r} is not available on {sys.platform}; "
                f"use one of {multiprocessing.get_all_start_methods()} or 'auto'"
            )

    @property
    def max_shard_bytes(self) -> int:
        return int(self.max_shard_mb * _MIB)

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
    index: ShardIndex
    samples: dict[str, int]
    shards: dict[str, int]
    bytes: dict[str, int]
    quarantined: list[dict[str, Any]]
    images_per_second: float
    seconds: float
    source_bytes: int  # bytes of the source image files read (for shard size vs JPEG size)
    mode: str = "full"  # "full" | "incremental" | "unchanged"
    reason: str = ""  # why this mode
    new_samples: dict[str, int] = field(default_factory=dict)  # samples preprocessed by this build, per split
    reused_shards: int = 0  # shard files kept untouched from the previous build


class _SplitWriter:
    """Writes one split's shards into a temporary folder, cutting by position bounds and by bytes."""

    def __init__(self, folder: Path, split: str, bounds: list[int], max_bytes: int, first: int = 0) -> None:
        self.folder, self.split, self.max_bytes, self.first = folder, split, max_bytes, first  # first file number
        self.next_bounds = deque(bounds[1:])
        self.shards: list[ShardEntry] = []
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}-{self.first + len(self.shards):05d}.tar"
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
        self._write(b"\0" * (closed_size(self._bytes) - self._bytes))  # end blocks + record padding, as tarfile
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
        if self._file is not None and self._samples and closed_size(self._bytes + len(blob)) > self.max_bytes:
            self._close()
        if self._file is None:
            self._open()
        self._write(blob)
        self._samples += 1

    def finish(self) -> list[ShardEntry]:
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


def _write_splits(
    rows: dict[str, list[Row]],
    temp_dirs: dict[str, Path],
    spec: WorkerSpec,
    config: ShardConfig,
    processor,
    progress: Callable[[str, int, int], None] | None,
    first: dict[str, int] | None = None,
) -> tuple[dict[str, list[ShardEntry]], dict[str, list[dict]], int]:
    """Process every batch (in a pool, or here when one worker) and write the shards in manifest order."""
    writers = {split: _SplitWriter(temp_dirs[split], split,
                                  shard_bounds(len(split_rows), config.samples_per_shard, config.min_shards),
                                  config.max_shard_bytes, (first or {}).get(split, 0))
               for split, split_rows in rows.items()}
    batches = plan_batches(rows, config.batch_size, config.workers())
    workers = min(config.workers(), len(batches))
    logger.info("building shards for %d images (%s) with %d worker(s)",
                sum(map(len, rows.values())), {s: len(r) for s, r in rows.items()}, workers)
    quarantined: dict[str, list[dict]] = defaultdict(list)
    source_bytes = 0
    try:
        size = slot_bytes(rows, spec, config.batch_size)
        with Runner(workers, config.context(), spec, processor, size, len(batches)) as runner:
            tasks = ((batch, task) for task, (_, _, batch) in enumerate(batches))
            results = runner.map(process_task, tasks)
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


def _current_index(out_dir: Path) -> ShardIndex | None:
    """The index of the shards now in ``out_dir``, or None where there is none or it is unreadable."""
    try:
        return read_index(out_dir)
    except (FileNotFoundError, ShardFormatError):
        return None


def _remove_unlisted_shards(out_dir: Path, index: ShardIndex) -> None:
    """Shard files an interrupted incremental build left behind: the index never listed them."""
    listed = {shard["file"] for entry in index["splits"].values() for shard in entry["shards"]}
    for split in SPLITS:
        for path in (out_dir / split).glob("*.tar"):
            if f"{split}/{path.name}" not in listed:
                path.unlink()


def _add_shards(out_dir: Path, temp_dirs: dict[str, Path]) -> None:
    """An incremental build's new shard files join the current ones; no existing file is touched."""
    try:
        for split, folder in temp_dirs.items():
            (out_dir / split).mkdir(exist_ok=True)
            for path in sorted(folder.glob("*.tar")):
                os.replace(path, out_dir / split / path.name)
    finally:
        for folder in temp_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)


def _replace_splits(out_dir: Path, temp_dirs: dict[str, Path]) -> None:
    """Every split is complete: each replaces its old folder; a split the manifest no longer has goes."""
    try:
        for split, folder in temp_dirs.items():
            replace_folder(folder, out_dir / split)
    finally:
        for folder in temp_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)
    for stale in set(SPLITS) - set(temp_dirs):
        shutil.rmtree(out_dir / stale, ignore_errors=True)


def build_shards(
    manifest: pd.DataFrame,
    dataset_root: Path,
    model_source: str,
    out_dir: Path,
    *,
    config: ShardConfig | None = None,
    categories: CategoryMap | None = None,
    model_name: str | None = None,
    local_files_only: bool = True,
    revision: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    incremental: bool = True,
) -> ShardsResult:
    """Write ``out_dir/<split>/<split>-NNNNN.tar``, ``quarantine.json`` and ``index.json`` from ``manifest``.

    ``model_source`` is what ``AutoProcessor.from_pretrained`` takes (a folder or a hub id); every worker
    loads it once. Unreadable images are quarantined with a reason; any other error stops the build and
    leaves the previous shards and index untouched. ``progress(split, done, total)`` is called per batch.
    ``categories`` (Oxford's by default) gives each label's name and the question; the index records them.
    When the manifest holds the current shards' rows unchanged plus new ones (and the model, question and
    category names are the same), only the new rows are preprocessed, into new shard files beside the untouched
    old ones (``mode`` "incremental"); nothing changed gives "unchanged"; anything else, or ``incremental=False``,
    a full rebuild. ``reason`` says why.
    """
    config = config or ShardConfig()
    categories = categories if categories is not None else oxford_map()
    names = categories.names
    dataset_root, out_dir = Path(dataset_root), Path(out_dir)
    started = time.perf_counter()
    if not dataset_root.is_dir():
        raise ShardInputError(f"dataset root {dataset_root} is not a folder; fetch the images first")
    rows = manifest_rows(manifest, names)

    processor = load_processor(str(model_source), revision, local_files_only)
    validate_normalizer(PixelNormalizer.from_processor(processor.image_processor))
    encoder = PromptEncoder(processor, question=categories.question)
    facts = _token_facts(encoder)
    tokens = _encode_labels(encoder, {row.label for split_rows in rows.values() for row in split_rows}, names, facts)
    fast = direct_resize_and_crop(processor.image_processor) if config.pil_geometry else None
    pil_geometry = fast is not None and matches_processor(processor.image_processor, fast)
    spec = WorkerSpec(
        dataset_root=str(dataset_root), model_source=str(model_source), revision=revision,
        local_files_only=local_files_only, names=tuple(names),
        pixel_shape=_probe_pixel_shape(processor.image_processor), pil_geometry=pil_geometry, tokens=tokens,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out_dir)
    model_name = model_name or str(model_source)
    build_facts = {"model_name": model_name, "revision": revision, "pixel_shape": list(spec.pixel_shape), **facts}
    row_files = row_facts(rows, dataset_root)
    previous = _current_index(out_dir) if incremental else None
    mode, reason, todo = plan_update(previous, build_facts, row_files, categories.to_json())
    if not incremental:
        reason = "full build requested (incremental=False)"
    logger.info("shards build: %s (%s)", mode, reason)
    old_splits: dict[str, Any] = {}
    if mode != "full":
        old_splits = previous["splits"]
        _remove_unlisted_shards(out_dir, previous)
        rows = {split: [row for row in split_rows if row.key in todo] for split, split_rows in rows.items()}
        rows = {split: split_rows for split, split_rows in rows.items() if split_rows}
        config = replace(config, min_shards=1)  # a few new rows make one shard per split, not min_shards slivers
    first = {split: len(old_splits.get(split, {}).get("shards", [])) for split in rows}

    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the pid tells a later build whether this one still runs
    temp_dirs = {split: out_dir / f".tmp-{split}-{tag}" for split in rows}
    done = False
    try:
        for folder in temp_dirs.values():
            folder.mkdir()
        if rows:
            shards, quarantined, source_bytes = _write_splits(rows, temp_dirs, spec, config, processor, progress, first)
        else:
            shards, quarantined, source_bytes = {}, defaultdict(list), 0
        done = True
    finally:
        if not done:
            for folder in temp_dirs.values():
                shutil.rmtree(folder, ignore_errors=True)
    if mode == "full":
        _replace_splits(out_dir, temp_dirs)
    else:
        _add_shards(out_dir, temp_dirs)

    splits = {split: split_entry(shards[split], quarantined[split]) for split in rows}
    for split, entry in old_splits.items():  # the reused shards first, in their order
        added = splits.get(split, split_entry([]))
        splits[split] = split_entry(entry["shards"] + added["shards"], entry["quarantined"] + added["quarantined"])
    index = make_index(model_name=model_name, revision=revision, pixel_shape=spec.pixel_shape, splits=splits,
                       categories=categories.to_json(), **facts)
    index["inputs"] = {"build": build_facts, "rows": row_files}  # what the next build compares (incremental.py)
    all_quarantined = [q for split in splits for q in splits[split]["quarantined"]]
    atomic_write_json(out_dir / QUARANTINE_FILE, all_quarantined)
    write_index(out_dir, index)
    seconds = time.perf_counter() - started
    total = sum(map(len, rows.values()))
    result = ShardsResult(
        out_dir=out_dir, index=index,
        samples={s: v["samples"] for s, v in index["splits"].items()},
        shards={s: len(v["shards"]) for s, v in index["splits"].items()},
        bytes={s: v["bytes"] for s, v in index["splits"].items()},
        quarantined=all_quarantined, images_per_second=total / seconds if seconds > 0 else 0.0,
        seconds=seconds, source_bytes=source_bytes, mode=mode, reason=reason,
        new_samples={s: sum(e["samples"] for e in shards[s]) for s in rows},
        reused_shards=sum(len(entry["shards"]) for entry in old_splits.values()),
    )
    logger.info("wrote %s samples in %s shards (%d quarantined) in %.1f s, %.0f images/s",
                result.samples, result.shards, len(all_quarantined), seconds, result.images_per_second)
    return result
