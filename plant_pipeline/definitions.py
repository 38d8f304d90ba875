"""The Dagster code location: every asset, check and resource of the pipeline.

Resource defaults come from the environment so one code location serves the demo and a real run:
``PLANT_PIPELINE_DATA_DIR`` (default ``data``) and ``PLANT_PIPELINE_MODEL`` (default a small pretrained
LLaVA from the hub; the demo sets ``tiny-random-llava``).
"""

from __future__ import annotations

import os

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from plant_pipeline.defs.assets import evaluation, flowers, shards, training, user_photos
from plant_pipeline.defs.automation import (
    add_user_photos_job,
    full_pipeline_job,
    prepare_data_job,
    retraining_schedule,
    train_and_evaluate_job,
)
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.defs.run_health import dead_run_reaper, health_checked_executor
from plant_pipeline.defs.sensors import incoming_photos_sensor
from plant_pipeline.ml.model.spec import DEFAULT_REAL_MODEL

ASSET_MODULES = [flowers, user_photos, shards, training, evaluation]


def build_definitions(data_dir: str | None = None, model_name: str | None = None) -> Definitions:
    storage = PipelineStorage(data_dir=data_dir or os.environ.get("PLANT_PIPELINE_DATA_DIR", "data"))
    model = ModelResource(model_name=model_name or os.environ.get("PLANT_PIPELINE_MODEL", DEFAULT_REAL_MODEL))
    return Definitions(
        assets=load_assets_from_modules(ASSET_MODULES),
        asset_checks=load_asset_checks_from_modules(ASSET_MODULES),
        resources={"storage": storage, "model": model},
        jobs=[prepare_data_job, add_user_photos_job, train_and_evaluate_job, full_pipeline_job],
        schedules=[retraining_schedule],
        sensors=[incoming_photos_sensor, dead_run_reaper],
        executor=health_checked_executor,  # runs record their worker; dead runs' pool slots are freed
    )


defs = build_definitions()
