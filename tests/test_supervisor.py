"""Acceptance: crashed actors are restarted, persistent crashes escalate, and
cancellation always gets through.

Timing runs under ``MockClock(autojump_threshold=0)`` so restart backoffs and
visibility leases pass instantly and exactly.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
import trio
import trio.testing

from ojs_trio.actors.supervisor import ActorEscalation, Supervisor
from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.job import Job
from ojs_trio.engine.states import JobState
from ojs_trio.storage.memory import MemoryStorage

BASE = 1_700_000_000.0


def wall() -> float:
    return BASE + trio.current_time()


def actor_stats(engine: Engine, name: str) -> dict[str, Any]:
    """The named actor's statistics (empty until its supervisor first ran it)."""
    found = [a for a in engine.statistics().actors if a["name"] == name]
    assert len(found) <= 1
    return found[0] if found else {"name": name, "restarts": 0, "running": False}


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds."""
    with trio.fail_after(within):
        while True:
            if predicate():
                return
            await trio.sleep(0.001)


# -- through the engine --------------------------------------------------------------


async def test_crashed_reaper_is_restarted_and_engine_keeps_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage(rng=random.Random(0))
    real_reap = storage.reap
    crashes = 0

    async def reap_that_crashes_once(now: float, limit: int) -> list[Job]:
        nonlocal crashes
        if crashes == 0:
            crashes += 1
            raise RuntimeError("simulated reaper crash")
        return await real_reap(now, limit)

    storage.reap = reap_that_crashes_once  # type: ignore[method-assign]
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        await wait_until(lambda: actor_stats(engine, "reaper")["restarts"] == 1)
        await wait_until(lambda: actor_stats(engine, "reaper")["running"])
        reaper = actor_stats(engine, "reaper")
        assert reaper["last_error"] == "RuntimeError: simulated reaper crash"
        assert crashes == 1
        for name in ("promoter", "heartbeater"):
            assert actor_stats(engine, name)["restarts"] == 0

        # The restarted reaper still does its job: an unacked lease is returned.
        job = (await engine.enqueue("t.job")).job
        (fetched,) = await engine.fetch(["default"], worker_id="gone", visibility_ms=2_000)
        fetched_at = trio.current_time()
        assert fetched.id == job.id
        await trio.sleep_until(fetched_at + 1.9)
        assert (await engine.get(job.id)).state is JobState.ACTIVE
        assert engine.statistics().reaped == 0
        await trio.sleep_until(fetched_at + 2.1)
        assert (await engine.get(job.id)).state is JobState.AVAILABLE
        assert engine.statistics().reaped == 1

        # And the engine serves as before.
        (again,) = await engine.fetch(["default"], worker_id="alive")
        assert again.id == job.id
        assert again.attempt == 2
        assert (await engine.ack(job.id, worker_id="alive")).state is JobState.COMPLETED
        other = (await engine.enqueue("t.other")).job
        assert [j.id for j in await engine.fetch(["default"])] == [other.id]
        assert actor_stats(engine, "reaper")["restarts"] == 1


async def test_crashed_promoter_is_restarted_and_retries_still_promote(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage(rng=random.Random(0))
    real_promote = storage.promote_due
    crashed = trio.Event()

    async def promote_that_crashes_once(now: float, limit: int) -> list[Job]:
        if not crashed.is_set():
            crashed.set()
            raise OSError("simulated promoter crash")
        return await real_promote(now, limit)

    storage.promote_due = promote_that_crashes_once  # type: ignore[method-assign]
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        await crashed.wait()
        retry = {"initial_interval": "PT2S", "jitter": False}
        job = (await engine.enqueue("t.job", retry=retry)).job
        await engine.fetch(["default"])
        await engine.nack(job.id)
        nacked_at = trio.current_time()
        (again,) = await engine.fetch(["default"], wait_ms=5_000)
        assert again.id == job.id
        assert trio.current_time() - nacked_at == pytest.approx(2.0, abs=0.01)
        assert engine.statistics().promoted == 1
        assert actor_stats(engine, "promoter")["restarts"] == 1
        assert actor_stats(engine, "promoter")["last_error"] == "OSError: simulated promoter crash"


async def test_crashed_fetcher_pool_is_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: run() closed its receive channel on a crash (``async with``), so
    the restarted pool died with ClosedResourceError and fetches hit BrokenResourceError."""
    storage = MemoryStorage(rng=random.Random(0))
    real_claim = storage.claim
    crashes = 0

    async def claim_that_crashes_once(requests: Any, now: float) -> list[list[Job]]:
        nonlocal crashes
        if crashes == 0:
            crashes += 1
            raise RuntimeError("simulated pool crash")
        return await real_claim(requests, now)

    storage.claim = claim_that_crashes_once  # type: ignore[method-assign]
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        job = (await engine.enqueue("t.job")).job
        # The first claim crashes the pool while this fetch waits in it; the
        # restarted pool must still serve it.
        with trio.fail_after(10):
            jobs = await engine.fetch(["default"], wait_ms=2_000)
        assert [j.id for j in jobs] == [job.id]
        assert actor_stats(engine, "fetcher:default")["restarts"] == 1
        other = (await engine.enqueue("t.job")).job
        assert [j.id for j in await engine.fetch(["default"])] == [other.id]


