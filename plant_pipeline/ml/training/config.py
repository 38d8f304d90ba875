"""Training settings: TrainConfig and its checks, the run identity that names a run's folders, and the
settings resolved against this machine (precision, loader workers, sharding engine)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from plant_pipeline.ml.device import DevicePolicy, policy_of
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.model.spec import ModelConfigError, ModelSpec, resolve_dtype
from plant_pipeline.ml.training.compile import COMPILE_PAD_MULTIPLE

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
REPORT_TO = ("mlflow", "tensorboard", "none")
KEEP = ("best", "last")


class TrainConfigError(UsageError):
    """A training setting that cannot work (alone, with the model, or with this machine); raised before any work."""


@dataclass
class TrainConfig:
    """Every knob of a training run. Invalid values raise TrainConfigError saying what to change."""

    max_steps: int = field(default=200, metadata={"help": "Optimizer steps in total, counted across resumes."})
    num_train_epochs: float | None = field(default=None, metadata={
        "help": "If set, replaces max_steps by ceil(epochs x train samples / (batch x accumulation x ranks))."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Samples per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Samples per device per validation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": f"One of {', '.join(SCHEDULERS)}."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Warmup as a fraction of max_steps, in [0, 1)."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup in steps; when > 0 it replaces warmup_ratio."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = no clipping)."})
    seed: int = field(default=42, metadata={"help": "Seed for weights init (LoRA), dropout and data order."})
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), metadata={
        "help": "Names of the language model's linear layers that get adapters (matched by the last name part, "
                "inside the language model only); each must match at least one layer."})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision encoder's weights fixed."})
    freeze_projector: bool = field(default=False, metadata={
        "help": "Keep the vision-to-text projector fixed (with LoRA, False trains it fully and saves it with "
                "the adapter)."})
    freeze_language_model: bool = field(default=False, metadata={
        "help": "Keep the language model fixed (full fine-tuning only; with LoRA its base weights are frozen anyway)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, more compute."})
    compile_blocks: bool = field(default=False, metadata={
        "help": "torch.compile each transformer block (compiled once, shared by every layer like it): fused "
                "kernels for norms, activations and residual adds. CUDA or CPU, not MPS; the first step takes "
                "longer (the compile). See bench/gpu_train.py for what it gains."})
    pad_to_multiple_of: int | None = field(default=None, metadata={
        "help": "Round each batch's sequence length up to a multiple of this; None = 64 with compile_blocks "
                "(compiled blocks then see a few shapes instead of one per length), else no rounding."})
    dtype: str = field(default="auto", metadata={
        "help": "Compute precision: auto (bf16 where supported on a GPU, fp16 on older MPS, else fp32), float32, "
                "bfloat16 or float16. Full fine-tuning keeps fp32 master weights and autocasts."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every this many steps (the resume points)."})
    save_total_limit: int | None = field(default=2, metadata={
        "help": "Keep at most this many checkpoints (None = all)."})
    eval_steps: int = field(default=50, metadata={
        "help": "Validate every this many steps (0 = only before and after)."})
    logging_steps: int = field(default=10, metadata={"help": "Report loss, speed and ETA every this many steps."})
    dataloader_num_workers: int | None = field(default=None, metadata={
        "help": "DataLoader worker processes per rank; None = auto: 0 on CUDA (pixels cross as uint8 and are "
                "expanded on the GPU, and a thread in the training process reads the next batches during the step; "
                "worker processes were slower there, bench/gpu_train.py), 2 on MPS and the CPU (device.py). "
                "The train split needs at least ranks x workers shards."})
    dataloader_prefetch_factor: int = field(default=2, metadata={
        "help": "Batches each worker prepares ahead (with 0 workers on CUDA: the read-ahead thread)."})
    shuffle_buffer: int = field(default=500, metadata={
        "help": "Samples held per worker for shuffling (memory: buffer x sample size)."})
    memory_cleanup_steps: int = field(default=50, metadata={
        "help": "Run gc and empty the CUDA/MPS allocator's cache every this many steps (0 = never)."})
    merge_lora: bool = field(default=False, metadata={
        "help": "Save the LoRA weights merged into a full model instead of a small adapter."})
    max_eval_samples: int | None = field(default=256, metadata={
        "help": "Validate on at most this many samples (None = the whole validation split)."})
    resume: bool = field(default=True, metadata={
        "help": "Resume from the last complete checkpoint whose run settings match; False deletes old checkpoints."})
    report_to: str = field(default="mlflow", metadata={
        "help": "Where the run's parameters, metrics and loss curve are logged: mlflow (the tracking resource's "
                "store: a local one under the data folder unless a server is configured), tensorboard (event files in "
                "the run's checkpoints folder, under tensorboard/) or none."})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "Stop once validation loss has not improved by more than early_stopping_threshold for this many "
                "evaluations in a row (every eval_steps; needs eval_steps > 0); the result says at which step "
                "and why. 0 = never stop early; train to max_steps."})
    early_stopping_threshold: float = field(default=0.0, metadata={
        "help": "The fall in validation loss below the best so far that an evaluation must exceed to count as "
                "an improvement (>= 0), as in transformers' EarlyStoppingCallback."})
    keep: str = field(default="best", metadata={
        "help": "Which weights become the trained model: best (the checkpoint with the lowest validation loss, "
                "as transformers' load_best_model_at_end: save_steps must be a multiple of eval_steps, so every "
                "checkpoint is validated, and a new best between two saves is checkpointed too; the best "
                "checkpoint is never rotated away by save_total_limit; the metadata says its step; with "
                "eval_steps 0 only the last checkpoint is validated, so it is the best) or last."})

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainConfigError(f"{name} must be a positive integer; got {value!r}")

        def non_negative(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"{name} must be an integer >= 0; got {value!r}")

        for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "save_steps", "logging_steps", "lora_r", "lora_alpha",
                     "dataloader_prefetch_factor", "shuffle_buffer"):
            positive(name)
        for name in ("warmup_steps", "eval_steps", "memory_cleanup_steps", "seed"):
            non_negative(name)
        if self.dataloader_num_workers is not None:
            non_negative("dataloader_num_workers")
        epochs = self.num_train_epochs
        if epochs is not None and not (epochs > 0 and math.isfinite(epochs)):
            raise TrainConfigError(
                f"num_train_epochs must be a finite number > 0 or None (use max_steps); got {self.num_train_epochs}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise TrainConfigError(f"learning_rate must be a finite number > 0; got {self.learning_rate}")
        non_negative("early_stopping_patience")
        if not (self.early_stopping_threshold >= 0 and math.isfinite(self.early_stopping_threshold)):
            raise TrainConfigError(
                f"early_stopping_threshold must be a finite number >= 0; got {self.early_stopping_threshold}")
        if self.early_stopping_patience and self.eval_steps == 0:
            raise TrainConfigError(
                f"early_stopping_patience={self.early_stopping_patience} counts evaluations, but eval_steps=0 "
                "validates only before and after training; set eval_steps > 0 (e.g. equal to save_steps) or "
                "early_stopping_patience=0")
        if self.report_to not in REPORT_TO:
            raise TrainConfigError(f"report_to must be one of {', '.join(REPORT_TO)}; got {self.report_to!r}")
        if self.keep not in KEEP:
            raise TrainConfigError(f"keep must be one of {', '.join(KEEP)}; got {self.keep!r}")
        if self.keep == "best" and self.eval_steps and self.save_steps % self.eval_steps:
            multiple = self.eval_steps * -(-self.save_steps // self.eval_steps)
            raise TrainConfigError(
                f"keep='best' picks among validated checkpoints, but save_steps={self.save_steps} is not a multiple "
                f"of eval_steps={self.eval_steps} (as transformers' load_best_model_at_end requires); set save_steps "
                f"to {multiple}, eval_steps to a divisor of {self.save_steps}, or keep='last'")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise TrainConfigError(
                f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}; got {self.lr_scheduler_type!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainConfigError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # NaN passes a "< 0" test
                raise TrainConfigError(f"{name} must be a finite number >= 0; got {value}")
        if self.num_train_epochs is None:
            self.check_warmup(self.max_steps)
        if not 0 <= self.lora_dropout < 1:
            raise TrainConfigError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        self.lora_target_modules = list(self.lora_target_modules)
        if self.use_lora and not self.lora_target_modules:
            raise TrainConfigError("lora_target_modules is empty; name at least one linear layer, e.g. q_proj, v_proj")
        if self.use_lora and self.freeze_language_model:
            raise TrainConfigError(
                "freeze_language_model=True contradicts use_lora=True (the adapters live in the language model); "
                "set freeze_language_model=False, or use_lora=False to train only the projector/vision tower")
        if not self.use_lora and self.freeze_vision_tower and self.freeze_projector and self.freeze_language_model:
            raise TrainConfigError("every part of the model is frozen: nothing would train; unfreeze at least one")
        if self.merge_lora and not self.use_lora:
            raise TrainConfigError("merge_lora=True needs use_lora=True (a full fine-tune is already a whole model)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise TrainConfigError(f"dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}")
        if self.save_total_limit is not None:
            positive("save_total_limit")
        if self.max_eval_samples is not None:
            positive("max_eval_samples")
        if self.pad_to_multiple_of is not None:
            positive("pad_to_multiple_of")

    def check_warmup(self, max_steps: int) -> None:
        """warmup_steps must fit in the run (max_steps, or what num_train_epochs makes of it)."""
        if self.warmup_steps > max_steps:
            where = "" if self.num_train_epochs is None else f" (from num_train_epochs={self.num_train_epochs})"
            raise TrainConfigError(
                f"warmup_steps={self.warmup_steps} is beyond max_steps={max_steps}{where}: the learning rate would "
                "never reach its peak; lower warmup_steps, or use warmup_ratio (a fraction of the run)")

    def padding_multiple(self) -> int | None:
        """The collator's ``pad_to_multiple_of`` (see that knob's help)."""
        if self.pad_to_multiple_of is not None:
            return self.pad_to_multiple_of
        return COMPILE_PAD_MULTIPLE if self.compile_blocks else None

    # Settings that change what a checkpoint means: a resume is refused when one of these differs.
    RESUME_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
                   "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "use_lora", "lora_r",
                   "lora_alpha", "lora_dropout", "lora_target_modules", "freeze_vision_tower", "freeze_projector",
                   "freeze_language_model", "dtype")



def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _shard_hashes(index: dict, split: str) -> list[str]:
    # A split index.json lacks is train()'s to report (shard_checks.split_samples), with a better message.
    return [s.get("sha256") or s["file"] for s in index["splits"].get(split, {}).get("shards", [])]


def json_safe(value):
    """``value`` with non-finite floats as strings, so json.dumps writes strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class RunIdentity:
    """Who a run is: the one place that says which runs share checkpoints and which result is already done.

    ``checkpoint_key()`` holds what a checkpoint's meaning depends on (TrainConfig.RESUME_KEYS, the model and
    its revision, the train shards' contents): runs with the same key share ``folder_name()`` and resume each
    other; train() refuses to resume a checkpoints folder written under another key. ``result_key()`` adds
    everything else the finished result depends on. max_steps and the logging/eval/save intervals are out of
    the checkpoint key, so raising max_steps continues a run.
    """

    config: TrainConfig
    model_spec: ModelSpec
    train_shards_sha256: str  # over the train split's shard hashes, in index order
    shards_sha256: str  # over the train and validation splits' shard hashes

    @classmethod
    def of(cls, config: TrainConfig, model_spec: ModelSpec, index: dict) -> RunIdentity:
        """The identity of training ``model_spec`` with ``config`` on the shards that ``index`` (index.json) lists."""
        shards = {split: _shard_hashes(index, split) for split in ("train", "validation")}
        return cls(config=config, model_spec=model_spec,
                   train_shards_sha256=hashlib.sha256(json.dumps(shards["train"]).encode()).hexdigest(),
                   shards_sha256=hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest())

    def checkpoint_key(self) -> dict:
        """What checkpoints depend on; train() records it in the checkpoints folder (run_config.json)."""
        return {
            "config": {key: getattr(self.config, key) for key in TrainConfig.RESUME_KEYS},
            "model_name": self.model_spec.model_name,
            "revision": self.model_spec.revision,
            "train_shards_sha256": self.train_shards_sha256,
        }

    def folder_name(self) -> str:
        """``<model slug>-<12 hex digits of the checkpoint key>``: the checkpoints (and result) folder of the run."""
        return f"{self.model_spec.slug}-{_digest(self.checkpoint_key())[:12]}"

    def result_key(self, max_steps: int, world_size: int) -> dict:
        """What a finished result depends on: settings (all but resume and report_to), model, shard contents, steps and ranks."""
        return json_safe({
            # Where it resumes from and where it reports to do not change the result.
            "train_config": {k: v for k, v in asdict(self.config).items() if k not in ("resume", "report_to")},
            "model_spec": asdict(self.model_spec),
            "shards_sha256": self.shards_sha256,
            "max_steps": max_steps,
            "world_size": world_size,
        })

    def changed_since(self, recorded: dict) -> list[str]:
        """Names of what differs between a recorded checkpoint_key() and this one (empty when they match)."""
        mine, before = self.checkpoint_key(), recorded.get("config", {})
        changed = sorted(k for k in set(before) | set(mine["config"]) if before.get(k) != mine["config"].get(k))
        return changed + [k for k in ("model_name", "revision", "train_shards_sha256") if recorded.get(k) != mine[k]]


