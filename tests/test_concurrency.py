"""Acceptance: many concurrent consumers never see a job twice.

Embedded workers and raw ``Engine.fetch`` callers race over the same queues;
every job must be delivered exactly once and never held by two consumers at
the same time.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.lowlevel

from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.job import Job
from ojs_trio.engine.worker import JobContext
from ojs_trio.storage.memory import MemoryStorage

JOBS = 2_000
WORKERS = 8


@asynccontextmanager
async def running_engine(**config: Any) -> AsyncIterator[Engine]:
    async with open_engine(MemoryStorage(rng=random.Random(0)), EngineConfig(**config)) as engine:
        yield engine


async def wait_until(predicate: Any, within: float = 30.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds."""
    with trio.fail_after(within):
        while True:
            if predicate():
                return
            await trio.sleep(0.005)


async def test_eight_workers_complete_2000_jobs_exactly_once() -> None:
    async with running_engine() as engine:
        completions: Counter[str] = Counter()
        in_flight: set[str] = set()
        overlaps: list[str] = []
        by_worker: Counter[str] = Counter()
        max_concurrent = 0

        async def handler(ctx: JobContext) -> int:
            nonlocal max_concurrent
            job_id = ctx.job.id
            if job_id in in_flight:
                overlaps.append(job_id)
            in_flight.add(job_id)
            max_concurrent = max(max_concurrent, len(in_flight))
            await trio.lowlevel.checkpoint()  # let every other worker run while we hold the job
            in_flight.discard(job_id)
            completions[job_id] += 1
            by_worker[ctx.slot] += 1
            return int(ctx.args[0])

        engine.register("bulk.job", handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run_workers, ["default"], WORKERS)
            results = await engine.submit_many(
                [{"type": "bulk.job", "args": [n]} for n in range(JOBS)]
            )
            enqueued = {r.job.id for r in results}
            assert len(enqueued) == JOBS
            await wait_until(lambda: engine.statistics().acked >= JOBS)
            nursery.cancel_scope.cancel()

        assert overlaps == []
        assert set(completions) == enqueued
        assert len(completions) == JOBS
        assert set(completions.values()) == {1}
        stats = engine.statistics()
        assert stats.acked == JOBS
        assert stats.fetched == JOBS
        assert stats.nacked == 0
        # The work really was spread over concurrent workers.
        assert max_concurrent > 1
        assert len(by_worker) == WORKERS
        queue = {q.name: q for q in await engine.list_queues()}["default"]
        assert queue.counts == {"completed": JOBS}


async def test_workers_started_before_jobs_arrive_share_trickled_work() -> None:
    """Workers park in long polls first; jobs then arrive a few at a time."""
    async with running_engine() as engine:
        completions: Counter[str] = Counter()
        holders: dict[str, str] = {}
        overlaps: list[str] = []

        async def handler(ctx: JobContext) -> None:
            if ctx.job.id in holders:
                overlaps.append(ctx.job.id)
            holders[ctx.job.id] = ctx.slot
            await trio.lowlevel.checkpoint()
            del holders[ctx.job.id]
            completions[ctx.job.id] += 1

        engine.register("bulk.job", handler)
        total = 500
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run_workers, ["default"], WORKERS)
            # The pool parks one long poll for all its free workers.
            await wait_until(lambda: engine.statistics().waiting_fetches == 1)
            for start in range(0, total, 5):
                await engine.submit_many(
                    [{"type": "bulk.job", "args": [n]} for n in range(start, start + 5)]
                )
                await trio.lowlevel.checkpoint()
            await wait_until(lambda: engine.statistics().acked >= total)
            nursery.cancel_scope.cancel()

        assert overlaps == []
        assert len(completions) == total
        assert set(completions.values()) == {1}
        assert engine.statistics().acked == total


async def test_raw_fetchers_racing_over_one_queue_never_share_a_job() -> None:
    async with running_engine() as engine:
        total = 1_000
        await engine.submit_many([{"type": "race.job", "args": [n]} for n in range(total)])
        delivered: list[str] = []
        rng = random.Random(1)

        async def fetcher(n: int) -> None:
            while True:
                jobs = await engine.fetch(["default"], rng.randint(1, 4), worker_id=f"f{n}")
                if not jobs:
                    return
                delivered.extend(j.id for j in jobs)
                await trio.lowlevel.checkpoint()
                for job in jobs:
                    await engine.ack(job.id, worker_id=f"f{n}")

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(fetcher, n)

        counts = Counter(delivered)
        assert [job_id for job_id, c in counts.items() if c > 1] == []
        assert len(counts) == total
        assert engine.statistics().acked == total


async def test_long_polling_fetchers_over_overlapping_queue_sets() -> None:
    """Different queue sets are different pools: exclusivity must hold across pools."""
    async with running_engine() as engine:
        per_queue = 300
        total = 2 * per_queue
        queue_sets = [["a"], ["b"], ["a", "b"], ["b", "a"]]
        delivered: list[tuple[str, Job]] = []
        active: set[str] = set()
        overlaps: list[str] = []
        all_acked = trio.Event()

        async def fetcher(n: int) -> None:
            queues = queue_sets[n % len(queue_sets)]
            worker = f"f{n}"
            while True:
                jobs = await engine.fetch(queues, 2, worker_id=worker, wait_ms=10_000)
                for job in jobs:
                    assert job.queue in queues
                    if job.id in active:
                        overlaps.append(job.id)
                    active.add(job.id)
                    delivered.append((worker, job))
                await trio.lowlevel.checkpoint()
                for job in jobs:
                    active.discard(job.id)
                    await engine.ack(job.id, worker_id=worker)
                if engine.statistics().acked >= total:
                    all_acked.set()

        async def producer() -> None:
            for n in range(per_queue):
                await engine.enqueue("race.job", [n], queue="a")
                await engine.enqueue("race.job", [n], queue="b")
                if n % 7 == 0:
                    await trio.lowlevel.checkpoint()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(40):
                    nursery.start_soon(fetcher, n)
                await wait_until(lambda: engine.statistics().waiting_fetches == 40)
                nursery.start_soon(producer)
                await all_acked.wait()
                nursery.cancel_scope.cancel()

        counts = Counter(job.id for _, job in delivered)
        assert overlaps == []
        assert [job_id for job_id, c in counts.items() if c > 1] == []
        assert len(counts) == total
        assert engine.statistics().acked == total
        assert engine.statistics().fetcher_pools == len(queue_sets)
        queues = {q.name: q.counts for q in await engine.list_queues()}
        assert queues == {"a": {"completed": per_queue}, "b": {"completed": per_queue}}
