"""Asset ``trained_model``: fine-tune the model on the train shards with CustomTrainer (LoRA by default)."""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from plant_pipeline.defs.config import config_from_dataclass, to_dataclass
from plant_pipeline.defs.metadata import image
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.ml.fileutil import sha256_file
from plant_pipeline.ml.shard_format import INDEX_FILE
from plant_pipeline.ml.train import TrainConfig, train

TrainedModelConfig = config_from_dataclass(
    "TrainedModelConfig", TrainConfig, "Fine-tuning settings; the same config with the same shards resumes."
)


def run_name(config: TrainConfig, model_name: str, shards_sha: str) -> str:
    """Runs with the same model, shards and checkpoint-relevant settings share a folder, so they resume.

    ``max_steps`` and the logging/eval/save intervals are left out: raising max_steps continues a run.
    """
    settings = {key: getattr(config, key) for key in TrainConfig.RESUME_KEYS}
    blob = json.dumps({"model": model_name, "shards": shards_sha, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _log_progress(context: AssetExecutionContext):
    def on_log(record: dict) -> None:
        parts = [f"step {record.get('step')}/{record.get('max_steps')}"]
        for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("samples_per_second", "{:.1f}"),
                         ("eta_seconds", "{:.0f}"), ("rss_mb", "{:.0f}")):
            if record.get(key) is not None:
                parts.append(f"{key} {fmt.format(record[key])}")
        context.log.info(", ".join(parts))

    return on_log


@asset(
    deps=["flower_shards"],
    group_name="training",
    code_version="1",
    kinds={"pytorch"},
    description="The model fine-tuned on the train shards (streamed), with checkpoints it resumes from; "
    "its metadata shows the losses, speed, memory and a loss curve.",
)
def trained_model(
    context: AssetExecutionContext, config: TrainedModelConfig, storage: PipelineStorage, model: ModelResource
) -> MaterializeResult:
    train_config = to_dataclass(TrainConfig, config)
    spec = model.spec(storage)
    shards_dir = storage.shards_dir(spec.slug)
    name = f"{spec.slug}-{run_name(train_config, spec.model_name, sha256_file(shards_dir / INDEX_FILE))}"
    context.log.info(f"run {name}: {json.dumps(asdict(train_config))}")
    result = train(
        train_config,
        model_spec=spec,
        shards_dir=shards_dir,
        checkpoints_dir=storage.path("checkpoints", name),
        output_dir=storage.path("models", name),
        on_log=_log_progress(context),
    )
    metadata = {
        "model_path": MetadataValue.path(result.model_path),
        "steps": result.steps,
        "final_train_loss": result.final_train_loss,
        "final_validation_loss": result.final_validation_loss,
        "initial_validation_loss": result.initial_validation_loss,
        "samples_per_second": round(result.samples_per_second, 2),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "peak_cuda_memory_mb": result.peak_cuda_memory_mb,
        "peak_mps_memory_mb": result.peak_mps_memory_mb,
        "device": result.device,
        "dtype": result.dtype,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "resumed_from_step": result.resumed_from_step,
        "checkpoints_dir": MetadataValue.path(str(storage.path("checkpoints", name))),
        "seconds": round(result.seconds, 1),
    }
    if result.loss_curve_path:
        metadata["loss_curve"] = image(Path(result.loss_curve_path), "training and validation loss")
    return MaterializeResult(metadata={k: v for k, v in metadata.items() if v is not None})
