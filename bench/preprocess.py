"""Throughput of the flower_shards preprocessing against its limit and the datasets.map baseline.

Real photos (the Oxford Flowers mini mirror) through a LLaVA-1.5-shaped processor at 336 px (576 image
tokens). Prints one table, then one line of JSON with every figure. Usage:
    python bench/preprocess.py [--data /work/shared/datasets] [--limit N] [--workers W] [--repeat R]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from plant_pipeline.ml.categories import CATEGORY_NAMES  # noqa: E402
from plant_pipeline.ml.flowers import image_relpath, read_labels, read_splits  # noqa: E402
from plant_pipeline.ml.pixels import resize_and_crop, to_rgb  # noqa: E402
from plant_pipeline.ml.prompts import QUESTION, answer_text, conversation  # noqa: E402
from plant_pipeline.ml.shards import ShardConfig, build_shards  # noqa: E402
from plant_pipeline.ml.tiny_model import TinyLlavaSpec, build_tiny_llava  # noqa: E402

MINI = "oxford-flowers-102-mini"


def prepare(data: Path, work: Path, limit: int | None) -> tuple[Path, pd.DataFrame]:
    """Extract the mini release once (not timed) and build its manifest."""
    mini = data / MINI
    root = work / "flowers"
    with tarfile.open(mini / "102flowers.tgz", "r:*") as archive:
        for member in archive:
            if member.isfile() and member.name.startswith("jpg/") and member.name.endswith(".jpg"):
                (root / member.name).parent.mkdir(parents=True, exist_ok=True)
                (root / member.name).write_bytes(archive.extractfile(member).read())
    labels = read_labels(mini / "imagelabels.mat")
    split_of = {int(i): split for split, ids in read_splits(mini / "setid.mat", len(labels)).items() for i in ids}
    ids = list(range(1, len(labels) + 1))
    if limit:
        # Every n-th image, so a small run still spans all splits and classes.
        ids = ids[:: max(1, len(ids) // limit)][:limit]
    manifest = pd.DataFrame({"image_id": ids, "path": [image_relpath(i) for i in ids],
                             "label": [int(labels[i - 1]) for i in ids], "split": [split_of[i] for i in ids],
                             "source": "oxford_flowers"})
    return root, manifest


# --- the limit: decode + resize + crop, nothing else ---------------------------------------------------

_IMAGE_PROCESSOR = None


def _init_limit(model_dir: str) -> None:
    global _IMAGE_PROCESSOR
    import torch
    from transformers import AutoProcessor

    torch.set_num_threads(1)  # as build_shards' workers: a forked child must not use the parent's OpenMP pool

    _IMAGE_PROCESSOR = AutoProcessor.from_pretrained(model_dir, local_files_only=True).image_processor


def _limit_batch(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with Image.open(path) as image:
            total += int(resize_and_crop(_IMAGE_PROCESSOR, to_rgb(image))[0, 0, 0])
    return total


def _pil_batch(paths: list[str]) -> int:
    """The same geometry in plain PIL (bicubic shortest edge, centre crop): what the processor wraps."""
    size = _IMAGE_PROCESSOR.crop_size["height"]
    short = _IMAGE_PROCESSOR.size["shortest_edge"]
    total = 0
    for path in paths:
        with Image.open(path) as image:
            rgb = to_rgb(image)
            w, h = rgb.size
            nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            resized = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            total += int(np.asarray(resized.crop((left, top, left + size, top + size)))[0, 0, 0])
    return total


def run_limit(fn, paths: list[str], model_dir: Path, workers: int, batch_size: int) -> float:
    ctx = ShardConfig(num_workers=workers).context()
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_limit, initargs=(str(model_dir),)) as pool:
        list(pool.map(fn, batches))
    return time.perf_counter() - start


# --- the baseline a user would write: datasets.map with the full processor, then save_to_disk ----------


def run_baseline(root: Path, manifest: pd.DataFrame, model_dir: Path, workers: int, out: Path) -> float:
    import datasets
    from transformers import AutoProcessor

    datasets.disable_progress_bars()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)

    def preprocess(batch):
        import torch

        # Without this, datasets' forked workers hang where the processor's torchvision backend runs
        # torch ops after this process has used its OpenMP pool.
        torch.set_num_threads(1)
        images = [Image.open(root / path).convert("RGB") for path in batch["path"]]
        texts = [processor.apply_chat_template(conversation(QUESTION, answer_text(CATEGORY_NAMES[label])),
                                               tokenize=False) for label in batch["label"]]
        out = processor(text=texts, images=images, padding=True, return_tensors="np")
        return {"pixel_values": out["pixel_values"], "input_ids": out["input_ids"],
                "attention_mask": out["attention_mask"], "label": batch["label"]}

    start = time.perf_counter()
    dataset = datasets.Dataset.from_pandas(manifest[["path", "label", "split"]], preserve_index=False)
    dataset = dataset.map(preprocess, batched=True, batch_size=32, num_proc=workers,
                          remove_columns=["path"])
    dataset.save_to_disk(str(out), num_proc=workers)
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PLANT_PIPELINE_SHARED_DATASETS",
                                                                         "/work/shared/datasets")))
    parser.add_argument("--limit", type=int, default=None, help="images (default: all 3060)")
    parser.add_argument("--workers", type=int, default=ShardConfig().workers())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="runs of the limit and the pipeline; best is kept")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        root, manifest = prepare(args.data, work, args.limit)
        model_dir = build_tiny_llava(work / "llava-336", TinyLlavaSpec(image_size=336, patch_size=14))
        paths = [str(root / p) for p in manifest.sort_values(["split", "image_id"])["path"]]
        n = len(paths)
        jpeg_bytes = sum(os.path.getsize(p) for p in paths)
        start_method = ShardConfig(num_workers=args.workers).context().get_start_method()

        limit_s, processor_s, pipeline_s, pipeline_processor_s = [], [], [], []
        result = None

        def pipeline(pil_geometry: bool):
            out = work / "shards"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            built = build_shards(manifest, root, str(model_dir), out, config=ShardConfig(
                num_workers=args.workers, batch_size=args.batch_size, pil_geometry=pil_geometry))
            return time.perf_counter() - start, built

        for _ in range(args.repeat):
            limit_s.append(run_limit(_pil_batch, paths, model_dir, args.workers, args.batch_size))
            processor_s.append(run_limit(_limit_batch, paths, model_dir, args.workers, args.batch_size))
            seconds, result = pipeline(True)
            pipeline_s.append(seconds)
            pipeline_processor_s.append(pipeline(False)[0])
        baseline_s = baseline_bytes = baseline_error = None
        if not args.skip_baseline:
            try:
                baseline_s = run_baseline(root, manifest, model_dir, args.workers, work / "hf")
                baseline_bytes = folder_bytes(work / "hf")
            except Exception as err:  # report the other figures even where datasets cannot run
                baseline_error = f"{type(err).__name__}: {err}"

        stored = sum(result.samples.values())
        shard_bytes = sum(result.bytes.values())
        figures = {
            "images": n, "workers": args.workers, "cpus": os.cpu_count(), "start_method": start_method,
            "batch_size": args.batch_size, "repeat": args.repeat, "pixel_shape": result.index["pixel_shape"],
            "num_image_tokens": result.index["num_image_tokens"],
            "limit_images_per_s": n / min(limit_s),
            "processor_resize_images_per_s": n / min(processor_s),
            "pipeline_images_per_s": n / min(pipeline_s),
            "pipeline_processor_path_images_per_s": n / min(pipeline_processor_s),
            "baseline_images_per_s": n / baseline_s if baseline_s else None,
            "limit_seconds": limit_s, "processor_resize_seconds": processor_s, "pipeline_seconds": pipeline_s,
            "pipeline_processor_path_seconds": pipeline_processor_s, "baseline_seconds": baseline_s,
            "quarantined": len(result.quarantined), "stored": stored,
            "shard_bytes_per_sample": shard_bytes / stored, "jpeg_bytes_per_sample": jpeg_bytes / n,
            "baseline_bytes_per_sample": baseline_bytes / n if baseline_bytes else None,
            "load_average": os.getloadavg()[0], "baseline_error": baseline_error,
        }
        limit = figures["limit_images_per_s"]
        figures["pipeline_vs_limit"] = figures["pipeline_images_per_s"] / limit
        figures["pipeline_vs_processor_resize"] = figures["pipeline_images_per_s"] / figures["processor_resize_images_per_s"]
        figures["pipeline_vs_baseline"] = (figures["pipeline_images_per_s"] / figures["baseline_images_per_s"]
                                           if baseline_s else None)
        figures["shard_vs_jpeg_bytes"] = figures["shard_bytes_per_sample"] / figures["jpeg_bytes_per_sample"]

        rows = [
            ("limit: decode + resize + crop (PIL)", limit),
            ("decode + processor's resize/crop (transformers)", figures["processor_resize_images_per_s"]),
            ("baseline: datasets.map + save_to_disk", figures["baseline_images_per_s"]),
            ("pipeline: build_shards (shards written)", figures["pipeline_images_per_s"]),
            ("pipeline with pil_geometry=False", figures["pipeline_processor_path_images_per_s"]),
        ]
        print(f"{n} images, {args.workers} workers ({start_method}), {result.index['pixel_shape']} pixels, "
              f"{result.index['num_image_tokens']} image tokens; best of {args.repeat}; load {figures['load_average']:.1f}")
        print(f"{'':50s} {'images/s':>9s} {'vs limit':>9s}")
        for name, rate in rows:
            print(f"{name:50s} {rate or float('nan'):9.1f} {(rate or float('nan')) / limit:9.2f}")
        if baseline_s:
            print(f"pipeline / baseline: {figures['pipeline_vs_baseline']:.2f}x")
        print(f"bytes per sample: shards {figures['shard_bytes_per_sample']:,.0f}, JPEG {figures['jpeg_bytes_per_sample']:,.0f} "
              f"({figures['shard_vs_jpeg_bytes']:.1f}x)"
              + (f", datasets.save_to_disk {figures['baseline_bytes_per_sample']:,.0f}" if baseline_bytes else ""))
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