# ---- settings resolved against this machine -------------------------------------------------------

def resolve_precision(config: TrainConfig, device: torch.device | DevicePolicy) -> torch.dtype:
    """The compute dtype for ``config.dtype`` on ``device``; TrainConfigError where it cannot train."""
    policy = policy_of(device)
    try:
        dtype = resolve_dtype(config.dtype, policy)
    except ModelConfigError as err:
        raise TrainConfigError(str(err)) from err
    if dtype == torch.float16 and not policy.trains_fp16:
        raise TrainConfigError(f"float16 training needs a GPU (cuda or mps), not {policy.type}; "
                               "use dtype='float32' or 'bfloat16'")
    return dtype


def check_device_settings(config: TrainConfig, device: torch.device | DevicePolicy) -> None:
    """TrainConfigError for a setting ``device`` refuses (compile_blocks on MPS), before the model loads."""
    policy = policy_of(device)
    if config.compile_blocks and policy.compile_refusal:
        raise TrainConfigError(policy.compile_refusal)


def loader_workers(config: TrainConfig, device: torch.device | DevicePolicy) -> int:
    """``dataloader_num_workers``, with None resolved for ``device`` (DevicePolicy.loader_workers)."""
    if config.dataloader_num_workers is not None:
        return config.dataloader_num_workers
    policy = policy_of(device)
    return policy.loader_workers


def sharded_engine() -> str | None:
    """"FSDP" or "DeepSpeed" when ``accelerate launch`` shards the weights across ranks, else None."""
    for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(env, "").lower() in ("1", "true", "yes"):
            return name
    return None
