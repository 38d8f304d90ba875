"""Fine-tune a LLaVA on flower shards: the core of the ``trained_model`` asset, runnable without Dagster.

``train(config, model_spec=..., shards_dir=..., checkpoints_dir=..., output_dir=...)`` checks the settings
against the model and the machine and the shards against their index, streams the shards through CustomTrainer,
resumes from the newest checkpoint whose files check out, stops early when validation loss stops improving
(``early_stopping_*``), and writes the best checkpoint's weights (or the last: ``keep``) as an adapter or merged
model, with the processor, loss curve and metadata, atomically. A finished result with the same settings and data
is kept as it is. Works under ``torchrun``: rank 0 alone writes the result.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from plant_pipeline.ml.model.spec import ModelSpec, resolve_device
from plant_pipeline.ml.shards.format import read_index, split_shard_paths
from plant_pipeline.ml.training.build import build_trainer, training_arguments
from plant_pipeline.ml.training.checkpoints import checkpoint_step, make_manifest_callback, prepare_checkpoints_dir
from plant_pipeline.ml.training.collate import memory_efficient_collate_fn
from plant_pipeline.ml.training.config import (
    RunIdentity,
    TrainConfig,
    TrainConfigError,
    loader_workers,
    resolve_precision,
    sharded_engine,
)
from plant_pipeline.ml.training.early_stopping import stop_reason, stopped_in
from plant_pipeline.ml.training.monitor import MemoryMonitor, make_progress_callback
from plant_pipeline.ml.training.parts import configure_trainable, count_params, model_skeleton, validate_lora_targets
from plant_pipeline.ml.training.results import TrainResult, finished_result, save_result
from plant_pipeline.ml.training.shard_checks import split_samples, verify_shards
from plant_pipeline.ml.training.streaming import check_readers, make_stream
from plant_pipeline.ml.training.tracking import data_params, recorded_run

logger = logging.getLogger(__name__)


def train(config: TrainConfig, *, model_spec: ModelSpec, shards_dir: str | Path, checkpoints_dir: str | Path,
          output_dir: str | Path, on_log: Callable[[dict], None] | None = None,
          wrap_collator: Callable[[Callable], Callable] | None = None) -> TrainResult:
    """Fine-tune ``model_spec``'s model on the train split of ``shards_dir`` (see the module docstring).

    ``checkpoints_dir`` is best named by ``RunIdentity.of(config, model_spec, index).folder_name()``, as the
    trained_model asset does: runs that can resume each other then share it and no others do.
    ``on_log`` receives every progress record; ``wrap_collator`` wraps the collator (a debugging aid: the cli
    records each batch's sample keys with it).
    """
    started = time.time()
    shards_dir, checkpoints_dir, output_dir = Path(shards_dir), Path(checkpoints_dir), Path(output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0

    # --- everything that can be wrong is checked before the model is loaded ---
    device = resolve_device(model_spec.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = resolve_precision(config, device)
    if config.compile_blocks and device.type == "mps":
        raise TrainConfigError("compile_blocks needs CUDA or a CPU (torch.compile's MPS backend is experimental); "
                               "set compile_blocks=False on this Mac")
    engine = sharded_engine()
    if engine and config.use_lora and config.merge_lora:
        raise TrainConfigError(
            f"merge_lora=True cannot merge adapters into weights that {engine} shards across ranks; train with "
            "merge_lora=False, then merge once: load_trained(path, spec)[0].merge_and_unload().save_pretrained(...)")
    index = read_index(shards_dir)
    train_samples = split_samples(index, "train", shards_dir)
    val_samples = split_samples(index, "validation", shards_dir)
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
    identity = RunIdentity.of(config, model_spec, index)
    result_key = identity.result_key(max_steps, world_size)
    if config.resume:
        finished = finished_result(output_dir, result_key)
        if finished is not None:
            logger.info("%s already holds this run's result (same settings, model, shards and %d steps); keeping it",
                        output_dir, max_steps)
            return finished
    hash_started = time.perf_counter()
    hashed = verify_shards(shards_dir, index)
    logger.info("verified %d shards (%.1f MB) against index.json in %.2f s", len(train_shards) + len(val_shards),
                hashed / 1e6, time.perf_counter() - hash_started)
    if config.use_lora:
        validate_lora_targets(model_skeleton(model_spec), config.lora_target_modules)
    resume_from = prepare_checkpoints_dir(checkpoints_dir, identity, resume=config.resume, is_main=is_main)
    resumed_step = checkpoint_step(resume_from) if resume_from else None
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
    model = configure_trainable(model_spec.load_model(device=device, dtype=load_dtype), config)
    trainable_params, total_params = count_params(model)
    if trainable_params == 0:
        raise TrainConfigError("no parameter would be trained; check the freeze_* settings")
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

    # Parameters the loss never reaches (CLIP's unused last layer / pooler) exist only if the vision tower trains.
    args = training_arguments(config, output_dir=str(checkpoints_dir), max_steps=max_steps, device=device,
                              dtype=dtype, workers=workers, find_unused_parameters=vision_trainable)
    memory = MemoryMonitor(args.device)
    progress = make_progress_callback(on_log, memory, global_batch)
    # On a GPU the pixels cross the bus as uint8 and are expanded there: a quarter of the bytes.
    collator = memory_efficient_collate_fn(processor, defer_pixel_normalization=device.type == "cuda",
                                           pad_to_multiple_of=config.padding_multiple())
    trainer = build_trainer(model, config, args, data_collator=wrap_collator(collator) if wrap_collator else collator,
                            train_dataset=train_stream, eval_dataset=val_stream, eval_workers=eval_workers,
                            # manifest first: its hashing is no training time
                            callbacks=[make_manifest_callback(), progress], data=data_params(index))

    logger.info("training %s on %s (%s): %d trainable of %d parameters, %d steps%s", model_spec.model_name,
                args.device, dtype, trainable_params, total_params, max_steps,
                f", resuming at step {resumed_step}" if resumed_step else "")
    initial = trainer.evaluate()
    stopped_before = stopped_in(resume_from, config, max_steps) if resume_from else None
    if (resumed_step is not None and resumed_step >= max_steps) or stopped_before:
        # Already finished (killed while writing the result): Trainer.train would run one step past the end.
        logger.info("%s is at max_steps=%d or stopped early there (%s); not training further", resume_from,
                    max_steps, stopped_before or "no")
        trainer.restore_checkpoint(resume_from)
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
    stopped = stop_reason(trainer.state, config, max_steps)
    if stopped:
        logger.info("stopped early at step %d of %d: %s", step, max_steps, stopped)
    best_step = best_eval_loss = None
    if config.keep == "best":
        # Without evaluations during training (eval_steps=0) the last checkpoint is the only one validated.
        loaded = trainer.best_checkpoint_loaded
        best_step = checkpoint_step(loaded) if loaded else step
        if loaded is None and trainer.state.best_global_step not in (None, step):
            logger.warning("the best checkpoint (step %d) is gone from %s; the model keeps the last weights (step %d)",
                           trainer.state.best_global_step, checkpoints_dir, step)
        best_eval_loss = next(e["eval_loss"] for e in reversed(history)
                              if "eval_loss" in e and e.get("step") == best_step)
        logger.info("keeping the weights of step %d (validation loss %.6g)", best_step, best_eval_loss)

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
        "stopped_early": stopped is not None,
        "stop_reason": stopped,
        "best_step": best_step,
        "best_eval_loss": best_eval_loss,
        "mlflow_run_id": (recorded_run(checkpoints_dir) or {}).get("run_id") if config.report_to == "mlflow" else None,
    }
    curve, _ = save_result(trainer, processor, config, model_spec, output_dir, history,
                           {**summary, "seconds": time.time() - started, "run_identity": result_key,
                            # What the model answers with: the Identifier reads it from a trained folder.
                            "shards_dir": str(shards_dir.resolve()), "categories": index.get("categories")},
                           is_main)
    curve_path = str(curve) if curve else None
    return TrainResult(model_path=str(output_dir), log_history=history, seconds=time.time() - started,
                       loss_curve_path=curve_path, **summary)
