"""Load generation and latency statistics.

* :func:`open_loop` issues operations on a fixed schedule, whether or not earlier ones
  have finished, and measures each latency from its *scheduled* send time.  A stall in
  the system under test therefore shows up in every operation that should have been
  sent during it (no coordinated omission), even when the generator itself falls
  behind.
* :func:`closed_loop` runs ``concurrency`` tasks back to back for a fixed time;
  :func:`measure_max` then steps open-loop runs down from that rate until one
  keeps up: the maximum the open-loop runs' offered rates are fractions of.
* :func:`summarize` turns samples into exact percentiles (nearest rank on a sorted
  list: no binning, so p99.9 is the real 99.9th sample when there are enough samples).
* :class:`Progress` is a small progress bar on stderr.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

PERCENTILES = (50.0, 95.0, 99.0, 99.9)

Op = Callable[[int], Awaitable[object]]


def percentile(sorted_samples: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (``nan`` when empty)."""
    if not sorted_samples:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_samples)))
    return sorted_samples[min(rank, len(sorted_samples)) - 1]


def summarize(samples_s: list[float]) -> dict[str, Any]:
    """Latency summary in milliseconds: count, mean, p50/p95/p99/p99.9, max."""
    ordered = sorted(samples_s)
    out: dict[str, Any] = {"n": len(ordered)}
    if not ordered:
        out.update({"mean_ms": None, "max_ms": None})
        out.update({_key(p): None for p in PERCENTILES})
        return out
    out["mean_ms"] = round(sum(ordered) / len(ordered) * 1000, 3)
    for p in PERCENTILES:
        out[_key(p)] = round(percentile(ordered, p) * 1000, 3)
    out["max_ms"] = round(ordered[-1] * 1000, 3)
    return out


def _key(pct: float) -> str:
    text = f"{pct:g}".replace(".", "_")
    return f"p{text}_ms"


@dataclass
class LoadResult:
    offered_rate: float | None  # operations per second (None for closed loop)
    duration_s: float  # from the first scheduled send to the last completion
    completed: int
    errors: int
    latencies_s: list[float] = field(default_factory=list)
    lag_max_s: float = 0.0  # how far the generator itself fell behind its schedule
    error_sample: str | None = None
    # The runs this result pools (see :func:`pooled`); empty for a single run.
    windows: list[LoadResult] = field(default_factory=list)

    @property
    def achieved_rate(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self, items_per_op: int = 1) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offered_rate": None if self.offered_rate is None else round(self.offered_rate, 1),
            "achieved_rate": round(self.achieved_rate, 1),
            "items_per_s": round(self.achieved_rate * items_per_op, 1),
            "duration_s": round(self.duration_s, 3),
            "completed": self.completed,
            "errors": self.errors,
            "generator_lag_max_ms": round(self.lag_max_s * 1000, 3),
            "latency": summarize(self.latencies_s),
        }
        if self.error_sample:
            out["error_sample"] = self.error_sample
        if self.windows:
            out["windows"] = [
                {
                    "achieved_rate": round(w.achieved_rate, 1),
                    "errors": w.errors,
                    "generator_lag_max_ms": round(w.lag_max_s * 1000, 3),
                    "latency": summarize(w.latencies_s),
                }
                for w in self.windows
            ]
        return out


def pooled(runs: list[LoadResult]) -> LoadResult:
    """Several runs at one offered rate as one result: their samples pooled.

    The percentiles are those of every sample of every run, as if the runs were
    one longer run; each run's own summary stays in ``windows``.  A single run is
    returned as it is.
    """
    if len(runs) == 1:
        return runs[0]
    samples = [s for run in runs for s in run.latencies_s]
    return LoadResult(
        offered_rate=runs[0].offered_rate,
        duration_s=sum(run.duration_s for run in runs),
        completed=sum(run.completed for run in runs),
        errors=sum(run.errors for run in runs),
        latencies_s=samples,
        lag_max_s=max(run.lag_max_s for run in runs),
        error_sample=next((run.error_sample for run in runs if run.error_sample), None),
        windows=list(runs),
    )


async def open_loop_windows(
    op: Op,
    rate: float,
    duration_s: float,
    windows: int,
    prepare: Callable[[], Awaitable[object]],
) -> LoadResult:
    """``windows`` open-loop runs of ``duration_s`` at ``rate``, pooled.

    ``prepare()`` runs before each (e.g. empty or refill the queue), outside the
    measured time.  One window of a few seconds holds a stall or none by chance;
    the pooled p99 over several, with each window's p99 beside it, says how
    steady the figure is.
    """
    runs = []
    for _ in range(max(windows, 1)):
        await prepare()
        runs.append(await open_loop(op, rate, duration_s))
    return pooled(runs)


