"""Fine-tune a LLaVA on flower shards: the core of the ``trained_model`` asset, runnable without Dagster.

``train(config, model_spec=..., shards_dir=..., checkpoints_dir=..., output_dir=...)`` checks the settings
against the model and the machine and the shards against their index, streams the shards through CustomTrainer,
resumes from the newest checkpoint whose files check out, and writes the adapter (or merged model), processor,
loss curve and metadata atomically. A finished result with the same settings and data is kept as it is.
Works under ``torchrun``: rank 0 alone writes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json, atomic_write_text, sha256_file
from plant_pipeline.ml.model.spec import ModelConfigError, ModelSpec, resolve_device, resolve_dtype
from plant_pipeline.ml.shards.format import read_index, split_shard_paths
from plant_pipeline.ml.training.collate import memory_efficient_collate_fn
from plant_pipeline.ml.training.compile import COMPILE_PAD_MULTIPLE, compile_blocks
from plant_pipeline.ml.training.streaming import check_readers, make_stream

logger = logging.getLogger(__name__)

RESULT_META = "training_meta.json"
LOSS_CURVE = "loss_curve.png"
RUN_CONFIG = "run_config.json"  # in checkpoints_dir: what the checkpoints were trained with
CHECKPOINT_MANIFEST = "checkpoint_sha256.json"  # in each checkpoint: size and sha256 of its files, written last
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class TrainConfigError(UsageError):
    """A training setting that cannot work (alone, with the model, or with this machine); raised before any work."""


class ShardIntegrityError(UsageError):
    """A shard file that is missing or differs from what the shard index recorded; raised before the model loads."""


class CheckpointError(UsageError):
    """No checkpoint can be resumed (its files are damaged), or a checkpoint's weights do not fit the model."""


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
        "help": "Recompute activations in the backward pass: less memory, about 30% more compute."})
    compile_blocks: bool = field(default=False, metadata={
        "help": "torch.compile each transformer block (compiled once, shared by every layer like it): fused "
                "kernels for norms, activations and residual adds. CUDA or CPU, not MPS; the first step takes "
                "about a minute longer. See bench/gpu_train.py for what it gains."})
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
                "expanded on the GPU, and a thread in the training process reads the next batches during the step: "
                "worker processes gave 48 instead of 79 samples/s on an H200, bench/gpu_train.py), 2 elsewhere. "
                "The train split needs at least ranks x workers shards."})
    dataloader_prefetch_factor: int = field(default=2, metadata={
        "help": "Batches each worker prepares ahead (with 0 workers on CUDA: the read-ahead thread)."})
    shuffle_buffer: int = field(default=500, metadata={
        "help": "Samples held per worker for shuffling (memory: buffer x sample size)."})
    memory_cleanup_steps: int = field(default=50, metadata={
        "help": "Run gc and empty the CUDA/MPS cache every this many steps (0 = never)."})
    merge_lora: bool = field(default=False, metadata={
        "help": "Save the LoRA weights merged into a full model instead of a small adapter."})
    max_eval_samples: int | None = field(default=256, metadata={
        "help": "Validate on at most this many samples (None = the whole validation split)."})
    resume: bool = field(default=True, metadata={
        "help": "Resume from the last complete checkpoint whose run settings match; False deletes old checkpoints."})

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


@dataclass
class TrainResult:
    model_path: str
    steps: int
    max_steps: int
    final_train_loss: float | None
    final_validation_loss: float
    initial_validation_loss: float
    samples_per_second: float
    peak_memory_mb: float  # peak resident set size of the training process, sampled during the run
    peak_cuda_memory_mb: float | None
    peak_mps_memory_mb: float | None
    device: str
    dtype: str
    trainable_params: int
    total_params: int
    log_history: list[dict]
    resumed_from_step: int | None
    seconds: float
    loss_curve_path: str | None
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- memory ---------------------------------------------------------------------------------------

