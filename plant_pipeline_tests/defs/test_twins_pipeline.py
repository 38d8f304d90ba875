"""The whole asset graph through dagster.materialize with each twin of a documented real model, loaded from its
folder as a hub model would be: shards exact to that model's processor, training, evaluation, every check."""

from __future__ import annotations

import pytest
import torch
from dagster import AssetKey, DagsterInstance

from plant_pipeline.defs.resources import ModelResource
from plant_pipeline.ml.data.demo_release import make_demo_release
from plant_pipeline.ml.model.twins import TWINS
from plant_pipeline.ml.shards.format import read_index
from plant_pipeline_tests.defs.test_assets_pipeline import ALL_CHECKS, ASSET_NAMES, Pipeline

STEPS = 4


def _metadata(result, asset_name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset_name)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_demo_release(tmp_path_factory.mktemp("release"), train_per_class=1, validation_per_class=1,
                             test_per_class=1, image_size=48)


# A whole graph per twin (~40 s each on 2 cores): `pytest -m slow`, keeping `make test` under 10 minutes;
# model/test_twins.py covers each twin's processor, training and ranking in the default run.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=sorted(TWINS), ids=lambda name: name.split("/")[-1])
def twin_run(request, release, twin_builds, tmp_path_factory):
    """One full materialisation with one twin; (hub id, result)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as env, DagsterInstance.ephemeral() as instance:
            env.setenv("OMP_NUM_THREADS", "1")
            pipeline = Pipeline(tmp_path_factory.mktemp("data"), release.out_dir, instance)
            pipeline.model = ModelResource(model_name=str(twin_builds(request.param)), local_files_only=True,
                                           device="cpu")
            result = pipeline.materialize(train={"max_steps": STEPS, "save_steps": STEPS, "eval_steps": STEPS,
                                                 "max_eval_samples": 16},
                                          evaluation={"compare_with_base": False})
            failures = [str(e.event_specific_data.error) for e in result.all_events
                        if e.event_type_value == "STEP_FAILURE"]
            assert result.success, "\n".join(failures)
            yield request.param, result
    finally:
        torch.set_num_threads(threads)


def test_every_asset_and_check_passes_with_the_twin(twin_run):
    _, result = twin_run
    assert {e.asset_key.path[-1] for e in result.get_asset_materialization_events()} == set(ASSET_NAMES)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert set(checks) == ALL_CHECKS
    assert not {name: c.metadata for name, c in checks.items() if not c.passed}


def test_shards_hold_the_twins_geometry_and_image_tokens(twin_run):
    real_model, result = twin_run
    index = read_index(_metadata(result, "flower_shards")["shards_dir"])
    spec = TWINS[real_model]
    assert tuple(index["pixel_shape"]) == (3, spec.image_size, spec.image_size)
    assert index["num_image_tokens"] == spec.image_seq_length


def test_training_learns_and_evaluation_scores_every_class(twin_run):
    _, result = twin_run
    trained = _metadata(result, "trained_model")
    assert trained["steps"] == STEPS
    assert trained["final_validation_loss"] < trained["initial_validation_loss"]
    evaluation = _metadata(result, "model_evaluation")
    assert evaluation["num_test_images"] == 102 and len(evaluation["per_class"].records) == 102
    assert evaluation["model_path"] == trained["model_path"]

