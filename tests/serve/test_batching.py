"""The micro-batcher: inputs submitted together share calls of at most max_batch, each caller
gets its own result, and one input's error reaches that caller alone."""

from __future__ import annotations

import asyncio

import pytest

from reslab.serve.batching import MicroBatcher


def doubler(calls):
    def run(items, stages):
        calls.append(list(items))
        stages["model"] = stages.get("model", 0.0) + 0.5
        return [ValueError(f"bad {x}") if x < 0 else 2 * x for x in items]

    return run


def test_inputs_submitted_together_are_batched():
    calls = []

    async def main():
        batcher = MicroBatcher(doubler(calls), max_batch=4, max_wait=0.05)
        await batcher.start()
        try:
            results = await asyncio.gather(
                *(batcher.submit(x) for x in [1, 2, 3, -4, 5, 6, 7, 8, 9, 10]),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()
        return results, batcher.stats.to_dict()

    results, stats = asyncio.run(main())
    assert results[:3] == [2, 4, 6] and results[4:] == [10, 12, 14, 16, 18, 20]
    assert isinstance(results[3], ValueError) and str(results[3]) == "bad -4"
    assert [len(c) for c in calls] == [4, 4, 2]
    assert sorted(x for c in calls for x in c) == sorted([1, 2, 3, -4, 5, 6, 7, 8, 9, 10])
    assert stats["requests"] == 10 and stats["batches"] == 3 and stats["largest_batch"] == 4
    assert stats["seconds"] == {"model": 1.5}


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on():
    def run(items, stages):
        if 0 in items:
            raise RuntimeError("the model failed")
        return list(items)

    async def main():
        batcher = MicroBatcher(run, max_batch=8, max_wait=0.0)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="the model failed"):
                await batcher.submit(0)
            return await batcher.submit(7)
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == 7
