"""Enqueue latency at fixed offered rates, single jobs and batches.

For each kind (one job per call; ``sizes.batch`` jobs per call):

1. the maximum rate: ``sizes.concurrency`` closed-loop callers for ``sizes.max_s``,
   then open-loop runs stepping down from that rate until one keeps up
   (:func:`bench.load.measure_max`);
2. open-loop runs at ``sizes.fractions`` of that maximum, each for ``sizes.rate_s``,
   with latency measured from each call's scheduled send time.  At the fraction
   the targets are read at, ``sizes.judged_windows`` such runs, pooled
   (:func:`bench.load.open_loop_windows`).

Storage is emptied before every run so resident rows do not build up across runs.
"""

from __future__ import annotations

from bench.load import max_rate, measure_max, open_loop_windows
from bench.modes import JUDGED_FRACTION
from bench.scenarios.common import QUEUE, Context


async def run(ctx: Context) -> None:
    target, sizes = ctx.target, ctx.sizes
    for kind, n in (("single", 1), ("batch", sizes.batch)):

        async def op(i: int, n: int = n) -> None:
            await target.enqueue(QUEUE, n, i * n)

        await target.reset()
        ctx.progress.show(ctx.label(f"enqueue {kind}: max rate"))

        async def prepare(rate: float) -> None:
            await target.reset()

        closed, ladder = await measure_max(op, sizes.concurrency, sizes.max_s, prepare)
        case = {"kind": kind, "batch": n, "concurrency": sizes.concurrency}
        ctx.record("enqueue", {**case, "phase": "max"}, closed.to_json(n))
        for run in ladder:
            ctx.record("enqueue", {**case, "phase": "max_open"}, run.to_json(n))
        best = max_rate(closed, ladder)
        ctx.measured[f"enqueue_{kind}_max_rate"] = best
        for fraction in sizes.fractions:
            rate = max(best * fraction, 1.0)
            windows = sizes.judged_windows if fraction == JUDGED_FRACTION else 1
            ctx.progress.show(ctx.label(f"enqueue {kind}: {rate:,.0f}/s open loop"))
            result = await open_loop_windows(op, rate, sizes.rate_s, windows, target.reset)
            ctx.record(
                "enqueue",
                {"kind": kind, "batch": n, "phase": "open", "fraction": fraction},
                result.to_json(n),
            )
    await target.reset()
