"""The whole asset graph through dagster.materialize: synthetic flowers, the tiny model, one Dagster instance.

The expensive run (shards, training, evaluation) happens once per module; later tests re-materialise single
assets on the same instance, because model_evaluation reads trained_model's latest materialisation from it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, DagsterInstance, materialize

from plant_pipeline.defs.assets.evaluation import model_evaluation
from plant_pipeline.defs.assets.flowers import category_map, category_map_complete, oxford_flowers
from plant_pipeline.defs.assets.shards import (
    flower_shards,
    shards_class_coverage,
    shards_exactness,
    shards_integrity,
    shards_no_leakage,
    shards_quarantine_rate,
)
from plant_pipeline.defs.assets.sources import folder_photos, hf_dataset_photos
from plant_pipeline.defs.assets.training import trained_model
from plant_pipeline.defs.resources import ModelResource, PipelineStorage, TrackingResource
from plant_pipeline.ml.data.demo_release import make_demo_release
from plant_pipeline.ml.data.manifest import read_manifest
from plant_pipeline.ml.shards.format import read_index

ASSETS = [oxford_flowers, folder_photos, hf_dataset_photos, category_map, category_map_complete, flower_shards, shards_integrity,
          shards_class_coverage, shards_no_leakage, shards_quarantine_rate, shards_exactness, trained_model,
          model_evaluation]
# The two other sources have no location set: they materialise as "not in use", as in `make demo`.
ASSET_NAMES = ("oxford_flowers", "folder_photos", "hf_dataset_photos", "category_map", "flower_shards", "trained_model", "model_evaluation")
ALL_CHECKS = {"category_map_complete", "shards_integrity", "shards_class_coverage", "shards_no_leakage",
              "shards_quarantine_rate", "shards_exactness", "accuracy_floor", "no_regression", "coverage"}
TEST_PER_CLASS = 1
MAX_STEPS = 10
TRAIN_CONFIG = {"max_steps": MAX_STEPS, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
                "learning_rate": 2e-3, "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "use_lora": True,
                "save_steps": 5, "eval_steps": 5, "logging_steps": 5, "dataloader_num_workers": 0,
                "shuffle_buffer": 16, "max_eval_samples": 32}
EVAL_CONFIG = {"batch_size": 16, "max_samples": None, "compare_with_base": True, "accuracy_floor": 0.0}


class Pipeline:
    """One data root, one model, one Dagster instance shared by the module's tests."""

    def __init__(self, data_dir: Path, release_dir: Path, instance: DagsterInstance):
        self.data_dir = data_dir
        self.release_dir = release_dir
        self.instance = instance
        self.storage = PipelineStorage(data_dir=str(data_dir))
        self.model = ModelResource(model_name="tiny-random-llava", local_files_only=True, device="cpu")

    def run_config(self, selection: list[str], train: dict | None = None, evaluation: dict | None = None) -> dict:
        ops = {
            "oxford_flowers": {"config": {"local_dir": str(self.release_dir), "md5": {}}},
            "flower_shards": {"config": {"num_workers": 1, "min_shards": 2}},
            "trained_model": {"config": {**TRAIN_CONFIG, **(train or {})}},
            "model_evaluation": {"config": {**EVAL_CONFIG, **(evaluation or {})}},
        }
        # Dagster rejects config for ops outside the selection.
        return {"ops": {name: value for name, value in ops.items() if name in selection}}

    def materialize(self, *selection: str, **config):
        """Materialise the named assets (all by default) with their checks, on the shared instance."""
        names = list(selection) or list(ASSET_NAMES)
        return materialize(ASSETS, selection=names, instance=self.instance, raise_on_error=False,
                           resources={"storage": self.storage, "model": self.model,
                                      "tracking": TrackingResource(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])},
                           run_config=self.run_config(names, **config))


