"""The small folder of awkward images the shard tests build from, and helpers to build and read it back."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from plant_pipeline.ml.data.categories import OXFORD_QUESTION, CategoryMap
from plant_pipeline.ml.shards.build import ShardConfig, build_shards
from plant_pipeline.ml.shards.format import decode_sample, read_index

NAMES = ("pink primrose", "hard-leaved pocket orchid", "canterbury bells")
CATEGORIES = CategoryMap(NAMES, question=OXFORD_QUESTION)  # Oxford's first three names and question
needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


def noise(rng, height, width, channels=3):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_flower_folder(root: Path, seed: int = 0) -> pd.DataFrame:
    """16 manifest rows over 3 classes: every image mode the pipeline converts, and 4 that it must quarantine."""
    rng = np.random.default_rng(seed)
    rgb = lambda h, w: Image.fromarray(noise(rng, h, w))  # noqa: E731
    files = {
        1: ("train", 0, "jpg/a1.jpg", jpeg_bytes(rgb(60, 80))),
        2: ("train", 0, "jpg/a2_grey.jpg", jpeg_bytes(Image.fromarray(noise(rng, 90, 50, 1), "L"))),
        3: ("train", 1, "jpg/a3_cmyk.jpg", jpeg_bytes(Image.fromarray(noise(rng, 70, 70, 4), "CMYK"))),
        4: ("train", 1, "png/a4_palette.png", png_bytes(rgb(48, 64).convert("P", palette=Image.Palette.ADAPTIVE))),
        5: ("train", 2, "png/a5_alpha.png", png_bytes(Image.fromarray(noise(rng, 40, 40, 4), "RGBA"))),
        6: ("train", 2, "jpg/a6.jpg", jpeg_bytes(rgb(64, 100))),
        7: ("train", 0, "jpg/a7_corrupt.jpg", rng.bytes(3000)),
        8: ("train", 1, "jpg/a8_missing.jpg", None),
        9: ("train", 2, "jpg/a9_truncated.jpg", jpeg_bytes(rgb(80, 80))[:700]),
        10: ("validation", 0, "jpg/b10.jpg", jpeg_bytes(rgb(70, 90))),
        11: ("validation", 1, "jpg/b11_grey.jpg", jpeg_bytes(Image.fromarray(noise(rng, 64, 64, 1), "L"))),
        12: ("validation", 2, "png/b12.png", png_bytes(rgb(66, 66))),
        13: ("test", 0, "jpg/c13.jpg", jpeg_bytes(rgb(72, 96))),
        14: ("test", 1, "jpg/c14.jpg", jpeg_bytes(rgb(96, 72))),
        15: ("test", 2, "jpg/c15.jpg", jpeg_bytes(rgb(64, 64))),
        16: ("test", 0, "png/c16_text.png", b"this is not an image\n" * 20),
    }
    rows = []
    for image_id, (split, label, path, data) in files.items():
        if data is not None:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
        rows.append({"image_id": image_id, "path": path, "label": label, "split": split, "source": "oxford_flowers"})
    # Shuffled on purpose: the build order must not depend on the manifest's row order.
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


EXPECTED_QUARANTINE = {
    "jpg/a7_corrupt.jpg": "not a recognised image format",
    "jpg/a8_missing.jpg": "missing file",
    "jpg/a9_truncated.jpg": "cannot decode image",
    "png/c16_text.png": "not a recognised image format",
}


def build_flowers(flowers, model_dir, out_dir, incremental=True, **config):
    """build_shards on the folder of awkward images, in this process and small batches unless ``config`` says."""
    root, manifest = flowers
    config = {"num_workers": 1, "batch_size": 3, **config}
    return build_shards(manifest, root, str(model_dir), out_dir, config=ShardConfig(**config), categories=CATEGORIES,
                        model_name="tiny", incremental=incremental)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: two builds are equal when these are."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_all(shards_dir: Path, split: str):
    """Every sample of a split, read as training reads it (webdataset and decode_sample)."""
    import webdataset as wds

    urls = [str(shards_dir / shard["file"]) for shard in read_index(shards_dir)["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode_sample))
