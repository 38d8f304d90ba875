"""Training from streamed shards (CustomTrainer) against the plain Trainer on the same samples held in memory.

A tiny LLaVA at 224 px (patch 32: 49 image tokens, 150 KB of uint8 pixels per sample), LoRA, CPU. Each
measurement runs in its own subprocess so its memory figure is clean: samples/s at 1x and peak memory
(PSS of the process and its DataLoader workers, sampled) at 1x and 8x the data. A third mode, CustomTrainer
on the in-memory samples, separates the cost of streaming from the saving of its answer-only logits.
Prints one table, then one line of JSON. Usage:
    python bench/train_stream.py [--samples 1000] [--scale 8] [--steps 100] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SPEC = dict(image_size=224, patch_size=32)
WARMUP_STEPS = 5  # not timed: worker start-up, shuffle-buffer fill, first-call allocations


# ---- data --------------------------------------------------------------------------------------------

def make_data(work: Path, samples: int, scale: int) -> tuple[Path, dict[int, Path]]:
    """The model, 1x shards (write_toy_shards), and scale-x shards: the same samples under new keys."""
    import webdataset as wds
    from transformers import AutoProcessor

    from plant_pipeline.ml.model import TinyLlavaSpec, build_tiny_llava
    from plant_pipeline.ml.shards import read_index, shard_entry, split_entry, split_shard_paths, write_index
    from plant_pipeline.ml.testing import encode_sample, write_toy_shards
    from plant_pipeline.ml.training import make_stream

    model_dir = build_tiny_llava(work / "model", TinyLlavaSpec(**SPEC))
    processor = AutoProcessor.from_pretrained(model_dir)
    one = write_toy_shards(work / "shards-1x", processor, classes=4,
                           per_class={"train": samples // 4, "validation": 2}, samples_per_shard=50)
    index = read_index(one)
    big = work / f"shards-{scale}x"
    (big / "train").mkdir(parents=True)
    shutil.copytree(one / "validation", big / "validation")
    shards = []
    for copy in range(scale):
        for number, path in enumerate(split_shard_paths(one, "train")):
            name = f"train/train-{copy:03d}-{number:05d}.tar"
            count = 0
            with wds.TarWriter(str(big / name)) as writer:
                for sample in make_stream([path], shuffle=False):
                    sample.key = f"{sample.key}_c{copy}"
                    writer.write(encode_sample(sample))
                    count += 1
            # Training verifies every shard against these digests before it starts.
            shards.append(shard_entry(big, name, count))
    index["splits"]["train"] = split_entry(shards)
    write_index(big, index)
    return model_dir, {1: one, scale: big}


# ---- one measurement (child process) -------------------------------------------------------------

def measure(mode: str, model_dir: Path, shards: Path, steps: int, batch: int, workers: int) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from plant_pipeline.ml.model import ModelSpec
    from plant_pipeline.ml.shards import split_shard_paths
    from plant_pipeline.ml.testing import PeakSampler
    from plant_pipeline.ml.training import (
        TrainConfig,
        build_trainer,
        configure_trainable,
        make_stream,
        memory_efficient_collate_fn,
    )

    sampler = PeakSampler(every=0.25)
    sampler.start()
    spec = ModelSpec(model_name=str(model_dir), device="cpu", local_files_only=True)
    processor = spec.load_processor()
    config = TrainConfig(max_steps=steps)
    model = configure_trainable(spec.load_model(), config)
    collator = memory_efficient_collate_fn(processor)
    paths = split_shard_paths(shards, "train")
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-train-"), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=10, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=workers, remove_unused_columns=False,
        accelerator_config={"dispatch_batches": False}, seed=0,
        dataloader_prefetch_factor=4 if workers else None)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    clock = StepClock()
    load_seconds = 0.0
    if mode == "stream":
        dataset = make_stream(paths, shuffle=True, shuffle_buffer=500, seed=0, epochs=None, num_workers=workers)
        trainer = build_trainer(model, config, args, data_collator=collator, train_dataset=dataset, callbacks=[clock])
    else:
        start = time.perf_counter()
        dataset = list(make_stream(paths, shuffle=False, epochs=1))  # decoded samples, uint8 pixels
        load_seconds = time.perf_counter() - start

        def plain_collate(samples):
            batch = collator(samples)
            # The plain Trainer passes every key to the model: only what the model takes.
            return {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "labels")}

        if mode == "memory":  # the baseline: plain Trainer, full-logits loss
            trainer = Trainer(model=model, args=args, data_collator=plain_collate, train_dataset=dataset,
                              callbacks=[clock])
        else:  # "memory-custom": CustomTrainer's loss on in-memory data, to isolate the cost of streaming
            trainer = build_trainer(model, config, args, data_collator=collator, train_dataset=dataset,
                                    callbacks=[clock])
    trainer.train()
    peak = sampler.stop()
    timed = clock.times[WARMUP_STEPS:]
    rate = (len(timed) - 1) * batch / (timed[-1] - timed[0])
    return {"mode": mode, "samples": len(dataset) if mode != "stream" else None, "samples_per_second": rate,
            "peak_pss_mb": peak / 2**20, "load_seconds": load_seconds, "threads": torch.get_num_threads()}


# ---- driver --------------------------------------------------------------------------------------

def run_child(mode: str, model_dir: Path, shards: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", mode, str(model_dir), str(shards), "--steps", str(args.steps),
           "--batch", str(args.batch), "--workers", str(args.workers)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} on {shards} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="train samples at 1x")
    parser.add_argument("--scale", type=int, default=8, help="data multiple for the memory comparison")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers, the same for both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeat", type=int, default=4, help="throughput runs per mode at 1x (best kept)")
    parser.add_argument("--work", type=Path, default=None, help="keep data here (default: a temp folder)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model_dir, shards = args.child
        print(json.dumps(measure(mode, Path(model_dir), Path(shards), args.steps, args.batch, args.workers)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-stream-"))
    try:
        start = time.time()
        model_dir, data = make_data(work, args.samples, args.scale)
        print(f"data ready in {time.time() - start:.0f} s under {work}", file=sys.stderr)
        results: dict[tuple[str, int], list[dict]] = {}
        # Interleaved and repeated at 1x, so a change in machine load hits every mode alike; best rate kept.
        plan = [("stream", 1), ("memory", 1), ("memory-custom", 1)] * args.repeat
        plan += [("stream", args.scale), ("memory", args.scale)]
        for mode, scale in plan:
            results.setdefault((mode, scale), []).append(run_child(mode, model_dir, data[scale], args))
        runs = {key: {**max(rs, key=lambda r: r["samples_per_second"]),
                      "peak_pss_mb": max(r["peak_pss_mb"] for r in rs),
                      "all_rates": [round(r["samples_per_second"], 2) for r in rs]}
                for key, rs in results.items()}
        s1, m1, c1 = runs[("stream", 1)], runs[("memory", 1)], runs[("memory-custom", 1)]
        sN, mN = runs[("stream", args.scale)], runs[("memory", args.scale)]
        figures = {
            "samples_1x": args.samples, "scale": args.scale, "steps": args.steps, "batch": args.batch,
            "workers": args.workers, "threads": args.threads, "bytes_per_sample": 3 * SPEC["image_size"] ** 2,
            "stream_samples_per_second": s1["samples_per_second"],
            "memory_samples_per_second": m1["samples_per_second"],
            "throughput_ratio": s1["samples_per_second"] / m1["samples_per_second"],
            "custom_memory_samples_per_second": c1["samples_per_second"],
            "throughput_ratio_same_loss": s1["samples_per_second"] / c1["samples_per_second"],
            "rates_1x": {mode: runs[(mode, 1)]["all_rates"] for mode in ("stream", "memory", "memory-custom")},
            "stream_samples_per_second_scaled": sN["samples_per_second"],
            "memory_samples_per_second_scaled": mN["samples_per_second"],
            "stream_peak_mb_1x": s1["peak_pss_mb"], f"stream_peak_mb_{args.scale}x": sN["peak_pss_mb"],
            "memory_peak_mb_1x": m1["peak_pss_mb"], f"memory_peak_mb_{args.scale}x": mN["peak_pss_mb"],
            "stream_memory_growth": sN["peak_pss_mb"] / s1["peak_pss_mb"],
            "memory_memory_growth": mN["peak_pss_mb"] / m1["peak_pss_mb"],
            "memory_load_seconds_scaled": mN["load_seconds"],
        }
        figures["goal_throughput_ratio_ge_0.95"] = figures["throughput_ratio"] >= 0.95
        figures["goal_stream_growth_le_1.1"] = figures["stream_memory_growth"] <= 1.1
        n = args.scale
        print(f"tiny LLaVA 224px/patch 32, LoRA, CPU x{args.threads} thread(s), batch {args.batch}, {args.steps} steps "
              f"({WARMUP_STEPS} untimed), {args.workers} worker(s); 1x = {args.samples} samples "
              f"({args.samples * figures['bytes_per_sample'] / 2**20:.0f} MB of pixels)")
        print(f"{'figure':38s} {'streaming':>10s} {'in-memory':>10s} {'ratio':>7s}   (streaming: CustomTrainer; "
              "in-memory: plain Trainer)")
        rows = [("samples/s (1x)", s1["samples_per_second"], m1["samples_per_second"]),
                ("samples/s (1x), in-memory CustomTrainer", s1["samples_per_second"], c1["samples_per_second"]),
                (f"samples/s ({n}x)", sN["samples_per_second"], mN["samples_per_second"]),
                ("peak memory MB (1x)", s1["peak_pss_mb"], m1["peak_pss_mb"]),
                (f"peak memory MB ({n}x)", sN["peak_pss_mb"], mN["peak_pss_mb"])]
        for name, stream, memory in rows:
            print(f"{name:38s} {stream:10.1f} {memory:10.1f} {stream / memory:7.2f}")
        print(f"{'memory growth ' + str(n) + 'x / 1x':38s} {figures['stream_memory_growth']:10.2f} "
              f"{figures['memory_memory_growth']:10.2f}")
        print(json.dumps(figures))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
