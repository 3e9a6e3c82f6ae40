"""Dequeue latency, and enqueue-to-start latency into an idle waiting worker.

* fetch → job in hand: ``fetch(count=1, wait_ms=0)`` against a pre-filled queue, so
  no long-poll waiting is included.  The maximum fetch rate comes from
  closed-loop callers, then open-loop runs stepping down from it until one keeps
  up (:func:`bench.load.measure_max`, the queue refilled before each); then
  open-loop fetches run at ``sizes.dq_fractions`` of it (latency from the
  scheduled send time; ``sizes.judged_windows`` runs, each on a refilled queue,
  at the fraction the targets are read at).  Fetched jobs are not acked
  (storage is reset after).
* enqueue → start: one worker long-polls (``wait_ms`` 30 s) and acks what it gets;
  jobs are enqueued one at a time, ``sizes.e2s_gap_s`` apart, so the worker is idle
  and waiting each time.  Latency runs from just before the enqueue call to the
  moment the fetch returns the job.  Five unmeasured jobs warm the path first.
"""

from __future__ import annotations

import trio

from bench.load import max_rate, measure_max, open_loop_windows, summarize
from bench.modes import JUDGED_FRACTION
from bench.scenarios.common import QUEUE, Context, fill

E2S_QUEUE = "bench-e2s"
WARMUP = 5


class Empty(Exception):
    pass


async def run(ctx: Context) -> None:
    target, sizes = ctx.target, ctx.sizes

    def tick(done: int) -> None:
        ctx.progress.show(ctx.label(f"dequeue: prefill {done:,}"))

    await target.reset()
    await fill(target, QUEUE, sizes.dq_prefill, tick=tick)

    async def fetch_any(i: int) -> bool:
        return bool(await target.fetch(QUEUE, 1))

    async def fetch_one(i: int) -> None:
        if not await target.fetch(QUEUE, 1):
            raise Empty("queue ran dry")

    async def refill(rate: float, seconds: float) -> None:
        await target.reset()
        await fill(target, QUEUE, int(rate * seconds * 1.2) + 50, tick=tick)

    async def prepare(rate: float) -> None:
        await refill(rate, sizes.max_s)  # each open-loop rung gets its own queue

    ctx.progress.show(ctx.label("dequeue: max fetch rate"))
    # Closed loop: on the prefill, a caller stops when it runs dry.  Open loop:
    # running dry is an error.
    closed, ladder = await measure_max(
        fetch_any, sizes.concurrency, sizes.max_s, prepare, open_op=fetch_one
    )
    case = {"concurrency": sizes.concurrency, "prefill": sizes.dq_prefill}
    ctx.record("dequeue", {**case, "phase": "max"}, closed.to_json())
    for run in ladder:
        ctx.record("dequeue", {**case, "phase": "max_open"}, run.to_json())
    best = max_rate(closed, ladder)
    ctx.measured["fetch_max_rate"] = best

    for fraction in sizes.dq_fractions:
        rate = max(best * fraction, 1.0)
        windows = sizes.judged_windows if fraction == JUDGED_FRACTION else 1

        async def prepare_window(rate: float = rate) -> None:
            await refill(rate, sizes.rate_s)

        ctx.progress.show(ctx.label(f"dequeue: {rate:,.0f} fetches/s open loop"))
        result = await open_loop_windows(fetch_one, rate, sizes.rate_s, windows, prepare_window)
        ctx.record("dequeue", {"phase": "open", "fraction": fraction}, result.to_json())

    await target.reset()
    ctx.progress.show(ctx.label("dequeue: enqueue → start, idle worker"))
    ctx.record("enqueue_to_start", {"gap_ms": sizes.e2s_gap_s * 1000}, await _e2s(ctx))
    await target.reset()


async def _e2s(ctx: Context) -> dict[str, object]:
    target, sizes = ctx.target, ctx.sizes
    send, receive = trio.open_memory_channel[float](100)
    latencies: list[float] = []
    ready = [trio.Event()]

    async def worker() -> None:
        while True:
            ready[0].set()  # about to park a fetch: the main loop may send after its gap
            ids = await target.fetch(E2S_QUEUE, 1, wait_ms=30_000, worker_id="bench-e2s")
            now = trio.current_time()
            ready[0] = trio.Event()
            for job_id in ids:
                await send.send(now)
                await target.ack(job_id, "bench-e2s")

    timeouts = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        for i in range(WARMUP + sizes.e2s_jobs):
            await ready[0].wait()
            await trio.sleep(sizes.e2s_gap_s)  # time for the fetch to reach its long-poll
            sent = trio.current_time()
            await target.enqueue(E2S_QUEUE, 1, i)
            with trio.move_on_after(10) as scope:
                started = await receive.receive()
            if scope.cancelled_caught:
                timeouts += 1
                continue
            if i >= WARMUP:
                latencies.append(started - sent)
        nursery.cancel_scope.cancel()
    return {"latency": summarize(latencies), "timeouts": timeouts}
