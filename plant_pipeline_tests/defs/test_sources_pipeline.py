"""The whole graph on a person's own photos through dagster.materialize: an image folder of three made-up categories
(one with a non-ASCII name), then a fourth category arriving through data/incoming/, shards updated incrementally."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from dagster import AssetKey, DagsterInstance, materialize
from PIL import Image

from plant_pipeline.defs.assets.evaluation import model_evaluation
from plant_pipeline.defs.assets.flowers import category_map, category_map_complete
from plant_pipeline.defs.assets.shards import flower_shards, shards_integrity, shards_no_leakage
from plant_pipeline.defs.assets.sources import folder_photos
from plant_pipeline.defs.assets.training import trained_model
from plant_pipeline.defs.assets.user_photos import user_photos
from plant_pipeline.defs.resources import ModelResource, PipelineStorage, TrackingResource
from plant_pipeline.ml.data import DEFAULT_QUESTION, read_category_map
from plant_pipeline.ml.shards.format import read_index

CATEGORIES = ("fern", "löwenzahn", "moss")  # made-up for this test; sorted as the source sorts them
ASSETS = [folder_photos, category_map, category_map_complete, user_photos, flower_shards, shards_integrity,
          shards_no_leakage, trained_model, model_evaluation]
TRAIN = {"max_steps": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "save_steps": 4,
         "eval_steps": 4, "logging_steps": 2, "dataloader_num_workers": 0, "shuffle_buffer": 8, "max_eval_samples": 8}


def _photo(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _settled(folder: Path) -> None:
    old = 1_000_000_000  # long ago: the intake's settle time is over
    for path in folder.rglob("*"):
        os.utime(path, (old, old))


@pytest.fixture(scope="module")
def garden(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("garden")
    seed = 0
    for name in CATEGORIES:
        for split, count in (("train", 4), ("validation", 1), ("test", 1)):
            for i in range(count):
                seed += 1
                _photo(root / split / name / f"{i}.png", seed)
    return root


class Run:
    def __init__(self, data_dir: Path, garden: Path, instance: DagsterInstance):
        self.storage = PipelineStorage(data_dir=str(data_dir))
        self.garden, self.instance = garden, instance
        self.model = ModelResource(model_name="tiny-random-llava", local_files_only=True, device="cpu")

    def materialize(self, *names: str):
        ops = {
            "folder_photos": {"config": {"root": str(self.garden)}},
            "category_map": {"config": {"source": "folder_photos"}},
            "user_photos": {"config": {"settle_seconds": 0}},
            "flower_shards": {"config": {"num_workers": 1, "min_shards": 1}},
            "trained_model": {"config": TRAIN},
            "model_evaluation": {"config": {"batch_size": 8, "compare_with_base": False, "accuracy_floor": 0.0}},
        }
        result = materialize(ASSETS, selection=list(names), instance=self.instance, raise_on_error=False,
                             resources={"storage": self.storage, "model": self.model,
                                        "tracking": TrackingResource(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])},
                             run_config={"ops": {k: v for k, v in ops.items() if k in names}})
        failures = [str(e.event_specific_data.error) for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert result.success, "\n".join(failures)
        return result


def _metadata(result, name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(name)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, garden):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as env, DagsterInstance.ephemeral() as instance:
            env.setenv("OMP_NUM_THREADS", "1")
            yield Run(tmp_path_factory.mktemp("data"), garden, instance)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first(run):
    return run.materialize("folder_photos", "category_map", "user_photos", "flower_shards", "trained_model",
                           "model_evaluation")


def test_the_graph_trains_and_evaluates_on_an_image_folder(run, first):
    categories = read_category_map(run.storage.category_map_path)
    assert categories.names == CATEGORIES and categories.source == "folder_photos"
    assert categories.question == DEFAULT_QUESTION and categories.allow_new
    meta = _metadata(first, "category_map")
    assert meta["num_categories"] == 3 and meta["new_categories"] == list(CATEGORIES)
    shards = _metadata(first, "flower_shards")
    assert (shards["samples_train"], shards["samples_validation"], shards["samples_test"]) == (12, 3, 3)
    assert read_index(shards["shards_dir"])["categories"]["id_to_name"] == {"0": "fern", "1": "löwenzahn", "2": "moss"}
    evaluation = _metadata(first, "model_evaluation")
    assert evaluation["num_test_images"] == 3
    assert sorted(row.data["name"] for row in evaluation["per_class"].records) == sorted(CATEGORIES)
    checks = {c.check_name: c.passed for c in first.get_asset_check_evaluations()}
    assert checks == {"category_map_complete": True, "shards_integrity": True, "shards_no_leakage": True,
                      "accuracy_floor": True, "no_regression": True, "coverage": True}


@pytest.fixture(scope="module")
def with_new_category(run, first):
    incoming = run.storage.incoming_dir / "Sphagnum"
    for i in range(6):
        _photo(incoming / f"{i}.png", 1000 + i)
    _settled(incoming)
    old_shards = {p.name: p.read_bytes() for p in Path(_metadata(first, "flower_shards")["shards_dir"]).rglob("*.tar")}
    result = run.materialize("user_photos", "flower_shards")
    return result, old_shards


def test_a_new_category_arrives_through_incoming_and_only_its_photos_are_preprocessed(run, with_new_category):
    result, old_shards = with_new_category
    categories = read_category_map(run.storage.category_map_path)
    assert categories.names == CATEGORIES + ("Sphagnum",), "old ids unchanged, the new category appended"
    assert _metadata(result, "user_photos")["new_categories"] == ["Sphagnum"]
    shards = _metadata(result, "flower_shards")
    assert shards["build"] == "incremental", shards["build_reason"]
    assert sum(shards["new_samples"].values()) == 6
    now = {p.name: p.read_bytes() for p in Path(shards["shards_dir"]).rglob("*.tar")}
    assert all(now[name] == data for name, data in old_shards.items()), "existing shard files are reused untouched"
    index = read_index(shards["shards_dir"])
    assert index["categories"]["id_to_name"]["3"] == "Sphagnum"
    assert sum(split["samples"] for split in index["splits"].values()) == 18 + 6
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["shards_integrity"] and checks["shards_no_leakage"]
    assert json.loads(run.storage.category_map_path.read_text())["name_to_id"]["löwenzahn"] == 1
