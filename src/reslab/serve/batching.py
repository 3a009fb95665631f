"""Micro-batching: requests that arrive together share one forward pass.

Each request hands its input to :meth:`MicroBatcher.submit` and awaits its own result. One
worker takes the first waiting input, gathers more for at most ``max_wait`` seconds or until
``max_batch`` are in hand, and runs them as one call in a single worker thread, so the event
loop keeps reading requests while the model runs. The next batch forms from what arrived
meanwhile; under load batches fill without waiting, and a lone request waits ``max_wait`` at
most (the same scheme as TorchServe's ``maxBatchDelay`` and Triton's dynamic batcher).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class BatchStats:
    """Totals since the start: what the server reports at ``GET /stats``."""

    requests: int = 0
    batches: int = 0
    largest: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per stage of a batch, summed

    def add(self, size: int, stages: dict[str, float]) -> None:
        self.requests += size
        self.batches += 1
        self.largest = max(self.largest, size)
        for name, seconds in stages.items():
            self.spent(name, seconds)

    def spent(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def to_dict(self) -> dict:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "mean_batch": self.requests / self.batches if self.batches else 0.0,
            "largest_batch": self.largest,
            "seconds": dict(self.seconds),
        }


# run(inputs, stages) -> one result or exception per input; it adds its stages' seconds
BatchFunction = Callable[[Sequence[object], dict[str, float]], list[object]]


class MicroBatcher:
    def __init__(self, run: BatchFunction, max_batch: int = 32, max_wait: float = 0.002):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        # one thread: batches run one after another, each with all of torch's threads
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reslab-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, item: object) -> object:
        """The result for ``item``; raises the exception its batch function gave it."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _gather(self) -> list[tuple[object, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            items = [item for item, _ in batch]
            stages: dict[str, float] = {}
            try:
                results = await loop.run_in_executor(self._executor, self.run, items, stages)
            except Exception as error:  # a failure of the whole batch goes to each request
                results = [error] * len(batch)
            self.stats.add(len(batch), stages)
            for (_, future), result in zip(batch, results, strict=True):
                if future.cancelled():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
