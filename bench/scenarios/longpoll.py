"""Enqueue latency while many long-poll workers are held open.

``sizes.longpoll_workers`` workers each keep a ``fetch(wait_ms=60000)`` parked on an
idle queue (over HTTP: one connection each, spread over clients of 100 connections;
the open-files limit is raised first).  They are started in waves of 100, each wave
confirmed by the server before the next (a server of several processes knows only
its own workers: there the harness counts fetches sent in full and not answered,
then waits for quick health answers, i.e. for the processes to have parked them).
Open-loop single enqueues on another queue are then measured at half the session's
measured single-enqueue maximum (or ``DEFAULT_RATE`` when the enqueue scenario did
not run), before the workers connect (baseline) and while they are held, for
``sizes.judged_windows`` windows each, pooled (the jobs they enqueue stay in
storage until the scenario ends: a few thousand on another queue).

Once the workers are held, the harness settles the heap as it does before every
scenario (``freeze_startup_heap``, as docs/embedding.md advises an application once
its workers are running).  Embedded, the 10,000 holder tasks live in the measuring
process: about 24 tracked objects each, so the first full collection after the
ramp walks ~240k objects (~75 ms here) and would land in the measured window by
chance.  The time that settling took is recorded (``settle_ms``); over HTTP the
holders live in the server process and nothing is done there.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from bench.load import open_loop_windows
from bench.scenarios.common import QUEUE, Context
from bench.server import raise_nofile_limit
from bench.targets import Target
from ojs_trio.runtime import freeze_startup_heap

IDLE_QUEUE = "bench-idle"
WAVE = 100
DEFAULT_RATE = 200.0


async def run(ctx: Context) -> None:
    target, sizes = ctx.target, ctx.sizes
    nofile = raise_nofile_limit()
    rate = max(ctx.measured.get("enqueue_single_max_rate", 2 * DEFAULT_RATE) * 0.5, 1.0)
    wanted = sizes.longpoll_workers

    async def enqueue_one(i: int) -> None:
        await target.enqueue(QUEUE, 1, i)

    await target.reset()
    ctx.progress.show(ctx.label(f"longpoll: baseline enqueue at {rate:,.0f}/s"))
    baseline = await open_loop_windows(
        enqueue_one, rate, sizes.longpoll_s, sizes.judged_windows, trio.lowlevel.checkpoint
    )
    await target.reset()

    clients: list[Target] = []
    held = 0
    ramp_s = 0.0
    settle_ms = 0.0
    try:
        async with trio.open_nursery() as nursery:

            async def hold(client: Target, k: int) -> None:
                while True:
                    await client.fetch(IDLE_QUEUE, 1, wait_ms=60_000, worker_id=f"lp-{k}")

            t0 = trio.current_time()
            for start in range(0, wanted, WAVE):
                client = target.new_client(WAVE + 4)
                if client is not target:
                    clients.append(client)
                n = min(WAVE, wanted - start)
                for k in range(start, start + n):
                    nursery.start_soon(hold, client, k)
                with trio.move_on_after(30):
                    # polls another process: no event to wait on
                    while (held := await target.waiting_workers()) < start + n:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                ctx.progress.show(ctx.label(f"longpoll: {held:,}/{wanted:,} workers held"))
            await target.wait_caught_up()
            ramp_s = trio.current_time() - t0
            held = await target.waiting_workers()
            t_settle = time.perf_counter()
            freeze_startup_heap()
            settle_ms = (time.perf_counter() - t_settle) * 1000
            ctx.progress.show(ctx.label(f"longpoll: enqueue at {rate:,.0f}/s, {held:,} held"))
            loaded = await open_loop_windows(
                enqueue_one, rate, sizes.longpoll_s, sizes.judged_windows, trio.lowlevel.checkpoint
            )
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()
    metrics: dict[str, Any] = {
        "rate": round(rate, 1),
        "workers_wanted": wanted,
        "workers_held": held,
        "ramp_s": round(ramp_s, 2),
        "settle_ms": round(settle_ms, 1),
        "nofile_limit": nofile,
        "baseline": baseline.to_json(),
        "held": loaded.to_json(),
    }
    ctx.record("longpoll", {"workers": wanted}, metrics)
    await target.reset()
