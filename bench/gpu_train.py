"""GPU training throughput: the plain ``transformers.Trainer`` on in-memory tensors against CustomTrainer on shards.

Two random-init LLaVA shapes, built straight on the GPU (no download, no CPU init):
  (a) SigLIP-so400m-384 + Qwen2-0.5B, bf16 autocast over fp32 master weights, projector + language model trained
      in full (vision tower frozen), batch 16;
  (b) CLIP-L/14-336 + Llama-7B, bf16 base, LoRA r=128 on every linear layer of the language model + projector
      trained, gradient checkpointing, batch 8.
Both sides get the same model, the same samples, the same trainable parts (training.configure_trainable) and
the same batch size. They differ only where the project claims to do better:
  plain:  transformers.Trainer, map-style dataset of pre-normalised float pixel tensors, a padding collator,
          optim adamw_torch (transformers 5.24's default is already the fused one: see --plain-optim), the model's
          own loss (full-vocabulary logits at every position), dataloader_num_workers=0.
  custom: the CustomTrainer that training.build_trainer makes (as train() does), make_stream over WebDataset shards
          of uint8 pixels + MemoryEfficientCollator, with training.training_arguments, as train() builds them
          (bf16, fused AdamW, workers, pinned memory, no dispatch; evaluation and checkpointing off), loss only at
          answer positions, and TrainConfig.compile_blocks (each transformer block torch.compiled once, sequences
          padded to a multiple of 64; --compile-cases picks the cases). --eager-too adds a custom-eager row without it.
Timing: a callback synchronises the GPU after ``--warmup`` optimizer steps and again after ``--steps`` more;
samples/s = measured steps x batch / that interval. "gap ms" is the mean host time between one step's end and the
next one's start (the data fetch): near zero when the data path never stalls the GPU.
Peak memory: torch.cuda.max_memory_allocated, reset before each side's model is built (weights + optimizer +
activations); the two sides never hold a model at the same time.

MFU = samples/s x useful FLOPs per sample / peak (989.4 TFLOP/s dense bf16 for H100 SXM and H200, the same chip
generation; --peak-tflops for another). Useful FLOPs per sample, counted per weight matrix W (n = in x out, every
nn.Linear / nn.Conv2d) over the tokens it is applied to:
  forward 2 n T; backward 2 n T for the activation gradient wherever a trainable part lies upstream (projector,
  language model, lm_head: yes; the frozen vision tower: no) + 2 n T for the weight gradient if W trains (so a
  trained layer costs 6 n T, a frozen LoRA base layer 4 n T, the frozen vision tower 2 n T);
  T = vision patches (+CLS) for the vision tower, image tokens for the projector, real (unpadded) sequence length
  for the language model, and for lm_head only the positions that predict an answer token: logits anywhere else
  are wasted work, so the plain side's full-vocabulary logits do not raise its MFU. Attention adds 4 T^2 d per
  layer forward (QK^T and AV, no causal discount), x3 in the language model for its backward. Gradient
  checkpointing's recomputation is not counted (model FLOPs, not hardware FLOPs).
Both sides train at learning rate 1e-5 (speed does not depend on it; a random model must not reach a NaN loss).
--budget-s bounds the whole run, imports included: the plan aims 15 s inside it, skips a case that no longer fits
(saying so), stops a side early when its share of the time is spent (the row says how many steps were timed), and
a watchdog exits (code 3) at the budget itself. Rows are printed as they are measured, then the table again and
one JSON line; with $OUT set they are also written, after every row, to $OUT/gpu_train.txt and .json.
    PYTHONPATH=. python3 bench/gpu_train.py --budget-s 200          # the GPU run
    PYTHONPATH=. python3 bench/gpu_train.py --tiny                  # tiny shapes, fp32, CPU: checks the script
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # the budget counts the imports too

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GIB = 2**30
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Planning aims this far inside --budget-s; a watchdog ends the process at the budget itself, so the caller's
# timeout never hits first and the rows already measured are on disk.
SAFETY_MARGIN_S = 15.0


# ---- cases -----------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    title: str
    vision: str  # "siglip" | "clip"
    vision_kwargs: dict
    text: str  # "qwen2" | "llama"
    text_kwargs: dict
    batch: int
    use_lora: bool
    lora_r: int = 128
    gradient_checkpointing: bool = False
    compile_blocks: bool = False  # the custom side's TrainConfig.compile_blocks
    goal_speedup: float = 1.0
    memory_goal: bool = False  # the issue asks for "no more peak memory" than the plain side (case a only)
    reference: str = ""
    est_side_s: float = 30.0  # rough wall time of one side on an H200 (build + warmup + measure), for planning

    @property
    def image_size(self) -> int:
        return self.vision_kwargs["image_size"]

    @property
    def patches(self) -> int:
        return (self.vision_kwargs["image_size"] // self.vision_kwargs["patch_size"]) ** 2

    @property
    def vision_tokens(self) -> int:  # CLIP prepends a CLS token; SigLIP has none
        return self.patches + (1 if self.vision == "clip" else 0)

    @property
    def image_tokens(self) -> int:  # what the language model sees: "default" drops CLIP's CLS, "full" keeps all
        return self.patches

    @property
    def vocab(self) -> int:
        return self.text_kwargs["vocab_size"]

    def llava_config(self):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

        if self.vision == "siglip":
            vision = SiglipVisionConfig(**self.vision_kwargs, vision_use_head=False)  # LLaVA never runs the head
        else:
            vision = CLIPVisionConfig(**self.vision_kwargs, projection_dim=self.vision_kwargs["hidden_size"])
        text_cls = Qwen2Config if self.text == "qwen2" else LlamaConfig
        text = text_cls(**self.text_kwargs, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        return LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=self.vocab - 1, image_seq_length=self.image_tokens,
            vision_feature_select_strategy="full" if self.vision == "siglip" else "default",
            vision_feature_layer=-1 if self.vision == "siglip" else -2, projector_hidden_act="gelu",
        )

    def train_config(self, dtype: str, max_steps: int):
        """The project's TrainConfig for this case: what both sides train."""
        from plant_pipeline.ml.training import TrainConfig

        common = dict(max_steps=max_steps, per_device_train_batch_size=self.batch, dtype=dtype,
                      freeze_vision_tower=True, freeze_projector=False,
                      gradient_checkpointing=self.gradient_checkpointing, compile_blocks=self.compile_blocks, seed=0)
        if self.use_lora:
            return TrainConfig(use_lora=True, lora_r=self.lora_r, lora_alpha=2 * self.lora_r, lora_dropout=0.05,
                               lora_target_modules=list(ALL_LINEAR), **common)
        return TrainConfig(use_lora=False, freeze_language_model=False, **common)


