"""The code location loads and holds the expected assets, lineage, checks, resources and documented config."""

from __future__ import annotations

import inspect

import pytest
from dagster import AssetKey, Config, DefaultSensorStatus, Definitions, validate_run_config

from plant_pipeline.definitions import build_definitions, defs
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.defs.run_health import health_checked_executor

LINEAGE = {
    "oxford_flowers": set(),
    "category_map": {"oxford_flowers"},
    "user_photos": set(),
    "flower_shards": {"oxford_flowers", "category_map", "user_photos"},
    "trained_model": {"flower_shards"},
    "model_evaluation": {"trained_model", "flower_shards"},
}
CHECKS = {
    ("category_map", "category_map_complete"),
    ("flower_shards", "shards_integrity"),
    ("flower_shards", "shards_class_coverage"),
    ("flower_shards", "shards_no_leakage"),
    ("flower_shards", "shards_exactness"),
    ("flower_shards", "shards_quarantine_rate"),
    ("model_evaluation", "accuracy_floor"),
    ("model_evaluation", "no_regression"),
    ("model_evaluation", "coverage"),
}
# Assets whose run config a person sets in the Launchpad.
CONFIGURED = {"oxford_flowers", "user_photos", "flower_shards", "trained_model", "model_evaluation"}


def _config_class(asset_name: str) -> type[Config] | None:
    """The Config class the asset function declares for its ``config`` parameter."""
    fn = defs.resolve_assets_def(AssetKey(asset_name)).op.compute_fn.decorated_fn
    parameter = inspect.signature(fn).parameters.get("config")
    return parameter.annotation if parameter is not None else None


def test_definitions_load():
    Definitions.validate_loadable(defs)
    # Every asset and check in one job: resources and config schemas all resolve.
    assert defs.resolve_implicit_global_asset_job_def() is not None


def test_asset_keys_and_lineage():
    graph = defs.resolve_asset_graph()
    lineage = {key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
               for key in graph.get_all_asset_keys()}
    assert lineage == LINEAGE


def test_asset_groups():
    groups = {spec.key.to_user_string(): spec.group_name for spec in defs.resolve_all_asset_specs()}
    assert groups == {"oxford_flowers": "data", "category_map": "data", "user_photos": "data",
                      "flower_shards": "data", "trained_model": "training", "model_evaluation": "training"}


def test_asset_checks():
    checks = {(key.asset_key.to_user_string(), key.name) for key in defs.resolve_asset_graph().asset_check_keys}
    assert checks == CHECKS


def test_resources():
    assert set(defs.resources) == {"storage", "model"}
    assert isinstance(defs.resources["storage"], PipelineStorage)
    assert isinstance(defs.resources["model"], ModelResource)


def test_every_asset_and_resource_has_a_description():
    for spec in defs.resolve_all_asset_specs():
        assert spec.description, spec.key
    for key in defs.resolve_asset_graph().asset_check_keys:
        spec = defs.resolve_asset_graph().get_check_spec(key)
        assert spec.description, key


@pytest.mark.parametrize("asset_name", sorted(LINEAGE))
def test_every_run_config_field_is_described(asset_name):
    config_class = _config_class(asset_name)
    if asset_name not in CONFIGURED:
        assert config_class is None
        return
    assert issubclass(config_class, Config)
    undocumented = [name for name, f in config_class.model_fields.items() if not (f.description or "").strip()]
    assert not undocumented, f"{config_class.__name__} fields without a description: {undocumented}"
    # The descriptions reach the schema the Launchpad renders.
    schema = defs.resolve_assets_def(AssetKey(asset_name)).op.config_schema.as_field().config_type.fields
    assert set(schema) == set(config_class.model_fields)
    assert all(field.description for field in schema.values())


@pytest.mark.parametrize("resource_class", [PipelineStorage, ModelResource])
def test_every_resource_field_is_described(resource_class):
    undocumented = [name for name, f in resource_class.model_fields.items() if not (f.description or "").strip()]
    assert not undocumented


def test_build_definitions_applies_its_arguments():
    built = build_definitions(data_dir="/tmp/somewhere", model_name="tiny-random-llava")
    assert built.resources["storage"].data_dir == "/tmp/somewhere"
    assert built.resources["model"].model_name == "tiny-random-llava"
    assert set(built.resolve_all_asset_keys()) == {AssetKey(name) for name in LINEAGE}


def test_build_definitions_reads_the_environment(monkeypatch):
    monkeypatch.setenv("PLANT_PIPELINE_DATA_DIR", "/srv/flowers")
    monkeypatch.setenv("PLANT_PIPELINE_MODEL", "some-org/some-llava")
    built = build_definitions()
    assert built.resources["storage"].data_dir == "/srv/flowers"
    assert built.resources["model"].model_name == "some-org/some-llava"
    # Explicit arguments win over the environment.
    assert build_definitions(data_dir="here").resources["storage"].data_dir == "here"


@pytest.mark.parametrize("job_name", ["__ASSET_JOB", "prepare_data", "add_user_photos", "train_and_evaluate",
                                      "full_pipeline"])
def test_every_job_records_its_worker_so_a_killed_run_frees_its_slots(job_name):
    job = defs.resolve_implicit_global_asset_job_def() if job_name == "__ASSET_JOB" else defs.resolve_job_def(job_name)
    assert job.executor_def is health_checked_executor
    # Same config as Dagster's default executor: existing run configs (execution: in_process) still validate.
    assert validate_run_config(job, {"execution": {"config": {"in_process": {}}}, "ops": {}}) is not None


def test_the_dead_run_reaper_runs_by_default():
    sensor = defs.resolve_sensor_def("dead_run_reaper")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    assert not sensor.targets, "housekeeping: it launches nothing"
