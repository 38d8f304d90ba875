"""Asset ``flower_shards``: every image and prompt preprocessed by the model's processor into WebDataset shards."""

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from plant_pipeline.defs.assets.flowers import category_map
from plant_pipeline.defs.assets.user_photos import user_photos
from plant_pipeline.defs.config import config_from_dataclass, to_dataclass
from plant_pipeline.defs.locks import locked_output
from plant_pipeline.defs.metadata import image
from plant_pipeline.defs.resources import ModelResource, PipelineStorage, with_run_config_defaults
from plant_pipeline.ml import shards as core
from plant_pipeline.ml.data import CategoryMap, combine_manifests, read_category_map, read_manifest, read_user_manifest
from plant_pipeline.ml.files import sha256_file
from plant_pipeline.ml.shards import INDEX_FILE, CheckOutcome, ShardConfig

# Defaults from PLANT_PIPELINE_RUN_CONFIG's files where it is set (make dev after make demo).
FlowerShardsConfig = with_run_config_defaults(config_from_dataclass(
    "FlowerShardsConfig", ShardConfig, "How flower_shards cuts the shards and parallelises the preprocessing."
), "flower_shards")


def training_manifest(storage: PipelineStorage) -> tuple[pd.DataFrame, CategoryMap, list[str]]:
    """The chosen source's photos plus those taken in from incoming/ (none before user_photos first ran), labelled
    by category_map.json; and the names of user photos' categories the map does not have (left out)."""
    categories = read_category_map(storage.category_map_path)
    user, left_out = read_user_manifest(storage.path(), categories)
    return combine_manifests(read_manifest(storage.dataset_manifest_path), user), categories, left_out


@asset(
    deps=[category_map, user_photos],
    group_name="data",
    code_version="3",  # 3: any categories (from category_map.json); incremental when only new photos arrived
    kinds={"python", "webdataset"},
    description="Images resized and cropped by the model's own processor (stored as uint8), prompt token ids and "
    "answer masks, validated and written as WebDataset tar shards per split: the chosen source's photos plus "
    "those taken in from incoming/ (user_photos). When only new photos arrived, only they are preprocessed, into "
    "new shard files beside the untouched old ones.",
)
@locked_output
def flower_shards(
    context: AssetExecutionContext, config: FlowerShardsConfig, storage: PipelineStorage, model: ModelResource
) -> MaterializeResult:
    spec = model.spec(storage)
    out_dir = storage.shards_dir(spec.slug)

    def progress(split: str, done: int, total: int) -> None:
        if done == total or done % 500 == 0:
            context.log.info(f"{split}: {done}/{total} images preprocessed")

    manifest, categories, left_out = training_manifest(storage)
    if left_out:
        context.log.warning(f"photos from incoming/ of categories not in category_map.json left out: {left_out[:20]}")
    result = core.build_shards(
        manifest,
        storage.path(),
        spec.source(),
        out_dir,
        categories=categories,
        config=to_dataclass(ShardConfig, config),
        model_name=spec.model_name,
        local_files_only=spec.local_files_only,
        revision=spec.revision,
        progress=progress,
    )
    splits = result.index["splits"]
    metadata = {
        "shards_dir": MetadataValue.path(str(out_dir)),
        "build": result.mode,
        "build_reason": result.reason,
        "reused_shards": result.reused_shards,
        "new_samples": MetadataValue.json(result.new_samples),
        "num_categories": len(categories),
        "model_name": spec.model_name,
        "quarantined": len(result.quarantined),
        "images_per_second": round(result.images_per_second, 1),
        "pixel_shape": str(result.index.get("pixel_shape")),
        "num_image_tokens": result.index.get("num_image_tokens"),
        "images_by_source": MetadataValue.json(manifest["source"].value_counts().to_dict()),
    }
    for split, info in splits.items():
        metadata[f"samples_{split}"] = info["samples"]
        metadata[f"shards_{split}"] = len(info["shards"])
        metadata[f"bytes_{split}"] = info["bytes"]
    if result.quarantined:
        metadata["quarantine"] = MetadataValue.json(result.quarantined[:50])
        context.log.warning(f"{len(result.quarantined)} images quarantined; see {out_dir / 'quarantine.json'}")
    metadata["preview"] = image(core.preview_grid(out_dir, "train"), "decoded training samples")
    # The index holds every shard's sha256, so its hash changes exactly when the shards do.
    return MaterializeResult(metadata=metadata, data_version=DataVersion(sha256_file(out_dir / INDEX_FILE)[:16]))


class QuarantineRateConfig(Config):
    max_fraction: float = Field(
        default=0.01, description="Most images of any split that may be quarantined (0.01 = 1%) before the check fails."
    )
    severity: str = Field(
        default="WARN",
        description="Severity when too many are quarantined: WARN (shown, training goes on) or ERROR.",
    )


def _result(outcome: CheckOutcome, severity: AssetCheckSeverity = AssetCheckSeverity.ERROR) -> AssetCheckResult:
    return AssetCheckResult(
        passed=outcome.passed, description=outcome.description, metadata=outcome.metadata, severity=severity
    )


def _shards_dir(storage: PipelineStorage, model: ModelResource):
    return storage.shards_dir(model.spec(storage).slug)


# Blocking: a shard that does not match its index must not be trained on, so a failure stops the assets
# downstream in the same run (trained_model, model_evaluation).
@asset_check(asset=flower_shards, blocking=True, description="Every shard re-read: counts and sha256 match the "
             "index; counts match the manifest minus quarantined images. Blocks the assets downstream when it fails.")
def shards_integrity(storage: PipelineStorage, model: ModelResource) -> AssetCheckResult:
    return _result(core.check_integrity(_shards_dir(storage, model), training_manifest(storage)[0]))


@asset_check(asset=flower_shards, description="Every class present in every split.")
def shards_class_coverage(storage: PipelineStorage, model: ModelResource) -> AssetCheckResult:
    return _result(core.check_class_coverage(_shards_dir(storage, model)))


# Blocking too: training on a test image would make the evaluation a lie.
@asset_check(asset=flower_shards, blocking=True, description="No image (by content hash) in more than one "
             "split. Blocks the assets downstream when it fails.")
def shards_no_leakage(storage: PipelineStorage, model: ModelResource) -> AssetCheckResult:
    return _result(core.check_no_leakage(_shards_dir(storage, model)))


@asset_check(asset=flower_shards, description="At most max_fraction of each split's images quarantined "
             "(undecodable, missing or rejected files; see quarantine.json).")
def shards_quarantine_rate(
    config: QuarantineRateConfig, storage: PipelineStorage, model: ModelResource
) -> AssetCheckResult:
    if config.severity.upper() not in ("WARN", "ERROR"):  # a typo fails now, not as a silent default
        raise ValueError(f"severity must be WARN or ERROR; got {config.severity!r}")
    outcome = core.check_quarantine_rate(_shards_dir(storage, model), config.max_fraction)
    return _result(outcome, AssetCheckSeverity(config.severity.upper()))


@asset_check(asset=flower_shards, description="A random sample of stored tensors equals a fresh run of the "
             "processor on the source image.")
def shards_exactness(storage: PipelineStorage, model: ModelResource) -> AssetCheckResult:
    spec = model.spec(storage)
    return _result(core.check_exactness(storage.shards_dir(spec.slug), storage.path(), spec.source()))