async def open_loop(
    op: Op,
    rate: float,
    duration_s: float,
    *,
    max_in_flight: int = 20_000,
    drain_timeout_s: float = 30.0,
) -> LoadResult:
    """Call ``op(i)`` at ``rate`` per second for ``duration_s``; latency from the schedule.

    Operation ``i`` is due at ``t0 + i / rate``.  The generator starts it at that time
    (or as soon as it can, if it is late) without waiting for earlier operations.
    Latency is ``completion - due time``, so time spent queued behind a stall, in the
    generator or in the system under test, counts.  ``max_in_flight`` only bounds
    memory; when it binds, the waiting still counts towards latency.  The generator
    sleeps until the next operation is due and then starts everything due by the
    time it woke.  Trio's sleeps end on the millisecond ticks of ``epoll``, so a
    start can be up to about 1 ms late; that counts towards the latency
    (conservative).  Operations still running ``drain_timeout_s`` after the last
    send are cancelled and counted as errors.
    """
    count = max(1, int(rate * duration_s))
    latencies: list[float] = []
    errors = 0
    error_sample: str | None = None
    lag_max = 0.0
    slots = trio.Semaphore(max_in_flight)
    last_done = 0.0

    async def one(i: int, due: float) -> None:
        nonlocal errors, error_sample, last_done
        try:
            await op(i)
        except Exception as exc:
            errors += 1
            error_sample = error_sample or f"{type(exc).__name__}: {exc}"[:300]
        else:
            now = trio.current_time()
            latencies.append(now - due)
            last_done = max(last_done, now)
        finally:
            slots.release()

    t0 = trio.current_time() + 0.01
    async with trio.open_nursery() as nursery:
        i = 0
        while i < count:
            due = t0 + i / rate
            if due > trio.current_time():
                # Start every operation due by the time we wake: under load the
                # loop wakes late and starts a batch.  A fixed 1 ms quantum here
                # (before 2026-12-07) added 1-2 ms to every latency on top of
                # epoll's own millisecond rounding.  Latency still counts from
                # each due time, so lateness can only add to it, never hide a stall.
                await trio.sleep_until(due)
            now = trio.current_time()
            while i < count and (due := t0 + i / rate) <= now:
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    await slots.acquire()
                lag_max = max(lag_max, now - due)
                nursery.start_soon(one, i, due)
                i += 1
        nursery.cancel_scope.deadline = trio.current_time() + drain_timeout_s
    unfinished = count - len(latencies) - errors
    end = last_done if last_done else trio.current_time()
    return LoadResult(
        offered_rate=rate,
        duration_s=max(end - t0, 1e-9),
        completed=len(latencies),
        errors=errors + unfinished,
        latencies_s=latencies,
        lag_max_s=lag_max,
        error_sample=error_sample,
    )


SUSTAINED = 0.95  # an open-loop run sustains its rate if it achieves this share of it
LADDER_STEP = 0.85  # each rung offers this share of the one before
LADDER_RUNGS = 8


async def measure_max(
    op: Op,
    concurrency: int,
    duration_s: float,
    prepare: Callable[[float], Awaitable[object]],
    *,
    open_op: Op | None = None,
) -> tuple[LoadResult, list[LoadResult]]:
    """The maximum rate as the open-loop runs can load the system under test.

    First ``concurrency`` closed-loop callers.  Closed-loop callers share the
    engine's batches, and an open-loop generator in the same process spends a task
    per call, so the open loop may sustain less.  Then a ladder of open-loop runs,
    each after ``prepare(rate)``: offered the closed-loop rate, then
    ``LADDER_STEP`` of the previous rate, until one achieves ``SUSTAINED`` of
    what it was offered.  An overloaded run's own achieved rate understates the
    maximum (a backlog of thousands of calls thrashes), hence the ladder.  The
    maximum is the achieved rate of the first run that sustained its rate, or of
    the best run if none did.  ``open_op`` (default ``op``) is what the open-loop
    runs call.  Returns the closed-loop run and the ladder.
    """
    closed = await closed_loop(op, concurrency, duration_s)
    ladder: list[LoadResult] = []
    rate = max(closed.achieved_rate, 1.0)
    for _ in range(LADDER_RUNGS):
        await prepare(rate)
        run = await open_loop(open_op or op, rate, duration_s)
        ladder.append(run)
        if run.achieved_rate >= SUSTAINED * rate:
            break
        rate *= LADDER_STEP
    return closed, ladder


def max_rate(closed: LoadResult, ladder: list[LoadResult]) -> float:
    """The maximum :func:`measure_max` found (see there)."""
    if ladder and ladder[-1].achieved_rate >= SUSTAINED * (ladder[-1].offered_rate or 0.0):
        return min(closed.achieved_rate, ladder[-1].achieved_rate)
    return min(closed.achieved_rate, max((r.achieved_rate for r in ladder), default=0.0))


async def closed_loop(op: Op, concurrency: int, duration_s: float) -> LoadResult:
    """``concurrency`` tasks call ``op`` back to back for ``duration_s``.

    An operation that returns ``False`` means "nothing left to do" (for example an
    empty queue) and stops its task early.
    """
    latencies: list[float] = []
    errors = 0
    error_sample: str | None = None
    counter = 0
    t0 = trio.current_time()
    stop_at = t0 + duration_s

    async def runner() -> None:
        nonlocal errors, error_sample, counter
        while trio.current_time() < stop_at:
            i = counter
            counter += 1
            start = trio.current_time()
            try:
                more = await op(i)
            except Exception as exc:
                errors += 1
                error_sample = error_sample or f"{type(exc).__name__}: {exc}"[:300]
                await trio.sleep(0.001)
                continue
            latencies.append(trio.current_time() - start)
            if more is False:
                return

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(runner)
    return LoadResult(
        offered_rate=None,
        duration_s=max(trio.current_time() - t0, 1e-9),
        completed=len(latencies),
        errors=errors,
        latencies_s=latencies,
        error_sample=error_sample,
    )


class Progress:
    """A one-line progress bar on stderr (a plain line per step when not a terminal)."""

    def __init__(self, total: int, *, enabled: bool = True, width: int = 28) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.width = width
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str, *, advance: bool = True) -> None:
        if advance:
            self.done = min(self.done + 1, self.total)
        self.show(label)

    def show(self, label: str) -> None:
        if not self.enabled:
            return
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        line = f"[{bar}] {self.done}/{self.total} {elapsed:6.1f}s  {label}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line[:160])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def log(self, message: str) -> None:
        """A message on its own line, without breaking the bar."""
        if self.tty and self.enabled:
            sys.stderr.write("\r\x1b[2K")
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
