"""Stream decoded samples out of WebDataset shards, for the trainer and the evaluator.

One pipeline: seeded shard order per epoch -> split by rank -> split by DataLoader worker -> tar members
-> seeded shuffle buffer -> decode_sample. Only the shuffle buffer is held in memory, whatever the data size.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

import webdataset as wds
from webdataset.utils import pytorch_worker_info

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.shards.format import decode_sample

logger = logging.getLogger(__name__)


class StreamConfigError(UsageError):
    """A stream that cannot give every reader (rank x worker) its own shards."""


def _seed(*parts: int) -> int:
    # Integers only: str hashes differ between processes, and every rank must agree on the shard order.
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) & 0x7FFFFFFF
    return value


def _shard_epochs(urls: tuple[str, ...], shuffle: bool, seed: int, epochs: int | None) -> Iterator[dict]:
    """The shard list ``epochs`` times (forever when None), reshuffled each time with the same seed everywhere.

    Every rank and worker generates the identical sequence and then takes its own slice of it, so the
    readers never overlap within an epoch and need no communication.
    """
    for epoch in itertools.count() if epochs is None else range(epochs):
        order = list(urls)
        if shuffle:
            random.Random(_seed(seed, epoch)).shuffle(order)
        for url in order:
            yield {"url": url}


def _shuffle_samples(samples: Iterable, bufsize: int, seed: int) -> Iterator:
    # Seeded per rank and worker, at iteration time: each reader shuffles its own samples differently.
    rank, _, worker, _ = pytorch_worker_info()
    yield from wds.shuffle(bufsize, bufsize, rng=random.Random(_seed(seed, rank, worker)))(iter(samples))


def _identity(src: Iterable) -> Iterable:
    return src


def check_readers(num_shards: int, *, world_size: int, num_workers: int, what: str = "this split") -> None:
    """Every rank x worker needs at least one shard, or some reader sees no data (and DDP ranks fall out of step)."""
    readers = max(1, world_size) * max(1, num_workers)
    if num_shards < readers:
        raise StreamConfigError(
            f"{what} has {num_shards} shard(s) but {readers} readers need one each "
            f"({world_size} rank(s) x {max(1, num_workers)} DataLoader worker(s)). Rebuild the shards with "
            f"min_shards >= {readers}, or lower dataloader_num_workers to "
            f"{max(1, num_shards // max(1, world_size))} or fewer."
        )


def make_stream(
    shard_paths: Sequence[Path | str],
    *,
    shuffle: bool,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epochs: int | None = 1,
    distributed: bool = False,
    world_size: int = 1,
    num_workers: int = 0,
    what: str = "this split",
) -> wds.DataPipeline:
    """A torch IterableDataset of ``Sample`` read from ``shard_paths``.

    shuffle: shard order (per epoch) and a ``shuffle_buffer``-sample buffer, both seeded from ``seed``.
    epochs: passes over the shard list, each in a new order; None repeats forever (a run bounded by
        max_steps; ranks then never run dry at different times).
    distributed: split shards between ranks with ``wds.split_by_node``; False gives every rank the whole
        stream (validation, where each rank must see the same number of batches).
    world_size, num_workers: the readers that will consume the stream; checked against the shard count
        before anything runs (see check_readers).
    Memory: one ``shuffle_buffer`` of decoded samples per worker, whatever the number of shards.
    """
    if not shard_paths:
        raise StreamConfigError(f"{what} has no shards; materialise flower_shards first")
    if shuffle and shuffle_buffer < 1:
        raise StreamConfigError(f"shuffle_buffer must be at least 1 when shuffling; got {shuffle_buffer}")
    missing = [str(p) for p in shard_paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} shard file(s) missing, e.g. {missing[0]}; rebuild the shards")
    check_readers(len(shard_paths), world_size=world_size if distributed else 1, num_workers=num_workers, what=what)
    urls = tuple(str(p) for p in shard_paths)
    return wds.DataPipeline(
        partial(_shard_epochs, urls, shuffle, seed, epochs),
        wds.split_by_node if distributed else _identity,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        partial(_shuffle_samples, bufsize=shuffle_buffer, seed=seed) if shuffle else _identity,
        wds.map(decode_sample),
    )
