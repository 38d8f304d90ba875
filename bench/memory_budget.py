"""The 16 GB laptop budget: llava-interleave-qwen-0.5b's full-size architecture trained with the laptop recipe on the
CPU, our trainer (build_trainer on streamed shards) against a plain transformers Trainer, side by side.

The model is built from the published config values alone (random weights, bfloat16) and saved once; each side then
loads it through from_pretrained in its own child process, so the two peaks never mix. The recipe, the same on both
sides (training.configure_trainable): LoRA on the language model's default targets, projector trained, vision tower
frozen, gradient checkpointing, batch 2, 384 px, bfloat16 (what DevicePolicy picks on an M2, whose MPS runs bf16
from macOS 14; fp16 would need a grad scaler and overflows more easily, fp32 doubles the weights).
The sides differ where the project claims to do better:
  ours:  CustomTrainer from training.build_trainer with training.training_arguments, uint8 shards streamed by
         make_stream with the laptop's loader workers (DevicePolicy), MemoryEfficientCollator, answer-only logits;
  plain: transformers.Trainer, a map-style dataset of normalised float pixels in memory, the model's own loss
         (full-vocabulary logits at every position), no loader workers.
Per side: RSS after the imports, after loading (+LoRA), at the start of training, after the first optimizer step; the
peak RSS of the process (getrusage) and the sampled peak PSS of the process and its loader workers; the bytes of the
weights, of the trainable copies and of the optimizer state; step time. Peak memory does not depend on the number of
accumulated micro-batches (each one's activations are freed before the next), so the measured steps use
--accumulation 1 unless told otherwise, to keep the run short on 2 cores.
Prints a table, the ratio, and last one line of JSON. Usage:
    python bench/memory_budget.py [--steps 2] [--accumulation 1] [--threads 2] [--samples N] [--work DIR]
    python bench/memory_budget.py --quick      # tiny shapes: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# After sys.path: the synthetic data, model config and plain-side collation are gpu_train's, not copies.
from bench.gpu_train import (
    PAD_ID,
    Case,
    InMemoryDataset,
    make_samples,
    normalizer_for,
    plain_collate,
    tiny_cases,
    write_shards,
)

GIB = 2**30
GOAL_GIB = 10.0  # a 16 GB M2 keeps 6 GiB for the system and the UI
BATCH = 2

# llava-hf/llava-interleave-qwen-0.5b-hf's config.json: google/siglip-so400m-patch14-384 with its last layer dropped
# (26 of 27 layers; LLaVA reads the last kept layer, strategy "full", no pooling head) and Qwen/Qwen1.5-0.5B-Chat
# (Qwen2 classes; 16 heads without grouped KV), its vocabulary padded to 152000 for <image> and the pad token.
INTERLEAVE_05B = Case(
    "interleave-0.5b", "llava-interleave-qwen-0.5b (SigLIP-so400m-384 + Qwen1.5-0.5B), LoRA, bf16", "siglip",
    dict(hidden_size=1152, num_hidden_layers=26, num_attention_heads=16, intermediate_size=4304, image_size=384,
         patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "qwen2", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=2816, vocab_size=152000, tie_word_embeddings=True, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0),
    batch=BATCH, use_lora=True, gradient_checkpointing=True)


def quick_case() -> Case:
    tiny = tiny_cases()[0]  # SigLIP + Qwen2 at toy sizes
    return replace(tiny, name="quick", title="tiny SigLIP + Qwen2, LoRA (--quick)", batch=BATCH, use_lora=True,
                   gradient_checkpointing=True, compile_blocks=False)


# ---- memory readings -------------------------------------------------------------------------------

def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- one side (child process) ----------------------------------------------------------------------

def train_config(steps: int, accumulation: int):
    from plant_pipeline.ml.training import TrainConfig

    # The laptop recipe (README, "Configuration"); evaluation, checkpoints and tracking off: only training is measured.
    return TrainConfig(max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulation,
                       gradient_checkpointing=True, dtype="bfloat16", use_lora=True, freeze_vision_tower=True,
                       learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, eval_steps=0,
                       report_to="none", keep="last", seed=0)


def measure(side: str, case: Case, model_dir: Path, shards: Path, steps: int, accumulation: int) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from plant_pipeline.ml.model import ModelSpec
    from plant_pipeline.ml.shards import split_shard_paths
    from plant_pipeline.ml.testing import PeakSampler
    from plant_pipeline.ml.training import (
        MemoryEfficientCollator,
        build_trainer,
        configure_trainable,
        loader_workers,
        make_stream,
        training_arguments,
    )
    from plant_pipeline.ml.training.config import resolve_precision

    sampler = PeakSampler(every=0.2)
    sampler.start()
    readings = {"imports": rss_bytes()}
    device = torch.device("cpu")
    config = train_config(steps, accumulation)
    dtype = resolve_precision(config, device)
    set_seed(0)
    spec = ModelSpec(model_name=str(model_dir), dtype="bfloat16", device="cpu", local_files_only=True)
    # The laptop's load: the frozen base in the compute dtype, as train() loads it under LoRA.
    model = configure_trainable(spec.load_model(device=device, dtype=dtype), config)
    readings["loaded"] = rss_bytes()
    peak_after_load = peak_rss_bytes()
    params = list(model.parameters())
    weights, trainable = tensor_bytes(params), tensor_bytes(p for p in params if p.requires_grad)

    out_dir = tempfile.mkdtemp(prefix=f"bench-memory-{side}-")
    workers = 0
    if side == "ours":
        workers = loader_workers(config, device)  # the laptop's too: DevicePolicy gives MPS the CPU's count
        args = training_arguments(config, output_dir=out_dir, max_steps=steps, device=device, dtype=dtype,
                                  workers=workers, eval_strategy="no", save_strategy="no", logging_steps=1)
        stream = make_stream(split_shard_paths(shards, "train"), shuffle=True, shuffle_buffer=config.shuffle_buffer,
                             seed=0, epochs=None, num_workers=workers)
        collator = MemoryEfficientCollator(normalizer=normalizer_for(case), pad_token_id=PAD_ID)

        def make_trainer(callbacks):
            return build_trainer(model, config, args, data_collator=collator, train_dataset=stream,
                                 callbacks=callbacks)
    else:
        samples = make_samples(case, count=BATCH * accumulation * steps + BATCH)  # the shards' samples
        dataset = InMemoryDataset(samples, normalizer_for(case))
        args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=BATCH,
                                 gradient_accumulation_steps=accumulation, learning_rate=config.learning_rate,
                                 lr_scheduler_type="constant", bf16=True, use_cpu=True, save_strategy="no",
                                 eval_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
                                 remove_unused_columns=False, seed=0)

        def make_trainer(callbacks):
            return Trainer(model=model, args=args, data_collator=plain_collate, train_dataset=dataset,
                           callbacks=callbacks)

    class Clock(TrainerCallback):
        def __init__(self):
            self.begins, self.ends, self.optimizer_bytes = [], [], 0

        def on_train_begin(self, args, state, control, **kwargs):
            readings["train_begin"] = rss_bytes()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.ends.append(time.perf_counter())
            if len(self.ends) == 1:
                readings["first_step"] = rss_bytes()
                inner = getattr(optimizer, "optimizer", optimizer)
                self.optimizer_bytes = tensor_bytes(
                    t for state_ in inner.state.values() for t in state_.values() if isinstance(t, torch.Tensor))

    clock = Clock()
    trainer = make_trainer([clock])
    trainer.train()
    tree_peak = sampler.stop()
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds = [end - begin for begin, end in zip(clock.begins, clock.ends)]
    later = seconds[1:] or seconds  # the first step pays one-off allocations and kernel selection
    peak = peak_rss_bytes()
    return {
        "side": side, "steps": len(seconds), "accumulation": accumulation, "workers": workers,
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "rss_gib": {k: v / GIB for k, v in readings.items()},
        "peak_rss_gib": peak / GIB, "peak_rss_during_load_gib": peak_after_load / GIB,
        "peak_pss_with_workers_gib": tree_peak / GIB,
        "weights_gib": weights / GIB, "trainable_gib": trainable / GIB, "optimizer_state_gib": clock.optimizer_bytes / GIB,
        # What the step adds on top of everything held between steps: activations, gradients' transients, logits.
        "step_transient_gib": (peak - readings["first_step"]) / GIB if peak > readings["first_step"] else 0.0,
        "first_step_s": seconds[0], "step_s": sum(later) / len(later),
    }


# ---- driver ----------------------------------------------------------------------------------------

def build_model(case: Case, out_dir: Path) -> Path:
    """Random weights from the config alone, in bfloat16, saved for from_pretrained."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlavaForConditionalGeneration(case.llava_config())
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out_dir)
    return out_dir


