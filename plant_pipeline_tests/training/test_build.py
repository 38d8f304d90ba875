"""build_trainer / training_arguments: the wiring train() and the benchmarks share, and the private Trainer API
it rests on."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from plant_pipeline.ml.model.spec import ModelSpec
from plant_pipeline.ml.shards.format import split_shard_paths
from plant_pipeline.ml.training import (
    TrainConfig,
    build_trainer,
    configure_trainable,
    make_stream,
    memory_efficient_collate_fn,
    training_arguments,
)
from plant_pipeline.ml.training.trainer import (
    PRIVATE_TRAINER_API,
    PRIVATE_TRAINER_ATTRIBUTES,
    CustomTrainer,
)

PACKAGE = Path(__file__).resolve().parents[2] / "plant_pipeline"


def test_private_trainer_methods_exist_with_the_parameters_relied_on():
    for name, parameters in PRIVATE_TRAINER_API.items():
        method = getattr(Trainer, name, None)
        assert method is not None, f"transformers.Trainer.{name} is gone: see PRIVATE_TRAINER_API in trainer.py"
        assert tuple(inspect.signature(method).parameters) == parameters, name


def test_the_private_trainer_api_is_used_in_trainer_py_only():
    names = [*PRIVATE_TRAINER_API, *PRIVATE_TRAINER_ATTRIBUTES]
    pattern = re.compile(r"\.(" + "|".join(map(re.escape, names)) + r")\b")
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if path.name != "trainer.py" and pattern.search(path.read_text()))
    assert users == []


def test_build_trainer_wires_the_configs_knobs(tiny_model_dir, tiny_processor, toy_shards, tmp_path):
    config = TrainConfig(max_steps=3, memory_cleanup_steps=7, max_eval_samples=5, dataloader_prefetch_factor=3,
                         eval_steps=0, dataloader_num_workers=0)
    spec = ModelSpec(model_name=str(tiny_model_dir), device="cpu", local_files_only=True)
    model = configure_trainable(spec.load_model(), config)
    device = torch.device("cpu")
    args = training_arguments(config, output_dir=str(tmp_path), max_steps=3, device=device, dtype=torch.float32,
                              workers=0, save_strategy="no", learning_rate=1e-5)
    assert isinstance(args, TrainingArguments)
    assert args.learning_rate == 1e-5 and args.save_strategy == "no", "overrides replace single values"
    assert args.max_steps == 3 and args.ignore_data_skip and args.eval_strategy == "no"
    stream = make_stream(split_shard_paths(toy_shards, "train"), shuffle=False)
    trainer = build_trainer(model, config, args, data_collator=memory_efficient_collate_fn(tiny_processor),
                            train_dataset=stream, eval_workers=1)
    assert isinstance(trainer, CustomTrainer)
    assert (trainer.memory_cleanup_steps, trainer.max_eval_samples, trainer.read_ahead_batches,
            trainer.eval_dataloader_num_workers) == (7, 5, 3, 1)
    assert not any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
    for name in PRIVATE_TRAINER_ATTRIBUTES:
        assert hasattr(trainer, name), f"transformers.Trainer no longer sets {name}: see trainer.py"


def test_importing_the_package_leaves_transformers_unloaded():
    # The Dagster process imports the package for TrainConfig and RunIdentity; transformers costs seconds to load.
    code = "import sys, plant_pipeline.ml.training; print('transformers' in sys.modules, 'peft' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.stdout.split() == ["False", "False"]
