"""The micro-batcher's logic with a stand-in scorer: batching, the bounded queue, errors, draining."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest
from PIL import Image

from plant_pipeline.service.batcher import Batcher, BatcherClosed, QueueFull


@dataclass(frozen=True)
class Answer:  # stands in for Identification: the batcher only trims .guesses
    photo: str
    guesses: tuple[int, ...]


class Scorer:
    """Records each call's batch; answers each image with its width (the tests' photo id) and top_k guesses."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False, seconds: float = 0.0) -> None:
        self.calls: list[tuple[list[int], int]] = []
        self.gate, self.fail, self.seconds = gate, fail, seconds

    def __call__(self, images: list[Image.Image], top_k: int) -> list[Answer]:
        self.calls.append(([image.width for image in images], top_k))
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if self.seconds:
            time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("model exploded")
        return [Answer(str(image.width), tuple(range(top_k))) for image in images]


def photos(*widths: int) -> list[Image.Image]:
    return [Image.new("RGB", (width, 1)) for width in widths]


def test_concurrent_requests_within_the_window_are_scored_in_one_call():
    scorer = Scorer()

    async def main():
        async with Batcher(scorer, max_batch=16, window_ms=200) as batcher:
            return await asyncio.gather(batcher.submit(photos(1), 5), batcher.submit(photos(2, 3), 2),
                                        batcher.submit(photos(4), 3))

    first, second, third = asyncio.run(main())
    assert scorer.calls == [([1, 2, 3, 4], 5)]  # one call, scored for the largest top_k
    assert [a.photo for a in first] == ["1"] and [a.photo for a in second] == ["2", "3"] and third[0].photo == "4"
    assert [len(a.guesses) for a in first + second + third] == [5, 2, 2, 3]  # each request's own top_k


def test_batches_hold_at_most_max_batch_photos_and_never_split_a_request():
    scorer = Scorer()

    async def main():
        async with Batcher(scorer, max_batch=4, window_ms=100) as batcher:
            return await asyncio.gather(*(batcher.submit(photos(10 * i + 1, 10 * i + 2), 1) for i in range(5)),
                                        batcher.submit(photos(*range(100, 106)), 1))

    answers = asyncio.run(main())
    assert [len(batch) for batch, _ in scorer.calls] == [4, 4, 2, 6]  # the 6-photo request goes alone
    assert [a.photo for a in answers[2]] == ["21", "22"] and len(answers[5]) == 6


def test_a_full_queue_refuses_with_retry_after_and_the_queued_requests_still_succeed():
    gate = threading.Event()
    scorer = Scorer(gate=gate)

    async def main():
        async with Batcher(scorer, max_batch=2, window_ms=0, max_queue=4) as batcher:
            in_flight = asyncio.create_task(batcher.submit(photos(1, 2), 1))
            while not scorer.calls:  # the first batch is being scored (blocked on the gate)
                await asyncio.sleep(0.005)
            queued = [asyncio.create_task(batcher.submit(photos(3, 4), 1)),
                      asyncio.create_task(batcher.submit(photos(5), 1))]
            await asyncio.sleep(0.02)
            assert batcher.waiting == 3
            with pytest.raises(QueueFull) as refused:
                await batcher.submit(photos(6, 7), 1)
            gate.set()
            done = await asyncio.gather(in_flight, *queued)
            later = await batcher.submit(photos(8, 9), 1)  # the service is still up
            return refused.value, done, later

    refused, done, later = asyncio.run(main())
    assert refused.retry_after >= 1 and refused.waiting == 3 and "retry after" in str(refused)
    assert [[a.photo for a in answers] for answers in done] == [["1", "2"], ["3", "4"], ["5"]]
    assert [a.photo for a in later] == ["8", "9"]


def test_a_request_bigger_than_the_queue_is_refused():
    async def main():
        async with Batcher(Scorer(), max_queue=2) as batcher:
            await batcher.submit(photos(1, 2, 3), 1)

    with pytest.raises(ValueError, match="3 photos in one request"):
        asyncio.run(main())


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs():
    scorer = Scorer(fail=True)

    async def main():
        async with Batcher(scorer, window_ms=50) as batcher:
            failed = await asyncio.gather(batcher.submit(photos(1), 1), batcher.submit(photos(2), 1),
                                          return_exceptions=True)
            scorer.fail = False
            return failed, await batcher.submit(photos(3), 1)

    failed, later = asyncio.run(main())
    assert all(isinstance(error, RuntimeError) and "exploded" in str(error) for error in failed)
    assert later[0].photo == "3" and len(scorer.calls) == 2


def test_scoring_runs_off_the_event_loop():
    scorer = Scorer(seconds=0.3)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        async with Batcher(scorer, window_ms=0) as batcher:
            await batcher.submit(photos(1), 1)
        task.cancel()
        return ticks

    assert asyncio.run(main()) >= 10  # a scorer blocking the loop would allow none during its 0.3 s


def test_stop_answers_the_queued_requests_then_refuses_new_ones():
    scorer = Scorer(seconds=0.05)

    async def main():
        batcher = Batcher(scorer, max_batch=1, window_ms=0)
        with pytest.raises(BatcherClosed):
            await batcher.submit(photos(1), 1)
        await batcher.start()
        pending = [asyncio.create_task(batcher.submit(photos(i), 1)) for i in range(1, 4)]
        await asyncio.sleep(0)
        await batcher.stop()
        with pytest.raises(BatcherClosed):
            await batcher.submit(photos(9), 1)
        return [task.result()[0].photo for task in pending]

    assert asyncio.run(main()) == ["1", "2", "3"]


def test_photos_queued_during_a_batch_wait_for_the_clients_it_answers():
    # Closed-loop clients: the one answered by batch 1 sends its next photo at once; the photo that queued while
    # batch 1 ran must wait for it (the window counts from batch 1's end), not go alone.
    gate = threading.Event()
    scorer = Scorer(gate)

    async def main():
        async with Batcher(scorer, max_batch=4, window_ms=300) as batcher:
            first = asyncio.create_task(batcher.submit(photos(1), 1))
            while not scorer.calls:  # batch 1 is being scored
                await asyncio.sleep(0.005)
            queued = asyncio.create_task(batcher.submit(photos(2), 1))
            await asyncio.sleep(0.35)  # longer than the window: photo 2 has waited it out meanwhile
            gate.set()
            await first
            return await asyncio.gather(queued, batcher.submit(photos(3), 1))  # the answered client's next photo

    asyncio.run(main())
    assert [batch for batch, _ in scorer.calls] == [[1], [2, 3]]
