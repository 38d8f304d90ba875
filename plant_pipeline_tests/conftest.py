"""Fixtures shared by the whole suite: offline Hugging Face, the real data folder, a tiny model, toy shards."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Nothing in the tests may reach the hub; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Training logs to MLflow by default (report_to="mlflow"); the tests' runs go to a store of the session's own,
# never to MLflow's default (mlflow.db in the working directory).
os.environ.setdefault("MLFLOW_TRACKING_URI",
                      f"sqlite:///{tempfile.mkdtemp(prefix='plant-pipeline-tests-mlflow-')}/mlflow.db")

from plant_pipeline.ml.testing import write_toy_shards  # noqa: E402  (used by the toy_shards fixture)

SHARED_DATASETS_ENV = "PLANT_PIPELINE_SHARED_DATASETS"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real Oxford Flowers folders (see .ci/run); skipped where they are not available."""
    value = os.environ.get(SHARED_DATASETS_ENV)
    if not value:
        pytest.skip(f"{SHARED_DATASETS_ENV} is not set; point it at shared/datasets to run tests on real photos")
    path = Path(value)
    if not (path / "oxford-flowers-102-mini").is_dir():
        pytest.skip(f"{SHARED_DATASETS_ENV}={path} has no oxford-flowers-102-mini folder")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """tiny-random-llava built once per session with save_pretrained."""
    from plant_pipeline.ml.model.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-random-llava")


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory, tiny_processor) -> Path:
    """4 classes of solid colours, 8/2/2 images per class in train/validation/test, 8 samples per shard."""
    return write_toy_shards(tmp_path_factory.mktemp("toy_shards"), tiny_processor)


@pytest.fixture(scope="session")
def twin_builds(tmp_path_factory):
    """Offline twins of the documented real models, each built at most once per session (by hub id)."""
    from plant_pipeline.ml.model.twins import TWINS, build_twin

    root = tmp_path_factory.mktemp("twins")
    built: dict[str, Path] = {}

    def get(real_model: str) -> Path:
        if real_model not in built:
            spec = TWINS[real_model]
            built[real_model] = build_twin(root / spec.folder_name, spec)
        return built[real_model]

    return get
