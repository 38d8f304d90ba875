"""Resources: where the pipeline keeps its data, which model it uses, and where it logs its experiments; and the
environment's run-config defaults.

All are bound to an environment rather than a run, so they are resources. The code location binds them in
``resources()`` below: to ``PLANT_PIPELINE_DATA_DIR``, ``PLANT_PIPELINE_MODEL``, ``MLFLOW_TRACKING_URI`` and
``MLFLOW_EXPERIMENT_NAME`` through ``dagster.EnvVar`` where those are set (the UI's resource tab then names the
variable), else to the defaults.

``PLANT_PIPELINE_RUN_CONFIG`` names run-config files whose values become the defaults of the assets' config
(``with_run_config_defaults``): what ``make dev`` sets after ``make demo``, so every launch in that UI (the
Launchpad, *Materialize all*, sensors, the schedule, automation) runs on the demo's data and settings.
"""

import os
from pathlib import Path

import pydantic
from dagster import Config, ConfigurableResource, Definitions, EnvVar, config_from_files, definitions
from pydantic import ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from plant_pipeline.defs.config import config_from_dataclass, to_dataclass
from plant_pipeline.ml.data import DATASET_MANIFEST, INCOMING_DIR, OXFORD_MANIFEST
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.model import DEFAULT_REAL_MODEL, ModelSpec
from plant_pipeline.ml.training import (
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    TRACKING_URI_ENV,
    TrackingSettings,
    local_store_uri,
)

DATA_DIR_ENV = "PLANT_PIPELINE_DATA_DIR"
MODEL_ENV = "PLANT_PIPELINE_MODEL"
RUN_CONFIG_ENV = "PLANT_PIPELINE_RUN_CONFIG"
DEFAULT_DATA_DIR = "data"


class RunConfigDefaultsError(UsageError):
    """A file named by PLANT_PIPELINE_RUN_CONFIG that is missing, or sets a field an asset does not have."""


def run_config_files() -> list[str]:
    """The files ``PLANT_PIPELINE_RUN_CONFIG`` names (separated by ``os.pathsep``), in order; [] when unset."""
    return [part for part in os.environ.get(RUN_CONFIG_ENV, "").split(os.pathsep) if part.strip()]


def run_config_defaults(op: str) -> dict:
    """``op``'s config in the files ``PLANT_PIPELINE_RUN_CONFIG`` names, merged as ``-c a.yaml -c b.yaml`` merges
    them (the later winning); {} when the variable is unset or the files do not configure ``op``."""
    files = run_config_files()
    if not files:
        return {}
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise RunConfigDefaultsError(
            f"{RUN_CONFIG_ENV} names {missing}, which do not exist; expected run-config YAML files separated by "
            f"{os.pathsep!r}. Run `make demo` again to write the demo's, or unset {RUN_CONFIG_ENV}.")
    return dict(((config_from_files(files).get("ops") or {}).get(op) or {}).get("config") or {})


def with_run_config_defaults(config_cls: type[Config], op: str) -> type[Config]:
    """``config_cls`` with ``op``'s values in ``PLANT_PIPELINE_RUN_CONFIG``'s files as its field defaults.

    Called where the asset's config class is declared, so the defaults hold when the code location loads (the
    config schema is fixed when the asset is decorated) and in every run it launches, which loads the code in the
    same environment. Without the variable, or values for ``op``, ``config_cls`` itself. A run's own config still
    wins over these defaults.
    """
    values = run_config_defaults(op)
    if not values:
        return config_cls
    fields = config_cls.model_fields
    source = f"{RUN_CONFIG_ENV} ({os.pathsep.join(run_config_files())}), ops.{op}.config"
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RunConfigDefaultsError(f"{source} sets {unknown}, which {op}'s config does not have; it has "
                                     f"{sorted(fields)}. Fix or remove those keys.")
    # Each field keeps its type, description and constraints; only its default changes.
    overrides = {name: (fields[name].annotation, FieldInfo.merge_field_infos(fields[name], default=value,
                                                                             default_factory=None))
                 for name, value in values.items()}
    try:  # the new defaults alone, checked as values would be (pydantic does not check defaults otherwise)
        create_model(f"{config_cls.__name__}Defaults", __config__=ConfigDict(validate_default=True), **overrides)()
    except pydantic.ValidationError as error:
        shown = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                          for e in error.errors())
        raise RunConfigDefaultsError(f"{source}: {shown}. Fix those values.") from None
    return create_model(config_cls.__name__, __base__=config_cls, __doc__=config_cls.__doc__,
                        __module__=config_cls.__module__, **overrides)


