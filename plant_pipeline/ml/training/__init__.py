"""Stage 3: training. The config and run identity, checkpoints, trainable parts and LoRA, collation,
streaming the shards, the CustomTrainer, and the command line torchrun launches.

Exported: what the Dagster layer and the benchmarks use. Importing this package does not import transformers
(the Dagster process imports it); train() and build_trainer() do when called.
"""

from plant_pipeline.ml.training.build import build_trainer, training_arguments
from plant_pipeline.ml.training.checkpoints import CheckpointError
from plant_pipeline.ml.training.cli import ENTRY_MODULE, RunFile, RunFileError
from plant_pipeline.ml.training.collate import MemoryEfficientCollator, memory_efficient_collate_fn
from plant_pipeline.ml.training.config import RunIdentity, TrainConfig, TrainConfigError, loader_workers
from plant_pipeline.ml.training.loss import labelled_token_loss
from plant_pipeline.ml.training.parts import configure_trainable, validate_lora_targets
from plant_pipeline.ml.training.results import TrainResult, load_trained
from plant_pipeline.ml.training.run import train
from plant_pipeline.ml.training.shard_checks import ShardIntegrityError
from plant_pipeline.ml.training.streaming import make_stream

__all__ = [
    "ENTRY_MODULE",
    "CheckpointError",
    "MemoryEfficientCollator",
    "RunFile",
    "RunFileError",
    "RunIdentity",
    "ShardIntegrityError",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "build_trainer",
    "configure_trainable",
    "labelled_token_loss",
    "load_trained",
    "loader_workers",
    "make_stream",
    "memory_efficient_collate_fn",
    "train",
    "training_arguments",
    "validate_lora_targets",
]
