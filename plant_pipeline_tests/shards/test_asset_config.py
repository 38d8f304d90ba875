"""flower_shards' Launchpad config is generated from the core ShardConfig, so the two cannot disagree."""

from __future__ import annotations

import dataclasses

import pytest

from plant_pipeline.defs.assets.shards import FlowerShardsConfig
from plant_pipeline.defs.config import to_dataclass
from plant_pipeline.ml.shards import ShardConfig, ShardInputError


def test_launchpad_fields_are_the_core_fields_with_their_defaults_and_help():
    core = {f.name: f for f in dataclasses.fields(ShardConfig)}
    launchpad = FlowerShardsConfig.model_fields
    assert set(launchpad) == set(core)
    for name, field in core.items():
        assert launchpad[name].default == field.default, name
        assert launchpad[name].description == field.metadata["help"] and field.metadata["help"], name


def test_min_shards_defaults_to_four_in_both():
    # Four shards per split: a trainer with 2 ranks x 2 data-loader workers has one each.
    assert ShardConfig().min_shards == 4 == FlowerShardsConfig().min_shards


def test_a_run_config_becomes_the_core_config():
    config = to_dataclass(ShardConfig, FlowerShardsConfig(min_shards=2, max_shard_mb=0.5, num_workers=1))
    assert config == ShardConfig(min_shards=2, max_shard_mb=0.5, num_workers=1)
    assert config.max_shard_bytes == 2**19
    assert to_dataclass(ShardConfig, FlowerShardsConfig()) == ShardConfig()
    with pytest.raises(ShardInputError, match="min_shards must be an integer >= 1"):
        to_dataclass(ShardConfig, FlowerShardsConfig(min_shards=0))