def run_child(side: str, work: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", side, str(work), "--steps", str(args.steps),
           "--accumulation", str(args.accumulation)] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the {side} side failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(case: Case, ours: dict, plain: dict, args, build_s: float) -> dict:
    rows = [
        ("RSS after imports", ours["rss_gib"]["imports"], plain["rss_gib"]["imports"]),
        ("RSS after load + LoRA", ours["rss_gib"]["loaded"], plain["rss_gib"]["loaded"]),
        ("RSS at train begin", ours["rss_gib"]["train_begin"], plain["rss_gib"]["train_begin"]),
        ("RSS after 1st optimizer step", ours["rss_gib"]["first_step"], plain["rss_gib"]["first_step"]),
        ("peak RSS while loading", ours["peak_rss_during_load_gib"], plain["peak_rss_during_load_gib"]),
        ("peak RSS (process)", ours["peak_rss_gib"], plain["peak_rss_gib"]),
        ("peak PSS (process + workers)", ours["peak_pss_with_workers_gib"], plain["peak_pss_with_workers_gib"]),
        ("  weights (all parameters)", ours["weights_gib"], plain["weights_gib"]),
        ("  trainable (fp32 LoRA + projector)", ours["trainable_gib"], plain["trainable_gib"]),
        ("  optimizer state (AdamW)", ours["optimizer_state_gib"], plain["optimizer_state_gib"]),
        ("  step transient (peak - after step 1)", ours["step_transient_gib"], plain["step_transient_gib"]),
    ]
    print(f"{case.title}; batch {BATCH} x accumulation {args.accumulation}, {args.steps} optimizer steps, CPU x"
          f"{args.threads} thread(s), {ours['dtype']}; model built in {build_s:.0f} s")
    print(f"{'GiB / seconds':40s} {'ours':>9s} {'plain':>9s} {'ratio':>7s}")
    for name, a, b in rows:
        print(f"{name:40s} {a:9.2f} {b:9.2f} {a / b if b else float('nan'):7.2f}")
    for name, key in (("first step s", "first_step_s"), ("step s (after the first)", "step_s")):
        print(f"{name:40s} {ours[key]:9.1f} {plain[key]:9.1f} {ours[key] / plain[key]:7.2f}")
    ours_peak = max(ours["peak_rss_gib"], ours["peak_pss_with_workers_gib"])
    plain_peak = max(plain["peak_rss_gib"], plain["peak_pss_with_workers_gib"])
    figures = {
        "case": case.name, "batch": BATCH, "accumulation": args.accumulation, "steps": args.steps,
        "threads": args.threads, "dtype": ours["dtype"], "ours": ours, "plain": plain,
        "ours_peak_gib": ours_peak, "plain_peak_gib": plain_peak, "peak_ratio": ours_peak / plain_peak,
        "step_time_ratio": ours["step_s"] / plain["step_s"],
        f"goal_ours_peak_le_{GOAL_GIB:g}_gib": ours_peak <= GOAL_GIB, "goal_ours_below_plain": ours_peak < plain_peak,
    }
    print(f"peak (the larger of process RSS and process+workers PSS): ours {ours_peak:.2f} GiB, plain "
          f"{plain_peak:.2f} GiB, ratio {ours_peak / plain_peak:.2f}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per side (the first is timed apart)")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step (the recipe's 8 costs time, not peak memory)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples in the shards (default: two shuffle buffers' worth, one per loader worker)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the script")
    parser.add_argument("--work", type=Path, default=None, help="keep the model and shards here (default: temp)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = quick_case() if args.quick else INTERLEAVE_05B
    if args.child:
        side, work = args.child
        work = Path(work)
        print(json.dumps(measure(side, case, work / "model", work / "shards", args.steps, args.accumulation)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-memory-budget-"))
    try:
        start = time.perf_counter()
        if not (work / "model" / "config.json").is_file():
            build_model(case, work / "model")
        if not (work / "shards" / "index.json").is_file():
            # As many samples as the default shuffle buffer holds per loader worker, so the buffers fill as in a
            # real run (the plain side keeps only the samples it trains on in memory: its dataset costs it less).
            count = args.samples or (2 * BATCH if args.quick else 2 * train_config(1, 1).shuffle_buffer)
            write_shards(work / "shards", case, make_samples(case, count), num_shards=2)
        build_s = time.perf_counter() - start
        print(f"model and shards ready in {build_s:.0f} s under {work}", file=sys.stderr)
        ours = run_child("ours", work, args)
        plain = run_child("plain", work, args)
        figures = report(case, ours, plain, args, build_s)
        print(json.dumps(figures))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
