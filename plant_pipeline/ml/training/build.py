"""The wiring from a model, its streams and a collator to a CustomTrainer: ``training_arguments`` and
``build_trainer``, which train() calls and the benchmarks call instead of copying it.

transformers is imported inside the functions, so that importing the training package (the Dagster
process does) does not load it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from plant_pipeline.ml.device import DevicePolicy, policy_of
from plant_pipeline.ml.training.compile import compile_blocks
from plant_pipeline.ml.training.config import TrainConfig, check_device_settings
from plant_pipeline.ml.training.early_stopping import make_early_stopping_callback
from plant_pipeline.ml.training.tracking import make_tracking_callbacks

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainingArguments

    from plant_pipeline.ml.training.trainer import CustomTrainer

logger = logging.getLogger(__name__)


def streaming_args(config: TrainConfig, device: torch.device | DevicePolicy, workers: int) -> dict[str, Any]:
    """The TrainingArguments with which CustomTrainer streams shards (part of training_arguments)."""
    return dict(
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps if config.warmup_steps > 0 else config.warmup_ratio,
        dataloader_num_workers=workers,
        dataloader_pin_memory=policy_of(device).pin_memory,
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


def training_arguments(config: TrainConfig, *, output_dir: str, max_steps: int, device: torch.device,
                       dtype: torch.dtype, workers: int, find_unused_parameters: bool = False,
                       **overrides: Any) -> TrainingArguments:
    """The TrainingArguments train() runs with; ``overrides`` replace single values (a benchmark turns off
    evaluation and checkpointing this way).

    ``find_unused_parameters``: DDP's search for parameters the loss never reaches, needed only when the vision
    tower trains (CLIP's unused last layer and pooler).
    """
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(output_dir),
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
        report_to="none",  # tracking: make_tracking_callbacks
        disable_tqdm=True,
        use_cpu=policy_of(device).use_cpu,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        ddp_find_unused_parameters=find_unused_parameters,
        seed=config.seed,
        **streaming_args(config, device, workers),
    )
    values.update(overrides)
    if values["eval_strategy"] != "no" and (config.keep == "best" or config.early_stopping_patience):
        # The Trainer tracks the lowest validation loss (early stopping compares with it), never rotates that
        # checkpoint away, and with keep="best" loads it at the end. Not when an override turns saving off.
        values.setdefault("metric_for_best_model", "eval_loss")
        values.setdefault("greater_is_better", False)
        values.setdefault("load_best_model_at_end", config.keep == "best" and values["save_strategy"] != "no")
    return TrainingArguments(**values)


def build_trainer(model: nn.Module, config: TrainConfig, args: TrainingArguments, *, data_collator: Callable,
                  train_dataset, eval_dataset=None, eval_workers: int | None = None,
                  callbacks: Iterable[TrainerCallback] = (), data: dict | None = None) -> CustomTrainer:
    """A CustomTrainer for ``model`` (already made trainable: parts.configure_trainable) with ``config``'s
    trainer-side knobs; compiles the model's blocks when ``config.compile_blocks`` says so.

    Progress goes to the callbacks and the loggers, not to stdout: the Trainer's PrinterCallback is removed.
    With ``config.early_stopping_patience`` and evaluation on, the early-stopping callback is added; with
    ``config.report_to``, the tracking callback (tracking.py; MLflow's store is checked here, before training).
    ``eval_workers``: DataLoader workers for validation (None: as for training). ``data``: the data facts tracking
    records with the run (tracking.data_params).
    """
    from transformers import PrinterCallback

    from plant_pipeline.ml.training.trainer import CustomTrainer

    # train() refuses this before loading the model; a benchmark calling build_trainer is stopped here.
    check_device_settings(config, args.device)
    if config.compile_blocks and compile_blocks(model) == 0:
        logger.warning("compile_blocks: %s has no transformer blocks to compile; training uncompiled",
                       type(model).__name__)
    callbacks = list(callbacks)
    callbacks += make_tracking_callbacks(config, args, callbacks, data)
    if config.early_stopping_patience and args.eval_strategy != "no":
        callbacks.append(make_early_stopping_callback(config))
    trainer = CustomTrainer(
        model=model,
        args=args,
        data_collator=data_collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        memory_cleanup_steps=config.memory_cleanup_steps,
        max_eval_samples=config.max_eval_samples,
        eval_dataloader_num_workers=eval_workers,
        read_ahead_batches=config.dataloader_prefetch_factor,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer
