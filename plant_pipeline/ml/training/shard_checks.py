"""The shards a run trains on, checked before the model loads: every file's size and sha256 against
index.json, and each split's sample count."""

from __future__ import annotations

from pathlib import Path

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import sha256_file
from plant_pipeline.ml.training.config import TrainConfigError


class ShardIntegrityError(UsageError):
    """A shard file that is missing or differs from what the shard index recorded; raised before the model loads."""


def verify_shards(shards_dir: Path, index: dict, splits: tuple[str, ...] = ("train", "validation")) -> int:
    """Every shard of ``splits`` exists with the size and sha256 that index.json recorded; returns the bytes read.

    Raises ShardIntegrityError on the first that does not: training on a damaged shard would fail mid-run or,
    worse, learn from garbage. Sizes are compared before any hashing.
    """
    shards = [shard for split in splits for shard in index["splits"].get(split, {}).get("shards", [])]
    advice = "rematerialise flower_shards (the shards_integrity check names every damaged file)"
    for shard in shards:
        path = shards_dir / shard["file"]
        if not path.is_file():
            raise ShardIntegrityError(f"shard {path} is missing (listed in {shards_dir}/index.json); {advice}")
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise ShardIntegrityError(
                f"shard {path} has {size} bytes, index.json expects {shard['bytes']}; {advice}")
    total = 0
    for shard in shards:
        path = shards_dir / shard["file"]
        expected = shard.get("sha256")
        if not expected:
            raise ShardIntegrityError(f"{shards_dir}/index.json records no sha256 for {shard['file']}; {advice}")
        actual = sha256_file(path)
        total += path.stat().st_size
        if actual != expected:
            raise ShardIntegrityError(
                f"shard {path} has sha256 {actual}, index.json expects {expected}: the file changed after it "
                f"was written; {advice}")
    return total


def split_samples(index: dict, split: str, shards_dir: Path) -> int:
    """The sample count index.json records for ``split``; TrainConfigError when it has no such split."""
    if split not in index["splits"]:
        raise TrainConfigError(f"{shards_dir}/index.json has no {split!r} split; it has {sorted(index['splits'])}")
    return int(index["splits"][split]["samples"])
