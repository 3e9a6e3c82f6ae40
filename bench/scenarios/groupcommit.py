"""Group commit on and off: the embedded engine on PostgreSQL, same workload both ways.

``PostgresStorage(group_commit=False)`` runs every enqueue, ack, nack and heartbeat
call as a statement or transaction of its own, concurrently on its own pooled
connection (docs/postgresql.md); with group commit on (the default) concurrent
calls of one verb share one.  Each run opens a fresh database and an engine on it
and does, with ``sizes.gc_concurrency`` tasks and ``sizes.gc_jobs`` jobs:

1. **enqueue**: the tasks submit one job per call (``Engine.submit``) until all
   jobs are in;
2. **drain**: the tasks fetch one job per call (``Engine.fetch``, count 1) and ack
   it with its own call (``Engine.ack``) until all are acked.

Fetches are batched into claims by the engine's fetcher pool either way; group
commit changes the enqueue and ack writes.  (The worker pool's ``ack_many`` is one
call for a batch of acks either way, so ``run_workers`` would not show it.)  Runs
alternate on, off, on, off ... (``sizes.gc_runs`` each) and the medians are
reported, with the ratios on ÷ off.  No timing is asserted anywhere.
"""

from __future__ import annotations

import statistics
from typing import Any

import trio

from bench.load import Progress
from bench.modes import Sizes
from bench.targets import JOB_TYPE, job_body, noop, recreate_database
from ojs_trio.engine.engine import EngineConfig, open_engine
from ojs_trio.storage.postgres.adapter import PostgresStorage

QUEUE = "groupcommit"
POOL_SIZE = 10  # the server's default (OJS_POOL_SIZE)
PHASES = ("enqueue", "drain", "full_cycle")


async def run_once(url: str, group_commit: bool, jobs: int, concurrency: int) -> dict[str, Any]:
    """One run on a fresh database: enqueue phase, then drain phase."""
    storage = PostgresStorage(url, max_size=POOL_SIZE, group_commit=group_commit)
    async with open_engine(storage, EngineConfig()) as engine:
        engine.register(JOB_TYPE, noop)
        submitted = 0

        async def producer() -> None:
            nonlocal submitted
            while submitted < jobs:
                n = submitted
                submitted += 1
                await engine.submit(job_body(QUEUE, n))

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(producer)
        enqueue_s = trio.current_time() - t0
        enqueued = storage.group_commit_statistics()["enqueue"]

        taken = 0  # jobs a worker has set out to fetch: each exists, so each is found

        async def worker(k: int) -> None:
            nonlocal taken
            worker_id = f"gc-{k}"
            while taken < jobs:
                taken += 1
                got: list[Any] = []
                while not got:
                    got = await engine.fetch([QUEUE], 1, worker_id=worker_id, wait_ms=1000)
                await engine.ack(got[0].id, None, has_result=False, worker_id=worker_id)

        t1 = trio.current_time()
        with trio.fail_after(max(60.0, jobs / 20)):
            async with trio.open_nursery() as nursery:
                for k in range(concurrency):
                    nursery.start_soon(worker, k)
        drain_s = trio.current_time() - t1
        settled = storage.group_commit_statistics()["settle"]
        acked = engine.statistics().acked
    return {
        "group_commit": group_commit,
        "jobs": jobs,
        "acked": acked,
        "enqueue_s": round(enqueue_s, 4),
        "drain_s": round(drain_s, 4),
        "enqueue_jobs_per_s": round(jobs / enqueue_s, 1),
        "drain_jobs_per_s": round(jobs / drain_s, 1),
        "full_cycle_jobs_per_s": round(jobs / (enqueue_s + drain_s), 1),
        # Calls per statement/transaction: 1.0 with group commit off.
        "enqueue_batch_mean": round(enqueued.calls / max(enqueued.batches, 1), 2),
        "ack_batch_mean": round(settled.calls / max(settled.batches, 1), 2),
    }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(float(r[key]) for r in runs)), 1)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians each way and the ratios on ÷ off."""
    out: dict[str, Any] = {}
    for label, flag in (("with", True), ("without", False)):
        mine = [r for r in runs if r["group_commit"] is flag]
        out[label] = {
            f"{phase}_jobs_per_s": _median(mine, f"{phase}_jobs_per_s") for phase in PHASES
        }
        out[label]["enqueue_batch_mean"] = _median(mine, "enqueue_batch_mean")
        out[label]["ack_batch_mean"] = _median(mine, "ack_batch_mean")
    out["ratio"] = {
        phase: round(out["with"][f"{phase}_jobs_per_s"] / out["without"][f"{phase}_jobs_per_s"], 2)
        for phase in PHASES
    }
    return out


async def run(url: str, sizes: Sizes, progress: Progress) -> dict[str, Any]:
    """The scenario's record; ``url`` names the database to (re)create for each run."""
    jobs, concurrency = sizes.gc_jobs, sizes.gc_concurrency
    runs: list[dict[str, Any]] = []
    for n in range(sizes.gc_runs):
        for group_commit in (True, False):
            way = "on" if group_commit else "off"
            progress.show(
                f"groupcommit: {way}, run {n + 1}/{sizes.gc_runs}, {jobs:,} jobs, "
                f"{concurrency} tasks"
            )
            await trio.to_thread.run_sync(recreate_database, url)
            runs.append(await run_once(url, group_commit, jobs, concurrency))
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "pool_size": POOL_SIZE,
        "runs": runs,
        **summarize(runs),
    }