async def test_crashed_heartbeater_is_restarted(autojump_clock: trio.testing.MockClock) -> None:
    """Regression: like the fetcher pool, a crash closed the heartbeater's channel."""
    storage = MemoryStorage(rng=random.Random(0))
    real_heartbeat = storage.heartbeat
    crashes = 0

    async def heartbeat_that_crashes_once(*args: Any) -> list[Job]:
        nonlocal crashes
        if crashes == 0:
            crashes += 1
            raise RuntimeError("simulated heartbeater crash")
        return await real_heartbeat(*args)

    storage.heartbeat = heartbeat_that_crashes_once  # type: ignore[method-assign]
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        job = (await engine.enqueue("t.job")).job
        await engine.fetch(["default"], worker_id="w1")
        with trio.fail_after(10):
            await engine.heartbeat("w1", [job.id])  # this one crashes the actor
            await wait_until(lambda: actor_stats(engine, "heartbeater")["restarts"] == 1)
            await wait_until(lambda: actor_stats(engine, "heartbeater")["running"])
            reply = await engine.heartbeat("w1", [job.id])
        assert reply.extended == [job.id]
        assert reply.state == "running"


async def test_promoter_does_not_spin_on_a_lease_while_the_reaper_is_down() -> None:
    """Regression: the promoter slept until the storage-wide next wakeup, which
    includes leases only the reaper acts on, so it busy-looped while the reaper was down."""
    storage = MemoryStorage()

    async def reap_always_crashes(now: float, limit: int) -> list[Job]:
        raise RuntimeError("reaper down")

    storage.reap = reap_always_crashes  # type: ignore[method-assign]
    supervisor = Supervisor(max_restarts=100, initial_backoff=30.0, max_backoff=30.0)
    config = EngineConfig(supervisor=supervisor, timer_max_sleep=0.05)
    async with open_engine(storage, config) as engine:
        await wait_until(lambda: actor_stats(engine, "reaper")["restarts"] == 1)
        await engine.enqueue("t.job")
        await engine.fetch(["default"], visibility_ms=20)
        await trio.sleep(0.05)  # the lease has run out; the reaper is in its backoff
        before = engine.promoter.passes
        await trio.sleep(0.25)  # nothing to observe but the absence of activity
        # About 0.25 / timer_max_sleep = 5 passes; a busy loop makes thousands.
        assert engine.promoter.passes - before <= 25


async def test_reaper_does_not_spin_on_a_due_job_while_the_promoter_is_down() -> None:
    """Regression: the mirror image, a due job the promoter has not promoted yet."""
    storage = MemoryStorage()

    async def promote_always_crashes(now: float, limit: int) -> list[Job]:
        raise RuntimeError("promoter down")

    storage.promote_due = promote_always_crashes  # type: ignore[method-assign]
    supervisor = Supervisor(max_restarts=100, initial_backoff=30.0, max_backoff=30.0)
    config = EngineConfig(supervisor=supervisor, timer_max_sleep=0.05)
    async with open_engine(storage, config) as engine:
        await wait_until(lambda: actor_stats(engine, "promoter")["restarts"] == 1)
        await engine.enqueue("t.job", delay_ms=20)
        await trio.sleep(0.05)  # the job is due; the promoter is in its backoff
        before = engine.reaper.passes
        await trio.sleep(0.25)
        # About 0.25 / timer_max_sleep = 5 passes; a busy loop makes thousands.
        assert engine.reaper.passes - before <= 25


async def test_engine_escalates_an_actor_that_keeps_crashing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage()
    calls = 0

    async def reap_always_crashes(now: float, limit: int) -> list[Job]:
        nonlocal calls
        calls += 1
        raise RuntimeError("the backend is gone for good")

    storage.reap = reap_always_crashes  # type: ignore[method-assign]
    supervisor = Supervisor(max_restarts=3, window=60.0, initial_backoff=0.1)
    with pytest.raises(ExceptionGroup) as excinfo:
        async with open_engine(storage, EngineConfig(clock=wall, supervisor=supervisor)):
            await trio.sleep_forever()  # the escalation tears the engine down
    assert excinfo.group_contains(ActorEscalation)
    assert calls == 4  # the first run and three restarts


# -- the supervisor on its own ---------------------------------------------------------


async def test_supervisor_restarts_after_backoff(autojump_clock: trio.testing.MockClock) -> None:
    supervisor = Supervisor(initial_backoff=0.5, max_backoff=5.0)
    runs: list[float] = []

    async def actor() -> None:
        runs.append(trio.current_time())
        if len(runs) <= 3:
            raise ValueError(f"crash {len(runs)}")

    await supervisor.supervise("flaky", actor)  # returns once the actor returns
    assert runs == pytest.approx([0.0, 0.5, 1.5, 3.5])  # backoff doubles: 0.5, 1, 2
    (stats,) = supervisor.statistics()
    assert stats.name == "flaky"
    assert stats.restarts == 3
    assert stats.last_error == "ValueError: crash 3"
    assert not stats.running


