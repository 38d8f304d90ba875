"""The read-ahead thread CustomTrainer uses on CUDA without DataLoader workers (prefetch.py)."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from plant_pipeline.ml.training.prefetch import PrefetchingDataLoader, ThreadPrefetcher


class Numbers(IterableDataset):
    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_at:
                raise OSError(f"shard unreadable at item {i}")
            yield {"x": torch.tensor([i, i + 1])}


def test_batches_arrive_complete_and_in_order():
    plain = [batch["x"] for batch in DataLoader(Numbers(10), batch_size=3)]
    ahead = [batch["x"] for batch in PrefetchingDataLoader(Numbers(10), batch_size=3, prefetch_depth=2)]
    assert len(ahead) == len(plain) == 4
    assert all(torch.equal(a, b) for a, b in zip(ahead, plain))


def test_a_reader_error_is_raised_where_the_batch_is_asked_for():
    loader = iter(PrefetchingDataLoader(Numbers(10, fail_at=4), batch_size=2))
    assert torch.equal(next(loader)["x"], torch.tensor([[0, 1], [1, 2]]))
    assert torch.equal(next(loader)["x"], torch.tensor([[2, 3], [3, 4]]))
    with pytest.raises(OSError, match="unreadable at item 4"):
        next(loader)
    with pytest.raises(StopIteration):
        next(loader)


def test_reads_ahead_by_depth_only_and_close_stops_the_thread():
    produced = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    prefetcher = ThreadPrefetcher(source(), depth=2)
    assert next(prefetcher) == 0
    time.sleep(0.3)
    # one handed out, two queued, one more waiting to be queued: nowhere near the 100 available
    assert len(produced) <= 4
    prefetcher.close()
    prefetcher._thread.join(timeout=5)  # it notices within one 0.1 s put timeout; the margin is for a busy CI
    assert not prefetcher._thread.is_alive()
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ThreadPrefetcher(range(3), depth=0)


def test_an_abandoned_iterator_stops_its_thread():
    import gc

    prefetcher = ThreadPrefetcher(iter(range(10**6)), depth=1)
    thread = prefetcher._thread
    next(prefetcher)
    del prefetcher
    gc.collect()
    thread.join(timeout=2)
    assert not thread.is_alive()
