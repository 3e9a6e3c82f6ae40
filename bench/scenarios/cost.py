"""Cost growth: claim latency and throughput with many jobs resident, and after churn.

For each size in ``sizes.cost_resident``: storage is emptied, that many available
jobs are enqueued (batches of 1000), then

* claim latency: ``sizes.cost_samples`` sequential ``fetch(count=1)`` calls, each
  followed by its ack (latency of the fetch only);
* throughput: 16 workers ``fetch(count=10)`` + ack from the backlog (no producer:
  the backlog is the resident set) until half the smallest resident size has been
  acked or ``sizes.cost_tp_s`` has passed.  Every size thus runs the same jobs
  (5,000 in the full run) against its own backlog: a fixed duration would let the
  small backlog drain in a fraction of a second while the large one ran for the
  whole period, and compare a short burst with a long run.  That is
  ``sizes.cost_runs`` runs, the backlog topped back up between them; the
  median run's rate is the figure, and every run's is kept (``runs_jobs_per_s``).

A last case measures the smallest size again after ``sizes.cost_dead`` jobs have been
run to completion first without emptying storage (completed rows and the dead
tuples they leave behind in PostgreSQL's live partition; autovacuum is left at the
schema's settings).  Over HTTP on PostgreSQL the churn runs through an embedded
engine on the same database (servers sharing a backend is a supported setup, and
a million acks over HTTP would take most of an hour); over HTTP on memory storage
it goes through the server and is capped at ``HTTP_MEMORY_CHURN`` jobs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import trio

from bench.load import summarize
from bench.scenarios.common import QUEUE, Context, fill
from bench.targets import HttpTarget, Target, open_embedded

WORKERS = 16
MAX_JOBS = 10
HTTP_MEMORY_CHURN = 100_000


async def run(ctx: Context) -> None:
    target = ctx.target
    for resident in ctx.sizes.cost_resident:
        await target.reset()
        await _fill(ctx, resident, f"cost: fill {resident:,}")
        metrics = await measure(ctx, f"{resident:,} resident")
        ctx.record("cost", {"resident": resident, "dead": 0}, metrics)
    # after churn: run cost_dead jobs to completion, then measure the smallest size
    await target.reset()
    dead = ctx.sizes.cost_dead
    if isinstance(target, HttpTarget) and target.storage == "postgres":
        async with open_embedded(target.storage, target.backend_url) as churner:
            churn_ctx = replace(ctx, target=churner)
            await _fill(churn_ctx, dead, f"cost: churn fill {dead:,} (embedded, same database)")
            churn_rate = await _drain(churn_ctx, dead)
    else:
        if isinstance(target, HttpTarget):
            dead = min(dead, HTTP_MEMORY_CHURN)
        await _fill(ctx, dead, f"cost: churn fill {dead:,}")
        churn_rate = await _drain(ctx, dead)
    resident = ctx.sizes.cost_resident[0]
    await _fill(ctx, resident, f"cost: fill {resident:,} after churn")
    metrics = await measure(ctx, f"{resident:,} resident after {dead:,} done")
    metrics["churn_jobs_per_s"] = round(churn_rate, 1)
    ctx.record("cost", {"resident": resident, "dead": dead}, metrics)
    await target.reset()


async def _fill(ctx: Context, count: int, text: str) -> None:
    def tick(done: int) -> None:
        if done % 10_000 < 1000 or done == count:
            ctx.progress.show(ctx.label(f"{text} ({done:,})"))

    rate = await fill(ctx.target, QUEUE, count, tick=tick)
    ctx.measured["fill_jobs_per_s"] = rate


async def _drain(ctx: Context, count: int) -> float:
    """Fetch (100 at a time) and ack ``count`` jobs with 16 workers; jobs per second."""
    target = ctx.target
    done = 0
    t0 = trio.current_time()

    async def worker(k: int) -> None:
        nonlocal done
        while done < count:
            ids = await target.fetch(QUEUE, 100, worker_id=f"churn-{k}")
            if not ids:
                return
            for job_id in ids:
                await target.ack(job_id, f"churn-{k}")
                done += 1
            if done % 5000 < 100:
                ctx.progress.show(ctx.label(f"cost: churn {done:,}/{count:,}"))

    async with trio.open_nursery() as nursery:
        for k in range(WORKERS):
            nursery.start_soon(worker, k)
    return done / max(trio.current_time() - t0, 1e-9)


async def measure(ctx: Context, text: str) -> dict[str, Any]:
    target, sizes = ctx.target, ctx.sizes
    ctx.progress.show(ctx.label(f"cost: claim latency, {text}"))
    latencies: list[float] = []
    for _ in range(sizes.cost_samples):
        t0 = trio.current_time()
        ids = await target.fetch(QUEUE, 1, worker_id="cost-claim")
        latencies.append(trio.current_time() - t0)
        for job_id in ids:
            await target.ack(job_id, "cost-claim")

    limit = max(sizes.cost_resident[0] // 2, MAX_JOBS)
    runs: list[tuple[float, int, float]] = []  # (jobs/s, acked, seconds) per run
    for run in range(max(sizes.cost_runs, 1)):
        if run:
            # Back to the backlog the first run started from: every run sees the same.
            await fill(target, QUEUE, runs[-1][1], tick=lambda done: None)
        ctx.progress.show(ctx.label(f"cost: throughput {run + 1}/{sizes.cost_runs}, {text}"))
        runs.append(await _throughput(target, sizes.cost_tp_s, limit))
    rates = sorted(rate for rate, _, _ in runs)
    return {
        "claim_latency": summarize(latencies),
        "jobs_per_s": round(rates[len(rates) // 2], 1),
        "runs_jobs_per_s": [round(rate, 1) for rate, _, _ in runs],
        "acked": sum(acked for _, acked, _ in runs),
        "duration_s": round(sum(seconds for _, _, seconds in runs), 3),
        "fill_jobs_per_s": round(ctx.measured.get("fill_jobs_per_s", 0.0), 1),
    }


async def _throughput(target: Target, seconds: float, limit: int) -> tuple[float, int, float]:
    """16 workers drain up to ``limit`` jobs for up to ``seconds``: (jobs/s, acked, s)."""
    acked = 0
    t0 = trio.current_time()
    stop_at = t0 + seconds
    last = t0

    async def worker(k: int) -> None:
        nonlocal acked, last
        while trio.current_time() < stop_at and acked < limit:
            ids = await target.fetch(QUEUE, MAX_JOBS, worker_id=f"cost-{k}")
            if not ids:
                return
            for job_id in ids:
                await target.ack(job_id, f"cost-{k}")
                acked += 1
            last = trio.current_time()

    async with trio.open_nursery() as nursery:
        for k in range(WORKERS):
            nursery.start_soon(worker, k)
    elapsed = max(last - t0, 1e-9)
    return acked / elapsed, acked, elapsed
