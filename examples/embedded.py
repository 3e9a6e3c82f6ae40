"""Run ojs-trio inside a Trio program: no HTTP server, in-memory storage.

    .venv/bin/python examples/embedded.py

Registers three handlers, adds one enqueue middleware (stamps ``meta``) and one
execution middleware (times each attempt), runs four workers, and enqueues:

* two jobs that succeed,
* one job that fails its first attempt and succeeds on the retry,
* one job whose handler raises ``Discard`` (it ends at once, never retried).

It waits until every job has reached a terminal state, which it learns from
the engine's event bus rather than by sleeping, prints the outcome and shuts
down.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ojs_trio import Job, JobState, open_engine
from ojs_trio.engine.middleware import EnqueueNext, ExecuteNext
from ojs_trio.engine.worker import Discard, JobContext
from ojs_trio.storage.memory import MemoryStorage

QUEUES = ["default", "reports"]
WORKERS = 4
TERMINAL_EVENTS = ["job.completed", "job.discarded", "job.cancelled"]


# -- handlers: each receives a JobContext and returns the job's result ----------------


async def add(ctx: JobContext) -> int:
    a, b = ctx.args
    return int(a) + int(b)


async def flaky_report(ctx: JobContext) -> str:
    await trio.sleep(0.02)  # stands in for real I/O
    # ctx.job.attempt counts executions: 1 on the first run, 2 on the first retry.
    if ctx.job.attempt == 1:
        raise ConnectionError("report backend not ready yet")
    return f"report {ctx.args[0]} built on attempt {ctx.job.attempt}"


async def legacy(ctx: JobContext) -> None:
    # Discard ends the job in `discarded` without using up its retries.
    raise Discard("legacy jobs are no longer supported")


# -- middleware ----------------------------------------------------------------------


async def stamp_source(job: Job, call_next: EnqueueNext) -> Job | None:
    """Enqueue middleware: runs before the job is stored; may change or drop it."""
    job.meta = {**(job.meta or {}), "enqueued_by": "examples/embedded.py"}
    return await call_next(job)


async def time_attempts(ctx: JobContext, call_next: ExecuteNext) -> Any:
    """Execution middleware: wraps every handler call, success or failure."""
    started = trio.current_time()
    outcome = "ok"
    try:
        return await call_next(ctx)
    except Exception as exc:
        outcome = f"raised {type(exc).__name__}: {exc}"
        raise
    finally:
        elapsed_ms = (trio.current_time() - started) * 1000
        print(
            f"  ran {ctx.job.type:<14} attempt {ctx.job.attempt} "
            f"on {ctx.slot} in {elapsed_ms:.1f} ms: {outcome}"
        )


# -- the program ---------------------------------------------------------------------


async def main() -> None:
    async with open_engine(MemoryStorage()) as engine:
        engine.register("math.add", add)
        engine.register("report.build", flaky_report)
        engine.register("legacy.task", legacy)
        engine.use_enqueue(stamp_source)
        engine.use_execution(time_attempts)

        # Subscribe before enqueueing so no terminal event can be missed.
        finished = engine.events.subscribe(types=TERMINAL_EVENTS)

        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run_workers, QUEUES, WORKERS)
            print(f"started {WORKERS} workers on {QUEUES}")

            fast_retry = {"max_attempts": 3, "initial_interval": "PT0.1S"}
            submitted = [
                await engine.enqueue("math.add", [2, 3]),
                await engine.enqueue("math.add", [40, 2]),
                await engine.enqueue("report.build", ["q3"], queue="reports", retry=fast_retry),
                await engine.enqueue("legacy.task", []),
            ]
            pending = {result.job.id for result in submitted if result is not None}
            print(f"enqueued {len(pending)} jobs")

            with trio.fail_after(10):  # a safety net, not the way we wait
                async for event in finished.receive:
                    pending.discard(event["job_id"])
                    if not pending:
                        break

            # Stop fetching: waiting fetches return empty and the workers exit,
            # so run_workers returns and the nursery closes on its own.
            engine.begin_shutdown()

        print("results:")
        for result in submitted:
            assert result is not None
            job = await engine.get(result.job.id)
            outcome = job.result if job.state is JobState.COMPLETED else (job.error or {})
            print(
                f"  {job.type:<14} {job.state.value:<9} attempt={job.attempt} "
                f"errors={len(job.errors)} meta={job.meta} -> {outcome}"
            )
        stats = engine.statistics()
        print(f"engine: enqueued={stats.enqueued} acked={stats.acked} nacked={stats.nacked}")
    print("engine closed")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    trio.run(main)
