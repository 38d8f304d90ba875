"""The errors a shard build raises; the sample, pixel and format errors live beside the code that raises them."""

from __future__ import annotations

from plant_pipeline.ml.errors import PlantPipelineError, UsageError


class ShardInputError(UsageError):
    """The manifest, dataset folder, processor or config cannot produce shards; raised before any work starts."""


class ShardBuildError(PlantPipelineError, RuntimeError):
    """The build stopped midway (a worker died or raised); the previous shards are left as they were."""
