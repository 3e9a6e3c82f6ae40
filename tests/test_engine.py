"""The embedded engine API: jobs in and out through ``Engine`` without HTTP.

Timer logic (long-poll deadlines, retry backoff, visibility leases, embedded
heartbeats) runs under ``MockClock(autojump_threshold=0)``: the engine's wall
clock is ``BASE + trio.current_time()``, so the engine's idea of "now" follows
the mock clock and a test sleeps through seconds of engine time instantly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from ojs_trio.actors.fetcher import CONCURRENT_ROUNDS, PROBE_BATCH
from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.errors import (
    BackendError,
    BackendUnavailable,
    InvalidRequest,
    InvalidStateTransition,
    NotFound,
    OjsError,
    ShuttingDown,
)
from ojs_trio.engine.events import EventBus, job_event
from ojs_trio.engine.ids import is_uuid7
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.engine.validation import parse_job
from ojs_trio.engine.worker import SETTLE_WRITES, DeadLetter, Discard, JobContext
from ojs_trio.storage.memory import MemoryStorage
from ojs_trio.storage.port import AckRequest

BASE = 1_700_000_000.0  # the wall-clock time at mock time 0


def wall() -> float:
    """A wall clock that follows Trio's (mock) clock."""
    return BASE + trio.current_time()


def no_jitter(interval: str = "PT2S", max_attempts: int = 3, **extra: Any) -> dict[str, Any]:
    return {"max_attempts": max_attempts, "initial_interval": interval, "jitter": False, **extra}


@asynccontextmanager
async def running_engine(**config: Any) -> AsyncIterator[Engine]:
    config.setdefault("clock", wall)
    storage = MemoryStorage(rng=random.Random(0))
    async with open_engine(storage, EngineConfig(**config)) as engine:
        yield engine


@asynccontextmanager
async def running_workers(
    engine: Engine, queues: tuple[str, ...] = ("default",), concurrency: int = 1, **options: Any
) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(engine.run_workers, list(queues), concurrency, **options))
        yield
        nursery.cancel_scope.cancel()


async def wait_for_state(
    engine: Engine, job_id: str, *states: JobState, within: float = 10.0
) -> Job:
    """Poll until the job reaches one of ``states`` (fails after ``within`` seconds)."""
    with trio.fail_after(within):
        while True:
            job = await engine.get(job_id)
            if job.state in states:
                return job
            await trio.sleep(0.001)


async def fetch_one(engine: Engine, queue: str = "default", **kwargs: Any) -> Job:
    jobs = await engine.fetch([queue], **kwargs)
    assert len(jobs) == 1, jobs
    return jobs[0]


# -- the basic verbs ----------------------------------------------------------------


async def test_enqueue_fetch_ack_get() -> None:
    async with running_engine(clock=lambda: BASE) as engine:
        result = await engine.enqueue("email.send", ["a@example.com"], queue="mail", priority=5)
        assert result.created
        job = result.job
        assert job.state is JobState.AVAILABLE
        assert (job.type, job.queue, job.args, job.priority) == (
            "email.send",
            "mail",
            ["a@example.com"],
            5,
        )
        assert job.created_at == BASE

        fetched = await fetch_one(engine, "mail", worker_id="w1")
        assert fetched.id == job.id
        assert fetched.state is JobState.ACTIVE
        assert fetched.attempt == 1
        assert fetched.worker_id == "w1"
        assert await engine.fetch(["mail"]) == []  # nothing else to hand out

        acked = await engine.ack(job.id, {"sent": True}, worker_id="w1")
        assert acked.state is JobState.COMPLETED
        stored = await engine.get(job.id)
        assert stored.state is JobState.COMPLETED
        assert stored.has_result and stored.result == {"sent": True}
        assert stored.to_wire()["result"] == {"sent": True}

        stats = engine.statistics()
        assert (stats.enqueued, stats.fetched, stats.acked, stats.nacked) == (1, 1, 1, 0)


async def test_fetch_order_priority_then_fifo() -> None:
    async with running_engine() as engine:
        low = (await engine.enqueue("t.low", priority=-5)).job
        first = (await engine.enqueue("t.normal")).job
        high = (await engine.enqueue("t.high", priority=10)).job
        second = (await engine.enqueue("t.normal")).job
        jobs = await engine.fetch(["default"], 10)
        assert [j.id for j in jobs] == [high.id, first.id, second.id, low.id]


async def test_fetch_respects_queue_order() -> None:
    async with running_engine() as engine:
        b = (await engine.enqueue("t.job", queue="b")).job
        a = (await engine.enqueue("t.job", queue="a")).job
        jobs = await engine.fetch(["a", "b"], 2)
        assert [j.id for j in jobs] == [a.id, b.id]


async def test_nack_requeue_and_discard() -> None:
    async with running_engine() as engine:
        job = (await engine.enqueue("t.job", retry=no_jitter(max_attempts=1))).job
        await fetch_one(engine)
        requeued = await engine.nack(job.id, requeue=True)
        assert requeued.state is JobState.AVAILABLE
        assert requeued.attempt == 0  # a handed-back attempt is not a failed one

        await fetch_one(engine)
        failed = await engine.nack(job.id, Failure(code="boom", message="it broke"))
        assert failed.state is JobState.DISCARDED  # max_attempts 1: exhausted
        assert failed.error is not None and failed.error["code"] == "boom"
        assert engine.statistics().nacked == 2


async def test_cancel_and_unknown_ids() -> None:
    async with running_engine() as engine:
        job = (await engine.enqueue("t.job")).job
        cancelled = await engine.cancel(job.id)
        assert cancelled.state is JobState.CANCELLED
        assert await engine.fetch(["default"]) == []  # a cancelled job is never handed out

        with pytest.raises(OjsError) as excinfo:
            await engine.cancel(job.id)  # terminal: no transition
        assert excinfo.value.http_status == 409

        missing = "01890000-0000-7000-8000-000000000000"
        calls: list[Callable[[], Awaitable[Job]]] = [
            partial(engine.get, missing),
            partial(engine.cancel, missing),
            partial(engine.ack, missing),
            partial(engine.nack, missing),
            partial(engine.retry_dead_letter, missing),
            partial(engine.delete_dead_letter, missing),
        ]
        for call in calls:
            with pytest.raises(NotFound):
                await call()


async def test_ack_by_other_worker_is_conflict() -> None:
    async with running_engine() as engine:
        job = (await engine.enqueue("t.job")).job
        await fetch_one(engine, worker_id="w1")
        with pytest.raises(OjsError) as excinfo:
            await engine.ack(job.id, worker_id="w2")
        assert excinfo.value.code == "conflict"
        assert (await engine.get(job.id)).state is JobState.ACTIVE


async def test_fetch_rejects_bad_queues() -> None:
    async with running_engine() as engine:
        with pytest.raises(InvalidRequest):
            await engine.fetch([])
        with pytest.raises(InvalidRequest):
            await engine.fetch(["Not A Queue"])