async def test_supervisor_backoff_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    supervisor = Supervisor(max_restarts=100, initial_backoff=1.0, max_backoff=3.0, window=1.0)
    runs: list[float] = []

    async def actor() -> None:
        runs.append(trio.current_time())
        if len(runs) <= 5:
            raise ValueError("crash")

    await supervisor.supervise("capped", actor)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps == pytest.approx([1.0, 2.0, 3.0, 3.0, 3.0])


async def test_always_crashing_actor_escalates(autojump_clock: trio.testing.MockClock) -> None:
    supervisor = Supervisor(max_restarts=3, window=60.0, initial_backoff=0.05)
    calls = 0

    async def doomed() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError(f"crash {calls}")

    start = trio.current_time()
    with pytest.raises(ActorEscalation, match="doomed") as excinfo:
        await supervisor.supervise("doomed", doomed)
    assert calls == 4  # max_restarts restarts, then the next crash escalates
    assert isinstance(excinfo.value.__cause__, RuntimeError)
    assert str(excinfo.value.__cause__) == "crash 4"
    assert trio.current_time() - start == pytest.approx(0.05 + 0.1 + 0.2)
    (stats,) = supervisor.statistics()
    assert stats.restarts == 4
    assert not stats.running


async def test_crashes_outside_the_window_do_not_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Crashes 2 s apart with a 1 s window: never more than one in the window.
    supervisor = Supervisor(max_restarts=1, window=1.0, initial_backoff=2.0, max_backoff=2.0)
    calls = 0

    async def sometimes() -> None:
        nonlocal calls
        calls += 1
        if calls <= 6:
            raise RuntimeError("transient")

    await supervisor.supervise("sometimes", sometimes)
    assert calls == 7
    assert supervisor.statistics()[0].restarts == 6


async def test_escalation_through_a_nursery_cancels_siblings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor(max_restarts=0, initial_backoff=0.01)
    sibling_cancelled = False

    async def doomed() -> None:
        raise RuntimeError("boom")

    async def sibling() -> None:
        nonlocal sibling_cancelled
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            sibling_cancelled = True
            raise

    with pytest.RaisesGroup(ActorEscalation):
        async with trio.open_nursery() as nursery:
            supervisor.start(nursery, "sibling", sibling)
            supervisor.start(nursery, "doomed", doomed)
    assert sibling_cancelled
    assert {s.name: s.restarts for s in supervisor.statistics()} == {"sibling": 0, "doomed": 1}


async def test_cancellation_is_never_swallowed(autojump_clock: trio.testing.MockClock) -> None:
    supervisor = Supervisor()

    async def sleeper() -> None:
        await trio.sleep_forever()

    start = trio.current_time()
    with trio.move_on_after(1.0) as scope:
        await supervisor.supervise("sleeper", sleeper)
        raise AssertionError("supervise returned although its actor never does")
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(1.0)
    assert supervisor.statistics()[0].restarts == 0


async def test_cancellation_during_restart_backoff_exits_promptly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = Supervisor(initial_backoff=30.0, max_backoff=30.0)
    crashed = trio.Event()

    async def crasher() -> None:
        crashed.set()
        raise RuntimeError("crash")

    async with trio.open_nursery() as nursery:
        supervisor.start(nursery, "crasher", crasher)
        await crashed.wait()
        await trio.sleep(1.0)  # now sleeping in its 30 s backoff
        cancelled_at = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() == cancelled_at
    assert supervisor.statistics()[0].restarts == 1


async def test_actor_that_catches_exceptions_broadly_still_gets_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``except Exception`` in an actor does not catch Cancelled, so neither may we."""
    supervisor = Supervisor(initial_backoff=0.01)
    loops = 0

    async def stubborn() -> None:
        nonlocal loops
        while True:
            try:
                loops += 1
                await trio.sleep(1)
            except Exception:  # the point of the test: a broad except
                pass

    with trio.move_on_after(3.5):
        await supervisor.supervise("stubborn", stubborn)
    assert loops == 4
    assert supervisor.statistics()[0].restarts == 0


async def test_supervised_actors_report_running(autojump_clock: trio.testing.MockClock) -> None:
    async with open_engine(MemoryStorage(), EngineConfig(clock=wall)) as engine:
        await trio.sleep(0.1)
        names = {a["name"]: a for a in engine.statistics().actors}
        assert {"promoter", "reaper", "heartbeater"} <= set(names)
        for name in ("promoter", "reaper", "heartbeater"):
            assert names[name]["running"]
            assert names[name]["restarts"] == 0
            assert names[name]["last_error"] is None
