"""config_from_dataclass / to_dataclass: a core dataclass config becomes Launchpad config and back, still validated;
with_run_config_defaults: the environment's run config (PLANT_PIPELINE_RUN_CONFIG) as a config's defaults."""
# No `from __future__ import annotations`: Dagster reads the asset's config annotation at runtime.

import os
from dataclasses import dataclass, field
from pathlib import Path

import pydantic
import pytest
from dagster import Config, MaterializeResult, asset, config_from_files, materialize
from pydantic import Field

from plant_pipeline.defs.config import config_from_dataclass, to_dataclass
from plant_pipeline.defs.resources import (
    RUN_CONFIG_ENV,
    RunConfigDefaultsError,
    run_config_defaults,
    with_run_config_defaults,
)
from plant_pipeline.ml.training.run import TrainConfig, TrainConfigError


class KnobsError(ValueError):
    pass


@dataclass
class Knobs:
    label: str = field(metadata={"help": "A name; required."})
    steps: int = field(default=3, metadata={"help": "How many steps, at least 1."})
    names: list[str] = field(default_factory=lambda: ["a", "b"], metadata={"help": "Some names."})
    rate: float | None = field(default=None, metadata={"help": "An optional rate."})
    quiet: bool = False  # no help

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise KnobsError(f"steps must be >= 1; got {self.steps}")


KnobsConfig = config_from_dataclass(
    "KnobsConfig", Knobs, "Knobs for a test.",
    workers=(int, Field(default=1, gt=0, description="Only the Dagster side has this.")),
)


def test_one_config_field_per_dataclass_field_plus_extras():
    assert issubclass(KnobsConfig, Config)
    assert KnobsConfig.__name__ == "KnobsConfig" and KnobsConfig.__doc__ == "Knobs for a test."
    assert list(KnobsConfig.model_fields) == ["label", "steps", "names", "rate", "quiet", "workers"]


def test_descriptions_come_from_the_help_metadata():
    fields = KnobsConfig.model_fields
    assert fields["label"].description == "A name; required."
    assert fields["names"].description == "Some names."
    assert fields["workers"].description == "Only the Dagster side has this."
    assert not fields["quiet"].description
    # ...and reach the schema the Launchpad renders.
    schema = KnobsConfig.to_config_schema().as_field().config_type.fields
    assert schema["steps"].description == "How many steps, at least 1."


def test_defaults_and_required_fields():
    config = KnobsConfig(label="x")
    assert (config.steps, config.names, config.rate, config.quiet, config.workers) == (3, ["a", "b"], None, False, 1)
    assert KnobsConfig.model_fields["label"].is_required()
    assert not any(f.is_required() for name, f in KnobsConfig.model_fields.items() if name != "label")
    with pytest.raises(pydantic.ValidationError, match="label"):
        KnobsConfig()


def test_default_factory_gives_each_config_its_own_list():
    first, second = KnobsConfig(label="x"), KnobsConfig(label="y")
    assert first.names == ["a", "b"] and first.names is not second.names


def test_round_trip_to_the_dataclass_drops_dagster_only_fields():
    config = KnobsConfig(label="x", steps=5, names=["c"], rate=0.5, quiet=True, workers=4)
    assert to_dataclass(Knobs, config) == Knobs(label="x", steps=5, names=["c"], rate=0.5, quiet=True)
    assert to_dataclass(Knobs, config, steps=9).steps == 9


def test_dataclass_validation_still_fires():
    config = KnobsConfig(label="x", steps=0)  # the type is right, so the Config accepts it...
    with pytest.raises(KnobsError, match="steps must be >= 1; got 0"):
        to_dataclass(Knobs, config)  # ...and the dataclass rejects it


def test_train_config_round_trip_and_validation():
    train_config = config_from_dataclass("TrainedModelConfig", TrainConfig, "doc")
    assert to_dataclass(TrainConfig, train_config()) == TrainConfig()
    assert to_dataclass(TrainConfig, train_config(max_steps=7, lora_target_modules=["q_proj"])).max_steps == 7
    with pytest.raises(TrainConfigError, match="max_steps must be a positive integer"):
        to_dataclass(TrainConfig, train_config(max_steps=0))
    with pytest.raises(TrainConfigError, match="lr_scheduler_type"):
        to_dataclass(TrainConfig, train_config(lr_scheduler_type="sideways"))


