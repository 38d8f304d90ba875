"""Fixtures the training tests share: one torch thread, and the tiny model as a ModelSpec on the CPU."""

from __future__ import annotations

import pytest
import torch

from plant_pipeline.ml.model import ModelSpec


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny model's matmuls gain nothing from threads; on a busy 2-core machine OpenMP spin-waiting made
    # two threads ~10x slower than one. Restored after each module.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec(model_name=str(tiny_model_dir), device="cpu", local_files_only=True)
