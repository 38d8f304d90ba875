"""Benchmark: the tiny model trained from scratch on real photos (the Oxford Flowers 102 mini mirror).

Goes the pipeline's own way (the core functions behind the Dagster assets): fetch_release from the mirror
folder with its md5sums, safe_extract_tgz, build_manifest, build_shards, train (full fine-tuning, as in
config/demo.yaml), then rank evaluation of the test split for the trained model and the untrained base
model, against chance (1/102). Prints one table, then one JSON line. Usage:
    python bench/real_photos.py [--steps 300] [--data DIR] [--work DIR] [--device auto] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MINI = "oxford-flowers-102-mini"
# Laid out like the pipeline's data root, so the manifest paths and shard roots are the assets' own.
DATASET_DIR = "oxford_flowers"
IMAGES_DIR = "extracted"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def find_data(arg: str | None) -> Path:
    """The mirror folder from --data or $PLANT_PIPELINE_SHARED_DATASETS; exits with what to set when absent."""
    if arg:
        folder = Path(arg)
    elif os.environ.get("PLANT_PIPELINE_SHARED_DATASETS"):
        folder = Path(os.environ["PLANT_PIPELINE_SHARED_DATASETS"]) / MINI
    else:
        sys.exit(f"real_photos: no data: pass --data /path/to/{MINI} or set PLANT_PIPELINE_SHARED_DATASETS to the "
                 f"folder that holds {MINI}/")
    needed = ("102flowers.tgz", "imagelabels.mat", "setid.mat", "md5sums")
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        sys.exit(f"real_photos: {folder} lacks {', '.join(missing)}; expected the {MINI} mirror "
                 f"({', '.join(needed)}): pass --data or set PLANT_PIPELINE_SHARED_DATASETS")
    return folder


def score(model, processor, shards_dir: Path, batch_size: int, max_samples: int | None, label: str):
    """Rank evaluation of the test split, as the model_evaluation asset does it."""
    from plant_pipeline.ml.evaluation import evaluate_shards, read_shard_categories, summary_metrics

    def progress(done: int, total: int | None) -> None:
        if done == total or done % (batch_size * 16) == 0:
            log(f"{label}: {done}/{total} test images scored")

    categories = read_shard_categories(shards_dir)
    result = evaluate_shards(model, processor, shards_dir, split="test", method="rank", categories=categories,
                             batch_size=batch_size, max_samples=max_samples, progress=progress)
    return result, summary_metrics(result.predictions, categories.names)


def run(args: argparse.Namespace, data: Path, work: Path) -> dict:
    import torch

    from plant_pipeline.ml.data import (
        build_manifest,
        fetch_release,
        parse_md5sums,
        safe_extract_tgz,
        summarize_manifest,
    )
    from plant_pipeline.ml.model import TINY_MODEL_NAME, ModelSpec
    from plant_pipeline.ml.shards import ShardConfig, build_shards
    from plant_pipeline.ml.training import TrainConfig, load_trained, train

    if args.threads:
        torch.set_num_threads(args.threads)
    root = work / DATASET_DIR

    # --- data: the oxford_flowers asset's steps, reading the mirror folder with its own checksums ---
    started = time.perf_counter()
    fetched = fetch_release(root / "downloads", local_dir=data, md5=parse_md5sums((data / "md5sums").read_text()))
    images_root = root / IMAGES_DIR
    safe_extract_tgz(fetched.paths["102flowers.tgz"], images_root)
    manifest = build_manifest(images_root, fetched.paths["imagelabels.mat"], fetched.paths["setid.mat"])
    manifest["path"] = f"{DATASET_DIR}/{IMAGES_DIR}/" + manifest["path"]  # relative to the data root
    counts = summarize_manifest(manifest)
    prepare_seconds = time.perf_counter() - started
    log(f"manifest: {counts} ({prepare_seconds:.1f} s)")

    # --- shards: the flower_shards asset, for the tiny model ---
    spec = ModelSpec(model_name=TINY_MODEL_NAME, device=args.device, local_files_only=True,
                     models_dir=str(work / "models"))
    shards_dir = work / "shards" / spec.slug
    shards = build_shards(manifest, work, spec.source(), shards_dir, config=ShardConfig(min_shards=4),
                          model_name=spec.model_name, local_files_only=True)
    if shards.quarantined:
        log(f"{len(shards.quarantined)} images quarantined: {shards.quarantined[:5]}")
    log(f"shards: {shards.samples} samples in {shards.shards} shards ({shards.seconds:.1f} s, "
        f"{shards.images_per_second:.0f} images/s)")

    # --- training from scratch: config/demo.yaml's settings (every part of the random model learns) ---
    config = TrainConfig(
        max_steps=args.steps, per_device_train_batch_size=args.batch, per_device_eval_batch_size=64,
        learning_rate=2e-3, warmup_ratio=0.05, use_lora=False, freeze_vision_tower=False,
        save_steps=args.steps, eval_steps=0, logging_steps=20, dataloader_num_workers=2,
        max_eval_samples=204, seed=args.seed, resume=False,  # a benchmark run never continues an older one
    )

    def on_log(record: dict) -> None:
        parts = [f"step {record.get('step')}/{record.get('max_steps')}"]
        for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("samples_per_second", "{:.1f}"),
                         ("eta_seconds", "{:.0f}")):
            if record.get(key) is not None:
                parts.append(f"{key} {fmt.format(record[key])}")
        log("train: " + ", ".join(parts))

    trained = train(config, model_spec=spec, shards_dir=shards_dir, checkpoints_dir=work / "checkpoints" / "bench",
                    output_dir=work / "models" / "bench", on_log=on_log)
    log(f"trained {trained.steps} steps in {trained.seconds:.0f} s, {trained.samples_per_second:.1f} samples/s, "
        f"validation loss {trained.initial_validation_loss:.3f} -> {trained.final_validation_loss:.3f}")

    # --- evaluation: the trained model, then the untrained base model ---
    model, processor = load_trained(trained.model_path, spec)
    tuned, tuned_summary = score(model, processor, shards_dir, args.eval_batch, args.max_test_images, "fine-tuned")
    del model
    base_model = spec.load_model()  # the same random weights that training started from
    _, base_summary = score(base_model, spec.load_processor(), shards_dir, args.eval_batch, args.max_test_images,
                            "base")
    del base_model

    chance = 1.0 / tuned.num_categories
    return {
        "counts": counts, "shards": shards, "trained": trained, "tuned": tuned, "tuned_summary": tuned_summary,
        "base_summary": base_summary, "chance": chance, "prepare_seconds": prepare_seconds,
        "threads": torch.get_num_threads(),
    }


def report(args: argparse.Namespace, r: dict) -> None:
    tuned, base, chance, trained = r["tuned_summary"], r["base_summary"], r["chance"], r["trained"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    def ratio(x: float | None) -> str:
        return "n/a" if x is None else f"{x / chance:.2f}x"

    chance5 = 5 * chance
    print(f"tiny-random-llava trained from scratch on real photos ({MINI}): {r['counts']}; "
          f"{trained.steps} steps x batch {args.batch} on {trained.device} ({trained.dtype}), "
          f"{trained.trainable_params:,} trainable parameters, torch threads {r['threads']}, load average {load:.2f}")
    rows = [("test figure", "fine-tuned", "x chance", "base (untrained)", "x chance", "chance"),
            ("top-1 accuracy", pct(tuned["top1_accuracy"]), ratio(tuned["top1_accuracy"]),
             pct(base["top1_accuracy"]), ratio(base["top1_accuracy"]), pct(chance)),
            ("macro accuracy", pct(tuned["macro_accuracy"]), ratio(tuned["macro_accuracy"]),
             pct(base["macro_accuracy"]), ratio(base["macro_accuracy"]), pct(chance)),
            ("top-5 accuracy", pct(tuned["top5_accuracy"]),
             "n/a" if tuned["top5_accuracy"] is None else f"{tuned['top5_accuracy'] / chance5:.2f}x",
             pct(base["top5_accuracy"]),
             "n/a" if base["top5_accuracy"] is None else f"{base['top5_accuracy'] / chance5:.2f}x", pct(chance5)),
            ("test images", str(tuned["num_test_images"]), "", str(base["num_test_images"]), "", ""),
            ("validation loss (start -> end)",
             f"{trained.initial_validation_loss:.3f} -> {trained.final_validation_loss:.3f}", "", "", "", ""),
            ("train seconds / samples per s", f"{trained.seconds:.0f} / {trained.samples_per_second:.1f}",
             "", "", "", ""),
            ("eval images per s", f"{r['tuned'].images_per_second:.1f}", "", "", "", "")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(json.dumps({
        "bench": "real_photos", "dataset": MINI, "model": "tiny-random-llava",
        "top1": round(tuned["top1_accuracy"], 4), "macro": round(tuned["macro_accuracy"], 4),
        "top5": None if tuned["top5_accuracy"] is None else round(tuned["top5_accuracy"], 4),
        "chance": round(chance, 5), "ratio_to_chance": round(tuned["top1_accuracy"] / chance, 2),
        "base_top1": round(base["top1_accuracy"], 4), "base_macro": round(base["macro_accuracy"], 4),
        "base_top5": None if base["top5_accuracy"] is None else round(base["top5_accuracy"], 4),
        "base_ratio_to_chance": round(base["top1_accuracy"] / chance, 2),
        "steps": trained.steps, "batch": args.batch, "learning_rate": 2e-3, "seed": args.seed,
        "train_seconds": round(trained.seconds, 1), "samples_per_second": round(trained.samples_per_second, 2),
        "initial_validation_loss": round(trained.initial_validation_loss, 4),
        "final_validation_loss": round(trained.final_validation_loss, 4),
        "final_train_loss": None if trained.final_train_loss is None else round(trained.final_train_loss, 4),
        "images": r["counts"], "test_images": tuned["num_test_images"],
        "quarantined": len(r["shards"].quarantined), "shard_seconds": round(r["shards"].seconds, 1),
        "eval_images_per_second": round(r["tuned"].images_per_second, 2),
        "device": trained.device, "dtype": trained.dtype, "threads": r["threads"], "load_average": round(load, 2),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help=f"the {MINI} folder (default: "
                        f"$PLANT_PIPELINE_SHARED_DATASETS/{MINI})")
    parser.add_argument("--work", default=None, help="working data root, kept (default: a temporary folder under "
                        "data/bench/, removed afterwards unless --keep)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (batch 32: 300 steps ~ 9.4 epochs)")
    parser.add_argument("--batch", type=int, default=32, help="per-device train batch size")
    parser.add_argument("--eval-batch", type=int, default=16, help="test images per forward pass")
    parser.add_argument("--max-test-images", type=int, default=None, help="score only the first N test images "
                        "(a quick smoke run; default: all)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = parser.parse_args()
    data = find_data(args.data)

    if args.work:
        work, temporary = Path(args.work), False
        work.mkdir(parents=True, exist_ok=True)
    else:
        (ROOT / "data" / "bench").mkdir(parents=True, exist_ok=True)
        work, temporary = Path(tempfile.mkdtemp(prefix="real_photos-", dir=ROOT / "data" / "bench")), True
    log(f"data {data}, work folder {work}")
    try:
        results = run(args, data, work)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif temporary:
            log(f"kept {work}")
    report(args, results)


if __name__ == "__main__":
    main()
