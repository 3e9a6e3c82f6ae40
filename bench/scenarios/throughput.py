"""Full-cycle throughput (enqueue → fetch → ack) against the number of workers.

For each ``max_jobs`` in ``sizes.tp_max_jobs`` and each worker count in
``sizes.tp_workers``: producers enqueue continuously (one job per request when
``max_jobs`` is 1, batches of 100 otherwise) while ``workers`` tasks loop
``fetch(count=max_jobs)`` then ack every job (one ack call per job, as the OJS
worker protocol has it).  The queue starts with a backlog of ``high_water`` jobs
(from ``sizes.tp_backlog``, 500 except in smoke-only runs, up to 3,000), and
producers stay at most that far ahead of the acks, so the queue neither runs dry
nor grows without bound.  Acks are counted over ``sizes.tp_s``
after a ``sizes.tp_warm_s`` warm-up.
"""

from __future__ import annotations

import trio

from bench.scenarios.common import QUEUE, Context, fill

ENQUEUE_BATCH = 100
SINGLE_PRODUCERS = 8


async def run(ctx: Context) -> None:
    for max_jobs in ctx.sizes.tp_max_jobs:
        for workers in ctx.sizes.tp_workers:
            ctx.progress.show(ctx.label(f"throughput: {workers} workers, max_jobs {max_jobs}"))
            await ctx.target.reset()
            metrics = await cycle(ctx, workers, max_jobs)
            ctx.record("throughput", {"workers": workers, "max_jobs": max_jobs}, metrics)
    await ctx.target.reset()


async def cycle(ctx: Context, workers: int, max_jobs: int) -> dict[str, object]:
    target, sizes = ctx.target, ctx.sizes
    batch = 1 if max_jobs == 1 else ENQUEUE_BATCH
    high_water = min(max(sizes.tp_backlog, workers * max_jobs * 2, batch * 4), 3000)
    enqueued = 0
    acked = 0
    errors = 0
    counting = False
    counted = 0
    client = target.new_client(workers + SINGLE_PRODUCERS + 8)

    async def producer() -> None:
        nonlocal enqueued, errors
        while True:
            if enqueued - acked > high_water:
                await trio.sleep(0.001)
                continue
            start = enqueued
            enqueued += batch
            try:
                await client.enqueue(QUEUE, batch, start)
            except Exception:
                enqueued -= batch
                errors += 1
                await trio.sleep(0.01)

    async def worker(k: int) -> None:
        nonlocal acked, counted, errors
        worker_id = f"tp-{k}"
        while True:
            try:
                ids = await client.fetch(QUEUE, max_jobs, wait_ms=1000, worker_id=worker_id)
                for job_id in ids:
                    await client.ack(job_id, worker_id)
                    acked += 1
                    if counting:
                        counted += 1
            except Exception:
                errors += 1
                await trio.sleep(0.01)

    # Start with a backlog, so the first measured moments do not see an empty queue.
    enqueued = high_water
    await fill(client, QUEUE, high_water, chunk=ENQUEUE_BATCH, tick=lambda done: None)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(SINGLE_PRODUCERS if batch == 1 else 2):
                nursery.start_soon(producer)
            for k in range(workers):
                nursery.start_soon(worker, k)
            await trio.sleep(sizes.tp_warm_s)
            counting = True
            t0 = trio.current_time()
            await trio.sleep(sizes.tp_s)
            counting = False
            elapsed = trio.current_time() - t0
            nursery.cancel_scope.cancel()
    finally:
        if client is not target:
            with trio.CancelScope(shield=True):
                await client.aclose()
    return {
        "jobs_per_s": round(counted / elapsed, 1),
        "acked": counted,
        "duration_s": round(elapsed, 3),
        "enqueue_batch": batch,
        "errors": errors,
    }
