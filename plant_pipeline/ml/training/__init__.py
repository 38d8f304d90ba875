"""Stage 3: training. The config and run identity, checkpoints, trainable parts and LoRA, collation,
streaming the shards, the CustomTrainer, and the command line torchrun launches.

Exported: what the Dagster layer and the benchmarks use. Importing this package does not import transformers
(the Dagster process imports it); train() and build_trainer() do when called.
"""

from plant_pipeline.ml.training.build import build_trainer, training_arguments
from plant_pipeline.ml.training.checkpoints import CheckpointError
from plant_pipeline.ml.training.collate import MemoryEfficientCollator, memory_efficient_collate_fn
from plant_pipeline.ml.training.config import RunIdentity, TrainConfig, TrainConfigError, loader_workers
from plant_pipeline.ml.training.loss import labelled_token_loss
from plant_pipeline.ml.training.parts import configure_trainable, validate_lora_targets
from plant_pipeline.ml.training.results import TrainResult, load_trained
from plant_pipeline.ml.training.run import train
from plant_pipeline.ml.training.run_file import ENTRY_MODULE, RunFile, RunFileError
from plant_pipeline.ml.training.shard_checks import ShardIntegrityError
from plant_pipeline.ml.training.streaming import make_stream
from plant_pipeline.ml.training.tracking import (
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    TRACKING_URI_ENV,
    TrackingError,
    TrackingSettings,
    check_tracking_store,
    local_store_uri,
    recorded_run,
    run_url,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "ENTRY_MODULE",
    "EXPERIMENT_ENV",
    "TRACKING_URI_ENV",
    "CheckpointError",
    "MemoryEfficientCollator",
    "RunFile",
    "RunFileError",
    "RunIdentity",
    "ShardIntegrityError",
    "TrainConfig",
    "TrainConfigError",
    "TrackingError",
    "TrackingSettings",
    "TrainResult",
    "build_trainer",
    "check_tracking_store",
    "configure_trainable",
    "labelled_token_loss",
    "load_trained",
    "local_store_uri",
    "loader_workers",
    "make_stream",
    "memory_efficient_collate_fn",
    "recorded_run",
    "run_url",
    "train",
    "training_arguments",
    "validate_lora_targets",
]