def full_cases() -> list[Case]:
    return [
        Case("a", "SigLIP-so400m-384 + Qwen2-0.5B, full FT of projector + LM, bf16", "siglip",
             dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                  image_size=384, patch_size=14),
             "qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                           max_position_embeddings=32768, rms_norm_eps=1e-6),
             batch=16, use_lora=False, compile_blocks=True, goal_speedup=1.5, memory_goal=True, est_side_s=45.0,
             reference="plain Trainer, every part trained, H200: 60 samples/s at batch 16, 55 GiB"),
        Case("b", "CLIP-L/14-336 + Llama-7B, LoRA r=128 + projector, gradient checkpointing, bf16", "clip",
             dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=336, patch_size=14),
             "llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           intermediate_size=11008, vocab_size=32064, tie_word_embeddings=False,
                           max_position_embeddings=4096, rms_norm_eps=1e-5),
             batch=8, use_lora=True, lora_r=128, gradient_checkpointing=True, compile_blocks=True, goal_speedup=1.2,
             est_side_s=50.0,
             reference="plain Trainer, H200: 9.5 samples/s at batch 8, 21 GiB"),
    ]


def tiny_cases() -> list[Case]:
    """The same two recipes at toy sizes: exercises every code path on a CPU in seconds."""
    small_vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=56, patch_size=14)
    return [
        Case("a", "tiny SigLIP + Qwen2, full FT of projector + LM", "siglip", dict(small_vision),
             "qwen2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=1024, tie_word_embeddings=True,
                           max_position_embeddings=512),
             batch=4, use_lora=False, compile_blocks=True, goal_speedup=1.5, memory_goal=True, est_side_s=20.0),
        Case("b", "tiny CLIP + Llama, LoRA r=8 + projector, gradient checkpointing", "clip", dict(small_vision),
             "llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           intermediate_size=128, vocab_size=1024, tie_word_embeddings=False,
                           max_position_embeddings=512),
             batch=4, use_lora=True, lora_r=8, gradient_checkpointing=True, compile_blocks=True, goal_speedup=1.2,
             est_side_s=20.0),
    ]


# ---- synthetic data --------------------------------------------------------------------------------

