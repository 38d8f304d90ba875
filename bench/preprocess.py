"""Throughput of the flower_shards preprocessing against its limit and the datasets.map baseline.

Real photos (the Oxford Flowers mini mirror) through a LLaVA-1.5-shaped processor at 336 px (576 image
tokens). Prints one table, then one line of JSON with every figure. Usage:
    python bench/preprocess.py [--data /work/shared/datasets] [--limit N] [--workers W] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
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

from plant_pipeline.ml.data import (  # noqa: E402
    CATEGORY_NAMES,
    image_relpath,
    read_labels,
    read_splits,
    safe_extract_tgz,
)
from plant_pipeline.ml.images import to_rgb  # noqa: E402
from plant_pipeline.ml.model import TinyLlavaSpec, build_tiny_llava  # noqa: E402
from plant_pipeline.ml.shards import (  # noqa: E402
    QUESTION,
    ShardConfig,
    answer_text,
    build_shards,
    conversation,
    resize_and_crop,
)

MINI = "oxford-flowers-102-mini"


def prepare(data: Path, work: Path, limit: int | None) -> tuple[Path, pd.DataFrame]:
    """Extract the mini release once (not timed) and build its manifest."""
    mini = data / MINI
    root = work / "flowers"
    # The pipeline's own extraction: a member named "../x", absolute or a link is refused, not written.
    safe_extract_tgz(mini / "102flowers.tgz", root)
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


def run_limit(fn, paths: list[str], model_dir: Path, workers: int, batch_size: int) -> None:
    ctx = ShardConfig(num_workers=workers).context()
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_limit, initargs=(str(model_dir),)) as pool:
        list(pool.map(fn, batches))


def measure(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process and its finished children, fn's result).

    On a shared machine wall time swings with other people's work; CPU time per image barely does, and
    for CPU-bound work ``cores / CPU per image`` is the throughput a quiet machine would give.
    """
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    wall, used = time.perf_counter(), cpu()
    result = fn()
    return time.perf_counter() - wall, cpu() - used, result


# --- the baseline a user would write: datasets.map with the full processor, then save_to_disk ----------


