"""Fixtures of the shard tests: the folder of awkward images and one build of it, once per test module."""

from __future__ import annotations

import pytest

from plant_pipeline_tests.shards.flower_folder import build_flowers, make_flower_folder


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """(dataset root, manifest) of the awkward images."""
    root = tmp_path_factory.mktemp("flowers")
    return root, make_flower_folder(root)


@pytest.fixture(scope="module")
def built(flowers, tiny_model_dir, tmp_path_factory):
    """One build through a real process pool (two shards per split), shared by read-only tests."""
    out = tmp_path_factory.mktemp("shards")
    return build_flowers(flowers, tiny_model_dir, out, num_workers=2, min_shards=2)