def make_samples(case: Case, count: int, seed: int = 0) -> list:
    """[bos, image x N, ~20 prompt tokens, ~8 answer tokens, eos]; labels -100 up to the answer."""
    import numpy as np

    from plant_pipeline.ml.shards import IGNORE_INDEX, Sample

    rng = np.random.default_rng(seed)
    image_token = case.vocab - 1
    samples = []
    for i in range(count):
        prompt = rng.integers(3, case.vocab - 1, size=int(rng.integers(18, 23)))
        answer = rng.integers(3, case.vocab - 1, size=int(rng.integers(6, 11)))
        ids = np.concatenate([[BOS_ID], np.full(case.image_tokens, image_token), prompt, answer, [EOS_ID]])
        labels = ids.copy()
        labels[: 1 + case.image_tokens + len(prompt)] = IGNORE_INDEX
        pixels = rng.integers(0, 256, size=(3, case.image_size, case.image_size), dtype=np.uint8)
        samples.append(Sample(key=f"synthetic_{i:05d}", pixels=pixels, input_ids=ids.astype(np.int32),
                              labels=labels.astype(np.int32),
                              meta={"image_id": i + 1, "label": 0, "name": "synthetic", "split": "train",
                                    "source": "synthetic", "sha256": ""}))
    return samples


def write_shards(out_dir: Path, case: Case, samples: list, num_shards: int) -> Path:
    """Shards and index.json in the flower_shards format, through the index writer the build uses."""
    import webdataset as wds

    from plant_pipeline.ml.shards import make_index, shard_entry, split_entry, write_index
    from plant_pipeline.ml.testing import encode_sample

    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    per_shard = math.ceil(len(samples) / num_shards)
    shards = []
    for number, start in enumerate(range(0, len(samples), per_shard)):
        name = f"train/train-{number:05d}.tar"
        with wds.TarWriter(str(out_dir / name)) as writer:
            for sample in samples[start:start + per_shard]:
                writer.write(encode_sample(sample))
        shards.append(shard_entry(out_dir, name, len(samples[start:start + per_shard])))
    write_index(out_dir, make_index(model_name=f"synthetic-{case.name}",
                                    pixel_shape=[3, case.image_size, case.image_size],
                                    num_image_tokens=case.image_tokens, splits={"train": split_entry(shards)}))
    return out_dir


def normalizer_for(case: Case):
    """The processor's own uint8 -> float lookup table (pure-python image processors, no download)."""
    from plant_pipeline.ml.shards import PixelNormalizer

    size = case.image_size
    if case.vision == "siglip":
        from transformers.models.siglip import SiglipImageProcessorPil

        processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    else:
        from transformers.models.clip import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return PixelNormalizer.from_processor(processor)


