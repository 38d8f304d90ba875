"""Training throughput with 1 and N processes (DDP, gloo on CPU) through the train_cli entry point.

Each run is the real launch the trained_model asset makes (``python -m plant_pipeline.ml.training.cli`` or
``torch.distributed.run --nproc_per_node=N``) on the tiny model and toy shards; samples/s counts all ranks.
On a 2-core CPU no gain is expected: the point is that it runs, every rank does the same steps and the loss falls.
Prints one table, then one line of JSON. Usage:
    python bench/scale.py [--procs 1 2] [--steps 30] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def make_data(work: Path, shards: int) -> tuple[Path, Path]:
    from transformers import AutoProcessor

    from plant_pipeline.ml.model import build_tiny_llava
    from plant_pipeline.ml.testing import write_toy_shards

    model = build_tiny_llava(work / "tiny-random-llava")
    # 8 classes x 16 train samples in shards of 8: 16 train shards, enough for 2 ranks x 2 workers and more.
    data = write_toy_shards(work / "shards", AutoProcessor.from_pretrained(model), classes=8,
                            per_class={"train": 16, "validation": 2, "test": 1}, samples_per_shard=128 // shards)
    return model, data


def run_once(work: Path, model: Path, shards: Path, procs: int, args) -> dict:
    from plant_pipeline.defs.assets.training import launch_command
    from plant_pipeline.ml.model import ModelSpec
    from plant_pipeline.ml.training import RunFile, TrainConfig

    out = work / f"np{procs}"
    run = RunFile(
        train=TrainConfig(max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=3e-3,
                          warmup_ratio=0.0, lr_scheduler_type="constant", dataloader_num_workers=args.workers,
                          shuffle_buffer=32, logging_steps=5, save_steps=args.steps, eval_steps=0,
                          max_eval_samples=16, resume=False),
        model=ModelSpec(model_name=str(model), device="cpu", local_files_only=True),
        shards_dir=str(shards), checkpoints_dir=str(out / "ck"), output_dir=str(out / "model"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run.to_json()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    started = time.time()
    done = subprocess.run(launch_command(procs, "--config", str(out / "run.json"), "--result", str(out / "result.json"),
                                         "--record-keys", str(out / "keys")),
                          env=env, capture_output=True, text=True, check=False)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed with code {done.returncode}:\n{done.stderr[-4000:]}")
    result = json.loads((out / "result.json").read_text())
    steps = sorted(json.loads(p.read_text())["steps"] for p in (out / "keys").glob("result-rank*.json"))
    return {"procs": procs, "steps_per_rank": steps, "samples_per_second": round(result["samples_per_second"], 1),
            "global_batch": args.batch * procs, "initial_validation_loss": round(result["initial_validation_loss"], 3),
            "final_validation_loss": round(result["final_validation_loss"], 3), "wall_seconds": round(wall, 1),
            "train_seconds": round(result["seconds"], 1), "peak_memory_mb_rank0": round(result["peak_memory_mb"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        model, shards = make_data(work, shards=16)
        rows = [run_once(work, model, shards, procs, args) for procs in args.procs]
    print(f"{'procs':>5} {'global batch':>12} {'steps/rank':>12} {'samples/s':>10} {'val loss':>15} "
          f"{'train s':>8} {'wall s':>7} {'rss MB r0':>9}")
    for r in rows:
        print(f"{r['procs']:>5} {r['global_batch']:>12} {r['steps_per_rank']!s:>12} {r['samples_per_second']:>10} "
              f"{r['initial_validation_loss']:>6} -> {r['final_validation_loss']:<6} {r['train_seconds']:>8} "
              f"{r['wall_seconds']:>7} {r['peak_memory_mb_rank0']:>9}")
    print(json.dumps({"bench": "scale", "cpu_count": os.cpu_count(), "steps": args.steps, "batch_per_rank": args.batch,
                      "threads_per_rank": args.threads, "runs": rows}))


if __name__ == "__main__":
    main()