def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    # ru_maxrss: kilobytes on Linux, bytes on macOS; the lifetime peak, so only a fallback.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MemoryMonitor:
    """Peak RSS (sampled), CUDA max allocated and MPS driver memory over a training run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_rss = 0
        self.peak_mps = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.sample()

    def sample(self) -> None:
        rss = _rss_bytes()
        self.peak_rss = max(self.peak_rss, rss if rss is not None else _max_rss_bytes())
        if self.device.type == "mps":
            self.peak_mps = max(self.peak_mps, int(torch.mps.driver_allocated_memory()))

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss / 2**20

    @property
    def peak_cuda_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None

    @property
    def peak_mps_mb(self) -> float | None:
        return self.peak_mps / 2**20 if self.device.type == "mps" else None


# ---- progress -------------------------------------------------------------------------------------

def _make_progress_callback(on_log: Callable[[dict], None] | None, memory: MemoryMonitor, global_batch: int):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Forwards every log event, with speed and ETA, to ``on_log``; times steps without eval and saves."""

        def __init__(self):
            self.started_at: float | None = None
            self.first_step = 0
            self.step_seconds = 0.0
            self.steps_timed = 0
            self._interval_start: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started_at = self._interval_start = time.time()
            self.first_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            if self._interval_start is not None:
                self.step_seconds += now - self._interval_start
                self.steps_timed += 1
            self._interval_start = now
            memory.sample()
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last step's loss, even off the logging_steps grid

        def _after_side_work(self):
            # Evaluation and checkpointing are not training throughput: restart the step clock after them.
            if self._interval_start is not None:
                self._interval_start = time.time()

        def on_evaluate(self, args, state, control, **kwargs):
            memory.sample()
            self._after_side_work()

        def on_save(self, args, state, control, **kwargs):
            self._after_side_work()

        @property
        def samples_per_second(self) -> float:
            return self.steps_timed * global_batch / self.step_seconds if self.step_seconds > 0 else 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            memory.sample()
            if not state.is_world_process_zero:
                return
            record = dict(logs or {})
            record.update(step=state.global_step, max_steps=state.max_steps, rss_mb=round(memory.peak_rss_mb, 1))
            if self.started_at is not None and state.global_step > self.first_step:
                elapsed = time.time() - self.started_at
                per_step = elapsed / (state.global_step - self.first_step)
                record["samples_per_second"] = round(self.samples_per_second, 3)
                record["eta_seconds"] = round(per_step * max(0, state.max_steps - state.global_step), 1)
            logger.info("step %d/%d %s", state.global_step, state.max_steps,
                        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                                 if k not in ("step", "max_steps")))
            if on_log is not None:
                on_log(record)

    return ProgressCallback()


# ---- checkpoints ----------------------------------------------------------------------------------

