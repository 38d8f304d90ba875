"""production_model in Dagster: it follows model_evaluation's latest materialisation and that run's check results,
promotes a better model, keeps a worse one or one whose checks failed out (materialising all the same, with the
reason in its metadata), and writes the pointer the Identifier, CLI and service read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    MaterializeResult,
    MetadataValue,
    asset,
    materialize,
)

from plant_pipeline.defs.assets.evaluation import model_evaluation
from plant_pipeline.defs.assets.production import production_model
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.ml.evaluation import read_shard_categories
from plant_pipeline.ml.serving.registry import CATEGORIES_FILE, MODEL_CARD_FILE, read_pointer
from plant_pipeline.ml.training.results import RESULT_META

CHECKS = sorted(key.name for key in model_evaluation.check_keys)


def _fake_evaluation(model_path: Path, top1: float, num_categories: int, failed: tuple[str, ...] = ()):
    """model_evaluation as Dagster records it (metadata and check results of one run), without scoring anything."""

    @asset(name="model_evaluation", deps=["trained_model"],
           check_specs=[AssetCheckSpec(name, asset="model_evaluation") for name in CHECKS])
    def fake() -> MaterializeResult:
        return MaterializeResult(
            metadata={"top1_accuracy": top1, "macro_accuracy": top1 - 0.01, "top5_accuracy": 1.0,
                      "num_test_images": 8, "num_categories": num_categories, "model_path": MetadataValue.path(str(model_path))},
            check_results=[AssetCheckResult(check_name=name, passed=name not in failed) for name in CHECKS])

    return fake


def _trained(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / RESULT_META).write_text(json.dumps({"kind": "full", "steps": 2, "train_config": {"use_lora": False}}))
    return path


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir, toy_shards):
    storage = PipelineStorage(data_dir=str(tmp_path / "data"))
    model = ModelResource(model_name=str(tiny_model_dir), local_files_only=True, device="cpu")
    shutil.copytree(toy_shards, storage.shards_dir(model.spec(storage).slug))
    categories = len(read_shard_categories(toy_shards))
    with DagsterInstance.ephemeral() as instance:
        def run(top1: float, weights: bytes, failed: tuple[str, ...] = (), num_categories: int | None = None,
                **config) -> dict:
            trained = _trained(tmp_path / "trained" / weights.decode(), weights)
            evaluation = _fake_evaluation(trained, top1, num_categories or categories, failed)
            result = materialize([evaluation, production_model], instance=instance,
                                 resources={"storage": storage, "model": model},
                                 run_config={"ops": {"production_model": {"config": config}}} if config else None)
            assert result.success
            [event] = [e for e in result.get_asset_materialization_events()
                       if e.asset_key == AssetKey("production_model")]
            return {k: v.value for k, v in event.materialization.metadata.items()}

        run.instance, run.resources = instance, {"storage": storage, "model": model}
        yield run, storage


def test_better_models_are_promoted_and_worse_ones_kept_out_with_the_reason(pipeline):
    run, storage = pipeline
    first = run(0.5, b"first")
    assert first["promoted"] is True and "first production model" in first["reason"]
    production = read_pointer(storage.path())
    assert production.model_id == first["model_id"] and production.metrics["top1_accuracy"] == 0.5
    folder = Path(production.model_path)
    assert (folder / "model.safetensors").read_bytes() == b"first" and (folder / CATEGORIES_FILE).is_file()
    assert production.model_id in first["model_card"] and (folder / MODEL_CARD_FILE).is_file()
    assert production.base_model.endswith("tiny-random-llava") and len(production.data_version) == 12

    worse = run(0.4, b"worse")
    assert worse["promoted"] is False
    assert f"top-1 0.400 is 0.100 below production {production.model_id} (0.500)" in worse["reason"]
    assert worse["model_id"] == production.model_id and worse["previous_production_top1_accuracy"] == 0.5
    assert read_pointer(storage.path()) == production

    within = run(0.49, b"within", margin=0.05)
    assert within["promoted"] is True and "within the margin 0.05" in within["reason"]
    assert read_pointer(storage.path()).model_id == within["model_id"] != production.model_id


def test_a_failing_check_keeps_a_better_model_out(pipeline):
    run, storage = pipeline
    first = run(0.5, b"first")
    failed = run(0.9, b"better-but-failing", failed=("coverage",))
    assert failed["promoted"] is False and "checks failed: coverage" in failed["reason"]
    assert failed["failed_checks"] == ["coverage"]
    assert read_pointer(storage.path()).model_id == first["model_id"]
    # The check requirement is a setting: without it the better model goes in.
    forced = run(0.9, b"better-forced", failed=("coverage",), require_checks=False)
    assert forced["promoted"] is True


def test_an_evaluation_on_other_categories_than_the_shards_now_hold_is_kept_out(pipeline):
    run, storage = pipeline
    stale = run(0.5, b"stale", num_categories=3)
    assert stale["promoted"] is False and "materialise model_evaluation again" in stale["reason"]
    assert read_pointer(storage.path()) is None and "model_id" not in stale


def test_a_retraining_since_the_evaluation_keeps_the_unevaluated_weights_out(pipeline, tmp_path):
    run, storage = pipeline
    instance = run.instance
    instance.report_runless_asset_event(AssetMaterialization("trained_model", tags={"dagster/data_version": "v1"}))
    first = run(0.5, b"first")  # evaluated the v1 training: promoted
    assert first["promoted"] is True
    instance.report_runless_asset_event(AssetMaterialization("trained_model", tags={"dagster/data_version": "v2"}))
    again = materialize([production_model], instance=instance, resources=run.resources)
    [event] = again.get_asset_materialization_events()
    reason = event.materialization.metadata["reason"].value
    assert "trained_model (data version v1 -> v2) changed since this evaluation" in reason
    assert event.materialization.metadata["promoted"].value is False
    assert read_pointer(storage.path()).model_id == first["model_id"]


def test_the_model_already_in_production_is_not_promoted_twice(pipeline):
    run, storage = pipeline
    first = run(0.5, b"same")
    shutil.rmtree(Path(storage.path()).parent / "trained")  # the same weights evaluated again
    again = run(0.5, b"same")
    assert again["promoted"] is False and f"already in production as {first['model_id']}" in again["reason"]
    assert len(list((storage.path("production", "models")).iterdir())) == 1
    # A production folder someone removed is replaced, not compared with.
    shutil.rmtree(storage.path("production", "models", first["model_id"]))
    shutil.rmtree(Path(storage.path()).parent / "trained")
    restored = run(0.1, b"same")
    assert restored["promoted"] is True and "first production model" in restored["reason"]
    assert Path(read_pointer(storage.path()).model_path).is_dir()


@pytest.mark.slow
def test_after_the_real_graph_the_identifier_serves_the_promoted_model(tmp_path, tiny_model_dir, tiny_processor):
    """trained_model -> model_evaluation -> production_model on toy shards (~50 s on 2 cores), then
    Identifier.load() follows the pointer: what `make demo` leaves for `plant-pipeline identify`."""
    from PIL import Image

    from plant_pipeline.defs.assets.training import trained_model
    from plant_pipeline.defs.resources import TrackingResource
    from plant_pipeline.ml.data.categories import CategoryMap
    from plant_pipeline.ml.serving.identifier import Identifier
    from plant_pipeline.ml.testing import write_toy_shards

    storage = PipelineStorage(data_dir=str(tmp_path / "data"))
    model = ModelResource(model_name=str(tiny_model_dir), local_files_only=True, device="cpu")
    categories = CategoryMap(("red rose", "blue iris", "green fern", "white daisy"), source="image_folder")
    write_toy_shards(storage.shards_dir(model.spec(storage).slug), tiny_processor, categories=categories)
    train = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "warmup_ratio": 0.0,
             "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "dataloader_num_workers": 0, "shuffle_buffer": 16,
             "max_eval_samples": 8, "report_to": "none"}
    evaluation = {"batch_size": 8, "compare_with_base": False, "accuracy_floor": 0.0}
    with DagsterInstance.ephemeral() as instance:
        result = materialize([trained_model, model_evaluation, production_model], instance=instance,
                             resources={"storage": storage, "model": model, "tracking": TrackingResource()},
                             run_config={"ops": {"trained_model": {"config": train},
                                                 "model_evaluation": {"config": evaluation}}})
    assert result.success
    production = read_pointer(storage.path())
    assert production is not None and production.metrics["num_categories"] == 4
    identifier = Identifier.load(data_dir=storage.path(), device="cpu")
    [answer] = identifier.identify([Image.new("RGB", (40, 30), (200, 10, 10))], top_k=4)
    assert answer.model_id == production.model_id and answer.data_version == production.data_version
    assert {guess.name for guess in answer.guesses} == set(categories.names)
    assert sum(guess.score for guess in answer.guesses) == pytest.approx(1.0)
