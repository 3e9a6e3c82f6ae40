"""Timer actors: the delay promoter and the TTL side of the reaper.

Everything runs under ``MockClock(autojump_threshold=0)`` (the pytest-trio
``autojump_clock`` fixture) and the engine's wall clock follows it
(``BASE + trio.current_time()``), so "at +9.9 s" is exact and instant.

A busy-looping actor would freeze mock time (autojump only fires when every
task is blocked), so a test guarding against busy loops would hang rather than
fail; :func:`real_time_limit` turns such a hang into a failure.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
import trio.testing
from mockclock import engine_on_clock, real_time_limit

from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.job import Job
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.storage.memory import MemoryStorage

BASE = 1_700_000_000.0  # the wall-clock time at mock time 0


def wall() -> float:
    return BASE + trio.current_time()


def running_engine(
    storage: MemoryStorage | None = None, **config: Any
) -> AbstractAsyncContextManager[Engine]:
    config.setdefault("clock", wall)
    return engine_on_clock(storage, **config)


async def fetchable(engine: Engine, queue: str = "default") -> list[Job]:
    """Claim whatever is claimable now (the claimed jobs are then active)."""
    return await engine.fetch([queue], 100)


# -- delay promoter ---------------------------------------------------------------


@pytest.mark.parametrize("max_sleep", [1.0, 3600.0])
async def test_scheduled_job_is_claimable_exactly_when_due(
    autojump_clock: trio.testing.MockClock, max_sleep: float
) -> None:
    """Due at +10 s: not before (+9.9 s), and at once after (+10.1 s), whatever the
    promoter's re-check bound is: it sleeps until the due time, not by polling."""
    with real_time_limit():
        async with running_engine(timer_max_sleep=max_sleep) as engine:
            start = trio.current_time()
            job = (await engine.enqueue("t.job", delay_ms=10_000)).job
            assert job.state is JobState.SCHEDULED
            assert job.scheduled_at == pytest.approx(BASE + start + 10.0)

            await trio.sleep_until(start + 9.9)
            assert (await engine.get(job.id)).state is JobState.SCHEDULED
            assert await fetchable(engine) == []

            await trio.sleep_until(start + 10.1)
            assert (await engine.get(job.id)).state is JobState.AVAILABLE
            assert [j.id for j in await fetchable(engine)] == [job.id]
            assert engine.statistics().promoted == 1


async def test_long_poll_gets_a_scheduled_job_the_moment_it_is_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine(timer_max_sleep=3600.0) as engine:
            start = trio.current_time()
            job = (await engine.enqueue("t.job", delay_until="+PT10S")).job
            (got,) = await engine.fetch(["default"], wait_ms=60_000)
            assert got.id == job.id
            assert trio.current_time() - start == pytest.approx(10.0, abs=1e-6)


async def test_sooner_job_wakes_a_promoter_sleeping_towards_a_later_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The promoter plans to sleep an hour (towards the later job); a job due in
    5 s, enqueued meanwhile, must still be available on time."""
    with real_time_limit():
        async with running_engine(timer_max_sleep=3600.0) as engine:
            later = (await engine.enqueue("t.later", delay_ms=3_000_000)).job
            await trio.sleep(1.0)  # the promoter is now asleep towards `later`
            passes = engine.promoter.passes
            start = trio.current_time()
            sooner = (await engine.enqueue("t.sooner", delay_ms=5_000)).job

            await trio.sleep_until(start + 4.9)
            assert (await engine.get(sooner.id)).state is JobState.SCHEDULED
            await trio.sleep_until(start + 5.0 + 1e-3)
            assert (await engine.get(sooner.id)).state is JobState.AVAILABLE
            assert (await engine.get(later.id)).state is JobState.SCHEDULED
            assert [j.id for j in await fetchable(engine)] == [sooner.id]
            # Woken early once (re-plan) and once more at the due time: no polling.
            assert engine.promoter.passes - passes <= 3


async def test_later_job_does_not_delay_a_planned_sooner_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine(timer_max_sleep=3600.0) as engine:
            start = trio.current_time()
            sooner = (await engine.enqueue("t.sooner", delay_ms=5_000)).job
            await trio.sleep(1.0)
            later = (await engine.enqueue("t.later", delay_ms=60_000)).job
            await trio.sleep_until(start + 5.0 + 1e-3)
            assert (await engine.get(sooner.id)).state is JobState.AVAILABLE
            assert (await engine.get(later.id)).state is JobState.SCHEDULED
            await trio.sleep_until(start + 61.0 + 1e-3)
            assert (await engine.get(later.id)).state is JobState.AVAILABLE
            assert engine.statistics().promoted == 2


async def test_many_interleaved_due_times_each_promote_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    delays = [7, 3, 11, 1, 5, 9, 2]
    with real_time_limit():
        async with running_engine(timer_max_sleep=3600.0) as engine:
            start = trio.current_time()
            jobs = {d: (await engine.enqueue("t.job", [d], delay_ms=d * 1000)).job for d in delays}
            for d in sorted(delays):
                await trio.sleep_until(start + d - 0.05)
                assert (await engine.get(jobs[d].id)).state is JobState.SCHEDULED
                await trio.sleep_until(start + d + 1e-3)
                assert (await engine.get(jobs[d].id)).state is JobState.AVAILABLE


@pytest.mark.parametrize(
    "option",
    [
        {"scheduled_at": format_ts(BASE - 60.0)},
        {"delay_until": format_ts(BASE - 0.5)},
        {"delay_ms": 0},
    ],
    ids=["scheduled_at-past", "delay_until-past", "delay_ms-0"],
)
async def test_past_schedule_is_available_immediately(
    autojump_clock: trio.testing.MockClock, option: dict[str, Any]
) -> None:
    with real_time_limit():
        async with running_engine(timer_max_sleep=3600.0) as engine:
            start = trio.current_time()
            job = (await engine.enqueue("t.job", **option)).job
            assert job.state is JobState.AVAILABLE
            assert job.scheduled_at is None
            assert [j.id for j in await fetchable(engine)] == [job.id]
            assert trio.current_time() == start  # no timer involved at all
            assert engine.statistics().promoted == 0


async def test_promoter_and_reaper_do_not_busy_poll_while_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With timer_max_sleep=1.0, 60 s of idle mock time is about 60 passes each."""
    with real_time_limit():
        async with running_engine(timer_max_sleep=1.0) as engine:
            await trio.sleep(0.5)
            promoter, reaper = engine.promoter.passes, engine.reaper.passes
            await trio.sleep(60.0)
            assert 50 <= engine.promoter.passes - promoter <= 70
            assert 50 <= engine.reaper.passes - reaper <= 70


async def test_promoter_does_not_busy_poll_with_a_far_future_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine(timer_max_sleep=1.0) as engine:
            job = (await engine.enqueue("t.job", delay_ms=3_600_000)).job
            active = (await engine.enqueue("t.active")).job
            await engine.fetch(["default"], visibility_ms=3_600_000)  # a lease far away too
            await trio.sleep(0.5)
            promoter, reaper = engine.promoter.passes, engine.reaper.passes
            await trio.sleep(60.0)
            assert engine.promoter.passes - promoter <= 70
            assert engine.reaper.passes - reaper <= 70
            assert (await engine.get(job.id)).state is JobState.SCHEDULED
            assert (await engine.get(active.id)).state is JobState.ACTIVE


async def test_promoter_with_a_long_bound_sleeps_through_idle_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine(timer_max_sleep=3600.0) as engine:
            await trio.sleep(0.5)
            passes = engine.promoter.passes
            await trio.sleep(600.0)
            assert engine.promoter.passes - passes == 0


# -- TTL (expires_at) -----------------------------------------------------------------