class InMemoryDataset:
    """Map-style dataset of ready model inputs: what a plain Trainer user feeds (float pixels pre-normalised)."""

    def __init__(self, samples: list, normalizer):
        import numpy as np
        import torch

        self.items = []
        for sample in samples:
            pixels = normalizer(torch.from_numpy(sample.pixels[None]))[0]
            self.items.append({"input_ids": torch.from_numpy(sample.input_ids.astype(np.int64)),
                               "labels": torch.from_numpy(sample.labels.astype(np.int64)),
                               "pixel_values": pixels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def plain_collate(items: list[dict]) -> dict:
    """Right-pad to the longest sequence; stack the float pixels."""
    import torch

    longest = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), longest), PAD_ID, dtype=torch.long)
    labels = torch.full((len(items), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.stack([item["pixel_values"] for item in items])}


# ---- model -----------------------------------------------------------------------------------------

def build_model(case: Case, cfg, device, compute_dtype):
    """Random-init LLaVA made directly on ``device`` in train()'s load dtype, then its freezing / LoRA."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from plant_pipeline.ml.training import configure_trainable, validate_lora_targets

    # As in train(): LoRA keeps the frozen base in the compute dtype; full fine-tuning keeps fp32 master weights.
    load_dtype = compute_dtype if cfg.use_lora else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(load_dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(case.llava_config())
    finally:
        torch.set_default_dtype(previous)
    if cfg.use_lora:
        validate_lora_targets(model, cfg.lora_target_modules)
    with torch.device(device):  # LoRA matrices are created (and initialised) on the GPU too
        model = configure_trainable(model, cfg)
    return model


def count_params(model) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def useful_flops_per_sample(model, case: Case, samples: list) -> float:
    """See the module docstring: model FLOPs needed for the answer-token loss, averaged over ``samples``."""
    from torch import nn

    from plant_pipeline.ml.shards import IGNORE_INDEX

    per_token = {"vision": 0.0, "projector": 0.0, "language": 0.0, "lm_head": 0.0}  # FLOPs per token, fwd+bwd
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or "original_module" in name:
            continue  # peft keeps a frozen, never-run copy of each modules_to_save module
        n = module.weight.numel()
        trains = module.weight.requires_grad
        if "vision_tower" in name:
            part, backward_input = "vision", False
        elif "multi_modal_projector" in name:
            part, backward_input = "projector", True
        elif name.split(".")[-1] == "lm_head":
            part, backward_input = "lm_head", True
        else:
            part, backward_input = "language", True
        per_token[part] += 2 * n + (2 * n if backward_input else 0) + (2 * n if trains else 0)
    vision_cfg, text_cfg = model.config.vision_config, model.config.text_config
    vision_attention = 4 * case.vision_tokens**2 * vision_cfg.hidden_size * vision_cfg.num_hidden_layers
    fixed = per_token["vision"] * case.vision_tokens + vision_attention + per_token["projector"] * case.image_tokens
    total = 0.0
    for sample in samples:
        length = len(sample.input_ids)
        answers = int((sample.labels[1:] != IGNORE_INDEX).sum())
        attention = 3 * 4 * length**2 * text_cfg.hidden_size * text_cfg.num_hidden_layers
        total += fixed + per_token["language"] * length + attention + per_token["lm_head"] * answers
    return total / len(samples)


# ---- timing ----------------------------------------------------------------------------------------

def make_clock(warmup: int, measure_until: int, deadline: float, sync: Callable[[], None], profile_steps: int = 0):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Times optimizer steps warmup+1 .. measure_until; stops training early at ``deadline``.

        With ``profile_steps``, that many more steps then run under torch.profiler (kept out of the timing),
        with CUDA's sync debug mode recording every host-device synchronisation and the line that caused it.
        """

        def __init__(self):
            self.train_begin = self.t0 = self.t1 = None
            self.measured_steps = 0
            self.stopped_early = False
            self.gaps: list[float] = []
            self._last_end = None
            self.profiler = None
            self.profile_wall_s = None
            self.profiled_steps = 0
            self.syncs: dict[str, int] = {}
            self._warnings = None
            self._profile_start = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = time.monotonic()

        def on_step_begin(self, args, state, control, **kwargs):
            if self._last_end is not None and warmup <= state.global_step < measure_until:
                self.gaps.append(time.monotonic() - self._last_end)

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            now = time.monotonic()
            if self.profiler is not None:
                if step >= measure_until + profile_steps or now > deadline:
                    self._stop_profile(sync, step)
                    control.should_training_stop = True
            elif step == warmup:
                sync()
                self.t0 = time.monotonic()
            elif step > warmup and (step >= measure_until or now > deadline):
                sync()
                self.t1 = time.monotonic()
                self.measured_steps = step - warmup
                self.stopped_early = step < measure_until
                if profile_steps and not self.stopped_early:
                    self._start_profile(step)
                else:
                    control.should_training_stop = True
            elif now > deadline:  # still warming up: nothing to measure
                self.stopped_early = True
                control.should_training_stop = True
            self._last_end = time.monotonic()
            return control

        def _start_profile(self, step: int) -> None:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._warnings = warnings.catch_warnings(record=True)
            self._recorded = self._warnings.__enter__()
            warnings.simplefilter("always")
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")
            self._profile_step = step
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self._profile_start = time.monotonic()

        def _stop_profile(self, sync: Callable[[], None], step: int) -> None:
            import torch

            sync()
            self.profile_wall_s = time.monotonic() - self._profile_start
            self.profiled_steps = step - self._profile_step
            self.profiler.__exit__(None, None, None)
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode(0)
            for item in self._recorded:
                if "synchroniz" in str(item.message):
                    where = f"{Path(item.filename).name}:{item.lineno}"
                    self.syncs[where] = self.syncs.get(where, 0) + 1
            self._warnings.__exit__(None, None, None)

    return StepClock()


def profile_summary(clock, rows: int = 15) -> str:
    """Top operators by device (else CPU) time, GPU busy share of the wall time, and where the host synced."""
    prof = clock.profiler
    if prof is None or not clock.profiled_steps:
        return "(no profile: the side stopped before the profiled steps)"
    from torch.autograd import DeviceType

    averages = prof.key_averages()
    # Kernels only: operator rows repeat their kernels' time.
    device_total_us = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA)
    sort_by = "self_cuda_time_total" if device_total_us else "self_cpu_time_total"
    lines = [f"profile over {clock.profiled_steps} steps, {clock.profile_wall_s * 1000:.0f} ms wall"]
    if device_total_us:
        busy = device_total_us / 1e6 / clock.profile_wall_s
        lines.append(f"GPU kernels {device_total_us / 1000:.0f} ms = {100 * busy:.0f}% of the wall time "
                     f"(the rest: the GPU waits on the host)")
    lines.append(averages.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))
    per_step = {k: v / clock.profiled_steps for k, v in sorted(clock.syncs.items(), key=lambda kv: -kv[1])}
    lines.append("host-device syncs per step: " + (", ".join(f"{k} x{v:g}" for k, v in per_step.items()) or "none"))
    return "\n".join(lines)


