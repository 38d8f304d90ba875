"""FSDP on GPUs: the training entry point under ``accelerate launch --config_file config/accelerate/fsdp_7b.yaml``
beside the same entry point in one plain process, on the tiny model and toy shards (LoRA, as for the 7B model).

What only a GPU shows: FSDP wraps the LLaVA layers and trains, and Trainer.save_model gathers the full adapter
to rank 0, so the saved result reloads (load_trained) and gives the validation loss the run itself reported.
Rows: samples/s (all ranks), validation loss before / after, the reloaded result's validation loss, and the
FSDP/plain ratios. A failed run is a row with its error; the script still prints the table and the JSON line.
    PYTHONPATH=. python3 bench/gpu_fsdp.py [--nproc N] [--steps 30] [--dtypes float32 bfloat16]
    PYTHONPATH=. python3 bench/gpu_fsdp.py --device cpu --dtypes float32   # the plain row only: checks the script
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
FSDP_CONFIG = REPO / "config" / "accelerate" / "fsdp_7b.yaml"


def make_data(work: Path) -> tuple[Path, Path]:
    from transformers import AutoProcessor

    from plant_pipeline.ml.model import build_tiny_llava
    from plant_pipeline.ml.testing import write_toy_shards

    model = build_tiny_llava(work / "tiny-random-llava")
    shards = write_toy_shards(work / "shards", AutoProcessor.from_pretrained(model), classes=8,
                              per_class={"train": 16, "validation": 4, "test": 1}, samples_per_shard=8)
    return model, shards


def command(side: str, nproc: int, run_file: Path, result: Path) -> list[str]:
    """``side`` is "plain" or the path of an accelerate config file."""
    entry = ["-m", "plant_pipeline.ml.training.cli", "--config", str(run_file), "--result", str(result)]
    if side == "plain":
        return [sys.executable, *entry]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", side,
            "--num_processes", str(nproc), *entry]


def reloaded_validation_loss(model_path: Path, spec, shards: Path) -> float:
    """Mean cross-entropy per answer token of the saved result over the whole validation split."""
    import torch

    from plant_pipeline.ml.shards import split_shard_paths
    from plant_pipeline.ml.training import labelled_token_loss, load_trained, make_stream, memory_efficient_collate_fn

    model, processor = load_trained(model_path, spec)
    collate = memory_efficient_collate_fn(processor)
    samples = list(make_stream(split_shard_paths(shards, "validation"), shuffle=False))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), 8):
            batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                     for k, v in collate(samples[start:start + 8]).items()}
            loss_sum, count, _ = labelled_token_loss(model, batch)
            total, tokens = total + float(loss_sum), tokens + int(count)
    return total / tokens


def run_side(work: Path, model: Path, shards: Path, side: str, dtype: str, nproc: int, steps: int,
             device: str) -> dict:
    from plant_pipeline.ml.model import ModelSpec
    from plant_pipeline.ml.training import RunFile, TrainConfig

    label = "plain" if side == "plain" else Path(side).stem
    out = work / f"{label}-{dtype}"
    spec = ModelSpec(model_name=str(model), device=device, dtype=dtype, local_files_only=True)
    run = RunFile(
        train=TrainConfig(max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0,
                          lr_scheduler_type="constant", dtype=dtype, dataloader_num_workers=0, shuffle_buffer=32,
                          logging_steps=5, save_steps=steps, eval_steps=0, max_eval_samples=None, resume=False),
        model=spec, shards_dir=str(shards), checkpoints_dir=str(out / "ck"), output_dir=str(out / "model"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run.to_json()))
    started = time.time()
    done = subprocess.run(command(side, nproc, out / "run.json", out / "result.json"),
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                        os.environ.get("PYTHONPATH")]))},
                          capture_output=True, text=True, check=False)
    row = {"side": label, "dtype": dtype, "procs": 1 if side == "plain" else nproc, "seconds": time.time() - started}
    (out / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        # The rank's own exception, not the launcher's ChildFailedError that follows it.
        errors = [line for line in lines if "Error:" in line and "ChildFailedError" not in line]
        row["error"] = f"exit {done.returncode}: " + (errors[-1] if errors else " | ".join(lines[-3:]))[-400:]
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"{label}-{dtype}.log").write_text("\n".join(lines[-150:]))
        return row
    result = json.loads((out / "result.json").read_text())
    row.update(steps=result["steps"], samples_per_second=result["samples_per_second"],
               initial_validation_loss=result["initial_validation_loss"],
               final_validation_loss=result["final_validation_loss"],
               saved=sorted(p.name for p in (out / "model").iterdir()))
    try:
        row["reloaded_validation_loss"] = reloaded_validation_loss(out / "model", spec, shards)
    except Exception as err:  # the point of the check: report it as a row
        row["error"] = f"reload failed: {type(err).__name__}: {err}"[:400]
    return row


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=None, help="FSDP ranks (default: every visible GPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--configs", nargs="+", default=[str(FSDP_CONFIG)],
                        help="accelerate config files to launch with, one row each (default: the shipped FSDP one)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain single-process rows")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu runs the plain rows only (FSDP needs GPUs): a check of the script itself")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_fsdp: needs a CUDA GPU (or --device cpu to check the script); nothing measured")
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return
    sides = ([] if args.no_plain else ["plain"]) + (list(args.configs) if args.device == "cuda" else [])
    nproc = args.nproc or max(1, torch.cuda.device_count())
    work = Path(tempfile.mkdtemp(prefix="gpu-fsdp-"))
    model, shards = make_data(work)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    rows, figures = [], {"device": name, "fsdp_ranks": nproc, "rows": []}
    header = (f"{'side':12s} {'dtype':9s} {'procs':>5s} {'steps':>5s} {'samples/s':>10s} {'val start':>9s} "
              f"{'val end':>8s} {'reloaded':>8s}  note")
    print(f"gpu_fsdp: {figures['device']}, FSDP ranks {nproc}, tiny LLaVA + LoRA, {args.steps} steps", flush=True)
    print(header, flush=True)
    for dtype in args.dtypes:
        for side in sides:
            row = run_side(work, model, shards, side, dtype, nproc, args.steps, args.device)
            rows.append(row)
            figures["rows"].append(row)

            def f(key, fmt):
                return format(row[key], fmt) if row.get(key) is not None else "n/a"

            match = ""
            if row.get("reloaded_validation_loss") is not None and row.get("final_validation_loss") is not None:
                gap = abs(row["reloaded_validation_loss"] - row["final_validation_loss"])
                row["reload_matches"] = gap <= 1e-3 * max(1.0, row["final_validation_loss"])
                match = f"reload {'matches' if row['reload_matches'] else 'DIFFERS'} ({gap:.1e})"
            text = (f"{row['side'][:12]:12s} {dtype:9s} {row['procs']:5d} {f('steps', '5d'):>5s} "
                    f"{f('samples_per_second', '10.1f'):>10s} {f('initial_validation_loss', '9.3f'):>9s} "
                    f"{f('final_validation_loss', '8.3f'):>8s} {f('reloaded_validation_loss', '8.3f'):>8s}  "
                    f"{row.get('error') or match}")
            print(text, flush=True)
        these = rows[-len(sides):]
        plain = these[0] if sides and sides[0] == "plain" else None
        for fsdp in these[1 if plain else 0:]:
            if plain and plain.get("samples_per_second") and fsdp.get("samples_per_second"):
                ratio = fsdp["samples_per_second"] / plain["samples_per_second"]
                figures[f"{fsdp['side']}_over_plain_{dtype}"] = ratio
                print(f"{fsdp['side'][:12]:12s} {dtype:9s} over plain: throughput {ratio:.2f}x (one GPU: FSDP adds its "
                      "gathers, no gain expected)", flush=True)
    print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
