"""Synthetic shards of solid-colour images, in the exact format of ``flower_shards``, for tests and benchmarks.

The colour names the class, so a tiny model learns the task in seconds; readers cannot tell these shards
from real ones (same sample members, same index.json).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from plant_pipeline.ml.data.categories import CATEGORY_NAMES
from plant_pipeline.ml.shards.format import INDEX_FILE, INDEX_FORMAT_VERSION, Sample, encode_sample
from plant_pipeline.ml.shards.pixels import resize_and_crop
from plant_pipeline.ml.shards.prompts import PromptEncoder


def write_toy_shards(out_dir: Path, processor, *, classes: int = 4, per_class: dict[str, int] | None = None,
                     samples_per_shard: int = 8, seed: int = 0) -> Path:
    """Shards of solid-colour images whose colour names the class: a task a tiny model learns in seconds.

    Written with the same sample format and index as the flower_shards asset, so readers under test
    cannot tell the difference.
    """
    per_class = per_class or {"train": 8, "validation": 2, "test": 2}
    rng = np.random.default_rng(seed)
    encoder = PromptEncoder(processor)
    palette = rng.integers(0, 256, size=(classes, 3))
    index = {"format_version": INDEX_FORMAT_VERSION, "model_name": "toy", "num_image_tokens": encoder.num_image_tokens,
             "splits": {}}
    image_id = 0
    for split, count in per_class.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        samples = []
        for label in range(classes):
            for _ in range(count):
                image_id += 1
                colour = np.clip(palette[label] + rng.integers(-10, 11, size=3), 0, 255).astype(np.uint8)
                image = Image.fromarray(np.broadcast_to(colour, (40, 48, 3)).copy())
                input_ids, labels = encoder.encode_category(CATEGORY_NAMES[label])
                meta = {"image_id": image_id, "label": label, "name": CATEGORY_NAMES[label], "split": split,
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
            data = (out_dir / name).read_bytes()
            shards.append({"file": name, "samples": min(samples_per_shard, len(samples) - start), "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        index["splits"][split] = {"samples": len(samples), "bytes": sum(s["bytes"] for s in shards),
                                  "quarantined": [], "shards": shards}
    index["pixel_shape"] = list(samples[0].pixels.shape)
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return out_dir
