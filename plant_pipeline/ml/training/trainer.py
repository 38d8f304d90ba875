"""A ``transformers.Trainer`` for LLaVA on streamed shards: answer-token loss, streaming loaders, fail-fast steps.

Documented hooks are overridden (data loaders, get_batch_samples, training_step, compute_loss,
prediction_step, evaluate) with the parent's signatures and return shapes. The private Trainer API used where
no public one exists is listed in PRIVATE_TRAINER_API, and used nowhere else in the package.

No host-device synchronisation of its own per training step: batches go to the GPU non-blocking from pinned
memory as soon as they are fetched, logit positions come from the collator, and pixels may travel as uint8
and be expanded on the device. The one sync left is the non-finite loss check, which shares its moment with
the Trainer's own NaN/inf logging filter.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedModel, Trainer, TrainerState

from plant_pipeline.ml.device import policy_of
from plant_pipeline.ml.errors import PlantPipelineError
from plant_pipeline.ml.shards.pixels import PixelNormalizer
from plant_pipeline.ml.training.checkpoints import CheckpointError
from plant_pipeline.ml.training.collate import LOGIT_POSITIONS, SAMPLE_KEYS
from plant_pipeline.ml.training.loss import labelled_token_loss
from plant_pipeline.ml.training.prefetch import PrefetchingDataLoader

logger = logging.getLogger(__name__)

# The private Trainer API this module relies on, for want of a public one, with the parameters it relies on.
# plant_pipeline_tests/training/test_trainer_api.py checks each against the installed transformers, so an
# upgrade that renames or changes one fails there rather than mid-run.
PRIVATE_TRAINER_API = {
    # Overridden: the parent loads checkpoint weights non-strictly and only warns (see the override).
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    # Called on resume: the parent restores the RNG state only at an epoch boundary (see train()).
    "_load_rng_state": ("self", "checkpoint"),
    # Called to move a batch to the device exactly as the parent's own prediction_step does.
    "_prepare_inputs": ("self", "inputs"),
    # Overridden: the parent loads a best checkpoint's full weights non-strictly too (see _load_best_model).
    "_load_best_model": ("self",),
    # Overridden: a new best validation loss between two save steps gets a checkpoint of its own.
    "_determine_best_metric": ("self", "metrics", "trial"),
}
# Read, not called: the batch size the parent's training loop uses (it may differ from args with
# auto_find_batch_size, or after a resume that restores it from the checkpoint's state).
PRIVATE_TRAINER_ATTRIBUTES = ("_train_batch_size",)


class NonFiniteLossError(PlantPipelineError, FloatingPointError):
    """The loss became NaN or infinite; raised before the optimizer step, so no checkpoint holds the damage."""

    def __init__(self, step: int, sample_keys: list[str], loss: float, phase: str = "training"):
        self.step = step
        self.sample_keys = list(sample_keys)
        self.loss = loss
        shown = ", ".join(self.sample_keys[:16]) + (" ..." if len(self.sample_keys) > 16 else "")
        super().__init__(
            f"{phase} loss is {loss} at step {step} on the batch of samples [{shown}]. Nothing from this step was "
            "saved. Lower learning_rate, use dtype='float32' or 'bfloat16' instead of float16, or inspect these "
            "samples."
        )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device`` without waiting: from pinned memory the copy runs behind the queued GPU work."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _key_error(where: Path, what: str, missing, unexpected, mismatched=()) -> CheckpointError:
    def shown(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = [f"{label} [{shown(keys)}]" for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                            ("keys of another shape", mismatched)) if keys]
    return CheckpointError(
        f"{where} does not fit {what}: {'; '.join(parts)}. It was saved from another model or is damaged; resume "
        "from another checkpoint (move this one away) or set resume=False to start over")


def _check_adapter_keys(model: nn.Module, folder: Path) -> None:
    """The adapter file holds exactly the keys peft would save for this model (peft's own loader only warns)."""
    from peft import get_peft_model_state_dict

    adapter = model.active_adapters[0]
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        file = folder / name
        if file.is_file():
            break
    else:
        return  # the parent looks for other layouts (adapters in sub-folders) and says what it does not find
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            saved = set(handle.keys())
    else:
        saved = set(torch.load(file, map_location="cpu", weights_only=True))
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter))
    if saved != expected:
        raise _key_error(file, f"the {adapter!r} adapter of this model", expected - saved, saved - expected)


