"""Code for tests and benchmarks only: synthetic shards in the exact format of ``flower_shards``, and the
reference encodings the build's streaming writer is checked against.

The toy shards' colour names the class, so a tiny model learns the task in seconds; readers cannot tell these
shards from real ones (same sample members, same index.json, written through shards.format.write_index).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from plant_pipeline.ml.data.categories import CATEGORY_NAMES, CategoryMap
from plant_pipeline.ml.files import staging_folder
from plant_pipeline.ml.shards.format import (
    INPUT_IDS,
    LABELS,
    META,
    PIXELS,
    Sample,
    make_index,
    shard_entry,
    split_entry,
    write_index,
)
from plant_pipeline.ml.shards.pixels import resize_and_crop
from plant_pipeline.ml.shards.prompts import PromptEncoder
from plant_pipeline.ml.shards.tar import write_sample
from plant_pipeline.ml.shards.validation import validate_key, validate_pixels, validate_tokens


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(sample: Sample) -> dict[str, Any]:
    """Sample -> the dict ``webdataset.TarWriter.write`` takes (bytes per member): the format's plain encoding.

    Raises SampleValidationError for a key that would not read back as one sample.
    """
    validate_key(sample.key)
    return {
        "__key__": sample.key,
        PIXELS: _npy_bytes(sample.pixels.astype(np.uint8, copy=False)),
        INPUT_IDS: _npy_bytes(sample.input_ids.astype(np.int32, copy=False)),
        LABELS: _npy_bytes(sample.labels.astype(np.int32, copy=False)),
        META: json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }


def tar_sample(sample: Sample) -> bytes:
    """One sample as the exact bytes of its four tar members (headers included), as build_shards stores it."""
    buffer = io.BytesIO()
    write_sample(buffer, sample)
    return buffer.getvalue()


def validate_sample(
    sample: Sample, *, pixel_shape: tuple[int, int, int], vocab_size: int, image_token_id: int, num_image_tokens: int
) -> None:
    """Raise SampleValidationError unless ``sample`` could be stored and trained on as is."""
    validate_key(sample.key)
    validate_pixels(sample.key, sample.pixels, pixel_shape)
    validate_tokens(sample.key, sample.input_ids, sample.labels, vocab_size=vocab_size,
                    image_token_id=image_token_id, num_image_tokens=num_image_tokens)


def write_toy_shards(out_dir: Path, processor, *, classes: int = 4, per_class: dict[str, int] | None = None,
                     samples_per_shard: int = 8, seed: int = 0, categories: CategoryMap | None = None) -> Path:
    """Shards of solid-colour images whose colour names the class: a task a tiny model learns in seconds.

    Written with the same sample format and index as the flower_shards asset, so readers under test
    cannot tell the difference. With ``categories`` the prompts use its names and question and the index records
    it; without, Oxford's names and question and an index without categories (one written before they were data).
    """
    names = categories.names if categories is not None else CATEGORY_NAMES
    if classes > len(names):
        raise ValueError(f"write_toy_shards: {classes} classes but only {len(names)} category names")
    per_class = per_class or {"train": 8, "validation": 2, "test": 2}
    rng = np.random.default_rng(seed)
    encoder = PromptEncoder(processor, **({"question": categories.question} if categories else {}))
    palette = rng.integers(0, 256, size=(classes, 3))
    splits = {}
    image_id = 0
    for split, count in per_class.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        samples = []
        for label in range(classes):
            for _ in range(count):
                image_id += 1
                colour = np.clip(palette[label] + rng.integers(-10, 11, size=3), 0, 255).astype(np.uint8)
                image = Image.fromarray(np.broadcast_to(colour, (40, 48, 3)).copy())
                input_ids, labels = encoder.encode_category(names[label])
                meta = {"image_id": image_id, "label": label, "name": names[label], "split": split,
                        "source": "toy", "sha256": hashlib.sha256(colour.tobytes() + bytes([image_id % 256])).hexdigest()}
                samples.append(Sample(f"image_{image_id:05d}", resize_and_crop(processor.image_processor, image),
                                      input_ids, labels, meta))
        order = rng.permutation(len(samples))
        shards = []
        for start in range(0, len(samples), samples_per_shard):
            name = f"{split}/{split}-{start // samples_per_shard:05d}.tar"
            with wds.TarWriter(str(out_dir / name)) as writer:
                for i in order[start:start + samples_per_shard]:
                    writer.write(encode_sample(samples[i]))
            shards.append(shard_entry(out_dir, name, min(samples_per_shard, len(samples) - start)))
        splits[split] = split_entry(shards)
    write_index(out_dir, make_index(
        model_name="toy", pixel_shape=samples[0].pixels.shape, num_image_tokens=encoder.num_image_tokens,
        image_token_id=int(encoder.image_token_id), vocab_size=len(processor.tokenizer), splits=splits,
        categories=categories.to_json() if categories is not None else None,
    ))
    return out_dir


def make_model_folder(path: str | os.PathLike, categories: CategoryMap, *, models_dir: str | os.PathLike) -> Path:
    """A model folder as train() leaves it, from the untrained tiny model: the full model and processor
    (save_pretrained), training_meta.json naming the base model's spec, and categories.json (as a promoted folder
    holds it). For tests and benchmarks of identifying photos that need no training: its answers are random.

    The tiny model is built (once) under ``models_dir``; ``path`` is replaced whole.
    """
    from plant_pipeline.ml.model.spec import ModelSpec
    from plant_pipeline.ml.model.tiny import TINY_MODEL_NAME, build_tiny_llava
    from plant_pipeline.ml.serving.registry import CATEGORIES_FILE
    from plant_pipeline.ml.training.results import RESULT_META

    spec = ModelSpec(model_name=TINY_MODEL_NAME, local_files_only=True, models_dir=str(models_dir))
    built = build_tiny_llava(Path(models_dir) / TINY_MODEL_NAME)
    with staging_folder(path) as staged:
        for item in built.iterdir():
            if item.is_file():
                shutil.copy2(item, staged / item.name)
        meta = {"kind": "full", "model_spec": asdict(spec), "train_config": {}, "steps": 0}
        (staged / RESULT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        (staged / CATEGORIES_FILE).write_text(json.dumps(categories.to_json(), indent=2))
    return Path(path)


# ---- memory measurement for the benchmarks (Linux /proc) ------------------------------------------------

def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss_bytes() -> int:
    """Proportional set size of this process and its children (loader workers): pages they share are counted
    once in total. 0 where /proc is missing."""
    me = os.getpid()
    try:
        children = [int(p) for p in Path(f"/proc/{me}/task/{me}/children").read_text().split()]
    except OSError:
        children = []
    return sum(_pss_bytes(pid) for pid in [me, *children])


class PeakSampler(threading.Thread):
    """Samples tree_pss_bytes() every ``every`` seconds until stop(), which returns the peak (reading smaps
    costs system time: not too often)."""

    def __init__(self, every: float):
        super().__init__(daemon=True)
        self.every, self.peak, self._done = every, 0, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, tree_pss_bytes())
            self._done.wait(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, tree_pss_bytes())
        return self.peak
