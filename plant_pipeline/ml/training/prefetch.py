"""Read the next batches in a background thread while the training process waits on the GPU.

With no DataLoader workers (the default on CUDA, where worker processes cost more than they saved) the next
batch is read and collated after the step ends, and the Trainer ends every step with a host-device sync (its
NaN/inf logging filter): the GPU idles for that whole read. A thread that stays ``depth`` batches ahead does
the reading during the step instead. It shares the GIL with the step's kernel launches (file reads and the
array copies release it, tar parsing does not); bench/gpu_train.py measures the gap between steps.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _fill(iterator: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """The thread's loop. It holds no reference to its ThreadPrefetcher, which can therefore be collected
    (and so stop the thread) once nobody iterates it any more."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in iterator:
            if not put(item):
                return
        put(_END)
    except BaseException as err:  # handed to the consumer, which raises it where it asks for the item
        put(_Failure(err))


class ThreadPrefetcher(Iterator):
    """Iterates ``iterable`` in a daemon thread, at most ``depth`` items ahead; errors surface on ``next``.

    ``close()`` (also on garbage collection) stops the thread at its next item, so an abandoned
    iterator does not keep its shards open.
    """

    def __init__(self, iterable: Iterable, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=_fill, args=(iter(iterable), self._queue, self._stop),
                                        name="batch-prefetch", daemon=True)
        self._thread.start()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()

    def __del__(self) -> None:
        if hasattr(self, "_stop"):  # not when __init__ refused its arguments
            self.close()


class PrefetchingDataLoader(DataLoader):
    """A DataLoader whose iterators read ``prefetch_depth`` batches ahead in a thread (see the module docstring)."""

    def __init__(self, *args, prefetch_depth: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prefetch_depth = prefetch_depth

    def __iter__(self) -> ThreadPrefetcher:
        return ThreadPrefetcher(super().__iter__(), self.prefetch_depth)