def test_generated_config_works_as_asset_run_config():
    @asset
    def knobs(config: KnobsConfig) -> MaterializeResult:
        return MaterializeResult(metadata={"knobs": repr(to_dataclass(Knobs, config))})

    result = materialize([knobs], run_config={"ops": {"knobs": {"config": {"label": "x", "steps": 2}}}})
    assert result.success
    [event] = result.get_asset_materialization_events()
    assert event.materialization.metadata["knobs"].value == repr(Knobs(label="x", steps=2))

    invalid = materialize([knobs], run_config={"ops": {"knobs": {"config": {"label": "x", "steps": 0}}}},
                          raise_on_error=False)
    assert not invalid.success
    [failure] = [e for e in invalid.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "steps must be >= 1" in str(failure.event_specific_data.error)


# ---- PLANT_PIPELINE_RUN_CONFIG: the environment's run config as the assets' config defaults (make dev) --------

REPO = Path(__file__).resolve().parents[2]


def _point_at(monkeypatch, *files) -> None:
    monkeypatch.setenv(RUN_CONFIG_ENV, os.pathsep.join(str(f) for f in files))


def test_run_config_files_become_the_config_defaults_the_later_file_winning(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("ops:\n  knobs:\n    config: {steps: 5, names: [x]}\n  other: {config: {n: 1}}\n")
    (tmp_path / "b.yaml").write_text("ops:\n  knobs:\n    config: {steps: 7}\n")
    _point_at(monkeypatch, tmp_path / "a.yaml", tmp_path / "b.yaml")
    config_cls = with_run_config_defaults(KnobsConfig, "knobs")
    assert config_cls.__name__ == "KnobsConfig" and issubclass(config_cls, KnobsConfig)
    assert (config_cls(label="x").steps, config_cls(label="x").names, config_cls(label="x").rate) == (7, ["x"], None)
    assert config_cls.model_fields["steps"].description == "How many steps, at least 1."
    with pytest.raises(pydantic.ValidationError, match="workers"):
        config_cls(label="x", workers=0)  # the fields' constraints stay

    # An asset declared with it runs on those defaults without any run config; a run's config still wins.
    @asset
    def knobs(config: config_cls) -> MaterializeResult:
        return MaterializeResult(metadata={"steps": config.steps})

    def steps(run_config) -> int:
        [event] = materialize([knobs], run_config=run_config).get_asset_materialization_events()
        return event.materialization.metadata["steps"].value

    assert steps({"ops": {"knobs": {"config": {"label": "x"}}}}) == 7
    assert steps({"ops": {"knobs": {"config": {"label": "x", "steps": 2}}}}) == 2


def test_without_the_variable_or_values_the_class_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_CONFIG_ENV, raising=False)
    assert with_run_config_defaults(KnobsConfig, "knobs") is KnobsConfig
    (tmp_path / "a.yaml").write_text("ops:\n  other: {config: {n: 1}}\n")
    _point_at(monkeypatch, tmp_path / "a.yaml")
    assert with_run_config_defaults(KnobsConfig, "knobs") is KnobsConfig


@pytest.mark.parametrize("text, message", [
    ("ops:\n  knobs: {config: {stepz: 5}}\n", r"sets \['stepz'\], which knobs's config does not have"),
    ("ops:\n  knobs: {config: {steps: many}}\n", r"steps: .*many"),
    ("ops:\n  knobs: {config: {workers: 0}}\n", r"workers: .*greater than 0"),  # the field's constraint holds
])
def test_a_wrong_key_or_value_is_named_when_the_code_location_loads(tmp_path, monkeypatch, text, message):
    (tmp_path / "a.yaml").write_text(text)
    _point_at(monkeypatch, tmp_path / "a.yaml")
    with pytest.raises(RunConfigDefaultsError, match=message) as error:
        with_run_config_defaults(KnobsConfig, "knobs")
    assert RUN_CONFIG_ENV in str(error.value) and str(tmp_path / "a.yaml") in str(error.value)


def test_a_missing_file_says_how_to_write_it(tmp_path, monkeypatch):
    _point_at(monkeypatch, tmp_path / "gone.yaml")
    with pytest.raises(RunConfigDefaultsError, match="gone.yaml.*do not exist.*make demo"):
        with_run_config_defaults(KnobsConfig, "knobs")


def test_the_demo_run_config_fits_every_asset_it_configures(monkeypatch):
    # What `make dev` sets after `make demo`: each value must be a field of that asset's config.
    from plant_pipeline.defs.assets.evaluation import ModelEvaluationConfig
    from plant_pipeline.defs.assets.flowers import OxfordFlowersConfig
    from plant_pipeline.defs.assets.shards import FlowerShardsConfig
    from plant_pipeline.defs.assets.training import TrainedModelConfig

    classes = {"oxford_flowers": OxfordFlowersConfig, "flower_shards": FlowerShardsConfig,
               "trained_model": TrainedModelConfig, "model_evaluation": ModelEvaluationConfig}
    demo = REPO / "config" / "demo.yaml"
    _point_at(monkeypatch, demo)
    unknown = set(config_from_files([str(demo)])["ops"]) - set(classes)
    assert not unknown, f"config/demo.yaml configures {unknown}: add their config classes here"
    for op, config_cls in classes.items():
        defaults = with_run_config_defaults(config_cls, op)
        assert defaults is not config_cls
        for name, value in run_config_defaults(op).items():
            assert defaults.model_fields[name].default == value, (op, name)