# ---- one side --------------------------------------------------------------------------------------

@dataclass
class SideResult:
    case: str
    side: str
    batch: int
    samples_per_second: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    reserved_gib: float | None = None
    measured_steps: int = 0
    measured_s: float | None = None
    warmup_s: float | None = None
    build_s: float | None = None
    gap_ms: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    leftover_gib: float | None = None
    optim: str | None = None
    note: str = ""
    error: str | None = None
    profile: str | None = None  # --profile's text, printed after the row (not part of the JSON)

    def row(self) -> str:
        def f(value, fmt):
            return format(value, fmt) if value is not None else "n/a"

        mfu = f"{100 * self.mfu:.1f}%" if self.mfu is not None else "n/a"
        note = self.error or self.note
        return (f"{self.case:4s} {self.side:12s} {self.batch:5d} {f(self.samples_per_second, '10.2f'):>10s} "
                f"{mfu:>6s} {f(self.peak_gib, '8.2f'):>8s} {self.measured_steps:5d} {f(self.build_s, '7.1f'):>7s} "
                f"{f(self.warmup_s, '8.1f'):>8s} {f(self.gap_ms, '7.1f'):>7s}  {note}")


HEADER = (f"{'case':4s} {'side':12s} {'batch':>5s} {'samples/s':>10s} {'MFU':>6s} {'peak GiB':>8s} {'steps':>5s} "
          f"{'build s':>7s} {'warmup s':>8s} {'gap ms':>7s}  note")


def training_args(side: str, cfg, run: dict, out_dir: str, max_steps: int):
    """plain: Trainer defaults with the shared knobs; custom: the TrainingArguments train() builds
    (training.training_arguments) minus evaluation and checkpointing, which are not throughput."""
    from transformers import TrainingArguments

    from plant_pipeline.ml.training import training_arguments

    # A small learning rate: speed does not depend on it, and a random-init model must not reach a NaN loss
    # (CustomTrainer would stop the run with NonFiniteLossError).
    shared = dict(gradient_accumulation_steps=1, learning_rate=1e-5, logging_steps=10**6, save_strategy="no",
                  eval_strategy="no")
    if side == "plain":
        return TrainingArguments(
            output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, report_to="none", disable_tqdm=True,
            use_cpu=run["device"].type == "cpu", bf16=run["bf16"], seed=cfg.seed, optim=run["plain_optim"],
            **shared)
    # optim stays at transformers' default (the fused AdamW), as in train().
    return training_arguments(cfg, output_dir=out_dir, max_steps=max_steps, device=run["device"],
                              dtype=run["dtype"], workers=run["workers"], logging_first_step=False, **shared)