def _incomplete(path: Path) -> str | None:
    """Why ``checkpoint-N`` was not written to the end, or None.

    transformers 5.24's ``Trainer._save_checkpoint`` writes straight into checkpoint-N (no temporary folder,
    no rename): the weights (adapter or model), then optimizer.pt, scheduler.pt, the scaler and RNG states,
    then trainer_state.json, and only then rotates old checkpoints; CHECKPOINT_MANIFEST follows (on_save). So a
    checkpoint is complete when its trainer_state.json parses and names step N and the weights, optimizer and
    scheduler files are non-empty.
    """
    match = CHECKPOINT_RE.match(path.name)
    if not match or not path.is_dir():
        return f"{path} is not a checkpoint-N folder"
    state_file = path / "trainer_state.json"
    try:
        step = int(json.loads(state_file.read_text()).get("global_step", -1))
    except FileNotFoundError:
        return f"{state_file} is missing"
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return f"{state_file} does not parse ({err})"
    if step != int(match.group(1)):
        return f"{state_file} is at step {step}, not {match.group(1)}"

    def present(name: str) -> bool:
        file = path / name
        return file.is_file() and file.stat().st_size > 0

    weights = any(present(name) for name in WEIGHT_FILES)
    index = path / "model.safetensors.index.json"
    if not weights and index.is_file():
        try:
            weights = all(present(name) for name in set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{index} does not parse ({err})"
    missing = [name for name, ok in (("weights", weights), ("optimizer.pt", present("optimizer.pt")),
                                     ("scheduler.pt", present("scheduler.pt"))) if not ok]
    return f"{path} has no {', '.join(missing)}" if missing else None


def checkpoint_is_complete(path: Path) -> bool:
    """Whether ``checkpoint-N`` was written to the end (see _incomplete); says nothing of its files' contents."""
    return _incomplete(path) is None


def _checkpoint_files(path: Path) -> list[Path]:
    return sorted(f for f in path.rglob("*") if f.is_file() and f.name != CHECKPOINT_MANIFEST
                  and not f.name.startswith("."))


def write_checkpoint_manifest(path: Path) -> Path:
    """Record size and sha256 of every file of a checkpoint the Trainer has just written (still in the page cache)."""
    files = {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in _checkpoint_files(path)}
    return atomic_write_json(path / CHECKPOINT_MANIFEST, {"files": files})


def _safetensors_problem(file: Path) -> str | None:
    # The header (8-byte length + JSON) lists every tensor's byte range: the data must end where the file does.
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= size - 8:
                return f"{file}: header length {length} does not fit in {size} bytes (truncated or not safetensors)"
            header = json.loads(handle.read(length))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"{file}: the safetensors header does not parse ({err})"
    if 8 + length + end != size:
        return f"{file}: the header promises {8 + length + end} bytes, the file has {size} (truncated?)"
    return None


def _structure_problem(path: Path) -> str | None:
    """Checks that cost no full read, for checkpoints without a manifest (older ones, or cut off just before it)."""
    import zipfile

    for file in _checkpoint_files(path):
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
        elif file.suffix in (".pt", ".pth", ".bin"):
            try:  # torch.save writes a zip: its central directory, at the end, goes with a truncation
                with zipfile.ZipFile(file) as archive:
                    archive.infolist()
                problem = None
            except (OSError, zipfile.BadZipFile) as err:
                problem = f"{file} is not a readable torch file ({err})"
        elif file.suffix == ".json":
            try:
                json.loads(file.read_text())
                problem = None
            except (OSError, ValueError) as err:
                problem = f"{file} does not parse ({err})"
        else:
            problem = None
        if problem:
            return problem
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed, naming the file; None when it can.

    With a manifest (every checkpoint this module's runs write): each file's size, then its sha256. Without one:
    the structure of each file (safetensors header and length, torch zip directory, JSON).
    """
    problem = _incomplete(path)
    if problem:
        return problem
    manifest = path / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        return _structure_problem(path)
    try:
        listed = json.loads(manifest.read_text())["files"]
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{manifest} does not parse ({err})"
    for name, (size, _) in files.items():  # sizes first: a truncated file is found without reading anything
        file = path / name
        if not file.is_file():
            return f"{file} is missing (listed in {CHECKPOINT_MANIFEST})"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} when it was saved (truncated or overwritten)"
    for name, (_, digest) in files.items():
        actual = sha256_file(path / name)
        if actual != digest:
            return f"{path / name} has sha256 {actual[:16]}..., {digest[:16]}... when it was saved (corrupted)"
    return None


def find_resumable_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step whose files check out (checkpoint_problem), or None.

    A newer complete checkpoint that does not check out is named in a warning and the next older one is tried;
    when complete checkpoints exist but none checks out, CheckpointError names them all.
    """
    if not checkpoints_dir.is_dir():
        return None
    complete = sorted(((int(m.group(1)), path) for path in checkpoints_dir.iterdir()
                       if (m := CHECKPOINT_RE.match(path.name)) and checkpoint_is_complete(path)), reverse=True)
    problems = []
    for _, path in complete:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("cannot resume from %s: %s; trying the next older checkpoint", path.name, problem)
        problems.append(problem)
    if problems:
        raise CheckpointError(
            f"no checkpoint in {checkpoints_dir} can be resumed: {'; '.join(problems)}. Move the damaged checkpoints "
            "away (to keep them) and train again, or set resume=False to start over (deletes them)")
    return None


def _remove_incomplete_checkpoints(checkpoints_dir: Path) -> None:
    # A checkpoint cut off by a kill would otherwise count in the Trainer's save_total_limit rotation
    # (it sorts by name/mtime, not completeness) and could push a good one out. Damaged complete ones stay: they
    # are overwritten when the resumed run saves that step again.
    for path in checkpoints_dir.glob("checkpoint-*"):
        problem = _incomplete(path) if CHECKPOINT_RE.match(path.name) else None
        if problem:
            logger.warning("removing incomplete checkpoint %s (the run that wrote it was interrupted): %s",
                           path, problem)
            shutil.rmtree(path, ignore_errors=True)


def _make_manifest_callback():
    from transformers import TrainerCallback

    class ManifestCallback(TrainerCallback):
        """Writes CHECKPOINT_MANIFEST into each checkpoint once every rank has written its part of it."""

        def on_save(self, args, state, control, **kwargs):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # per-rank files (RNG states, sharded weights) are all there
            if state.is_world_process_zero:
                write_checkpoint_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return ManifestCallback()


def _run_fingerprint(config: TrainConfig, model_spec: ModelSpec, index: dict) -> dict:
    train_shards = [s.get("sha256") or s["file"] for s in index["splits"]["train"]["shards"]]
    return {
        "config": {key: getattr(config, key) for key in TrainConfig.RESUME_KEYS},
        "model_name": model_spec.model_name,
        "revision": model_spec.revision,
        "train_shards_sha256": hashlib.sha256(json.dumps(train_shards).encode()).hexdigest(),
    }


def _prepare_checkpoints_dir(config: TrainConfig, checkpoints_dir: Path, fingerprint: dict,
                             is_main: bool) -> Path | None:
    """Decide where to resume from; refuse to resume checkpoints that other settings made."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    run_file = checkpoints_dir / RUN_CONFIG
    if not config.resume:
        if is_main:
            for path in checkpoints_dir.glob("checkpoint-*"):
                shutil.rmtree(path, ignore_errors=True)
        resume_from = None
    else:
        resume_from = find_resumable_checkpoint(checkpoints_dir)
        if resume_from is not None and run_file.is_file():
            previous = json.loads(run_file.read_text())
            if previous != fingerprint:
                changed = sorted(
                    k for k in set(previous.get("config", {})) | set(fingerprint["config"])
                    if previous.get("config", {}).get(k) != fingerprint["config"].get(k)
                ) + [k for k in ("model_name", "revision", "train_shards_sha256") if previous.get(k) != fingerprint[k]]
                raise TrainConfigError(
                    f"{checkpoints_dir} holds checkpoints from a run with other settings (differing: "
                    f"{', '.join(changed)}); set resume=False to start over (deletes them), restore those settings, "
                    "or use another checkpoints_dir"
                )
        if is_main:
            _remove_incomplete_checkpoints(checkpoints_dir)
    if is_main:
        atomic_write_text(run_file, json.dumps(fingerprint, indent=2, sort_keys=True))
    return resume_from


# ---- model ----------------------------------------------------------------------------------------

def _llava_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    core = getattr(model, "model", model)
    parts = {
        "vision_tower": [getattr(core, "vision_tower", None)],
        "multi_modal_projector": [getattr(core, "multi_modal_projector", None)],
        "language_model": [getattr(core, "language_model", None), getattr(model, "lm_head", None)],
    }
    if any(modules[0] is None for modules in parts.values()):
        raise ModelConfigError(
            f"{type(model).__name__} has no vision_tower / multi_modal_projector / language_model; "
            "expected a LlavaForConditionalGeneration (transformers >= 5)"
        )
    return {name: [m for m in modules if m is not None] for name, modules in parts.items()}


def _language_linear_names(model: nn.Module) -> dict[str, list[str]]:
    """Last name part -> full names of the linear layers inside the language model."""
    names: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".language_model." in f".{name}.":
            names.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return names


def lora_target_regex(targets: list[str]) -> str:
    """A peft ``target_modules`` regex matching these layer names inside the language model only
    (the CLIP vision tower has q_proj/k_proj/v_proj too)."""
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf"(.*\.)?language_model\.(.*\.)?({alternatives})"


def validate_lora_targets(model: nn.Module, targets: list[str]) -> None:
    available = _language_linear_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise TrainConfigError(
            f"lora_target_modules {missing} match no linear layer of the language model; available: "
            f"{', '.join(sorted(available))}"
        )


def _model_skeleton(model_spec: ModelSpec) -> nn.Module:
    """The model's module tree without its weights (meta device): enough to check LoRA targets in seconds."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(model_spec.source(), revision=model_spec.revision,
                                        local_files_only=model_spec.local_files_only)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _configure_trainable(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze parts, or wrap in LoRA adapters; returns the model to train."""
    parts = _llava_parts(model)
    frozen = {"vision_tower": config.freeze_vision_tower, "multi_modal_projector": config.freeze_projector,
              "language_model": config.freeze_language_model}
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # (use_cache stays as it is in the saved config: the loss passes use_cache=False per call.)
    if not config.use_lora:
        for name, modules in parts.items():
            for module in modules:
                module.requires_grad_(not frozen[name])
        return model

    from peft import LoraConfig, get_peft_model

    modules_to_save = [name for name in ("multi_modal_projector", "vision_tower") if not frozen[name]]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_regex(config.lora_target_modules),
        modules_to_save=modules_to_save or None,
        bias="none",
    )
    if config.gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps the graph connected.
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft 0.21 calls a transformers attribute deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    # Trainable copies (LoRA, modules_to_save) in fp32 even over a half-precision base: AdamW and the
    # fp16 grad scaler need fp32 parameters; autocast handles the matmuls.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def _count_params(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


# ---- outputs --------------------------------------------------------------------------------------

def plot_loss_curve(log_history: list[dict], path: Path) -> Path:
    """Train loss and validation loss against step, as a PNG (Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place; an old result stays until the new one is there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def sharded_engine() -> str | None:
    """"FSDP" or "DeepSpeed" when ``accelerate launch`` shards the weights across ranks, else None."""
    for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(env, "").lower() in ("1", "true", "yes"):
            return name
    return None


def _save_result(trainer, processor, config: TrainConfig, model_spec: ModelSpec, output_dir: Path,
                 log_history: list[dict], summary: dict, is_main: bool) -> tuple[Path | None, str]:
    """Called on every rank: under FSDP / ZeRO-3 each rank holds a shard, and Trainer.save_model gathers the
    full weights to rank 0, which alone writes. The folder is swapped into place only when complete."""
    tmp = output_dir.parent / f".{output_dir.name}.saving"  # one path that every rank agrees on
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    curve, kind = None, "lora_adapter" if config.use_lora else "full"
    try:
        if config.use_lora and config.merge_lora:  # unsharded only: refused before training under FSDP/DeepSpeed
            kind = "merged"
            if is_main:
                trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(tmp)
        else:
            trainer.save_model(str(tmp))
        if is_main:
            # The Trainer pickles its TrainingArguments beside the weights; the settings are in RESULT_META.
            (tmp / "training_args.bin").unlink(missing_ok=True)
            processor.save_pretrained(tmp)
            curve = plot_loss_curve(log_history, tmp / LOSS_CURVE)
            meta = {"kind": kind, "model_spec": asdict(model_spec), "train_config": asdict(config), **summary,
                    "log_history": log_history}
            (tmp / RESULT_META).write_text(json.dumps(_json_safe(meta), indent=2, sort_keys=True))
            _replace_dir(tmp, output_dir)
    finally:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return (output_dir / curve.name if curve else None), kind


def load_trained(model_path: str | Path, model_spec: ModelSpec, device: torch.device | str | None = None):
    """(model, processor) from a train() result: an adapter is applied to the spec's base model, a merged or
    fully fine-tuned model loads on its own. The model is in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_path = Path(model_path)
    device = torch.device(device) if device is not None else resolve_device(model_spec.device)
    dtype = resolve_dtype(model_spec.dtype, device)
    processor = AutoProcessor.from_pretrained(model_path)
    if (model_path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = model_spec.load_model(device=device, dtype=dtype)
        model = PeftModel.from_pretrained(base, model_path).to(device)
    elif (model_path / "config.json").is_file():
        model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=dtype).to(device)
    else:
        raise FileNotFoundError(f"{model_path} holds neither adapter_config.json nor config.json; run train() first")
    model.eval()
    return model, processor


# ---- train ----------------------------------------------------------------------------------------

def streaming_args(config: TrainConfig, device: torch.device, workers: int) -> dict[str, Any]:
    """The TrainingArguments with which CustomTrainer streams shards (bench/gpu_train.py uses them too)."""
    return dict(
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps if config.warmup_steps > 0 else config.warmup_ratio,
        dataloader_num_workers=workers,
        dataloader_pin_memory=device.type == "cuda",
        dataloader_prefetch_factor=config.dataloader_prefetch_factor if workers > 0 else None,
        remove_unused_columns=False,
        label_names=["labels"],
        # Batches vary in length and each rank reads its own shards: no dispatching from rank 0.
        accelerator_config={"dispatch_batches": False},
        data_seed=config.seed,
        # Resumed runs read a fresh shuffle (train's stream_seed): skipping would decode every sample seen before
        # the checkpoint.
        ignore_data_skip=True,
    )


def loader_workers(config: TrainConfig, device: torch.device) -> int:
    """``dataloader_num_workers``, with None resolved for ``device`` (see its help)."""
    if config.dataloader_num_workers is not None:
        return config.dataloader_num_workers
    return 0 if device.type == "cuda" else 2


def _resolve_precision(config: TrainConfig, device: torch.device) -> torch.dtype:
    try:
        dtype = resolve_dtype(config.dtype, device)
    except ModelConfigError as err:
        raise TrainConfigError(str(err)) from err
    if dtype == torch.float16 and device.type == "cpu":
        raise TrainConfigError("float16 training needs a GPU (cuda or mps); on CPU use dtype='float32' or 'bfloat16'")
    return dtype


def verify_shards(shards_dir: Path, index: dict, splits: tuple[str, ...] = ("train", "validation")) -> int:
    """Every shard of ``splits`` exists with the size and sha256 that index.json recorded; returns the bytes read.

    Raises ShardIntegrityError on the first that does not: training on a damaged shard would fail mid-run or,
    worse, learn from garbage. Sizes are compared before any hashing.
    """
    shards = [shard for split in splits for shard in index["splits"].get(split, {}).get("shards", [])]
    advice = "rematerialise flower_shards (the shards_integrity check names every damaged file)"
    for shard in shards:
        path = shards_dir / shard["file"]
        if not path.is_file():
            raise ShardIntegrityError(f"shard {path} is missing (listed in {shards_dir}/index.json); {advice}")
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise ShardIntegrityError(
                f"shard {path} has {size} bytes, index.json expects {shard['bytes']}; {advice}")
    total = 0
    for shard in shards:
        path = shards_dir / shard["file"]
        expected = shard.get("sha256")
        if not expected:
            raise ShardIntegrityError(f"{shards_dir}/index.json records no sha256 for {shard['file']}; {advice}")
        actual = sha256_file(path)
        total += path.stat().st_size
        if actual != expected:
            raise ShardIntegrityError(
                f"shard {path} has sha256 {actual}, index.json expects {expected}: the file changed after it "
                f"was written; {advice}")
    return total


def _split_samples(index: dict, split: str, shards_dir: Path) -> int:
    if split not in index["splits"]:
        raise TrainConfigError(f"{shards_dir}/index.json has no {split!r} split; it has {sorted(index['splits'])}")
    return int(index["splits"][split]["samples"])


def _result_identity(config: TrainConfig, model_spec: ModelSpec, index: dict, max_steps: int,
                     world_size: int) -> dict:
    """What a finished result depends on: settings (all but resume), model, shard contents, steps and ranks."""
    shards = {split: [s.get("sha256") or s["file"] for s in index["splits"][split]["shards"]]
              for split in ("train", "validation")}
    return _json_safe({
        "train_config": {k: v for k, v in asdict(config).items() if k != "resume"},
        "model_spec": asdict(model_spec),
        "shards_sha256": hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest(),
        "max_steps": max_steps,
        "world_size": world_size,
    })


def _finished_result(output_dir: Path, identity: dict) -> TrainResult | None:
    """The TrainResult already in ``output_dir`` when it was made with exactly ``identity``, else None.

    Reported as resumed at its last step, as a re-run that finds only the final checkpoint reports it."""
    try:
        meta = json.loads((output_dir / RESULT_META).read_text())
    except (OSError, ValueError):
        return None
    weights = [output_dir / n for n in (*WEIGHT_FILES, "model.safetensors.index.json")]
    if (not isinstance(meta, dict) or meta.get("run_identity") != identity or meta.get("steps") != identity["max_steps"]
            or not any(f.is_file() and f.stat().st_size > 0 for f in weights)):
        return None
    curve = output_dir / LOSS_CURVE
    names = {f.name for f in fields(TrainResult)} - {"model_path", "loss_curve_path", "resumed_from_step"}
    try:
        return TrainResult(model_path=str(output_dir), loss_curve_path=str(curve) if curve.is_file() else None,
                           resumed_from_step=meta["steps"], **{name: meta[name] for name in names if name in meta})
    except TypeError:  # metadata of an older layout
        return None


def train(config: TrainConfig, *, model_spec: ModelSpec, shards_dir: str | Path, checkpoints_dir: str | Path,
          output_dir: str | Path, on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune ``model_spec``'s model on the train split of ``shards_dir`` (see the module docstring)."""
    from transformers import PrinterCallback, TrainingArguments

    from plant_pipeline.ml.training.trainer import CustomTrainer

    started = time.time()
    shards_dir, checkpoints_dir, output_dir = Path(shards_dir), Path(checkpoints_dir), Path(output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0

    # --- everything that can be wrong is checked before the model is loaded ---
    device = resolve_device(model_spec.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = _resolve_precision(config, device)
    if config.compile_blocks and device.type == "mps":
        raise TrainConfigError("compile_blocks needs CUDA or a CPU (torch.compile's MPS backend is experimental); "
                               "set compile_blocks=False on this Mac")
    engine = sharded_engine()
    if engine and config.use_lora and config.merge_lora:
        raise TrainConfigError(
            f"merge_lora=True cannot merge adapters into weights that {engine} shards across ranks; train with "
            "merge_lora=False, then merge once: load_trained(path, spec)[0].merge_and_unload().save_pretrained(...)")
    index = read_index(shards_dir)
    train_samples = _split_samples(index, "train", shards_dir)
    val_samples = _split_samples(index, "validation", shards_dir)
    if train_samples == 0 or val_samples == 0:
        raise TrainConfigError(
            f"{shards_dir}: train has {train_samples} and validation {val_samples} samples; both need some")
    train_shards = split_shard_paths(shards_dir, "train")
    val_shards = split_shard_paths(shards_dir, "validation")
    workers = loader_workers(config, device)
    check_readers(len(train_shards), world_size=world_size, num_workers=workers,
                  what=f"the train split of {shards_dir}")
    global_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    max_steps = config.max_steps
    if config.num_train_epochs is not None:
        max_steps = max(1, math.ceil(config.num_train_epochs * train_samples / global_batch))
        config.check_warmup(max_steps)
    identity = _result_identity(config, model_spec, index, max_steps, world_size)
    if config.resume:
        finished = _finished_result(output_dir, identity)
        if finished is not None:
            logger.info("%s already holds this run's result (same settings, model, shards and %d steps); keeping it",
                        output_dir, max_steps)
            return finished
    hash_started = time.perf_counter()
    hashed = verify_shards(shards_dir, index)
    logger.info("verified %d shards (%.1f MB) against index.json in %.2f s", len(train_shards) + len(val_shards),
                hashed / 1e6, time.perf_counter() - hash_started)
    if config.use_lora:
        validate_lora_targets(_model_skeleton(model_spec), config.lora_target_modules)
    fingerprint = _run_fingerprint(config, model_spec, index)
    resume_from = _prepare_checkpoints_dir(config, checkpoints_dir, fingerprint, is_main)
    resumed_step = int(CHECKPOINT_RE.match(resume_from.name).group(1)) if resume_from else None
    if resumed_step is not None and resumed_step > max_steps:
        raise TrainConfigError(
            f"{resume_from} is at step {resumed_step}, beyond max_steps={max_steps}; raise max_steps or set "
            "resume=False")

    # --- model ---
    from transformers import set_seed

    set_seed(config.seed)  # LoRA's initial weights are drawn before the Trainer seeds anything
    processor = model_spec.load_processor()
    # Full fine-tuning keeps fp32 master weights (autocast does the half-precision compute); LoRA keeps the
    # frozen base in the compute dtype to halve its memory.
    load_dtype = dtype if config.use_lora else torch.float32
    model = _configure_trainable(model_spec.load_model(device=device, dtype=load_dtype), config)
    trainable_params, total_params = _count_params(model)
    if trainable_params == 0:
        raise TrainConfigError("no parameter would be trained; check the freeze_* settings")
    if config.compile_blocks and compile_blocks(model) == 0:
        logger.warning("compile_blocks: %s has no transformer blocks to compile; training uncompiled",
                       type(model).__name__)
    vision_trainable = any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)

    # --- data ---
    # Resumed runs read a fresh shuffle (seeded by the resume step) instead of replaying the stream up to it.
    stream_seed = config.seed if resumed_step is None else (config.seed * 1_000_003 + resumed_step) & 0x7FFFFFFF
    train_stream = make_stream(train_shards, shuffle=True, shuffle_buffer=config.shuffle_buffer, seed=stream_seed,
                               epochs=None, distributed=world_size > 1, world_size=world_size,
                               num_workers=workers, what=f"the train split of {shards_dir}")
    eval_workers = min(workers, len(val_shards))
    val_stream = make_stream(val_shards, shuffle=False, epochs=1, distributed=False, num_workers=eval_workers,
                             what=f"the validation split of {shards_dir}")

    args = TrainingArguments(
        output_dir=str(checkpoints_dir),
        max_steps=max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if config.eval_steps > 0 else "no",
        eval_steps=config.eval_steps if config.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Parameters the loss never reaches (CLIP's unused last layer / pooler) exist only if the vision tower trains.
        ddp_find_unused_parameters=vision_trainable,
        seed=config.seed,
        **streaming_args(config, device, workers),
    )
    memory = MemoryMonitor(args.device)
    progress = _make_progress_callback(on_log, memory, global_batch)
    trainer = CustomTrainer(
        model=model,
        args=args,
        # On a GPU the pixels cross the bus as uint8 and are expanded there: a quarter of the bytes.
        data_collator=memory_efficient_collate_fn(processor, defer_pixel_normalization=device.type == "cuda",
                                                  pad_to_multiple_of=config.padding_multiple()),
        train_dataset=train_stream,
        eval_dataset=val_stream,
        callbacks=[_make_manifest_callback(), progress],  # manifest first: its hashing is no training time
        memory_cleanup_steps=config.memory_cleanup_steps,
        max_eval_samples=config.max_eval_samples,
        eval_dataloader_num_workers=eval_workers,
        read_ahead_batches=config.dataloader_prefetch_factor,
    )
    # Progress goes to on_log and this module's logger, not to stdout.
    trainer.remove_callback(PrinterCallback)

    logger.info("training %s on %s (%s): %d trainable of %d parameters, %d steps%s", model_spec.model_name,
                args.device, dtype, trainable_params, total_params, max_steps,
                f", resuming at step {resumed_step}" if resumed_step else "")
    initial = trainer.evaluate()
    if resumed_step is not None and resumed_step >= max_steps:
        # Already finished (killed while writing the result): Trainer.train would run one step past max_steps,
        # so load the final checkpoint's weights and state instead.
        from transformers import TrainerState

        logger.info("%s is at max_steps=%d; not training further", resume_from, max_steps)
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = list(trainer.state.log_history)
    if not any("eval_loss" in e and e.get("step") == 0 for e in history):
        history.insert(0, {**initial, "step": 0})  # the pre-training evaluation, lost when train() reset the state
    step = trainer.state.global_step
    final_eval = next((e for e in reversed(history) if "eval_loss" in e and e.get("step") == step), None)
    final = final_eval if final_eval is not None else trainer.evaluate()
    if final_eval is None:
        history = history + [{**final, "step": trainer.state.global_step}]
    memory.sample()
    train_losses = [e["loss"] for e in history if "loss" in e]

    summary = {
        "steps": trainer.state.global_step,
        "max_steps": max_steps,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_validation_loss": final["eval_loss"],
        "initial_validation_loss": initial["eval_loss"],
        "samples_per_second": progress.samples_per_second,
        "peak_memory_mb": memory.peak_rss_mb,
        "peak_cuda_memory_mb": memory.peak_cuda_mb,
        "peak_mps_memory_mb": memory.peak_mps_mb,
        "device": str(args.device),
        "dtype": str(dtype).replace("torch.", ""),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "resumed_from_step": resumed_step,
        "world_size": world_size,
    }
    curve, _ = _save_result(trainer, processor, config, model_spec, output_dir, history,
                            {**summary, "seconds": time.time() - started, "run_identity": identity}, is_main)
    curve_path = str(curve) if curve else None
    return TrainResult(model_path=str(output_dir), log_history=history, seconds=time.time() - started,
                       loss_curve_path=curve_path, **summary)