def run_baseline(root: Path, manifest: pd.DataFrame, model_dir: Path, workers: int, out: Path) -> None:
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

    dataset = datasets.Dataset.from_pandas(manifest[["path", "label", "split"]], preserve_index=False)
    dataset = dataset.map(preprocess, batched=True, batch_size=32, num_proc=workers,
                          remove_columns=["path"])
    dataset.save_to_disk(str(out), num_proc=workers)


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

        def pipeline(pil_geometry: bool):
            return build_shards(manifest, root, str(model_dir), work / "shards", config=ShardConfig(
                num_workers=args.workers, batch_size=args.batch_size, pil_geometry=pil_geometry))

        variants = {  # name -> (label, function); run interleaved, best of --repeat kept
            "limit": ("limit: decode + resize + crop (PIL)",
                      lambda: run_limit(_pil_batch, paths, model_dir, args.workers, args.batch_size)),
            "processor_resize": ("decode + processor's resize/crop (transformers)",
                                 lambda: run_limit(_limit_batch, paths, model_dir, args.workers, args.batch_size)),
            "pipeline": ("pipeline: build_shards (shards written)", lambda: pipeline(True)),
            "pipeline_processor_path": ("pipeline with pil_geometry=False", lambda: pipeline(False)),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        result = None
        for _ in range(args.repeat):
            for name, (_, fn) in variants.items():
                shutil.rmtree(work / "shards", ignore_errors=True)  # the last run's ~1 GB: not this run's work
                wall, cpu, out = measure(fn)
                runs[name].append((wall, cpu))
                result = out if name == "pipeline" else result
        baseline_bytes = baseline_error = None
        if not args.skip_baseline:
            variants["baseline"] = ("baseline: datasets.map + save_to_disk", None)
            try:
                wall, cpu, _ = measure(lambda: run_baseline(root, manifest, model_dir, args.workers, work / "hf"))
                runs["baseline"] = [(wall, cpu)]
                baseline_bytes = folder_bytes(work / "hf")
            except Exception as err:  # report the other figures even where datasets cannot run
                baseline_error = f"{type(err).__name__}: {err}"
                runs["baseline"] = []

        stored = sum(result.samples.values())
        figures: dict = {
            "images": n, "workers": args.workers, "cpus": len(os.sched_getaffinity(0)), "start_method": start_method,
            "batch_size": args.batch_size, "repeat": args.repeat, "pixel_shape": result.index["pixel_shape"],
            "num_image_tokens": result.index["num_image_tokens"], "load_average": round(os.getloadavg()[0], 2),
            "quarantined": len(result.quarantined), "stored": stored,
            "shard_bytes_per_sample": sum(result.bytes.values()) / stored, "jpeg_bytes_per_sample": jpeg_bytes / n,
            "baseline_bytes_per_sample": baseline_bytes / n if baseline_bytes else None,
            "baseline_error": baseline_error,
        }
        for name, measured in runs.items():
            if measured:
                figures[f"{name}_images_per_s"] = n / min(wall for wall, _ in measured)
                figures[f"{name}_cpu_ms_per_image"] = 1000 * min(cpu for _, cpu in measured) / n
                figures[f"{name}_runs_wall_cpu_s"] = [[round(w, 2), round(c, 2)] for w, c in measured]
        wall_limit, cpu_limit = figures["limit_images_per_s"], figures["limit_cpu_ms_per_image"]
        for name in runs:
            if f"{name}_images_per_s" in figures and name != "limit":
                figures[f"{name}_vs_limit"] = figures[f"{name}_images_per_s"] / wall_limit
                figures[f"{name}_vs_limit_by_cpu"] = cpu_limit / figures[f"{name}_cpu_ms_per_image"]
        # Each round runs every variant once, back to back: the median of the rounds' own ratios is less
        # at the mercy of one lucky or unlucky run than the ratio of the bests.
        paired = [(limit[0] / pipe[0], limit[1] / pipe[1]) for limit, pipe in zip(runs["limit"], runs["pipeline"])]
        figures["pipeline_vs_limit_paired_median"] = statistics.median(wall for wall, _ in paired)
        figures["pipeline_vs_limit_by_cpu_paired_median"] = statistics.median(cpu for _, cpu in paired)
        if "baseline_images_per_s" in figures:
            figures["pipeline_vs_baseline"] = figures["pipeline_images_per_s"] / figures["baseline_images_per_s"]
            figures["pipeline_vs_baseline_by_cpu"] = (figures["baseline_cpu_ms_per_image"]
                                                      / figures["pipeline_cpu_ms_per_image"])
        figures["shard_vs_jpeg_bytes"] = figures["shard_bytes_per_sample"] / figures["jpeg_bytes_per_sample"]

        print(f"{n} images, {args.workers} workers ({start_method}) on {figures['cpus']} CPUs, "
              f"{result.index['pixel_shape']} pixels, {result.index['num_image_tokens']} image tokens; "
              f"best of {args.repeat}; load average after {figures['load_average']}")
        print(f"{'':50s} {'images/s':>9s} {'vs limit':>9s} {'CPU ms/img':>11s} {'vs limit':>9s}")
        for name, (label, _) in variants.items():
            if f"{name}_images_per_s" not in figures:
                print(f"{label:50s} {'failed: ' + str(baseline_error)}")
                continue
            rate, cpu = figures[f"{name}_images_per_s"], figures[f"{name}_cpu_ms_per_image"]
            print(f"{label:50s} {rate:9.1f} {rate / wall_limit:9.2f} {cpu:11.2f} {cpu_limit / cpu:9.2f}")
        if args.repeat > 1:
            print(f"pipeline vs limit, median of the {args.repeat} rounds' own ratios: "
                  f"{figures['pipeline_vs_limit_paired_median']:.2f} by wall time, "
                  f"{figures['pipeline_vs_limit_by_cpu_paired_median']:.2f} by CPU")
        if "pipeline_vs_baseline" in figures:
            print(f"pipeline vs baseline: {figures['pipeline_vs_baseline']:.2f}x by wall time, "
                  f"{figures['pipeline_vs_baseline_by_cpu']:.2f}x by CPU per image")
        print(f"bytes per sample: shards {figures['shard_bytes_per_sample']:,.0f}, JPEG {figures['jpeg_bytes_per_sample']:,.0f} "
              f"({figures['shard_vs_jpeg_bytes']:.1f}x)"
              + (f", datasets.save_to_disk {figures['baseline_bytes_per_sample']:,.0f}" if baseline_bytes else ""))
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