def run_side(case: Case, side: str, run: dict, data: dict, side_deadline: float) -> SideResult:
    import torch
    from transformers import PrinterCallback, Trainer

    device = run["device"]
    cuda = device.type == "cuda"
    result = SideResult(case=case.name, side=side, batch=case.batch)
    max_steps = run["warmup"] + run["steps"] + run["profile"]
    trainer = model = None
    try:
        cfg = case.train_config(run["dtype_name"], max_steps)
        if side == "custom-eager":
            cfg.compile_blocks = False
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.monotonic()
        model = build_model(case, cfg, device, run["dtype"])
        if cuda:
            torch.cuda.synchronize(device)
        result.build_s = time.monotonic() - start
        result.trainable_params, result.total_params = count_params(model)
        flops = useful_flops_per_sample(model, case, data["samples"])
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        clock = make_clock(run["warmup"], run["warmup"] + run["steps"], side_deadline, sync, run["profile"])
        args = training_args(side, cfg, run, tempfile.mkdtemp(prefix=f"gpu-train-{case.name}-{side}-",
                                                              dir=data["work"]), max_steps)
        result.optim = str(getattr(args.optim, "value", args.optim))
        if side == "plain":
            trainer = Trainer(model=model, args=args, data_collator=plain_collate, train_dataset=data["memory"],
                              callbacks=[clock])
        else:
            from plant_pipeline.ml.shards import split_shard_paths
            from plant_pipeline.ml.training import MemoryEfficientCollator, build_trainer, make_stream

            shards = split_shard_paths(data["shards"], "train")
            stream = make_stream(shards, shuffle=True, shuffle_buffer=min(cfg.shuffle_buffer, len(data["samples"])),
                                 seed=cfg.seed, epochs=None, num_workers=run["workers"], what="synthetic shards")
            collator = MemoryEfficientCollator(normalizer=data["normalizer"], pad_token_id=PAD_ID,
                                               pad_to_multiple_of=cfg.padding_multiple(),
                                               defer_pixel_normalization=cuda)  # as train() does
            # build_trainer compiles the blocks when cfg.compile_blocks says so, as in train().
            trainer = build_trainer(model, cfg, args, data_collator=collator, train_dataset=stream, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        if clock.t0 is not None and clock.train_begin is not None:
            result.warmup_s = clock.t0 - clock.train_begin
        if clock.t1 is not None and clock.measured_steps > 0:
            result.measured_steps = clock.measured_steps
            result.measured_s = clock.t1 - clock.t0
            result.samples_per_second = clock.measured_steps * case.batch / result.measured_s
            if run["peak_flops"]:
                result.mfu = result.samples_per_second * flops / run["peak_flops"]
            if clock.gaps:
                result.gap_ms = 1000 * sum(clock.gaps) / len(clock.gaps)
        else:
            result.note = "stopped by the time budget before any step was measured"
        if clock.stopped_early and result.measured_steps:
            result.note = f"time budget: measured {clock.measured_steps} of {run['steps']} steps"
        if cuda:
            result.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
            result.reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
        if run["profile"]:
            result.profile = profile_summary(clock)
    except Exception as err:  # one failed side (an OOM, say) must not cost the rest of the single GPU run
        traceback.print_exc(file=sys.stderr)
        result.error = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if cuda:
            result.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
    finally:
        if trainer is not None:
            trainer.accelerator.free_memory()
            trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
        del trainer, model
        # A fresh compiler state per side, as in separate processes: run after case a, case b's compile failed
        # once in inductor's partitioner (it passes on its own).
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            result.leftover_gib = torch.cuda.memory_allocated(device) / GIB
    return result


def prepare_data(case: Case, run: dict, case_dir: Path) -> dict:
    """The same synthetic samples as shards (custom side) and as in-memory float tensors (plain side)."""
    # One pass of the plain side's data at the default step counts; more steps cycle over the same samples.
    samples = make_samples(case, case.batch * max(2, min(run["warmup"] + run["steps"], 16)))
    normalizer = normalizer_for(case)
    return {"samples": samples, "normalizer": normalizer, "work": str(case_dir),
            "shards": write_shards(case_dir / "shards", case, samples, num_shards=max(8, run["workers"])),
            "memory": InMemoryDataset(samples, normalizer)}


def compare(case: Case, plain: SideResult, custom: SideResult) -> tuple[dict, str]:
    if not (plain.samples_per_second and custom.samples_per_second):
        return {}, f"{case.name}    custom/plain: no ratio (a side has no measurement)"
    speedup = custom.samples_per_second / plain.samples_per_second
    summary: dict[str, Any] = {"speedup": speedup, "speedup_goal_met": speedup >= case.goal_speedup}
    text = (f"{case.name}    custom/plain: throughput {speedup:.2f}x (goal >= {case.goal_speedup}x: "
            f"{'met' if summary['speedup_goal_met'] else 'NOT met'})")
    if plain.peak_gib and custom.peak_gib:
        ratio = custom.peak_gib / plain.peak_gib
        summary["memory_ratio"] = ratio
        text += f", peak memory {ratio:.2f}x"
        if case.memory_goal:
            summary["memory_goal_met"] = ratio <= 1.0
            text += f" (goal <= 1.0x: {'met' if ratio <= 1.0 else 'NOT met'})"
    return summary, text


# ---- driver ----------------------------------------------------------------------------------------

class Report:
    """Rows as they come, to stdout and (rewritten whole after each row) to $OUT/gpu_train.{txt,json}."""

    def __init__(self, out_dir: str | None):
        self.out_dir = Path(out_dir) if out_dir else None
        self.lines: list[str] = []
        self.table: list[str] = []  # header, rows and ratios, reprinted together at the end
        self.figures: dict[str, Any] = {}
        self._lock = threading.Lock()

    def line(self, text: str = "", table: bool = False) -> None:
        with self._lock:
            print(text, flush=True)
            self.lines.append(text)
            if table:
                self.table.append(text)
            self._write()

    def update(self, **figures) -> None:
        with self._lock:
            self.figures.update(figures)
            self._write()

    def _write(self) -> None:
        if self.out_dir is None:
            return
        try:
            from plant_pipeline.ml.files import atomic_write_bytes

            body = json.dumps(_json_safe(self.figures), sort_keys=False)
            atomic_write_bytes(self.out_dir / "gpu_train.txt", ("\n".join(self.lines) + "\n" + body + "\n").encode())
            atomic_write_bytes(self.out_dir / "gpu_train.json", (body + "\n").encode())
        except OSError as err:
            print(f"(could not write to {self.out_dir}: {err})", file=sys.stderr, flush=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def log(message: str) -> None:
    print(f"[{time.monotonic() - T_START:6.1f}s] {message}", file=sys.stderr, flush=True)


def start_watchdog(report: Report, hard_deadline: float) -> None:
    def abort():
        report.line("ABORTED: --budget-s reached; the rows above are complete, the side in progress is lost")
        report.update(aborted=True, elapsed_s=time.monotonic() - T_START)
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(max(0.0, hard_deadline - time.monotonic()), abort)
    timer.daemon = True
    timer.start()


def peak_flops_for(device, override_tflops: float | None) -> tuple[float | None, str]:
    import torch

    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "n/a (no GPU)"
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name and "H100" in name:
        return 756.0e12, "756 TFLOP/s dense bf16 (H100 PCIe)"
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{tflops} TFLOP/s dense bf16 ({key})"
    return None, f"unknown for {name!r}: pass --peak-tflops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=200.0, help="wall-clock bound for the whole run")
    parser.add_argument("--tiny", action="store_true", help="toy shapes, fp32 on CPU: a quick check of the script")
    parser.add_argument("--cases", default="a,b", help="comma-separated subset of a,b (run in this order)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps per side (3; tiny 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per side (10; tiny 3)")
    parser.add_argument("--batch-a", type=int, default=None)
    parser.add_argument("--batch-b", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None,
                        help="CustomTrainer DataLoader workers (default: train()'s, 0 on CUDA)")
    parser.add_argument("--plain-optim", default="adamw_torch",
                        help="the plain side's optimizer (adamw_torch: the unfused baseline of the issue)")
    parser.add_argument("--compile-cases", default=None,
                        help="cases whose custom side uses TrainConfig.compile_blocks (default: a,b; '' = none)")
    parser.add_argument("--eager-too", action="store_true",
                        help="also run the custom side uncompiled (custom-eager) for cases that compile")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed steps, profile N more steps per side (top ops, GPU idle share, syncs)")
    parser.add_argument("--bf16", action="store_true", help="bf16 even on a CPU (to check that path with --tiny)")
    args = parser.parse_args()
    # train() calls gradient_checkpointing_enable, which transformers 5.24 marks deprecated: not this run's news.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)

    report = Report(os.environ.get("OUT"))
    start_watchdog(report, T_START + args.budget_s)
    deadline = T_START + args.budget_s - min(SAFETY_MARGIN_S, 0.1 * args.budget_s)  # what the planning aims at

    import torch

    from plant_pipeline.ml.training import TrainConfig, loader_workers

    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny and not args.device:
        # The full shapes on a CPU would run for hours (case b is a 7B model): say so instead (make bench).
        report.line("gpu_train: no CUDA GPU; nothing measured (--tiny checks the script on a CPU)")
        report.update(skipped=["a", "b"], aborted=False, elapsed_s=time.monotonic() - T_START)
        report.line(json.dumps(_json_safe(report.figures)))
        sys.stdout.flush()
        os._exit(0)
    cases = tiny_cases() if args.tiny else full_cases()
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(wanted) - {c.name for c in cases})
    if unknown or not wanted:
        parser.error(f"--cases takes a comma-separated subset of a,b; got {args.cases!r}")
    cases = [next(c for c in cases if c.name == name) for name in wanted]
    for case in cases:
        override = args.batch_a if case.name == "a" else args.batch_b
        case.batch = override if override is not None else case.batch
        if args.compile_cases is not None:
            case.compile_blocks = case.name in args.compile_cases.split(",")
    if any(c.batch < 1 for c in cases) or (args.warmup is not None and args.warmup < 1) or \
            (args.steps is not None and args.steps < 1) or (args.workers is not None and args.workers < 0):
        parser.error("batch sizes, --warmup and --steps must be >= 1 and --workers >= 0")
    bf16 = args.bf16 or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    peak_flops, peak_text = peak_flops_for(device, args.peak_tflops)
    run = {
        "device": device, "bf16": bf16, "dtype": torch.bfloat16 if bf16 else torch.float32,
        "dtype_name": "bfloat16" if bf16 else "float32",
        "warmup": args.warmup if args.warmup is not None else (2 if args.tiny else 3),
        "steps": args.steps if args.steps is not None else (3 if args.tiny else 10),
        "workers": args.workers if args.workers is not None else loader_workers(TrainConfig(), device),
        "plain_optim": args.plain_optim, "peak_flops": peak_flops,
        "profile": max(0, args.profile),
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import transformers

    report.update(device=device_name, torch=torch.__version__, transformers=transformers.__version__,
                  peak_tflops=peak_flops / 1e12 if peak_flops else None, warmup_steps=run["warmup"],
                  timed_steps=run["steps"], custom_workers=run["workers"], plain_optim=args.plain_optim,
                  budget_s=args.budget_s, cases={}, skipped=[])
    report.line(f"gpu_train: {device_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
                f"{'bf16 autocast' if bf16 else 'fp32'}; MFU peak {peak_text}; {run['warmup']} warmup + "
                f"{run['steps']} timed steps per side; budget {args.budget_s:.0f} s")
    report.line("plain = transformers.Trainer, in-memory float tensors, full-vocab loss, "
                f"optim {args.plain_optim}, 0 workers | custom = CustomTrainer, shards + MemoryEfficientCollator, "
                f"answer-only logits, train()'s TrainingArguments, {run['workers']} workers")
    report.line(HEADER, table=True)

    work = Path(tempfile.mkdtemp(prefix="gpu-train-bench-"))
    try:
        for index, case in enumerate(cases):
            remaining = deadline - time.monotonic()
            # Both sides or neither: a lone side is no comparison.
            needed = 2 * case.est_side_s * (0.6 if index == 0 else 1.0)
            if remaining < needed:
                report.line(f"{case.name}: SKIPPED ({case.title}): {remaining:.0f} s of the budget left, about "
                            f"{needed:.0f} s needed", table=True)
                report.update(skipped=report.figures["skipped"] + [case.name])
                continue
            log(f"case {case.name}: {case.title}; writing synthetic data")
            try:
                data = prepare_data(case, run, work / case.name)
            except Exception as err:  # a missing package, say: the other case may still run
                traceback.print_exc(file=sys.stderr)
                report.line(f"{case.name}: FAILED to prepare the data: {type(err).__name__}: {err}", table=True)
                continue
            results = {}
            sides = ["plain", "custom"] + (["custom-eager"] if args.eager_too and case.compile_blocks else [])
            for side_index, side in enumerate(sides):
                # The time left is shared in proportion to the sides still to run (this case's and later ones').
                later = sum(2 * c.est_side_s for c in cases[index + 1:])
                this = (len(sides) - side_index) * case.est_side_s
                remaining = deadline - time.monotonic()
                side_deadline = time.monotonic() + max(5.0, remaining * case.est_side_s / (this + later))
                log(f"case {case.name} {side}: building the model and training "
                    f"(side allowance {side_deadline - time.monotonic():.0f} s)")
                result = run_side(case, side, run, data, side_deadline)
                results[side] = result
                report.line(result.row(), table=True)
                if result.profile:
                    report.line(f"--- profile: case {case.name} {side} ---\n{result.profile}")
                cases_fig = report.figures["cases"]
                cases_fig.setdefault(case.name, {"title": case.title, "reference": case.reference,
                                                 "goal_speedup": case.goal_speedup})[side] = {
                    k: v for k, v in result.__dict__.items() if k not in ("case", "side", "profile")}
                report.update(cases=cases_fig, elapsed_s=time.monotonic() - T_START)
                log(f"case {case.name} {side}: done; leftover after freeing: "
                    f"{'n/a' if result.leftover_gib is None else f'{result.leftover_gib:.2f} GiB'}")
            summary, text = compare(case, results["plain"], results["custom"])
            report.line(text, table=True)
            eager = results.get("custom-eager")
            if eager and eager.samples_per_second and results["plain"].samples_per_second:
                summary["speedup_uncompiled"] = eager.samples_per_second / results["plain"].samples_per_second
                report.line(f"{case.name}    custom-eager/plain: {summary['speedup_uncompiled']:.2f}x "
                            "(the same CustomTrainer without compile_blocks)", table=True)
            if case.reference:
                report.line(f"{case.name}    for scale: {case.reference}", table=True)
            cases_fig = report.figures["cases"]
            cases_fig[case.name].update(summary)
            report.update(cases=cases_fig)
            del data
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.update(elapsed_s=time.monotonic() - T_START, aborted=False)
    report.line(f"done in {time.monotonic() - T_START:.0f} s; summary:")
    for text in list(report.table):
        report.line(text)
    report.line(json.dumps(_json_safe(report.figures)))
    sys.stdout.flush()
    sys.stderr.flush()
    # DataLoader workers and the watchdog are daemons; leave without waiting on anything else.
    os._exit(0)


if __name__ == "__main__":
    main()
