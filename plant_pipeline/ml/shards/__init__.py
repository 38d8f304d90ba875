"""Stage 2: shards. Images and prompts preprocessed with the model's own processor, validated, and written
as WebDataset tar shards per split with an index; the checks that re-read them.

Exported: what the Dagster layer and the benchmarks use. Modules inside this package import each other by
full module path, never through here.
"""

from plant_pipeline.ml.shards.build import ShardConfig, ShardsResult, build_shards
from plant_pipeline.ml.shards.checks import (
    CheckOutcome,
    check_class_coverage,
    check_exactness,
    check_integrity,
    check_no_leakage,
    check_quarantine_rate,
)
from plant_pipeline.ml.shards.errors import ShardBuildError, ShardInputError
from plant_pipeline.ml.shards.format import (
    IGNORE_INDEX,
    INDEX_FILE,
    Sample,
    ShardFormatError,
    ShardIndex,
    make_index,
    read_categories,
    read_index,
    shard_entry,
    split_entry,
    split_shard_paths,
    write_index,
)
from plant_pipeline.ml.shards.pixels import PixelNormalizer, resize_and_crop
from plant_pipeline.ml.shards.preview import preview_grid
from plant_pipeline.ml.shards.prompts import QUESTION, answer_text, conversation

__all__ = [
    "IGNORE_INDEX",
    "INDEX_FILE",
    "QUESTION",
    "CheckOutcome",
    "PixelNormalizer",
    "Sample",
    "ShardBuildError",
    "ShardConfig",
    "ShardFormatError",
    "ShardIndex",
    "ShardInputError",
    "ShardsResult",
    "answer_text",
    "build_shards",
    "check_class_coverage",
    "check_exactness",
    "check_integrity",
    "check_no_leakage",
    "check_quarantine_rate",
    "conversation",
    "make_index",
    "preview_grid",
    "read_categories",
    "read_index",
    "resize_and_crop",
    "shard_entry",
    "split_entry",
    "split_shard_paths",
    "write_index",
]