class PipelineStorage(ConfigurableResource):
    """The data root: downloads, manifest, shards, checkpoints, models and reports live below it."""

    data_dir: str = Field(default=DEFAULT_DATA_DIR,
                          description="Folder for every output of the pipeline (git-ignored).")

    def path(self, *parts: str) -> Path:
        # Absolute, so paths recorded in metadata mean the same thing from any working directory.
        return Path(self.data_dir).resolve().joinpath(*parts)

    @property
    def manifest_path(self) -> Path:
        """The Oxford release's manifest (labels are Oxford's ids)."""
        return self.path(OXFORD_MANIFEST)

    def source_dir(self, source: str) -> Path:
        """Where a source other than Oxford keeps its manifest, its categories and any exported images."""
        return self.path("sources", source)

    @property
    def dataset_manifest_path(self) -> Path:
        """The chosen source's manifest with labels as category_map.json's ids: what the shards are built from
        (with the photos taken in from incoming/)."""
        return self.path(DATASET_MANIFEST)

    @property
    def incoming_dir(self) -> Path:
        """Where users drop photos: ``incoming/<category name or 0-based id>/*.jpg``."""
        return self.path(INCOMING_DIR)

    @property
    def category_map_path(self) -> Path:
        return self.path("category_map.json")

    def shards_dir(self, model_slug: str) -> Path:
        return self.path("shards", model_slug)


class ModelSpecResource(ConfigurableResource):
    """What ModelResource does; its fields are ModelSpec's, generated below."""

    def spec(self, storage: PipelineStorage) -> ModelSpec:
        return to_dataclass(ModelSpec, self, models_dir=str(storage.path("models")))


# models_dir is not a setting of its own: the tiny model is built under the storage's data root.
ModelResource = config_from_dataclass(
    "ModelResource", ModelSpec,
    "The LLaVA model every step shares: its processor preprocesses, its weights train and evaluate.",
    base=ModelSpecResource, exclude=("models_dir",),
)


class TrackingResource(ConfigurableResource):
    """Where training runs and evaluations are logged when a run's report_to is mlflow (MLflow)."""

    tracking_uri: str = Field(default="", description=(
        "MLflow tracking URI, e.g. a team's server http://mlflow.example.org:5000. Empty: a local store under the "
        "data folder (<data>/mlflow/mlflow.db, artifacts in <data>/mlflow/artifacts); nothing to start."))
    experiment_name: str = Field(default=DEFAULT_EXPERIMENT, description=(
        "MLflow experiment the runs go to (created on first use)."))

    def settings(self, storage: PipelineStorage, **tags: str) -> TrackingSettings:
        """The core's settings, with ``tags`` for the MLflow run (the Dagster run id, for one)."""
        return TrackingSettings(tracking_uri=self.tracking_uri or local_store_uri(storage.path("mlflow")),
                                experiment_name=self.experiment_name, tags=tags)


def from_environment(name: str, default: str) -> str:
    """``EnvVar(name)`` where the variable is set, so the UI shows where the value comes from; else ``default``."""
    return EnvVar(name) if name in os.environ else default


@definitions
def resources() -> Definitions:
    # Read when the code location loads, not at import: tests and tools import this module freely.
    return Definitions(resources={
        "storage": PipelineStorage(data_dir=from_environment(DATA_DIR_ENV, DEFAULT_DATA_DIR)),
        "model": ModelResource(model_name=from_environment(MODEL_ENV, DEFAULT_REAL_MODEL)),
        "tracking": TrackingResource(tracking_uri=from_environment(TRACKING_URI_ENV, ""),
                                     experiment_name=from_environment(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)),
    })
