"""Resources: where the pipeline keeps its data, and which model it uses.

Both are bound to an environment rather than a run, so they are resources; their defaults come from
environment variables (see definitions.py) and show in the UI's resource tab.
"""

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from plant_pipeline.ml.data import incoming
from plant_pipeline.ml.model.spec import DEFAULT_REAL_MODEL, ModelSpec


class PipelineStorage(ConfigurableResource):
    """The data root: downloads, manifest, shards, checkpoints, models and reports live below it."""

    data_dir: str = Field(default="data", description="Folder for every output of the pipeline (git-ignored).")

    def path(self, *parts: str) -> Path:
        # Absolute, so paths recorded in metadata mean the same thing from any working directory.
        return Path(self.data_dir).resolve().joinpath(*parts)

    @property
    def manifest_path(self) -> Path:
        return self.path("oxford_flowers", "manifest.parquet")

    @property
    def incoming_dir(self) -> Path:
        """Where users drop photos: ``incoming/<category name or 0-based id>/*.jpg``."""
        return self.path(incoming.INCOMING_DIR)

    @property
    def category_map_path(self) -> Path:
        return self.path("category_map.json")

    def shards_dir(self, model_slug: str) -> Path:
        return self.path("shards", model_slug)


class ModelResource(ConfigurableResource):
    """The LLaVA model every step shares: its processor preprocesses, its weights train and evaluate."""

    model_name: str = Field(
        default=DEFAULT_REAL_MODEL,
        description="Hugging Face hub id, a local folder, or 'tiny-random-llava' (built offline, for demos and tests).",
    )
    revision: str | None = Field(default=None, description="Hub revision: branch, tag or commit sha.")
    dtype: str = Field(default="auto", description="auto (bf16 where supported, fp16 on MPS, else fp32), float32, bfloat16, float16.")
    device: str = Field(default="auto", description="auto (cuda, then mps, then cpu), cuda, mps or cpu.")
    local_files_only: bool = Field(default=False, description="Load only from the local Hugging Face cache; never contact the hub.")

    def spec(self, storage: PipelineStorage) -> ModelSpec:
        return ModelSpec(
            model_name=self.model_name,
            revision=self.revision,
            dtype=self.dtype,
            device=self.device,
            local_files_only=self.local_files_only,
            models_dir=str(storage.path("models")),
        )
