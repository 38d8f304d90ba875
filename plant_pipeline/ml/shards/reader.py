"""Reading shards back member by member with tarfile, for the checks and the UI preview.

Unlike the training stream (webdataset), a reader here can skip the pixel data of every member it does not
need, and it reports a shard that cannot be read instead of stopping.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from plant_pipeline.ml.shards.format import META, Sample, ShardIndex, decode_sample


def _split_member(name: str) -> tuple[str, str]:
    key, _, member = name.partition(".")
    return key, member


def iter_shard(path: Path, wanted: Callable[[str, str], bool]) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, member, data) for every member of a tar shard; data is read only where ``wanted(key, member)``."""
    with tarfile.open(path, "r:") as archive:
        for info in archive:
            if not info.isfile():
                continue
            key, member = _split_member(info.name)
            data = archive.extractfile(info).read() if wanted(key, member) else None
            yield key, member, data


def shard_metas(path: Path) -> Iterator[tuple[str, dict]]:
    """(key, meta) per sample, skipping over the pixel data."""
    for key, member, data in iter_shard(path, lambda _key, member: member == META):
        if member == META:
            yield key, json.loads(data)


def read_samples(path: Path, keys: set[str] | None = None) -> Iterator[Sample]:
    """Samples of one shard in order (only ``keys`` when given), decoded with the format's own decoder.

    A sample's members are contiguous, so each is yielded as soon as the next key starts.
    """
    raw: dict | None = None
    for key, member, data in iter_shard(path, lambda key, _member: keys is None or key in keys):
        if data is None:
            continue
        if raw is not None and raw["__key__"] != key:
            yield decode_sample(raw)
            raw = None
        raw = raw or {"__key__": key, "__url__": str(path)}
        raw[member] = data
    if raw is not None:
        yield decode_sample(raw)


# Errors reading a shard that is missing, truncated or not a tar: a check reports them, it never raises them.
READ_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)


def read_problem(file: str, err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return f"{file}: missing"
    return f"{file}: not a readable shard ({type(err).__name__}: {err})"


def all_metas(shards_dir: Path, index: ShardIndex) -> tuple[dict[str, list[tuple[Path, str, dict]]], list[str]]:
    """(split -> (shard path, key, meta) of every readable sample, a problem per shard that cannot be read)."""
    metas: dict[str, list[tuple[Path, str, dict]]] = {}
    unreadable: list[str] = []
    for split, info in index["splits"].items():
        metas[split] = []
        for shard in info["shards"]:
            path = shards_dir / shard["file"]
            try:
                metas[split].extend((path, key, meta) for key, meta in list(shard_metas(path)))
            except READ_ERRORS as err:
                unreadable.append(read_problem(shard["file"], err))
    return metas, unreadable
