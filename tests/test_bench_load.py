"""Repeated measurements in the harness: pooled latency windows (bench/load.py), how
the report shows them, and the cost scenario's repeated throughput runs."""

from __future__ import annotations

from dataclasses import replace

import trio

from bench.load import LoadResult, Progress, open_loop_windows, pooled
from bench.modes import SMOKE
from bench.report import _windows
from bench.scenarios import cost
from bench.scenarios.common import QUEUE, Context, fill
from bench.targets import open_embedded


def _run(latencies_ms: list[float], *, errors: int = 0, lag_ms: float = 0.0) -> LoadResult:
    return LoadResult(
        offered_rate=100.0,
        duration_s=1.0,
        completed=len(latencies_ms),
        errors=errors,
        latencies_s=[ms / 1000 for ms in latencies_ms],
        lag_max_s=lag_ms / 1000,
        error_sample="Boom: x" if errors else None,
    )


def test_pooled_percentiles_are_those_of_every_sample() -> None:
    quiet = _run([1.0] * 100)
    stalled = _run([1.0] * 97 + [50.0] * 3, errors=2, lag_ms=3.0)
    result = pooled([quiet, stalled, quiet]).to_json()
    # 300 samples, 3 of them slow: the pooled p99 is the 297th, a quiet one;
    # alone, the stalled window's p99 (its 99th of 100) is a slow one.
    assert result["latency"]["n"] == 300
    assert result["latency"]["p99_ms"] == 1.0
    assert result["latency"]["max_ms"] == 50.0
    assert result["completed"] == 300
    assert result["errors"] == 2
    assert result["error_sample"] == "Boom: x"
    assert result["generator_lag_max_ms"] == 3.0
    assert result["duration_s"] == 3.0
    assert [w["latency"]["p99_ms"] for w in result["windows"]] == [1.0, 50.0, 1.0]
    assert _windows(result) == "3 windows, p99 each 1.00 / 50.00 / 1.00 ms"


def test_one_window_is_reported_as_a_plain_run() -> None:
    only = _run([2.0] * 10)
    assert pooled([only]) is only
    assert "windows" not in only.to_json()
    assert _windows(only.to_json()) == ""


async def test_each_window_is_prepared_before_it_runs(autojump_clock: trio.abc.Clock) -> None:
    events: list[str] = []

    async def prepare() -> None:
        events.append("prepare")

    async def op(i: int) -> None:
        events.append("op")
        await trio.sleep(0.002)

    result = await open_loop_windows(op, 100.0, 0.05, 3, prepare)
    # 100/s for 0.05 s: five calls per window, each after its window's preparation.
    assert events == (["prepare"] + ["op"] * 5) * 3
    assert [w.completed for w in result.windows] == [5, 5, 5]
    assert result.completed == 15
    assert all(abs(s - 0.002) < 1e-6 for s in result.latencies_s)


async def test_cost_runs_are_topped_up_and_the_median_is_the_figure() -> None:
    sizes = replace(SMOKE, cost_resident=(40, 100), cost_samples=10, cost_runs=3, cost_tp_s=30.0)
    async with open_embedded("memory", "memory://") as target:
        ctx = Context(target, sizes, Progress(1, enabled=False), [])
        await target.reset()
        await fill(target, QUEUE, 40, tick=lambda done: None)
        metrics = await cost.measure(ctx, "40 resident")
    # 30 jobs are left after the claim samples.  A run stops taking new batches
    # once half the smallest size (20) is acked, but 16 workers fetching 10 at a
    # time have all 30 in hand by then.  The top-up brings the next run's backlog
    # back to 30: without it the second and third runs would find none.
    assert metrics["acked"] == 3 * 30
    runs = metrics["runs_jobs_per_s"]
    assert len(runs) == 3 and all(rate > 0 for rate in runs)
    assert metrics["jobs_per_s"] == sorted(runs)[1]