def _load_full_weights(model: nn.Module, folder: Path) -> None:
    # One CPU copy of the weights, as the parent's load_state_dict path makes; from_pretrained applies the model's
    # conversion mapping (renamed keys, tied weights) exactly as it does for the pretrained model.
    dtype = next(model.parameters()).dtype
    where = next((folder / n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                       "pytorch_model.bin.index.json") if (folder / n).is_file()), folder)
    try:
        loaded, info = type(model).from_pretrained(folder, dtype=dtype, output_loading_info=True,
                                                   local_files_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{where} does not load into {type(model).__name__}: {err}") from err
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = [item[0] if isinstance(item, tuple) else item for item in info.get("mismatched_keys") or ()]
    if missing or unexpected or mismatched:
        raise _key_error(where, type(model).__name__, missing, unexpected, mismatched)
    model.load_state_dict(loaded.state_dict(), strict=True)


class CustomTrainer(Trainer):
    """Trainer over WebDataset streams.

    Extra keyword arguments:
      memory_cleanup_steps: every this many optimizer steps, gc.collect() and empty the device's cache (0 = never).
      max_eval_samples: evaluate on at most this many validation samples (the first ones, in shard order).
      eval_dataloader_num_workers: workers for validation (default: dataloader_num_workers); the trainer
        caps nothing itself, so pass no more than the validation split has shards.
      read_ahead_batches: with no DataLoader workers on CUDA, how many batches a thread reads ahead
        (prefetch.py). TrainingArguments has no place for it: its prefetch factor requires workers.

    Data loaders are plain ``DataLoader`` objects, not passed through ``accelerator.prepare``: accelerate
    would wrap an IterableDataset in ``IterableDatasetShard`` and keep 1/world_size of each rank's batches,
    on top of the shard split that ``wds.split_by_node`` already made. Device placement is done by
    ``_prepare_inputs`` as usual.
    """

    def __init__(self, *args, memory_cleanup_steps: int = 0, max_eval_samples: int | None = None,
                 eval_dataloader_num_workers: int | None = None, pixel_normalizer: PixelNormalizer | None = None,
                 read_ahead_batches: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        # Expands uint8 pixel_values on the device; taken from the collator when it has one.
        self.pixel_normalizer = pixel_normalizer or getattr(self.data_collator, "normalizer", None)
        self.memory_cleanup_steps = memory_cleanup_steps
        self.max_eval_samples = max_eval_samples
        self.eval_dataloader_num_workers = eval_dataloader_num_workers
        self.read_ahead_batches = read_ahead_batches
        self._last_cleanup_step = -1
        # Pinned memory, the read-ahead thread and cache emptying as this device wants them (device.py).
        self.device_policy = policy_of(self.args.device)
        self._rng_checkpoint: str | None = None  # see train()
        self.best_checkpoint_loaded: Path | None = None  # set when the best checkpoint's weights replace the last
        # compute_loss normalises by num_items_in_batch itself: have the Trainer count answer tokens over the
        # whole accumulated batch (and across ranks) and not rescale the loss again.
        self.model_accepts_loss_kwargs = True

    # ---- data -----------------------------------------------------------------------------------
    def _stream_loader(self, dataset, batch_size: int, num_workers: int, persistent: bool) -> DataLoader:
        params: dict[str, Any] = {
            "batch_size": batch_size,
            "collate_fn": self.data_collator,
            "num_workers": num_workers,
            "pin_memory": self.args.dataloader_pin_memory and self.device_policy.pin_memory,
        }
        if num_workers > 0:
            params["prefetch_factor"] = self.args.dataloader_prefetch_factor or 2
            params["persistent_workers"] = persistent
            if self.args.dataloader_multiprocessing_context:
                params["multiprocessing_context"] = self.args.dataloader_multiprocessing_context
        elif self.device_policy.read_ahead_thread:
            # No worker processes: a thread reads ahead while the GPU runs the step (prefetch.py).
            return PrefetchingDataLoader(dataset, prefetch_depth=self.read_ahead_batches, **params)
        return DataLoader(dataset, **params)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("CustomTrainer: training requires a train_dataset")
        if not isinstance(self.train_dataset, IterableDataset):
            return super().get_train_dataloader()
        # Persistent workers only matter if the stream ends and the Trainer starts a new pass over it.
        workers = self.args.dataloader_num_workers
        return self._stream_loader(self.train_dataset, self._train_batch_size, workers, persistent=workers > 0)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("CustomTrainer: evaluation requires an eval_dataset")
        if isinstance(eval_dataset, str):
            dataset = self.eval_dataset[eval_dataset]
        else:
            dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if not isinstance(dataset, IterableDataset):
            return super().get_eval_dataloader(eval_dataset)
        workers = self.eval_dataloader_num_workers
        if workers is None:
            workers = self.args.dataloader_num_workers
        # Evaluation is occasional: idle workers between evaluations would only hold memory.
        return self._stream_loader(dataset, self.args.eval_batch_size, workers, persistent=False)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The parent's, with each batch sent to the device as it is fetched: the copy overlaps the GPU's
        queued work, and the answer-token count is then summed there instead of copied over with a sync."""
        batches = [_to_device(batch, self.args.device) for batch in itertools.islice(epoch_iterator, num_batches)]
        result = super().get_batch_samples(iter(batches), len(batches), device)
        if self._rng_checkpoint is not None:
            # After the loader's iterator drew its seed, where the parent restores the RNG state when it skips batches.
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None
        return result

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        # With ignore_data_skip the parent restores the RNG state only at an epoch boundary, and a max_steps stream is
        # one endless epoch: dropout would draw other masks than in an uninterrupted run. get_batch_samples restores it.
        if (isinstance(resume_from_checkpoint, str) and self.args.ignore_data_skip
                and isinstance(self.train_dataset, IterableDataset)):
            self._rng_checkpoint = resume_from_checkpoint
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # ---- checkpoints ----------------------------------------------------------------------------
    def restore_checkpoint(self, checkpoint: str | Path) -> None:
        """Load a checkpoint's weights (strictly: CheckpointError when they do not fit) and its TrainerState,
        without training: for a run already at max_steps (or stopped early), which Trainer.train would take a step
        further. Ends as train() does: with load_best_model_at_end, holding the best checkpoint's weights."""
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        if self.args.load_best_model_at_end and self.state.best_global_step:
            # The recorded path is absolute: found again under output_dir, as the parent does when it saves.
            best = Path(self.args.output_dir) / f"checkpoint-{self.state.best_global_step}"
            if best.is_dir():
                self.state.best_model_checkpoint = str(best)
                self._load_best_model()

    def _load_best_model(self) -> None:
        """The best checkpoint's weights, loaded strictly as a resume loads them (_load_from_checkpoint): the
        parent's plain ``load_state_dict(..., strict=False)`` of full weights misses every renamed key and only
        warns, leaving the last weights in place. FSDP, DeepSpeed and SageMaker keep the parent's loader."""
        from transformers.utils import is_sagemaker_mp_enabled

        best = Path(self.state.best_model_checkpoint)
        logger.info("loading the best checkpoint, %s (validation loss %s)", best.name, self.state.best_metric)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or is_sagemaker_mp_enabled():
            super()._load_best_model()
        else:
            self._load_from_checkpoint(str(best))
        self.best_checkpoint_loaded = best

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        is_new_best = super()._determine_best_metric(metrics=metrics, trial=trial)
        if is_new_best and self.args.load_best_model_at_end:
            # With eval_steps < save_steps an evaluation may fall between saves: a new best is checkpointed then
            # too, so the best weights are always on disk (the parent would record a best it cannot load).
            self.control.should_save = True
        return is_new_best

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The weights of a checkpoint, loaded strictly and under the names the model has.

        transformers 5's save_pretrained writes a LLaVA's weights under its original checkpoint names (it reverts
        the conversion mapping that from_pretrained applies), and the parent reloads them with a non-strict
        ``load_state_dict`` that only warns: every key misses and the weights stay as they were. Full weights are
        therefore read through ``from_pretrained`` (the same renaming as any pretrained model) and copied in;
        adapters go through peft after their key list is compared with the model's. A missing or unexpected key
        raises CheckpointError. FSDP, DeepSpeed and SageMaker checkpoints keep the parent's loaders.
        """
        from transformers.utils import is_sagemaker_mp_enabled

        model = self.model if model is None else model
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or is_sagemaker_mp_enabled():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from peft import PeftModel

        folder = Path(resume_from_checkpoint)
        if isinstance(model, PeftModel):
            _check_adapter_keys(model, folder)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not isinstance(model, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_full_weights(model, folder)

    # ---- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        loss_sum, count, logits = labelled_token_loss(model, inputs, self.pixel_normalizer)
        if num_items_in_batch is not None:
            # Normalised over every answer token of the accumulated (and, on DDP, gathered) batch: gradient
            # accumulation and ranks with different token counts weigh each token equally.
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        else:
            loss = loss_sum / count.clamp(min=1)
        return (loss, {"logits": logits}) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        keys = list(inputs.get(SAMPLE_KEYS, []))
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked before the optimizer step and before any checkpoint of this step can be written.
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(self.state.global_step + 1, keys, float(loss.detach().float().mean()))
        self._maybe_free_memory()
        return loss

    def _maybe_free_memory(self) -> None:
        step, every = self.state.global_step, self.memory_cleanup_steps
        if every and step > 0 and step % every == 0 and step != self._last_cleanup_step:
            self._last_cleanup_step = step
            gc.collect()
            self.device_policy.empty_cache(self.args.device)

    # ---- evaluation -----------------------------------------------------------------------------
    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss_sum, count, logits = labelled_token_loss(model, inputs, self.pixel_normalizer)
        loss = (loss_sum / count.clamp(min=1)).detach()
        return (loss, None, None) if prediction_loss_only else (loss, logits.detach(), None)

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean cross-entropy per answer token over the first ``max_eval_samples`` validation samples.

        Token-weighted and exact (the parent averages per-batch means). Every rank reads the same samples
        (the validation stream is not split by node), so ranks run the same number of forwards and no
        collective is needed; the unwrapped model is used, as evaluation needs no DDP gradient hooks.
        """
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        start = time.time()
        total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        tokens = samples = 0
        limit = self.max_eval_samples
        try:
            with torch.no_grad():
                for batch in dataloader:
                    if limit is not None and samples >= limit:
                        break
                    keys = list(batch.get(SAMPLE_KEYS, []))
                    if limit is not None and samples + len(keys) > limit:
                        rows = limit - samples
                        # Positions are per batch, not per row: recomputed for the rows kept.
                        batch = {k: v[:rows] for k, v in batch.items() if k != LOGIT_POSITIONS}
                        keys = keys[:rows]
                    batch = self._prepare_inputs(batch)
                    with self.accelerator.autocast():
                        loss_sum, count, _ = labelled_token_loss(model, batch, self.pixel_normalizer)
                    if not torch.isfinite(loss_sum):
                        raise NonFiniteLossError(self.state.global_step, keys, float(loss_sum), phase="validation")
                    total += loss_sum.double()
                    tokens += int(count)
                    samples += len(keys)
        finally:
            model.train(was_training)
        if samples == 0:
            raise ValueError("the validation stream yielded no samples; check the validation shards in index.json")
        runtime = time.time() - start
        metrics = {
            f"{metric_key_prefix}_loss": float(total / tokens),
            f"{metric_key_prefix}_samples": samples,
            f"{metric_key_prefix}_tokens": tokens,
            f"{metric_key_prefix}_runtime": round(runtime, 4),
            f"{metric_key_prefix}_samples_per_second": round(samples / runtime, 3) if runtime > 0 else math.inf,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