def _metadata(result, asset_name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset_name)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _checks(result) -> dict:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def _failure_messages(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return "\n".join(str(e.event_specific_data.error) for e in failures)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    release = make_demo_release(tmp_path_factory.mktemp("release"), train_per_class=2, validation_per_class=1,
                                test_per_class=TEST_PER_CLASS, image_size=48)
    # Tiny matrices: extra threads cost more in synchronisation than they give, most of all on a busy machine.
    # OMP_NUM_THREADS reaches processes the assets start (training runs in a child process).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as env, DagsterInstance.ephemeral() as instance:
            env.setenv("OMP_NUM_THREADS", "1")
            yield Pipeline(tmp_path_factory.mktemp("data"), release.out_dir, instance)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first_run(pipeline):
    result = pipeline.materialize()
    assert result.success, _failure_messages(result)
    return result


def test_every_asset_materialises_and_every_check_passes(first_run):
    materialised = {e.asset_key.path[-1] for e in first_run.get_asset_materialization_events()}
    assert materialised == set(ASSET_NAMES)
    checks = _checks(first_run)
    assert set(checks) == ALL_CHECKS
    failed = {name: c.metadata for name, c in checks.items() if not c.passed}
    assert not failed


def test_oxford_flowers_metadata(first_run):
    meta = _metadata(first_run, "oxford_flowers")
    assert (meta["images_train"], meta["images_validation"], meta["images_test"]) == (204, 102, 102)
    assert meta["num_classes"] == 102
    assert len(read_manifest(meta["manifest_path"])) == 408


def test_flower_shards_metadata_matches_the_manifest(pipeline, first_run):
    meta = _metadata(first_run, "flower_shards")
    manifest = read_manifest(_metadata(first_run, "oxford_flowers")["manifest_path"])
    counts = manifest["split"].value_counts().to_dict()
    index = read_index(meta["shards_dir"])
    for split in ("train", "validation", "test"):
        assert meta[f"samples_{split}"] == counts[split]
        assert meta[f"shards_{split}"] == len(index["splits"][split]["shards"]) >= 2
    assert meta["quarantined"] == 0
    assert meta["images_per_second"] > 0
    assert Path(meta["shards_dir"]).parent == pipeline.data_dir / "shards"


def test_trained_model_metadata(first_run):
    meta = _metadata(first_run, "trained_model")
    model_path = Path(meta["model_path"])
    assert (model_path / "adapter_config.json").is_file()
    assert meta["steps"] == MAX_STEPS
    for key in ("final_train_loss", "final_validation_loss", "initial_validation_loss"):
        assert 0 < meta[key] < 50, key
    assert meta["samples_per_second"] > 0 and meta["peak_memory_mb"] > 0
    assert meta["device"] == "cpu"
    assert 0 < meta["trainable_params"] < meta["total_params"]
    assert "resumed_from_step" not in meta, "a fresh run resumes from nothing"
    assert "loss_curve" in meta


def test_model_evaluation_metadata_and_report(first_run):
    meta = _metadata(first_run, "model_evaluation")
    for key in ("top1_accuracy", "macro_accuracy", "top5_accuracy"):
        assert 0.0 <= meta[key] <= 1.0, key
    assert meta["top1_accuracy"] <= meta["top5_accuracy"]
    assert meta["num_test_images"] == 102 * TEST_PER_CLASS
    assert meta["model_path"] == _metadata(first_run, "trained_model")["model_path"]
    report_dir = Path(meta["report_path"])
    assert (report_dir / "report.md").is_file()
    assert {p.name for p in report_dir.glob("*.png")} == {"confusion_matrix.png", "per_class_accuracy.png"}
    assert len(meta["per_class"].records) == 102
    assert "delta_top1_vs_previous" not in meta, "the first evaluation has nothing to compare with"
    assert "delta_top1_vs_base" in meta


@pytest.fixture(scope="module")
def reevaluation(pipeline, first_run):
    """model_evaluation alone, again, with a floor no model can reach."""
    result = pipeline.materialize("model_evaluation", evaluation={"accuracy_floor": 1.01, "floor_severity": "ERROR",
                                                                  "compare_with_base": False})
    # A failed check that is not blocking leaves the run successful: the materialisation is still recorded.
    assert result.success, _failure_messages(result)
    return result


def test_reevaluation_compares_with_the_previous_one(first_run, reevaluation):
    meta = _metadata(reevaluation, "model_evaluation")
    first = _metadata(first_run, "model_evaluation")
    # Same model, same shards, deterministic scoring: nothing changed.
    assert meta["top1_accuracy"] == first["top1_accuracy"]
    assert meta["delta_top1_vs_previous"] == 0.0
    assert meta["classes_worse_than_previous"] == []
    assert meta["report_path"] != first["report_path"], "each run writes its own report"
    assert "delta_top1_vs_base" not in meta, "compare_with_base=False skips the base model"
    checks = _checks(reevaluation)
    assert set(checks) == {"accuracy_floor", "no_regression", "coverage"}
    assert checks["no_regression"].passed and checks["coverage"].passed
    assert checks["no_regression"].metadata["previous_top1_accuracy"].value == first["top1_accuracy"]


def test_accuracy_floor_fails_above_the_reachable(reevaluation):
    floor = _checks(reevaluation)["accuracy_floor"]
    assert not floor.passed
    assert floor.severity.value == "ERROR"
    assert floor.metadata["floor"].value == 1.01


def test_shards_integrity_fails_on_a_corrupted_shard(pipeline, first_run, tmp_path):
    # A copy of the shards and manifest, so the other tests keep reading intact ones.
    storage = PipelineStorage(data_dir=str(tmp_path))
    slug = pipeline.model.spec(pipeline.storage).slug
    shutil.copytree(pipeline.storage.shards_dir(slug), storage.shards_dir(slug))
    # What shards_integrity compares with: the dataset's manifest and its categories.
    shutil.copy(pipeline.storage.dataset_manifest_path, storage.dataset_manifest_path)
    shutil.copy(pipeline.storage.category_map_path, storage.category_map_path)
    assert shards_integrity(storage=storage, model=pipeline.model).passed

    shard = min((storage.shards_dir(slug) / "train").glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the sha256 can tell
    shard.write_bytes(bytes(data))
    check = shards_integrity(storage=storage, model=pipeline.model)
    assert not check.passed
    problems = check.metadata["problems"].value
    assert any(shard.name in p and "sha256" in p for p in problems), problems


def test_same_training_config_resumes_from_the_final_checkpoint(pipeline, first_run):
    result = pipeline.materialize("trained_model")
    assert result.success, _failure_messages(result)
    meta = _metadata(result, "trained_model")
    first = _metadata(first_run, "trained_model")
    assert meta["resumed_from_step"] == MAX_STEPS and meta["steps"] == MAX_STEPS
    assert meta["model_path"] == first["model_path"], "the same settings and shards map to the same run folder"
    assert meta["final_validation_loss"] == pytest.approx(first["final_validation_loss"], abs=1e-5)
