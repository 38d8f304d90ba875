"""make_stream: every sample once per epoch, seeded shuffles, disjoint ranks and workers, early errors."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from plant_pipeline.ml.shards.format import Sample, read_index, split_shard_paths
from plant_pipeline.ml.training.streaming import StreamConfigError, make_stream


@pytest.fixture(scope="module")
def train_shards(toy_shards):
    return split_shard_paths(toy_shards, "train")


def _keys(stream) -> list[str]:
    return [s.key for s in stream]


def test_one_epoch_yields_every_sample_once(toy_shards, train_shards):
    samples = list(make_stream(train_shards, shuffle=False, epochs=1))
    assert all(isinstance(s, Sample) for s in samples)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)) == read_index(toy_shards)["splits"]["train"]["samples"] == 32
    assert samples[0].pixels.dtype.name == "uint8" and samples[0].meta["split"] == "train"


def test_shuffle_is_seeded(train_shards):
    a = _keys(make_stream(train_shards, shuffle=True, shuffle_buffer=8, seed=1, epochs=1))
    b = _keys(make_stream(train_shards, shuffle=True, shuffle_buffer=8, seed=1, epochs=1))
    c = _keys(make_stream(train_shards, shuffle=True, shuffle_buffer=8, seed=2, epochs=1))
    plain = _keys(make_stream(train_shards, shuffle=False, epochs=1))
    assert a == b
    assert a != c and a != plain
    assert sorted(a) == sorted(c) == sorted(plain)


def test_epochs_repeat_in_new_orders_and_none_is_endless(train_shards):
    two = _keys(make_stream(train_shards, shuffle=True, shuffle_buffer=4, seed=0, epochs=2))
    assert Counter(two) == Counter({k: 2 for k in set(two)}) and len(set(two)) == 32
    endless = list(itertools.islice(make_stream(train_shards, shuffle=True, shuffle_buffer=4, epochs=None), 100))
    assert len(endless) == 100


def test_workers_read_disjoint_shards(train_shards):
    stream = make_stream(train_shards, shuffle=True, shuffle_buffer=4, seed=0, epochs=1, num_workers=2)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    keys = [s.key for s in loader]
    assert len(keys) == len(set(keys)) == 32


def test_ranks_read_disjoint_shards(train_shards, monkeypatch):
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(set(_keys(make_stream(train_shards, shuffle=True, seed=3, epochs=1, distributed=True,
                                              world_size=2))))
    assert per_rank[0].isdisjoint(per_rank[1])
    assert len(per_rank[0] | per_rank[1]) == 32 and per_rank[0] and per_rank[1]


def test_too_few_shards_for_the_readers_fails_before_reading(toy_shards, train_shards):
    validation = split_shard_paths(toy_shards, "validation")  # a single shard
    with pytest.raises(StreamConfigError, match="min_shards >= 2"):
        make_stream(validation, shuffle=False, num_workers=2)
    with pytest.raises(StreamConfigError, match=r"4 shard\(s\) but 8 readers"):
        make_stream(train_shards, shuffle=True, distributed=True, world_size=4, num_workers=2)


def test_missing_shard_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        make_stream([tmp_path / "gone.tar"], shuffle=False)
    with pytest.raises(StreamConfigError, match="no shards"):
        make_stream([], shuffle=False)