async def test_invalid_envelope_is_rejected_before_storage() -> None:
    async with running_engine() as engine:
        with pytest.raises(InvalidRequest):
            await engine.submit({"type": "t.job"})  # args missing
        with pytest.raises(InvalidRequest) as excinfo:
            await engine.submit_many([{"type": "t.job", "args": []}, {"type": 1, "args": []}])
        assert excinfo.value.details["errors"][0]["index"] == 1
        assert engine.statistics().enqueued == 0
        assert await engine.fetch(["default"], 10) == []  # all or nothing


async def test_shutdown_answers_waiting_fetch_and_refuses_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        results: list[list[Job]] = []

        async def long_poll() -> None:
            results.append(await engine.fetch(["default"], wait_ms=30_000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.sleep(1)
            assert engine.statistics().waiting_fetches == 1
            start = trio.current_time()
            engine.begin_shutdown()
        assert results == [[]]
        assert trio.current_time() - start < 0.001
        with pytest.raises(ShuttingDown):
            await engine.enqueue("t.job")
        assert await engine.fetch(["default"], wait_ms=30_000) == []


# -- long-poll fetch (MockClock) -------------------------------------------------------


async def test_long_poll_returns_as_soon_as_a_job_is_enqueued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        got: list[tuple[list[Job], float]] = []

        async def long_poll() -> None:
            jobs = await engine.fetch(["default"], wait_ms=30_000)
            got.append((jobs, trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.sleep(3)  # the fetch is parked in its pool meanwhile
            assert got == []
            assert engine.statistics().waiting_fetches == 1
            enqueued_at = trio.current_time()
            job = (await engine.enqueue("t.job")).job

        (jobs, returned_at), *_ = got
        assert [j.id for j in jobs] == [job.id]
        assert returned_at - enqueued_at < 0.001  # woken by the enqueue, not by a poll tick


async def test_long_poll_on_empty_queue_times_out_after_wait_ms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        start = trio.current_time()
        jobs = await engine.fetch(["default"], wait_ms=5_000)
        elapsed = trio.current_time() - start
        assert jobs == []
        assert elapsed == pytest.approx(5.0, abs=1e-6)


async def test_long_poll_wait_is_capped_by_config(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine(max_fetch_wait_ms=2_000) as engine:
        start = trio.current_time()
        assert await engine.fetch(["default"], wait_ms=60_000) == []
        assert trio.current_time() - start == pytest.approx(2.0, abs=1e-6)


async def test_long_poll_fetch_ignores_other_queues(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def other_queue() -> None:
                await trio.sleep(1)
                await engine.enqueue("t.job", queue="other")

            nursery.start_soon(other_queue)
            assert await engine.fetch(["default"], wait_ms=4_000) == []
        assert trio.current_time() - start == pytest.approx(4.0, abs=1e-6)
        assert len(await engine.fetch(["other"])) == 1


async def test_cancelled_long_poll_loses_no_job(autojump_clock: trio.testing.MockClock) -> None:
    async with running_engine() as engine:
        with trio.move_on_after(2.5) as scope:
            await engine.fetch(["default"], wait_ms=30_000)
        assert scope.cancelled_caught
        job = (await engine.enqueue("t.job")).job
        fetched_at = trio.current_time()
        assert [j.id for j in await engine.fetch(["default"])] == [job.id]
        assert trio.current_time() == fetched_at
        assert engine.statistics().waiting_fetches == 0


async def test_non_waiting_fetch_is_served_while_another_fetch_is_parked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a wait_ms=0 fetch arriving while the pool was parked for another
    fetch used to be expired (answered []) before any claim was tried for it."""
    storage = MemoryStorage()
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        parked: list[list[Job]] = []

        async def long_poll() -> None:
            parked.append(await engine.fetch(["default"], wait_ms=30_000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.sleep(0.5)
            # Two jobs appear without a wake-up, as when another server process on a
            # shared backend enqueues them.  The parked fetch wants one of them.
            jobs = [parse_job({"type": "t.job", "args": [n]}, wall()) for n in range(2)]
            await storage.enqueue(jobs, wall())
            got = await engine.fetch(["default"])  # wait_ms=0: one claim, then answer
            assert len(got) == 1, "answered [] without looking at storage"
        assert len(parked[0]) == 1


async def test_jobs_claimed_for_an_abandoned_fetch_are_handed_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The fetcher gives up while its pool is claiming: the claimed job must come back."""
    storage = MemoryStorage()
    real_claim = storage.claim
    claimed = trio.Event()
    gate = trio.Event()

    async def gated_claim(requests: Any, now: float) -> list[list[Job]]:
        results = await real_claim(requests, now)
        if any(results) and not gate.is_set():
            claimed.set()
            await gate.wait()
        return results

    storage.claim = gated_claim  # type: ignore[method-assign]
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def doomed_fetch() -> None:
                with scope:
                    await engine.fetch(["default"], worker_id="doomed", wait_ms=30_000)
                    raise AssertionError("the fetch should have been cancelled")

            nursery.start_soon(doomed_fetch)
            await trio.sleep(1)
            job = (await engine.enqueue("t.job")).job
            await claimed.wait()  # the pool holds the job for the doomed fetch
            scope.cancel()
            await trio.sleep(0.1)
            gate.set()
        back = await wait_for_state(engine, job.id, JobState.AVAILABLE)
        assert back.attempt == 0
        assert back.worker_id is None
        again = await fetch_one(engine, worker_id="next", wait_ms=1_000)
        assert again.id == job.id
        assert again.attempt == 1


def count_claims(storage: MemoryStorage) -> list[tuple[int, int]]:
    """Record each storage.claim call as (requests carried, jobs returned)."""
    real_claim = storage.claim
    calls: list[tuple[int, int]] = []

    async def counting_claim(requests: Sequence[Any], now: float) -> list[list[Job]]:
        results = await real_claim(requests, now)
        calls.append((len(requests), sum(len(jobs) for jobs in results)))
        return results

    storage.claim = counting_claim  # type: ignore[method-assign]
    return calls


async def park_in_order(engine: Engine, nursery: trio.Nursery, count: int) -> dict[int, list[Job]]:
    """Start ``count`` long-polls on "default", each parked before the next starts;
    what fetch ``n`` gets lands in the returned dict under ``n``."""
    got: dict[int, list[Job]] = {}

    async def long_poll(n: int) -> None:
        got[n] = await engine.fetch(["default"], worker_id=f"w{n}", wait_ms=30_000)

    for n in range(count):
        nursery.start_soon(long_poll, n)
        await trio.testing.wait_all_tasks_blocked()
    return got


async def test_one_claim_call_serves_every_parked_fetch() -> None:
    """20 long-polls parked on one queue set, then 20 jobs in one enqueue call: the
    pool serves all the fetches with a single storage.claim carrying 20 requests."""
    fetchers = 20
    storage = MemoryStorage()
    calls = count_claims(storage)
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        got: list[list[Job]] = []

        async def long_poll() -> None:
            got.append(await engine.fetch(["default"], worker_id="w", wait_ms=30_000))

        async with trio.open_nursery() as nursery:
            for _ in range(fetchers):
                nursery.start_soon(long_poll)
            await trio.testing.wait_all_tasks_blocked()
            # Every fetch had its first claim round, found nothing, and is parked.
            assert sum(carried for carried, _ in calls) == fetchers
            assert all(returned == 0 for _, returned in calls)
            assert engine.statistics().waiting_fetches == fetchers
            calls.clear()
            jobs = [parse_job({"type": "t.job", "args": [n]}, wall()) for n in range(fetchers)]
            await engine.enqueue_jobs(jobs)

        # An idle re-check round (every second) could add an empty call; the jobs
        # went out in exactly one.
        assert [call for call in calls if call[1]] == [(fetchers, fetchers)]
        assert sorted(len(batch) for batch in got) == [1] * fetchers
        assert {batch[0].id for batch in got} == {job.id for job in jobs}
        assert engine.statistics().waiting_fetches == 0


async def test_a_wake_claims_for_the_oldest_parked_fetches_until_one_comes_back_empty(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1,100 parked fetches (over two claim batches of 512), 3 jobs arrive: one claim
    of the oldest batch serves the 3 oldest, and the fetches behind them are left
    alone (a claim with an empty-handed fetch means storage is dry)."""
    parked = 1_100
    storage = MemoryStorage()
    calls = count_claims(storage)
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        async with trio.open_nursery() as nursery:
            got = await park_in_order(engine, nursery, parked)
            assert engine.statistics().waiting_fetches == parked
            calls.clear()
            jobs = [parse_job({"type": "t.job", "args": [n]}, wall()) for n in range(3)]
            await engine.enqueue_jobs(jobs)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == [(512, 3)]
            assert sorted(got) == [0, 1, 2]
            assert engine.statistics().waiting_fetches == parked - 3
            # The idle re-check claims for a few of the oldest, finds nothing, stops.
            calls.clear()
            await trio.sleep(1.5)
            assert calls == [(PROBE_BATCH, 0)]
            nursery.cancel_scope.cancel()


async def test_a_recheck_goes_on_past_its_probe_while_every_fetch_gets_a_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Jobs another process enqueued (no wake-up here) for half of 100 parked fetches:
    the idle re-check's probe of the oldest all get one, so it goes on in a full
    batch, and every job goes out in that one re-check."""
    storage = MemoryStorage()
    calls = count_claims(storage)
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        async with trio.open_nursery() as nursery:
            got = await park_in_order(engine, nursery, 100)
            calls.clear()
            jobs = [parse_job({"type": "t.job", "args": [n]}, wall()) for n in range(50)]
            await storage.enqueue(jobs, wall())
            await trio.sleep(1.5)
            assert calls == [(PROBE_BATCH, PROBE_BATCH), (100 - PROBE_BATCH, 50 - PROBE_BATCH)]
            assert sorted(got) == list(range(50))
            assert engine.statistics().waiting_fetches == 50
            nursery.cancel_scope.cancel()


async def test_parked_fetches_expire_each_at_its_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Deadlines in any order: each fetch is answered (empty) at its own, the count of
    waiting fetches follows, and a fetch parked after the others still gets a job."""
    waits_s = [5, 1, 4, 2, 3] * 40
    async with running_engine() as engine:
        answered: list[tuple[float, int]] = []
        start = trio.current_time()

        async def long_poll(wait_s: int) -> None:
            jobs = await engine.fetch(["default"], wait_ms=wait_s * 1000)
            assert jobs == []
            answered.append((trio.current_time() - start, wait_s))

        async with trio.open_nursery() as nursery:
            for wait_s in waits_s:
                nursery.start_soon(long_poll, wait_s)
            for second in range(1, 6):
                await trio.sleep_until(start + second + 0.5)
                expected = sum(1 for w in waits_s if w > second)
                assert engine.statistics().waiting_fetches == expected
        assert len(answered) == len(waits_s)
        assert all(at == pytest.approx(wait_s, abs=0.01) for at, wait_s in answered)
        job = (await engine.enqueue("t.job")).job
        assert [j.id for j in await engine.fetch(["default"], wait_ms=1000)] == [job.id]
        assert engine.statistics().waiting_fetches == 0


async def test_fetches_given_up_leave_the_count_at_once_and_the_pool_soon(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """200 of 300 parked long-polls are cancelled (their clients left): the waiting
    count drops at once, the pool lets go of them within a re-check, and a job
    that arrives goes to the oldest fetch still waiting."""
    async with running_engine() as engine:
        got: dict[int, list[Job]] = {}
        scopes = [trio.CancelScope() for _ in range(300)]

        async def long_poll(n: int) -> None:
            with scopes[n]:
                got[n] = await engine.fetch(["default"], worker_id=f"w{n}", wait_ms=30_000)

        async with trio.open_nursery() as nursery:
            for n in range(300):
                nursery.start_soon(long_poll, n)
                await trio.testing.wait_all_tasks_blocked()
            for n in range(200):
                scopes[n].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert engine.statistics().waiting_fetches == 100
            await trio.sleep(1.5)
            (pool,) = engine._pools.values()
            assert len(pool._waiting) == 100  # the given-up entries are gone
            job = (await engine.enqueue("t.job")).job
            await trio.testing.wait_all_tasks_blocked()
            assert [n for n, jobs in got.items() if jobs] == [200]
            assert got[200][0].id == job.id
            assert engine.statistics().waiting_fetches == 99
            nursery.cancel_scope.cancel()


async def test_a_fetch_whose_wait_ends_during_its_claim_gets_the_claimed_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The idle re-check claims for a parked fetch and the claim outlasts the fetch's
    wait: the expiry pass must leave it to the claim, which found a job for it."""
    storage = MemoryStorage()
    real_claim = storage.claim
    gate = trio.Event()
    in_claim = trio.Event()

    async def slow_claim(requests: Sequence[Any], now: float) -> list[list[Job]]:
        if trio.current_time() > 0.5:  # the re-check, not the fetch's first claim
            in_claim.set()
            await gate.wait()
        return await real_claim(requests, now)

    storage.claim = slow_claim  # type: ignore[method-assign]
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        got: list[list[Job]] = []

        async def long_poll() -> None:
            got.append(await engine.fetch(["default"], worker_id="w", wait_ms=2_000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await in_claim.wait()  # the 1 s re-check is claiming for the parked fetch
            # A job another process enqueued (no wake-up here), then the wait runs out.
            job = parse_job({"type": "t.job", "args": []}, wall())
            await storage.enqueue([job], wall())
            await trio.sleep(2.0)
            assert got == []  # not answered empty-handed behind the claim's back
            gate.set()
        assert [[j.id for j in jobs] for jobs in got] == [[job.id]]
        assert (await engine.get(job.id)).state is JobState.ACTIVE


async def test_a_fetch_arriving_during_a_claim_round_gets_a_round_of_its_own() -> None:
    """Claim rounds overlap, up to CONCURRENT_ROUNDS: a fetch that arrives while a
    round's claim is still running does not wait for it; one more than that does."""
    storage = MemoryStorage()
    real_claim = storage.claim
    gate = trio.Event()
    in_claim = 0

    async def slow_claim(requests: Sequence[Any], now: float) -> list[list[Job]]:
        nonlocal in_claim
        in_claim += 1
        await gate.wait()
        in_claim -= 1
        return await real_claim(requests, now)

    storage.claim = slow_claim  # type: ignore[method-assign]
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        for n in range(CONCURRENT_ROUNDS + 1):
            await engine.enqueue("t.job", [n])
        got: list[list[Job]] = []

        async def fetch() -> None:
            got.append(await engine.fetch(["default"], worker_id="w"))

        async with trio.open_nursery() as nursery:
            for n in range(CONCURRENT_ROUNDS + 1):
                nursery.start_soon(fetch)
                await trio.testing.wait_all_tasks_blocked()
                # Each fetch so far is in a claim of its own, up to the limit.
                assert in_claim == min(n + 1, CONCURRENT_ROUNDS)
            gate.set()
        assert sorted(len(jobs) for jobs in got) == [1] * (CONCURRENT_ROUNDS + 1)
        assert len({jobs[0].id for jobs in got}) == CONCURRENT_ROUNDS + 1


# -- retries, leases, heartbeats (MockClock) ---------------------------------------------


async def test_nacked_job_is_promoted_after_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        job = (await engine.enqueue("t.job", retry=no_jitter("PT2S"))).job
        await fetch_one(engine)
        nacked = await engine.nack(job.id, Failure(code="boom", message="try again"))
        nacked_at = trio.current_time()
        assert nacked.state is JobState.RETRYABLE
        assert nacked.retry_delay_ms == 2_000
        assert nacked.scheduled_at == pytest.approx(wall() + 2.0)

        await trio.sleep_until(nacked_at + 1.9)
        assert (await engine.get(job.id)).state is JobState.RETRYABLE
        assert await engine.fetch(["default"]) == []

        await trio.sleep_until(nacked_at + 2.1)
        assert (await engine.get(job.id)).state is JobState.AVAILABLE
        again = await fetch_one(engine)
        assert again.id == job.id
        assert again.attempt == 2
        assert engine.statistics().promoted == 1


async def test_long_poll_picks_up_a_promoted_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine(timer_max_sleep=60.0) as engine:
        job = (await engine.enqueue("t.job", retry=no_jitter("PT3S"))).job
        await fetch_one(engine)
        await engine.nack(job.id)
        nacked_at = trio.current_time()
        again = await fetch_one(engine, wait_ms=30_000)
        assert again.id == job.id
        # The promoter slept exactly until the due time (not until its 60 s bound).
        assert trio.current_time() - nacked_at == pytest.approx(3.0, abs=0.01)


async def test_scheduled_job_becomes_available_when_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        job = (await engine.enqueue("t.job", delay_until="+PT10S")).job
        assert job.state is JobState.SCHEDULED
        await trio.sleep(9.9)
        assert await engine.fetch(["default"]) == []
        await trio.sleep(0.2)
        assert (await fetch_one(engine)).id == job.id


async def test_reaper_requeues_job_after_visibility_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        sub = engine.events.subscribe(types=["job.requeued"])
        job = (await engine.enqueue("t.job")).job
        await fetch_one(engine, worker_id="gone", visibility_ms=5_000)
        fetched_at = trio.current_time()

        await trio.sleep_until(fetched_at + 4.9)
        assert (await engine.get(job.id)).state is JobState.ACTIVE
        assert engine.statistics().reaped == 0

        await trio.sleep_until(fetched_at + 5.1)
        reaped = await engine.get(job.id)
        assert reaped.state is JobState.AVAILABLE
        assert reaped.error is not None and reaped.error["code"] == "visibility_timeout"
        assert engine.statistics().reaped == 1
        assert sub.receive.receive_nowait()["job_id"] == job.id

        again = await fetch_one(engine, worker_id="alive")
        assert again.id == job.id
        assert again.attempt == 2
        await engine.ack(job.id, worker_id="alive")
        with pytest.raises(OjsError):
            await engine.ack(job.id, worker_id="gone")  # the old lease is worthless


async def test_lease_expiry_on_last_attempt_discards(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        job = (await engine.enqueue("t.job", retry=no_jitter(max_attempts=1))).job
        await fetch_one(engine, visibility_ms=1_000)
        await trio.sleep(1.5)
        assert (await engine.get(job.id)).state is JobState.DISCARDED


async def test_embedded_heartbeater_keeps_long_job_leased(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine(heartbeat_interval=1.0) as engine:
        started = trio.Event()
        release = trio.Event()

        async def slow(ctx: JobContext) -> str:
            started.set()
            await release.wait()
            return "finished"

        engine.register("t.slow", slow)
        job = (await engine.enqueue("t.slow")).job
        async with running_workers(engine, visibility_ms=3_000):
            await started.wait()
            began = trio.current_time()
            await trio.sleep_until(began + 10.0)  # more than three leases long
            running = await engine.get(job.id)
            assert running.state is JobState.ACTIVE
            assert running.attempt == 1
            assert running.lease_expires_at is not None
            assert running.lease_expires_at > wall()
            assert engine.statistics().reaped == 0
            assert engine.heartbeater.beats >= 8

            release.set()
            done = await wait_for_state(engine, job.id, JobState.COMPLETED)
        assert done.result == "finished"
        assert done.attempt == 1
        assert engine.statistics().reaped == 0


async def test_prefetched_jobs_stay_leased_and_run_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A pool with prefetch holds up to ``concurrency + prefetch`` jobs; the waiting
    ones keep their leases (the heartbeater tracks them) and run once a worker is free.
    """
    async with running_engine(heartbeat_interval=1.0) as engine:
        release = trio.Event()
        ran: list[int] = []

        async def slow(ctx: JobContext) -> None:
            ran.append(ctx.args[0])
            await release.wait()

        engine.register("t.slow", slow)
        ids = [(await engine.enqueue("t.slow", [n])).job.id for n in range(5)]
        async with running_workers(engine, visibility_ms=3_000, prefetch=2):
            while len(ran) < 1:  # noqa: ASYNC110 (a list filled by the handler)
                await trio.sleep(0.01)
            await trio.sleep(10.0)  # more than three leases long
            jobs = [await engine.get(i) for i in ids]
            assert [j.state for j in jobs] == [JobState.ACTIVE] * 3 + [JobState.AVAILABLE] * 2
            assert all(j.worker_id == "embedded" and j.attempt == 1 for j in jobs[:3])
            assert all((j.lease_expires_at or 0) > wall() for j in jobs[:3])
            assert engine.statistics().reaped == 0
            assert ran == [0]

            release.set()
            for job_id in ids:
                await wait_for_state(engine, job_id, JobState.COMPLETED)
        assert ran == [0, 1, 2, 3, 4]
        assert engine.statistics().reaped == 0


async def test_handlers_that_wait_run_side_by_side_up_to_concurrency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Jobs claimed together fan out over the free workers, never past ``concurrency``."""
    async with running_engine() as engine:
        release = trio.Event()
        running: list[str] = []

        async def waits(ctx: JobContext) -> None:
            running.append(ctx.slot)
            await release.wait()

        engine.register("t.wait", waits)
        ids = [(await engine.enqueue("t.wait", [n])).job.id for n in range(6)]
        async with running_workers(engine, concurrency=4, prefetch=2):
            with trio.fail_after(5):
                while len(running) < 4:  # noqa: ASYNC110 (a list filled by the handlers)
                    await trio.sleep(0.01)
            await trio.sleep(1.0)
            assert sorted(running) == [f"embedded-{n}" for n in range(4)]
            assert engine.statistics().fetched == 6  # two of them prefetched, waiting
            release.set()
            for job_id in ids:
                await wait_for_state(engine, job_id, JobState.COMPLETED)
        assert len(running) == 6
        assert not engine.heartbeater.statistics().tracked


async def test_a_cancelled_pool_releases_its_prefetched_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        started = trio.Event()

        async def stuck(ctx: JobContext) -> None:
            started.set()
            await trio.sleep_forever()

        engine.register("t.stuck", stuck)
        ids = [(await engine.enqueue("t.stuck", [n])).job.id for n in range(4)]
        async with running_workers(engine, prefetch=3):
            await started.wait()
            await trio.sleep(1.0)
        states = [(await engine.get(i)).state for i in ids]
        # The running job stays active until its lease runs out (its worker was
        # cancelled mid-job); the three that waited for a worker are available at once.
        assert states == [JobState.ACTIVE] + [JobState.AVAILABLE] * 3
        assert not engine.heartbeater.statistics().tracked


async def test_without_heartbeats_the_lease_runs_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Control for the test above: the heartbeater is what keeps the lease."""
    async with running_engine(heartbeat_interval=1_000.0) as engine:
        started = trio.Event()

        async def slow(ctx: JobContext) -> None:
            started.set()
            await trio.sleep_forever()

        engine.register("t.slow", slow)
        job = (await engine.enqueue("t.slow")).job
        async with running_workers(engine, visibility_ms=3_000):
            await started.wait()
            await trio.sleep(3.5)
            assert engine.statistics().reaped == 1
            assert (await engine.get(job.id)).state is JobState.AVAILABLE


# -- middleware ----------------------------------------------------------------------


async def test_enqueue_middleware_modifies_and_drops_jobs() -> None:
    async with running_engine() as engine:
        calls: list[str] = []

        async def outer(job: Job, nxt: Callable[[Job], Any]) -> Job | None:
            calls.append(f"outer:{job.type}")
            job.meta = {**(job.meta or {}), "tenant": "acme"}
            return await nxt(job)

        async def dropper(job: Job, nxt: Callable[[Job], Any]) -> Job | None:
            calls.append(f"dropper:{job.type}")
            if job.type == "t.drop":
                return None
            job.priority = 42
            return await nxt(job)

        engine.use_enqueue(outer)
        engine.use_enqueue(dropper)
        results = await engine.submit_many(
            [{"type": "t.keep", "args": [1]}, {"type": "t.drop", "args": [2]}]
        )
        assert calls == ["outer:t.keep", "dropper:t.keep", "outer:t.drop", "dropper:t.drop"]
        assert [r.job.type for r in results] == ["t.keep"]
        kept = await engine.get(results[0].job.id)
        assert kept.meta == {"tenant": "acme"}
        assert kept.priority == 42
        assert engine.statistics().enqueued == 1
        assert [j.type for j in await engine.fetch(["default"], 10)] == ["t.keep"]
        assert [e["data"]["job_type"] for e in engine.events.query()] == ["t.keep", "t.keep"]


async def test_enqueue_middleware_dropping_a_single_job() -> None:
    """Regression: Engine.submit used to index [0] into the empty result (IndexError)."""
    async with running_engine() as engine:

        async def drop_all(job: Job, nxt: Callable[[Job], Any]) -> Job | None:
            return None

        engine.use_enqueue(drop_all)
        try:
            result = await engine.enqueue("t.job")
        except OjsError:
            pass  # a documented refusal would do as well
        else:
            assert result is None
        assert engine.statistics().enqueued == 0


async def test_execution_middleware_wraps_in_registration_order() -> None:
    async with running_engine() as engine:
        trace: list[str] = []
        outcomes: list[tuple[str, Any]] = []

        async def outer(ctx: JobContext, nxt: Callable[[JobContext], Any]) -> Any:
            trace.append("outer:before")
            ctx.state["seen_by_outer"] = True
            try:
                result = await nxt(ctx)
            except Exception as exc:
                trace.append("outer:error")
                outcomes.append(("error", type(exc).__name__))
                raise
            trace.append("outer:after")
            outcomes.append(("result", result))
            return {"wrapped": result}

        async def inner(ctx: JobContext, nxt: Callable[[JobContext], Any]) -> Any:
            trace.append("inner:before")
            assert ctx.state["seen_by_outer"]
            try:
                return await nxt(ctx)
            finally:
                trace.append("inner:after")

        async def add(ctx: JobContext) -> int:
            trace.append("handler")
            return int(sum(ctx.args))

        async def explode(ctx: JobContext) -> None:
            trace.append("handler")
            raise ValueError("kaboom")

        engine.use_execution(outer)
        engine.use_execution(inner)
        engine.register("t.add", add)
        engine.register("t.explode", explode)
        async with running_workers(engine):
            ok = (await engine.enqueue("t.add", [2, 3])).job
            done = await wait_for_state(engine, ok.id, JobState.COMPLETED)
            assert done.result == {"wrapped": 5}  # middleware replaced the result
            assert trace == [
                "outer:before",
                "inner:before",
                "handler",
                "inner:after",
                "outer:after",
            ]

            trace.clear()
            bad = (await engine.enqueue("t.explode", retry=no_jitter(max_attempts=1))).job
            failed = await wait_for_state(engine, bad.id, JobState.DISCARDED)
            assert trace == [
                "outer:before",
                "inner:before",
                "handler",
                "inner:after",
                "outer:error",
            ]
        assert outcomes == [("result", 5), ("error", "ValueError")]
        assert failed.error is not None and failed.error["type"] == "ValueError"


async def test_execution_middleware_can_swallow_failures() -> None:
    async with running_engine() as engine:

        async def rescue(ctx: JobContext, nxt: Callable[[JobContext], Any]) -> Any:
            try:
                return await nxt(ctx)
            except RuntimeError:
                return "rescued"

        async def broken(ctx: JobContext) -> None:
            raise RuntimeError("nope")

        engine.use_execution(rescue)
        engine.register("t.broken", broken)
        async with running_workers(engine):
            job = (await engine.enqueue("t.broken")).job
            done = await wait_for_state(engine, job.id, JobState.COMPLETED)
        assert done.result == "rescued"


# -- handler outcomes --------------------------------------------------------------------


async def test_handler_discard_and_dead_letter_end_the_job() -> None:
    async with running_engine() as engine:

        async def discard(ctx: JobContext) -> None:
            raise Discard("not worth it")

        async def dead(ctx: JobContext) -> None:
            raise DeadLetter("needs a human")

        engine.register("t.discard", discard)
        engine.register("t.dead", dead)
        async with running_workers(engine):
            d = (await engine.enqueue("t.discard", retry=no_jitter(max_attempts=5))).job
            dl = (await engine.enqueue("t.dead", retry=no_jitter(max_attempts=5))).job
            discarded = await wait_for_state(engine, d.id, JobState.DISCARDED)
            dead_lettered = await wait_for_state(engine, dl.id, JobState.DISCARDED)

        assert discarded.attempt == 1  # no retries despite max_attempts 5
        assert discarded.error is not None and discarded.error["code"] == "DISCARD"
        assert not discarded.dead_letter
        assert dead_lettered.attempt == 1
        assert dead_lettered.error is not None and dead_lettered.error["code"] == "DEAD_LETTER"
        assert dead_lettered.error["message"] == "needs a human"
        assert dead_lettered.dead_letter

        page = await engine.list_dead_letter()
        assert [j.id for j in page.jobs] == [dl.id]
        assert page.total == 1

        revived = await engine.retry_dead_letter(dl.id)
        assert revived.state is JobState.AVAILABLE
        assert (await engine.list_dead_letter()).total == 0


async def test_job_without_handler_is_discarded() -> None:
    async with running_engine() as engine:
        async with running_workers(engine):
            job = (await engine.enqueue("t.unknown")).job
            gone = await wait_for_state(engine, job.id, JobState.DISCARDED)
        assert gone.error is not None and gone.error["code"] == "DISCARD"


async def test_a_result_json_cannot_carry_fails_the_job_not_the_worker() -> None:
    async with running_engine() as engine:

        async def odd(ctx: JobContext) -> Any:
            return {"when": object()} if ctx.job.args == ["bad"] else {"ok": [1, 2.5]}

        engine.register("t.odd", odd)
        async with running_workers(engine):
            bad = (await engine.enqueue("t.odd", ["bad"], retry=no_jitter(max_attempts=1))).job
            good = (await engine.enqueue("t.odd", ["good"])).job
            failed = await wait_for_state(engine, bad.id, JobState.DISCARDED)
            done = await wait_for_state(engine, good.id, JobState.COMPLETED)
        assert failed.error is not None and failed.error["code"] == "handler_error"
        assert "result.when" in failed.error["message"]
        assert done.result == {"ok": [1, 2.5]}


class _FlakyClaims(MemoryStorage):
    """Claims fail while ``down`` is set, as PostgreSQL's do during a restart."""

    down = True
    failures = 0

    async def claim(self, requests: Any, now: float) -> list[list[Job]]:
        if self.down:
            self.failures += 1
            raise BackendUnavailable("the database is restarting")
        return await super().claim(requests, now)


async def test_worker_pool_waits_out_a_backend_outage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = _FlakyClaims(rng=random.Random(0))
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        done = trio.Event()

        async def handler(ctx: JobContext) -> str:
            done.set()
            return "ok"

        engine.register("t.flaky", handler)
        job = (await engine.enqueue("t.flaky")).job
        async with running_workers(engine, concurrency=2):
            while storage.failures < 4:  # noqa: ASYNC110 (a counter)
                await trio.sleep(0.05)
            storage.down = False
            with trio.fail_after(10):  # backoff capped at 5 s
                await done.wait()
            completed = await wait_for_state(engine, job.id, JobState.COMPLETED)
        assert completed.result == "ok"
        # Backing off, not spinning: 0.1 + 0.2 + 0.4 s before the fourth attempt.
        assert storage.failures <= 6


async def test_an_ack_with_a_result_json_cannot_carry_is_refused() -> None:
    async with running_engine() as engine:
        job = (await engine.enqueue("t.x")).job
        [held] = await engine.fetch(["default"], worker_id="w")
        assert held.id == job.id
        with pytest.raises(InvalidRequest) as info:
            await engine.ack(job.id, {"n": 2**70}, worker_id="w")
        assert info.value.details["field"] == "result.n"
        assert (await engine.get(job.id)).state is JobState.ACTIVE
        await engine.ack(job.id, {"n": 2**64 - 1}, worker_id="w")


async def test_ack_many_settles_each_job_and_reports_each_refusal() -> None:
    async with running_engine() as engine:
        first, second, idle = [(await engine.enqueue("t.x")).job for _ in range(3)]
        await engine.fetch(["default"], 2, worker_id="w")
        bad = {"n": 2**70}
        out = await engine.ack_many(
            [(first.id, "one"), (second.id, bad), (idle.id, None), (first.id, "again")],
            worker_id="w",
        )
        assert isinstance(out[0], Job) and out[0].result == "one"
        assert isinstance(out[1], InvalidRequest) and out[1].details["field"] == "result.n"
        assert isinstance(out[2], InvalidStateTransition)  # never fetched
        assert isinstance(out[3], InvalidStateTransition)  # completed by the first ack
        assert (await engine.get(second.id)).state is JobState.ACTIVE
        assert engine.statistics().acked == 1
        completed = engine.events.query(types=["job.completed"])
        assert [e["data"]["job_id"] for e in completed] == [first.id]


class _GatedAcks(MemoryStorage):
    """Records each ack_many call; the first ``gated`` wait for ``gate``, the first may fail."""

    def __init__(self, *, fail_first: bool = False, gated: int = 1) -> None:
        super().__init__(rng=random.Random(0))
        self.gate = trio.Event()
        self.batches: list[list[str]] = []
        self.fail_first = fail_first
        self.gated = gated

    async def ack_many(self, acks: Sequence[AckRequest], now: float) -> list[Job | OjsError]:
        self.batches.append([ack.job_id for ack in acks])
        if len(self.batches) <= self.gated:
            first = len(self.batches) == 1
            await self.gate.wait()
            if first and self.fail_first:
                raise BackendUnavailable("the database is restarting")
        return await super().ack_many(acks, now)


async def test_a_pool_writes_the_outcomes_that_queued_meanwhile_in_one_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Both write slots are taken by parked writes of one outcome each; the
    # outcomes that queue meanwhile go out together once a slot is free.
    storage = _GatedAcks(gated=SETTLE_WRITES)
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        engine.register("t.quick", _returns_ok)
        async with running_workers(engine, concurrency=4):
            early = []
            for n in range(SETTLE_WRITES):
                early.append((await engine.enqueue("t.quick")).job)
                while len(storage.batches) <= n:  # noqa: ASYNC110 (the write is parked)
                    await trio.sleep(0.01)
            rest = [(await engine.enqueue("t.quick")).job for _ in range(4)]
            await trio.testing.wait_all_tasks_blocked()
            storage.gate.set()
            for job in [*early, *rest]:
                await wait_for_state(engine, job.id, JobState.COMPLETED)
        assert storage.batches == [[job.id] for job in early] + [[job.id for job in rest]]


async def test_a_failed_ack_write_leaves_the_jobs_to_their_leases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = _GatedAcks(fail_first=True)
    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        engine.register("t.quick", _returns_ok)
        async with running_workers(engine, concurrency=2, visibility_ms=5_000):
            job = (await engine.enqueue("t.quick")).job
            storage.gate.set()
            # The lost ack is not retried by the pool: the lease runs out, the
            # reaper makes the job available again, and its second attempt is acked.
            done = await wait_for_state(engine, job.id, JobState.COMPLETED, within=60)
        assert done.attempt == 2
        assert storage.batches == [[job.id], [job.id]]


class _LosesAcks(MemoryStorage):
    """Reports a failed write for the acks of ``lose`` (once), as PostgreSQL does
    when its settle transaction fails; settles every other ack."""

    def __init__(self) -> None:
        super().__init__(rng=random.Random(0))
        self.lose: set[str] = set()
        self.batches: list[list[str]] = []

    async def ack_many(self, acks: Sequence[AckRequest], now: float) -> list[Job | OjsError]:
        self.batches.append([ack.job_id for ack in acks])
        kept = [ack for ack in acks if ack.job_id not in self.lose]
        settled = iter(await super().ack_many(kept, now))
        outcomes: list[Job | OjsError] = []
        for ack in acks:
            if ack.job_id in self.lose:
                self.lose.discard(ack.job_id)
                outcomes.append(BackendError("PostgreSQL error (SerializationFailure)"))
            else:
                outcomes.append(next(settled))
        return outcomes


async def test_acks_lost_to_a_backend_error_are_one_warning_and_refusals_stay_info(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    storage = _LosesAcks()
    gate = trio.Event()
    running: set[str] = set()

    async def gated(ctx: JobContext) -> str:
        running.add(ctx.job.id)
        await gate.wait()
        return "ok"

    async with open_engine(storage, EngineConfig(clock=wall)) as engine:
        engine.register("t.gated", gated)
        async with running_workers(engine, concurrency=3, visibility_ms=5_000):
            first, second, cancelled = [(await engine.enqueue("t.gated")).job for _ in range(3)]
            while len(running) < 3:  # noqa: ASYNC110 (the handlers are parked on the gate)
                await trio.sleep(0.01)
            await engine.cancel(cancelled.id)
            storage.lose = {first.id, second.id}
            with caplog.at_level(logging.INFO, logger="ojs_trio.worker"):
                gate.set()
                # The lost acks run again once their leases run out.
                for job in (first, second):
                    done = await wait_for_state(engine, job.id, JobState.COMPLETED, within=60)
                    assert done.attempt == 2
        assert sorted(storage.batches[0]) == sorted([first.id, second.id, cancelled.id])
        records = [r for r in caplog.records if r.name == "ojs_trio.worker"]
        warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert warnings == [
            "could not ack 2 jobs: PostgreSQL error (SerializationFailure); "
            "their leases will run out and they run again"
        ]
        refusals = [r.getMessage() for r in records if r.levelno == logging.INFO]
        assert len(refusals) == 1 and cancelled.id in refusals[0], refusals
        assert refusals[0].startswith("could not settle job: ")


async def _returns_ok(ctx: JobContext) -> str:
    return "ok"


async def test_handler_exception_retries_then_succeeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        attempts: list[int] = []

        async def flaky(ctx: JobContext) -> str:
            attempts.append(ctx.job.attempt)
            if ctx.job.attempt == 1:
                raise ConnectionError("connection refused")
            return "ok"

        engine.register("t.flaky", flaky)
        async with running_workers(engine):
            job = (await engine.enqueue("t.flaky", retry=no_jitter("PT1S"))).job
            retrying = await wait_for_state(engine, job.id, JobState.RETRYABLE)
            failed_at = trio.current_time()
            assert retrying.error is not None
            assert retrying.error["code"] == "handler_error"
            assert retrying.error["type"] == "ConnectionError"
            assert retrying.retry_delay_ms == 1_000
            done = await wait_for_state(engine, job.id, JobState.COMPLETED)
            assert trio.current_time() - failed_at == pytest.approx(1.0, abs=0.01)
        assert attempts == [1, 2]
        assert done.result == "ok"
        assert [e["code"] for e in done.errors] == ["handler_error"]


async def test_handler_timeout_fails_the_attempt(autojump_clock: trio.testing.MockClock) -> None:
    async with running_engine() as engine:

        async def hang(ctx: JobContext) -> None:
            await trio.sleep_forever()

        engine.register("t.hang", hang)
        async with running_workers(engine):
            job = (
                await engine.enqueue("t.hang", timeout_ms=500, retry=no_jitter(max_attempts=1))
            ).job
            done = await wait_for_state(engine, job.id, JobState.DISCARDED)
        assert done.error is not None and done.error["code"] == "handler_timeout"


async def test_workers_stop_when_the_engine_drains() -> None:
    async with running_engine() as engine:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run_workers, ["default"], 4)
                # The pool long-polls once for its four free workers.
                while engine.statistics().waiting_fetches != 1:  # noqa: ASYNC110 (a counter)
                    await trio.sleep(0.001)
                engine.begin_shutdown()
            # The nursery exited by itself: every worker saw the drain and returned.


async def test_drain_lets_a_running_handler_finish_and_settle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        started = trio.Event()
        release = trio.Event()

        async def slow(ctx: JobContext) -> str:
            started.set()
            await release.wait()
            return "finished"

        engine.register("t.slow", slow)
        job = (await engine.enqueue("t.slow")).job
        queued = (await engine.enqueue("t.slow")).job
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run_workers, ["default"], 1)
            await started.wait()
            engine.begin_shutdown()
            await trio.sleep(5)
            assert (await engine.get(job.id)).state is JobState.ACTIVE  # not abandoned
            release.set()
        # The worker finished its job, acked it, and took no new one.
        assert (await engine.get(job.id)).state is JobState.COMPLETED
        assert (await engine.get(job.id)).result == "finished"
        assert (await engine.get(queued.id)).state is JobState.AVAILABLE


# -- events ------------------------------------------------------------------------------


async def test_lifecycle_events_are_published(autojump_clock: trio.testing.MockClock) -> None:
    async with running_engine() as engine:
        sub = engine.events.subscribe()

        ok = (await engine.enqueue("t.ok")).job
        await fetch_one(engine, worker_id="w1")
        await engine.ack(ok.id, worker_id="w1")

        retry = (await engine.enqueue("t.retry", retry=no_jitter())).job
        await fetch_one(engine)
        await engine.nack(retry.id)

        dead = (await engine.enqueue("t.dead", retry=no_jitter(max_attempts=1))).job
        await fetch_one(engine)
        await engine.nack(dead.id)

        cancel = (await engine.enqueue("t.cancel", queue="other")).job
        await engine.cancel(cancel.id)

        expected = {
            ok.id: ["job.enqueued", "job.started", "job.completed"],
            retry.id: ["job.enqueued", "job.started", "job.failed", "job.retrying"],
            dead.id: ["job.enqueued", "job.started", "job.failed", "job.discarded"],
            cancel.id: ["job.enqueued", "job.cancelled"],
        }
        for job_id, kinds in expected.items():
            assert [e["type"] for e in engine.events.query(job_id=job_id)] == kinds

        live: list[dict[str, Any]] = []
        while True:
            try:
                live.append(sub.receive.receive_nowait())
            except trio.WouldBlock:
                break
        assert live == engine.events.query(limit=1000)
        assert sub.dropped == 0

        types = {"t.ok": ok, "t.retry": retry, "t.dead": dead, "t.cancel": cancel}
        states = {
            "job.enqueued": "available",
            "job.started": "active",
            "job.completed": "completed",
            "job.retrying": "retryable",
            "job.discarded": "discarded",
            "job.cancelled": "cancelled",
        }
        for event in live:
            job = types[event["data"]["job_type"]]
            assert event["job_id"] == job.id == event["data"]["job_id"]
            assert event["queue"] == job.queue
            assert event["timestamp"] == format_ts(BASE)  # no mock time has passed
            if event["type"] in states:
                assert event["state"] == states[event["type"]]
        started = engine.events.query(types=["job.started"], job_id=ok.id)[0]
        assert started["data"]["worker_id"] == "w1"
        assert engine.events.query(types=["job.failed"], job_id=retry.id)[0]["state"] == (
            "retryable"
        )
        assert [e["job_id"] for e in engine.events.query(queues=["other"])] == [cancel.id] * 2
        assert engine.statistics().events == len(live)


async def test_event_subscription_drops_on_overflow() -> None:
    bus = EventBus(capacity=100, subscriber_buffer=2)
    sub = bus.subscribe()
    filtered = bus.subscribe(types=["job.completed"])
    job = Job(id="01890000-0000-7000-8000-000000000001", type="t.job", args=[])
    for n in range(5):
        bus.publish(job_event("job.enqueued", job, BASE + n))  # sync: cannot block
    assert sub.dropped == 3
    assert filtered.dropped == 0  # it did not want those events
    stats = bus.statistics()
    assert (stats.published, stats.retained, stats.subscribers, stats.dropped) == (5, 5, 2, 3)

    received = [sub.receive.receive_nowait(), sub.receive.receive_nowait()]
    assert [e["time"] for e in received] == [format_ts(BASE), format_ts(BASE + 1)]
    with pytest.raises(trio.WouldBlock):
        sub.receive.receive_nowait()

    bus.publish(job_event("job.completed", job, BASE + 9))  # room again
    assert sub.receive.receive_nowait()["type"] == "job.completed"
    assert filtered.receive.receive_nowait()["type"] == "job.completed"

    bus.unsubscribe(sub)
    bus.publish(job_event("job.completed", job, BASE + 10))
    assert bus.statistics().subscribers == 1
    assert bus.statistics().published == 7

    closed_early = bus.subscribe()
    closed_early.receive.close()  # the reader went away without unsubscribing
    bus.publish(job_event("job.completed", job, BASE + 11))  # must not raise


async def test_job_events_are_built_when_read_and_read_the_same_every_time() -> None:
    bus = EventBus(capacity=10)
    job = Job(id="01890000-0000-7000-8000-000000000001", type="t.job", args=[], queue="q")
    job.attempt = 2
    bus.publish_job("job.failed", job, BASE, {"error": {"code": "boom"}})
    job.state = JobState.COMPLETED  # the event keeps the state it was published with
    bus.publish_job("job.completed", job, BASE + 1, {"duration_ms": 5})
    bus.publish_job("job.completed", job, BASE + 1, {"result": object()})  # not marshallable
    first, second = bus.query(), bus.query()
    assert first == second and first is not second  # stable ids, private copies
    failed, completed, odd = first
    assert failed == job_event("job.failed", job, BASE) | {
        "id": failed["id"],
        "state": "available",
        "data": failed["data"],
    }
    assert failed["data"] == {
        "job_id": job.id,
        "job_type": "t.job",
        "queue": "q",
        "state": "available",
        "attempt": 2,
        "error": {"code": "boom"},
    }
    assert completed["state"] == "completed" and completed["data"]["duration_ms"] == 5
    assert completed["time"] == format_ts(BASE + 1) and "result" in odd["data"]
    ids = [e["id"] for e in first]
    assert len(set(ids)) == 3 and all(is_uuid7(i) for i in ids)
    assert bus.query(types=["job.completed"], queues=["q"], job_id=job.id) == [completed, odd]

    sub = bus.subscribe()  # a subscriber gets the same event a query returns
    bus.publish_job("job.started", job, BASE + 2, {})
    assert sub.receive.receive_nowait() == bus.query(types=["job.started"])[0]


async def test_slow_subscriber_never_blocks_the_engine() -> None:
    async with running_engine(event_subscriber_buffer=4) as engine:
        sub = engine.events.subscribe()
        with trio.fail_after(5):
            await engine.submit_many([{"type": "t.job", "args": [n]} for n in range(50)])
            for _ in range(20):
                job = await fetch_one(engine)
                await engine.ack(job.id)
        assert engine.statistics().acked == 20
        assert sub.dropped == 50 + 40 - 4
        assert engine.events.statistics().dropped == sub.dropped


async def test_event_log_is_a_ring_buffer() -> None:
    async with running_engine(event_log_size=10) as engine:
        await engine.submit_many([{"type": "t.job", "args": [n]} for n in range(25)])
        events = engine.events.query(limit=100)
        assert len(events) == 10
        assert [e["data"]["job_type"] for e in events] == ["t.job"] * 10
        assert engine.events.statistics().published == 25
