"""The code location loads and holds the expected assets, lineage, checks, jobs, schedules, sensors, resources
and documented config."""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    Config,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    validate_run_config,
)

from plant_pipeline import definitions
from plant_pipeline.defs.automation import RETRAIN_CRON, RETRAIN_CRON_ENV
from plant_pipeline.defs.resources import (
    DATA_DIR_ENV,
    MODEL_ENV,
    ModelResource,
    PipelineStorage,
)
from plant_pipeline.defs.run_health import health_checked_executor
from plant_pipeline.ml.model import DEFAULT_REAL_MODEL, ModelSpec

defs = definitions.defs()
REPO = Path(__file__).resolve().parents[2]
DG = shutil.which("dg", path=str(Path(sys.executable).parent))

LINEAGE = {
    "oxford_flowers": set(),
    "folder_photos": set(),
    "hf_dataset_photos": set(),
    "category_map": {"oxford_flowers", "folder_photos", "hf_dataset_photos"},
    "user_photos": {"category_map"},
    "flower_shards": {"category_map", "user_photos"},
    "trained_model": {"flower_shards"},
    "model_evaluation": {"trained_model", "flower_shards"},
    "production_model": {"model_evaluation"},
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
JOBS = {"prepare_data", "add_user_photos", "train_and_evaluate", "full_pipeline"}
SCHEDULES = {"retraining_schedule"}
SENSORS = {"incoming_photos_sensor", "dead_run_reaper", "default_automation_condition_sensor"}
# Assets whose run config a person sets in the Launchpad.
CONFIGURED = {"oxford_flowers", "folder_photos", "hf_dataset_photos", "category_map", "user_photos",
              "flower_shards", "trained_model", "model_evaluation", "production_model"}


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
    assert groups == {"oxford_flowers": "data", "folder_photos": "data", "hf_dataset_photos": "data",
                      "category_map": "data", "user_photos": "data",
                      "flower_shards": "data", "trained_model": "training", "model_evaluation": "training",
                      "production_model": "serving"}


def test_asset_checks():
    checks = {(key.asset_key.to_user_string(), key.name) for key in defs.resolve_asset_graph().asset_check_keys}
    assert checks == CHECKS


def test_resources():
    assert set(defs.resources) == {"storage", "model", "tracking"}
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


def test_jobs_schedules_and_sensors():
    assert {job.name for job in defs.resolve_all_job_defs()} == JOBS | {"__ASSET_JOB"}
    assert {schedule.name for schedule in defs.schedules} == SCHEDULES
    assert {sensor.name for sensor in defs.sensors} == SENSORS
    schedule = defs.resolve_schedule_def("retraining_schedule")
    assert (schedule.cron_schedule, schedule.default_status) == (RETRAIN_CRON, DefaultScheduleStatus.STOPPED)


def test_the_code_location_is_a_lazy_definitions_function():
    # Loaders call it: importing plant_pipeline.definitions builds nothing and reads no environment.
    assert callable(definitions.defs) and not isinstance(definitions.defs, Definitions)
    assert isinstance(defs, Definitions)


def _resolved(resource):
    """The resource as a run sees it: EnvVar fields read from the environment."""
    return resource.process_config_and_initialize()


def test_resources_default_to_data_and_the_real_model(monkeypatch):
    for name in (DATA_DIR_ENV, MODEL_ENV, RETRAIN_CRON_ENV):
        monkeypatch.delenv(name, raising=False)
    built = definitions.defs()
    assert _resolved(built.resources["storage"]).data_dir == "data"
    assert _resolved(built.resources["model"]).model_name == DEFAULT_REAL_MODEL
    assert built.resolve_schedule_def("retraining_schedule").cron_schedule == RETRAIN_CRON


def test_the_environment_binds_resources_through_env_vars_and_sets_the_cron(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, "/srv/flowers")
    monkeypatch.setenv(MODEL_ENV, "some-org/some-llava")
    monkeypatch.setenv(RETRAIN_CRON_ENV, "15 4 * * *")
    built = definitions.defs()
    storage, model = built.resources["storage"], built.resources["model"]
    # Bound to the variable, not to its value, so the UI's resource tab names the variable...
    assert storage.data_dir == DATA_DIR_ENV and model.model_name == MODEL_ENV
    # ...and a run reads it.
    assert _resolved(storage).data_dir == "/srv/flowers"
    assert _resolved(model).model_name == "some-org/some-llava"
    assert built.resolve_schedule_def("retraining_schedule").cron_schedule == "15 4 * * *"


def test_model_resource_is_generated_from_model_spec(tmp_path):
    spec_fields = {f.name: f for f in dataclasses.fields(ModelSpec)}
    # models_dir follows the storage, so it is not a setting of its own.
    assert set(ModelResource.model_fields) == set(spec_fields) - {"models_dir"}
    for name, field in ModelResource.model_fields.items():
        assert field.default == spec_fields[name].default, name
        assert field.description == spec_fields[name].metadata["help"], name
    resource = ModelResource(model_name="tiny-random-llava", device="cpu", local_files_only=True)
    spec = resource.spec(PipelineStorage(data_dir=str(tmp_path)))
    assert spec == ModelSpec(model_name="tiny-random-llava", device="cpu", local_files_only=True,
                             models_dir=str(tmp_path.resolve() / "models"))


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


@pytest.mark.slow
@pytest.mark.skipif(DG is None, reason="needs dagster-dg-cli (pip install -e '.[dev]')")
def test_dg_finds_and_loads_the_project():
    """[tool.dg] in pyproject.toml: `dg check defs` loads this code location, and `dg dev` starts from it."""
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parents[1])}
    done = subprocess.run([DG, "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr
    assert subprocess.run([DG, "dev", "--help"], cwd=REPO, capture_output=True, timeout=120).returncode == 0
