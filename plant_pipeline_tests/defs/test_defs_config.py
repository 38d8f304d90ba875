"""config_from_dataclass / to_dataclass: a core dataclass config becomes Launchpad config and back, still validated."""
# No `from __future__ import annotations`: Dagster reads the asset's config annotation at runtime.

from dataclasses import dataclass, field

import pydantic
import pytest
from dagster import Config, MaterializeResult, asset, materialize
from pydantic import Field

from plant_pipeline.defs.config import config_from_dataclass, to_dataclass
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
    workers=(int, Field(default=1, description="Only the Dagster side has this.")),
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