async def test_expired_available_job_is_discarded_by_the_reaper(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            sub = engine.events.subscribe(types=["job.discarded"])
            start = trio.current_time()
            job = (await engine.enqueue("t.job", expires_at="+PT2S")).job
            assert job.state is JobState.AVAILABLE
            assert job.expires_at == pytest.approx(BASE + start + 2.0)

            await trio.sleep_until(start + 1.9)
            assert (await engine.get(job.id)).state is JobState.AVAILABLE

            await trio.sleep_until(start + 2.0 + 1e-3)
            # Discarded by the reaper itself: nobody fetched in the meantime.
            expired = await engine.get(job.id)
            assert expired.state is JobState.DISCARDED
            assert expired.error is not None and expired.error["code"] == "expired"
            assert expired.completed_at is None
            assert expired.started_at is None
            assert expired.discarded_at == pytest.approx(BASE + start + 2.0)
            assert expired.attempt == 0
            assert engine.statistics().reaped == 1
            # Visible in the dead letter queue, with its default on_exhaustion (discard).
            assert expired.retry.on_exhaustion == "discard"
            dead = await engine.list_dead_letter()
            assert [j.id for j in dead.jobs] == [job.id]

            event = sub.receive.receive_nowait()
            assert event["job_id"] == job.id
            assert (event["data"]["reason"], event["data"]["dead_letter"]) == ("expired", True)

            assert await fetchable(engine) == []
            await trio.sleep(30.0)
            assert await fetchable(engine) == []
            assert (await engine.get(job.id)).state is JobState.DISCARDED


async def test_expired_job_is_never_handed_out_even_before_the_reaper_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Claim checks expires_at itself, so the reaper's timing cannot let one through."""
    storage = MemoryStorage()
    real_reap = storage.reap
    reaper_enabled = trio.Event()

    async def reap_later(now: float, limit: int) -> list[Job]:
        await reaper_enabled.wait()
        return await real_reap(now, limit)

    storage.reap = reap_later  # type: ignore[method-assign]
    with real_time_limit():
        async with open_engine(storage, EngineConfig(clock=wall)) as engine:
            start = trio.current_time()
            job = (await engine.enqueue("t.job", expires_at="+PT2S")).job
            keep = (await engine.enqueue("t.keep")).job
            await trio.sleep_until(start + 2.5)
            assert (await engine.get(job.id)).state is JobState.AVAILABLE  # not reaped yet
            assert [j.id for j in await fetchable(engine)] == [keep.id]
            expired = await engine.get(job.id)
            assert expired.state is JobState.DISCARDED
            assert expired.error is not None and expired.error["code"] == "expired"
            assert expired.completed_at is None
            reaper_enabled.set()
            with trio.fail_after(5):
                while True:
                    if engine.statistics().reaped >= 1:
                        break
                    await trio.sleep(0.1)
            assert engine.statistics().reaped == 1  # reported once, by the reaper


async def test_scheduled_job_expiring_before_it_is_due_is_never_promoted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            start = trio.current_time()
            job = (await engine.enqueue("t.job", delay_ms=10_000, expires_at="+PT5S")).job
            assert job.state is JobState.SCHEDULED

            await trio.sleep_until(start + 4.9)
            assert (await engine.get(job.id)).state is JobState.SCHEDULED
            await trio.sleep_until(start + 5.0 + 1e-3)
            expired = await engine.get(job.id)
            assert expired.state is JobState.DISCARDED
            assert expired.error is not None and expired.error["code"] == "expired"
            assert expired.completed_at is None
            assert expired.scheduled_at is None

            await trio.sleep_until(start + 15.0)
            assert (await engine.get(job.id)).state is JobState.DISCARDED
            assert await fetchable(engine) == []
            assert engine.statistics().promoted == 0
            assert engine.statistics().reaped == 1


async def test_scheduled_job_expiring_with_the_promoter_slept_past_ttl_is_not_promoted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Even when the promoter reaches the due time first (reaper down), it skips
    a job whose expires_at already passed."""
    storage = MemoryStorage()

    async def reaper_down(now: float, limit: int) -> list[Job]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    storage.reap = reaper_down  # type: ignore[method-assign]
    with real_time_limit():
        async with open_engine(storage, EngineConfig(clock=wall)) as engine:
            start = trio.current_time()
            job = (await engine.enqueue("t.job", delay_ms=10_000, expires_at="+PT5S")).job
            await trio.sleep_until(start + 12.0)
            assert engine.statistics().promoted == 0
            assert (await engine.get(job.id)).state is JobState.SCHEDULED
            assert await fetchable(engine) == []


async def test_job_with_a_far_expiry_runs_normally(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine(timer_max_sleep=60.0) as engine:
            start = trio.current_time()
            job = (await engine.enqueue("t.job", delay_ms=2_000, expires_at="+PT1H")).job
            await trio.sleep_until(start + 2.0 + 1e-3)
            (got,) = await engine.fetch(["default"], visibility_ms=7_200_000)
            assert got.id == job.id
            await trio.sleep(3700.0)  # past expires_at while active: TTL no longer applies
            assert (await engine.get(job.id)).state is JobState.ACTIVE
            assert (await engine.ack(job.id)).state is JobState.COMPLETED


async def test_ttl_shorter_than_the_reaper_bound_is_still_reaped_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The reaper sleeps up to ``timer_max_sleep``; a job enqueued meanwhile whose
    expires_at falls before the end of that sleep must still be discarded on time
    (as the promoter is woken for a sooner due time)."""
    with real_time_limit():
        async with running_engine(timer_max_sleep=30.0) as engine:
            await trio.sleep(1.0)  # the reaper is asleep for 30 s
            start = trio.current_time()
            job = (await engine.enqueue("t.job", expires_at="+PT2S")).job
            await trio.sleep_until(start + 2.0 + 1e-3)
            assert (await engine.get(job.id)).state is JobState.DISCARDED


async def test_lease_shorter_than_the_reaper_bound_is_still_reaped_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine(timer_max_sleep=30.0) as engine:
            await trio.sleep(1.0)  # the reaper is asleep for 30 s
            job = (await engine.enqueue("t.job")).job
            start = trio.current_time()
            await engine.fetch(["default"], worker_id="gone", visibility_ms=5_000)
            await trio.sleep_until(start + 5.0 + 1e-3)
            assert (await engine.get(job.id)).state is JobState.AVAILABLE
