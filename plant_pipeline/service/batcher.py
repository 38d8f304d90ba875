"""Server-side micro-batching: photos of requests that arrive within a short window are scored in one call.

One forward of 16 photos costs far less than 16 forwards of one, so concurrent requests wait up to ``window_ms``
for company and share a batch. Scoring runs in a worker thread, one batch at a time, so the event loop keeps
accepting requests meanwhile; the queue is bounded and a full one is refused at once (QueueFull) rather than
letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from plant_pipeline.ml.serving.identifier import Identification

logger = logging.getLogger(__name__)

# score(images, top_k) -> one Identification per image, in order. The service passes a function that looks up the
# model in service on every call, so a model switch takes effect at the next batch and never inside one.
ScoreFn = Callable[[list[Image.Image], int], "list[Identification]"]


class QueueFull(Exception):
    """Too many photos already wait; the caller should come back after ``retry_after`` seconds."""

    def __init__(self, waiting: int, incoming: int, max_queue: int, retry_after: float) -> None:
        self.waiting, self.incoming, self.max_queue, self.retry_after = waiting, incoming, max_queue, retry_after
        super().__init__(f"the service is busy: {waiting} photos wait and {incoming} more would pass the queue's "
                         f"limit of {max_queue}; retry after {math.ceil(retry_after)} s")


class BatcherClosed(RuntimeError):
    """submit() before start() or after stop(): the service is starting or shutting down."""


@dataclass
class _Request:
    images: list[Image.Image]
    top_k: int
    future: asyncio.Future
    arrived: float  # loop.time() at submit: the batch window counts from the oldest request's arrival


@dataclass
class BatcherStats:
    batches: int = 0
    photos: int = 0
    largest_batch: int = 0
    seconds_per_batch: float = 0.0  # moving average, for Retry-After


class Batcher:
    """Collects submitted photos into batches of at most ``max_batch`` and scores each batch with one ``score``
    call. A request is never split: one with more photos than ``max_batch`` is scored alone (the scorer splits it
    into forwards of its own size). At most ``max_queue`` photos wait; more raise QueueFull.
    """

    def __init__(self, score: ScoreFn, *, max_batch: int = 16, window_ms: float = 10.0, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1 or window_ms < 0:
            raise ValueError(f"Batcher needs max_batch >= 1, max_queue >= 1 and window_ms >= 0; got "
                             f"max_batch={max_batch}, max_queue={max_queue}, window_ms={window_ms}")
        self.score = score
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._pending: deque[_Request] = deque()
        self._waiting = 0  # photos in _pending
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._stopping = False

    @property
    def waiting(self) -> int:
        """Photos queued and not yet in a batch."""
        return self._waiting

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._stopping

    async def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("Batcher.start() called twice")
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._worker = asyncio.create_task(self._run(), name="identify-batcher")

    async def stop(self) -> None:
        """Refuse new requests, score every request already queued, then end the worker."""
        if self._worker is None:
            return
        self._stopping = True
        self._wakeup.set()
        try:
            await self._worker
        finally:
            self._worker = None

    async def __aenter__(self) -> Batcher:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def submit(self, images: Sequence[Image.Image], top_k: int) -> list[Identification]:
        """The photos' identifications (top ``top_k`` each), scored together with whatever else arrives meanwhile."""
        if not self.running:
            raise BatcherClosed("the service is not accepting photos (starting up or shutting down); retry shortly")
        images = list(images)
        if not images:
            return []
        if len(images) > self.max_queue:
            raise ValueError(f"{len(images)} photos in one request; the queue holds at most {self.max_queue}: "
                             "send them in smaller requests")
        self.check_room(len(images))
        loop = asyncio.get_running_loop()
        request = _Request(images, top_k, loop.create_future(), loop.time())
        self._pending.append(request)
        self._waiting += len(images)
        self._wakeup.set()
        return await request.future

    def check_room(self, photos: int) -> None:
        """Raise QueueFull if ``photos`` more would not fit now: lets a caller refuse before decoding uploads."""
        if self._waiting + photos > self.max_queue:
            raise QueueFull(self._waiting, photos, self.max_queue, self.retry_after())

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained: the batches ahead times the recent time per batch."""
        batches_ahead = math.ceil(self._waiting / self.max_batch) + 1
        return max(1.0, batches_ahead * (self.stats.seconds_per_batch or 0.1))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_batch_end = -math.inf
        while True:
            while not self._pending:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company for window_s from the oldest request's arrival or the previous batch's end, whichever
            # is later, unless the batch is full or the service is stopping. Counting from the batch's end too lets
            # the clients just answered send their next photos into this batch (under steady load batches stay
            # full instead of alternating between a large and a small one).
            while self._waiting < self.max_batch and not self._stopping:
                remaining = max(self._pending[0].arrived, last_batch_end) + self.window_s - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                    break
            batch = self._take()
            if batch:
                await self._score(batch)
                last_batch_end = loop.time()

    def _take(self) -> list[_Request]:
        """The oldest requests that fit in max_batch photos (at least one); abandoned requests are dropped."""
        batch: list[_Request] = []
        photos = 0
        while self._pending:
            request = self._pending[0]
            if request.future.done():  # the client went away (cancelled): nothing to score
                self._pending.popleft()
                self._waiting -= len(request.images)
                continue
            if batch and photos + len(request.images) > self.max_batch:
                break
            self._pending.popleft()
            self._waiting -= len(request.images)
            batch.append(request)
            photos += len(request.images)
        return batch

    async def _score(self, batch: list[_Request]) -> None:
        images = [image for request in batch for image in request.images]
        top_k = max(request.top_k for request in batch)
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.score, images, top_k)
            if len(results) != len(images):
                raise RuntimeError(f"the scorer returned {len(results)} results for {len(images)} photos")
        except Exception as error:  # every request of the batch gets the error; the worker goes on
            logger.exception("scoring a batch of %d photos failed", len(images))
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        elapsed = time.perf_counter() - started
        stats = self.stats
        stats.batches += 1
        stats.photos += len(images)
        stats.largest_batch = max(stats.largest_batch, len(images))
        stats.seconds_per_batch = elapsed if stats.batches == 1 else 0.8 * stats.seconds_per_batch + 0.2 * elapsed
        start = 0
        for request in batch:
            own = results[start:start + len(request.images)]
            start += len(request.images)
            if not request.future.done():
                request.future.set_result([_top(result, request.top_k) for result in own])


def _top(result: Identification, top_k: int) -> Identification:
    """The batch was scored for its largest top_k; each request gets its own."""
    if len(result.guesses) <= top_k:
        return result
    return dataclasses.replace(result, guesses=tuple(result.guesses[:top_k]))
