"""The storage contract: one suite every :class:`~ojs_trio.storage.port.Storage` must pass.

In the spirit of :func:`trio.testing.check_two_way_stream`: each check is an
async function that takes a *factory* and exercises one promise of the port.
The factory is called once per check and must return an async context manager
yielding an opened, empty storage, so checks never see each other's jobs::

    async def test_my_adapter() -> None:
        await check_storage(storage_factory(MyStorage))

Time never comes from a clock: every verb gets an explicit ``now`` built from
the fixed epoch :data:`T0`, so the checks are deterministic and never sleep.
Failures raise :class:`AssertionError` with a message naming what differed
(explicitly, so they survive ``python -O`` and need no pytest rewriting).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, Generic, TypeVar

import trio

from ojs_trio.engine.errors import Conflict, DuplicateJob, InvalidStateTransition, NotFound
from ojs_trio.engine.ids import uuid7
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.states import JobState
from ojs_trio.engine.validation import parse_job
from ojs_trio.storage.port import ClaimRequest, Storage

__all__ = [
    "CONTRACT_CHECKS",
    "T0",
    "ContractCheck",
    "StorageFactory",
    "check_storage",
    "make_job",
    "storage_factory",
]

StorageFactory = Callable[[], AbstractAsyncContextManager[Storage]]
ContractCheck = Callable[[StorageFactory], Awaitable[None]]

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z; whole seconds keep T0 + n exact in a float
BIG = 10_000  # a promote/reap limit no check reaches
QUEUE = "default"
FAILURE = Failure(code="handler_error", message="boom")
# A deterministic policy: no jitter, so retry times can be asserted exactly.
NO_JITTER: dict[str, Any] = {"max_attempts": 3, "initial_interval": "PT2S", "jitter": False}

E = TypeVar("E", bound=BaseException)


def storage_factory(make: Callable[[], Storage]) -> StorageFactory:
    """Build a factory from an adapter constructor: open, reset, yield, close.

    The reset makes shared backends (a database kept between checks) start
    empty, which every check relies on.
    """

    @asynccontextmanager
    async def factory() -> AsyncIterator[Storage]:
        storage = make()
        await storage.open()
        try:
            await storage.reset()
            yield storage
        finally:
            await storage.aclose()

    return factory


# -- helpers -------------------------------------------------------------------


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def _expect_eq(actual: Any, expected: Any, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")


class _Raised(Generic[E]):
    value: E


@contextmanager
def _raises(exc_type: type[E], what: str) -> Iterator[_Raised[E]]:
    raised: _Raised[E] = _Raised()
    try:
        yield raised
    except exc_type as exc:
        raised.value = exc
    else:
        raise AssertionError(f"{what}: expected {exc_type.__name__}, nothing was raised")


def make_job(
    *,
    queue: str = QUEUE,
    priority: int = 0,
    now: float = T0,
    args: list[Any] | None = None,
    **options: Any,
) -> Job:
    """A valid job built the way the engine builds one (via ``parse_job``).

    ``options`` are OJS enqueue options, e.g. ``delay_ms=5000``,
    ``expires_at="+PT10S"`` (relative to ``now``) or ``retry={...}``.
    """
    body = {
        "type": "contract.check",
        "args": args if args is not None else [],
        "options": {"queue": queue, "priority": priority, **options},
    }
    return parse_job(body, now)


def _ids(jobs: Sequence[Job]) -> list[str]:
    return [job.id for job in jobs]


async def _enqueue(storage: Storage, *jobs: Job, now: float = T0) -> None:
    await storage.enqueue(jobs, now)


async def _claim(
    storage: Storage,
    now: float,
    *queues: str,
    count: int = 1,
    worker_id: str | None = "w1",
    visibility_ms: int | None = None,
) -> list[Job]:
    """One request, one list back: the common case of a claim."""
    request = ClaimRequest(queues or (QUEUE,), count, worker_id, visibility_ms)
    (jobs,) = await storage.claim([request], now)
    return jobs


async def _claim_one(storage: Storage, now: float, job: Job, **kwargs: Any) -> Job:
    """Claim ``job`` (the only available job in its queue) and check that is what came back."""
    got = await _claim(storage, now, job.queue, **kwargs)
    _expect_eq(_ids(got), [job.id], f"claim of job {job.id} from {job.queue!r}")
    return got[0]


async def _state(storage: Storage, job_id: str) -> JobState:
    return (await storage.get(job_id)).state


async def _snapshot(storage: Storage, job_id: str) -> Job | None:
    try:
        return await storage.get(job_id)
    except NotFound:
        return None


async def _dead_letter_ids(storage: Storage, queue: str | None = None) -> set[str]:
    page = await storage.list_dead_letter(queue, BIG, 0)
    _expect_eq(page.total, len(page.jobs), "list_dead_letter total with an unbounded page")
    return set(_ids(page.jobs))


async def _exhaust(storage: Storage, job: Job, now: float) -> Job:
    """Run a one-attempt job to exhaustion: claim it and nack it."""
    claimed = await _claim_one(storage, now, job)
    return await storage.nack(claimed.id, "w1", FAILURE, False, now)


# -- enqueue and get -----------------------------------------------------------


async def check_enqueue_returns_stored_copies(factory: StorageFactory) -> None:
    """Neither the caller's job nor any returned job aliases what is stored."""
    async with factory() as storage:
        job = make_job(args=[{"n": 1}])
        original = job.clone()
        (result,) = await storage.enqueue([job], T0)
        _expect(result.created, "enqueue of a new job reports created=True")
        _expect_eq(result.job, original, "job returned by enqueue")
        _expect_eq(await storage.get(job.id), original, "job read back after enqueue")

        job.args[0]["n"] = 2  # the caller's own object
        job.priority = 99
        result.job.args.append("x")
        result.job.state = JobState.COMPLETED
        _expect_eq(await storage.get(job.id), original, "stored job after mutating enqueue I/O")

        fetched = await storage.get(job.id)
        fetched.args.append("y")
        fetched.state = JobState.CANCELLED
        _expect_eq(await storage.get(job.id), original, "stored job after mutating a get()")

        claimed = await _claim_one(storage, T0, job)
        snapshot = claimed.clone()
        claimed.state = JobState.COMPLETED
        claimed.args.append("z")
        _expect_eq(await storage.get(job.id), snapshot, "stored job after mutating a claim()")


async def check_enqueue_batch_is_atomic_on_duplicate(factory: StorageFactory) -> None:
    """A batch with any clashing id (stored or within the batch) stores nothing."""
    async with factory() as storage:
        first = make_job()
        await _enqueue(storage, first)

        fresh = make_job(queue="fresh")
        with _raises(DuplicateJob, "batch clashing with a stored id") as raised:
            await storage.enqueue([fresh, first.clone()], T0)
        _expect_eq(
            raised.value.details.get("existing_job_id"), first.id, "DuplicateJob existing_job_id"
        )
        with _raises(NotFound, "job from a rejected batch"):
            await storage.get(fresh.id)

        twin = make_job()
        other = make_job()
        with _raises(DuplicateJob, "batch holding the same id twice"):
            await storage.enqueue([other, twin, twin.clone()], T0)
        for job in (other, twin):
            with _raises(NotFound, "job from a batch with an internal duplicate"):
                await storage.get(job.id)

        _expect_eq(
            _ids(await _claim(storage, T0, QUEUE, "fresh", count=10)), [first.id], "claimable"
        )
        # The rejected ids stay free: a clean retry of the batch goes through.
        results = await storage.enqueue([fresh, other, twin], T0)
        _expect_eq([r.job.id for r in results], [fresh.id, other.id, twin.id], "retried batch")


async def check_unknown_job_raises_not_found(factory: StorageFactory) -> None:
    async with factory() as storage:
        await _enqueue(storage, make_job())
        missing = uuid7()
        with _raises(NotFound, "get of an unknown id"):
            await storage.get(missing)
        with _raises(NotFound, "ack of an unknown id"):
            await storage.ack(missing, "w1", None, False, T0)
        with _raises(NotFound, "nack of an unknown id"):
            await storage.nack(missing, "w1", FAILURE, False, T0)
        with _raises(NotFound, "cancel of an unknown id"):
            await storage.cancel(missing, T0)


# -- claim ---------------------------------------------------------------------


async def check_claim_order_queue_then_priority_then_fifo(factory: StorageFactory) -> None:
    async with factory() as storage:
        # Low queue holds the highest priority: queue order must still win.
        low = [make_job(queue="low", priority=100), make_job(queue="low", priority=50)]
        priorities = [0, 10, -10, 10, 0, 5]
        high = [make_job(queue="high", priority=p) for p in priorities]
        await _enqueue(storage, low[0], *high[:3])
        await _enqueue(storage, *high[3:], low[1])  # a second batch: FIFO spans calls

        by_priority = [high[1], high[3], high[5], high[0], high[4], high[2]]
        expected = _ids(by_priority) + _ids(low)
        got = await _claim(storage, T0, "high", "low", count=len(expected))
        _expect_eq(_ids(got), expected, "claim order (queue order, priority desc, FIFO)")

        await _enqueue(storage, make_job(queue="a"), make_job(queue="b"))
        got = await _claim(storage, T0, "b", "a", count=2)
        _expect_eq([j.queue for j in got], ["b", "a"], "queues of a claim listing b before a")


async def check_claim_count_returns_up_to_n(factory: StorageFactory) -> None:
    async with factory() as storage:
        jobs = [make_job() for _ in range(5)]
        await _enqueue(storage, *jobs)
        _expect_eq(_ids(await _claim(storage, T0, count=3)), _ids(jobs[:3]), "claim count=3")
        _expect_eq(_ids(await _claim(storage, T0, count=3)), _ids(jobs[3:]), "claim of last 2")
        _expect_eq(await _claim(storage, T0, count=3), [], "claim from a drained queue")
        _expect_eq(await _claim(storage, T0, "never-seen"), [], "claim from an unknown queue")


async def check_claim_requests_in_one_call_are_disjoint(factory: StorageFactory) -> None:
    async with factory() as storage:
        a_jobs = [make_job(queue="a") for _ in range(4)]
        b_jobs = [make_job(queue="b") for _ in range(3)]
        await _enqueue(storage, *a_jobs, *b_jobs)
        requests = [
            ClaimRequest(("a", "b"), 3, "w1"),
            ClaimRequest(("b", "a"), 3, "w2"),
            ClaimRequest(("a",), 2, "w3"),
            ClaimRequest(("b", "a"), 5, "w4"),
        ]
        results = await storage.claim(requests, T0)
        _expect_eq(len(results), len(requests), "one result list per request")
        seen: dict[str, str] = {}
        for request, got in zip(requests, results, strict=True):
            _expect(len(got) <= request.count, f"{request.worker_id} got more than its count")
            for job in got:
                _expect(job.id not in seen, f"job {job.id} handed to {seen.get(job.id)} and more")
                _expect(job.queue in request.queues, f"job from {job.queue!r} for {request}")
                _expect_eq(job.worker_id, request.worker_id, "worker_id of a claimed job")
                seen[job.id] = str(request.worker_id)
        # 7 jobs and 13 slots: every job must have been handed out, once.
        _expect_eq(set(seen), set(_ids(a_jobs + b_jobs)), "jobs handed out by one claim call")
        for job_id, worker in seen.items():
            _expect_eq((await storage.get(job_id)).worker_id, worker, "stored holder")


async def check_paused_queue_yields_nothing(factory: StorageFactory) -> None:
    async with factory() as storage:
        paused = make_job(queue="paused", priority=100)
        open_ = make_job(queue="open")
        await _enqueue(storage, paused, open_)
        info = await storage.set_queue_paused("paused", True, T0)
        _expect_eq((info.name, info.paused), ("paused", True), "queue info after pausing")
        got = await _claim(storage, T0, "paused", "open", count=10)
        _expect_eq(_ids(got), [open_.id], "claim across a paused and an open queue")
        _expect_eq(await _state(storage, paused.id), JobState.AVAILABLE, "job in a paused queue")
        listed = {i.name: i.paused for i in await storage.list_queues()}
        _expect_eq(listed, {"paused": True, "open": False}, "paused flags in list_queues")

        await storage.set_queue_paused("paused", False, T0 + 1)
        got = await _claim(storage, T0 + 1, "paused", "open", count=10)
        _expect_eq(_ids(got), [paused.id], "claim after resuming the queue")


async def check_claim_sets_active_fields(factory: StorageFactory) -> None:
    async with factory() as storage:
        plain = make_job(queue="plain")
        own_vis = make_job(queue="own", visibility_timeout_ms=12_000)
        await _enqueue(storage, plain, own_vis)
        now = T0 + 7

        got = await _claim_one(storage, now, plain, worker_id="w-9", visibility_ms=5_000)
        _expect_eq(got.state, JobState.ACTIVE, "state after claim")
        _expect_eq(got.attempt, 1, "attempt after first claim")
        _expect_eq(got.started_at, now, "started_at after claim")
        _expect_eq(got.worker_id, "w-9", "worker_id after claim")
        _expect_eq(got.lease_expires_at, now + 5.0, "lease with the request's visibility")
        _expect_eq(await storage.get(plain.id), got, "stored job equals the claimed copy")

        # Without a request visibility the job's own visibility_timeout_ms applies.
        got = await _claim_one(storage, now, own_vis, worker_id="w-9")
        _expect_eq(got.lease_expires_at, now + 12.0, "lease with the job's visibility")


async def check_concurrent_claims_are_exclusive(factory: StorageFactory) -> None:
    """20 tasks claiming 1000 jobs at once each get distinct jobs, all of them in total."""
    tasks, per_task = 20, 50
    queues = ("c0", "c1", "c2")
    async with factory() as storage:
        jobs = [make_job(queue=queues[i % 3]) for i in range(tasks * per_task)]
        for start in range(0, len(jobs), 100):
            await _enqueue(storage, *jobs[start : start + 100])
        claims: dict[str, list[str]] = {}  # job id -> every worker it was handed to

        async def worker(n: int) -> None:
            worker_id = f"w{n}"
            order = queues[n % 3 :] + queues[: n % 3]  # overlapping, rotated queue lists
            while True:
                requests = [ClaimRequest(order, 1 + n % 7, worker_id)]
                if n % 4 == 0:  # some tasks batch two fetches in one call
                    requests.append(ClaimRequest(order[::-1], 3, worker_id))
                results = await storage.claim(requests, T0)
                got = [job for batch in results for job in batch]
                if not got:
                    return
                for job in got:
                    claims.setdefault(job.id, []).append(worker_id)
                await trio.lowlevel.checkpoint()  # let the others in between claims

        async with trio.open_nursery() as nursery:
            for n in range(tasks):
                nursery.start_soon(worker, n)

        doubled = {job_id: ws for job_id, ws in claims.items() if len(ws) > 1}
        _expect(not doubled, f"jobs handed out more than once: {dict(list(doubled.items())[:5])}")
        _expect_eq(len(claims), len(jobs), "number of distinct jobs claimed")
        _expect_eq(set(claims), set(_ids(jobs)), "claimed job ids")
        for job_id, (worker_id,) in claims.items():
            stored = await storage.get(job_id)
            _expect_eq((stored.state, stored.worker_id), (JobState.ACTIVE, worker_id), "holder")


# -- scheduling ----------------------------------------------------------------


async def check_scheduled_job_claimable_only_after_promote(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job(delay_ms=60_000)
        due = T0 + 60
        _expect_eq((job.state, job.scheduled_at), (JobState.SCHEDULED, due), "test job")
        await _enqueue(storage, job)

        _expect_eq(await _claim(storage, due + 100), [], "claim of a scheduled, unpromoted job")
        _expect_eq(await storage.promote_due(due - 0.001, BIG), [], "promote before due")
        _expect_eq(await _state(storage, job.id), JobState.SCHEDULED, "state before due")

        promoted = await storage.promote_due(due, BIG)
        _expect_eq(_ids(promoted), [job.id], "promote_due at scheduled_at")
        _expect_eq(promoted[0].state, JobState.AVAILABLE, "state of the promoted copy")
        _expect_eq(await _state(storage, job.id), JobState.AVAILABLE, "stored state after promote")

        claimed = await _claim_one(storage, due, job)
        _expect_eq(claimed.attempt, 1, "attempt of a promoted job's first claim")


# -- ack -----------------------------------------------------------------------


async def check_ack_completes_active_job(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job()
        await _enqueue(storage, job)
        await _claim_one(storage, T0, job)
        result = {"answer": 42, "items": [1, 2]}
        acked = await storage.ack(job.id, "w1", result, True, T0 + 3)
        _expect_eq(acked.state, JobState.COMPLETED, "state after ack")
        _expect_eq((acked.has_result, acked.result), (True, result), "result after ack")
        _expect_eq(acked.completed_at, T0 + 3, "completed_at after ack")
        _expect_eq(acked.lease_expires_at, None, "lease after ack")
        _expect_eq(await storage.get(job.id), acked, "stored job equals the acked copy")

        plain = make_job()
        await _enqueue(storage, plain)
        await _claim_one(storage, T0, plain)
        acked = await storage.ack(plain.id, "w1", None, False, T0 + 1)
        _expect_eq((acked.state, acked.has_result), (JobState.COMPLETED, False), "ack w/o result")


async def check_settle_non_active_job_is_invalid_transition(factory: StorageFactory) -> None:
    """ack/nack of a job that is not active name its state and leave it unchanged."""
    async with factory() as storage:
        available = make_job(queue="idle")
        scheduled = make_job(queue="idle", delay_ms=60_000)
        done = make_job()
        await _enqueue(storage, available, scheduled, done)
        await _claim_one(storage, T0, done)
        await storage.ack(done.id, "w1", "ok", True, T0)

        for job, state in (
            (available, JobState.AVAILABLE),
            (scheduled, JobState.SCHEDULED),
            (done, JobState.COMPLETED),
        ):
            before = await storage.get(job.id)
            for verb in ("ack", "nack"):
                with _raises(InvalidStateTransition, f"{verb} of a {state} job") as raised:
                    if verb == "ack":
                        await storage.ack(job.id, "w1", "again", True, T0 + 1)
                    else:
                        await storage.nack(job.id, "w1", FAILURE, False, T0 + 1)
                exc = raised.value
                _expect(isinstance(exc, Conflict), "InvalidStateTransition is a Conflict")
                _expect_eq(exc.current, state.value, f"{verb} error's current state")
                _expect_eq(exc.details.get("current_state"), state.value, "details.current_state")
                _expect(f"'{state.value}'" in exc.message, f"message names the state: {exc}")
                _expect_eq(await storage.get(job.id), before, f"job after a rejected {verb}")


async def check_settle_by_other_worker_conflicts(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job()
        await _enqueue(storage, job)
        held = await _claim_one(storage, T0, job, worker_id="holder")
        for verb in ("ack", "nack"):
            with _raises(Conflict, f"{verb} by a worker that does not hold the job") as raised:
                if verb == "ack":
                    await storage.ack(job.id, "intruder", "x", True, T0 + 1)
                else:
                    await storage.nack(job.id, "intruder", FAILURE, False, T0 + 1)
            # The job *is* active, so a transition error would misreport the cause.
            _expect(
                not isinstance(raised.value, InvalidStateTransition),
                f"{verb} by another worker raised a state error: {raised.value}",
            )
            _expect_eq(await storage.get(job.id), held, f"job after a foreign {verb}")
        acked = await storage.ack(job.id, "holder", "x", True, T0 + 2)
        _expect_eq(acked.state, JobState.COMPLETED, "holder's ack after the foreign attempts")


# -- nack, retry and dead letter -----------------------------------------------


async def check_nack_with_retries_left_schedules_retry(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job(retry=NO_JITTER)
        await _enqueue(storage, job)
        await _claim_one(storage, T0, job)
        failed_at = T0 + 1
        nacked = await storage.nack(job.id, "w1", FAILURE, False, failed_at)
        _expect_eq(nacked.state, JobState.RETRYABLE, "state after nack with retries left")
        _expect_eq(nacked.attempt, 1, "attempt after nack (counted at claim)")
        _expect_eq(nacked.retry_delay_ms, 2_000, "retry_delay_ms (PT2S, no jitter)")
        _expect_eq(nacked.scheduled_at, failed_at + 2.0, "scheduled_at = now + delay")
        _expect_eq(nacked.lease_expires_at, None, "lease after nack")
        error = nacked.error or {}
        _expect_eq((error.get("code"), error.get("attempt")), ("handler_error", 1), "error")
        _expect_eq(await storage.get(job.id), nacked, "stored job equals the nacked copy")

        _expect_eq(await _claim(storage, failed_at + 10), [], "claim of a retryable job")
        _expect_eq(await storage.promote_due(failed_at + 1.999, BIG), [], "promote before due")
        promoted = await storage.promote_due(failed_at + 2.0, BIG)
        _expect_eq(_ids(promoted), [job.id], "promote at the retry time")
        _expect_eq(promoted[0].state, JobState.AVAILABLE, "state after promoting a retry")

        again = await _claim_one(storage, failed_at + 2.0, job)
        _expect_eq(again.attempt, 2, "attempt of the retry's claim")


async def check_nack_on_last_attempt_discards(factory: StorageFactory) -> None:
    """Exhaustion discards; only on_exhaustion=dead_letter puts the job in the DLQ."""
    async with factory() as storage:
        for policy in ("discard", "dead_letter"):
            retry = {**NO_JITTER, "max_attempts": 2, "on_exhaustion": policy}
            job = make_job(queue=policy.replace("_", "-"), retry=retry)
            await _enqueue(storage, job)
            await _claim_one(storage, T0, job)
            first = await storage.nack(job.id, "w1", FAILURE, False, T0)
            _expect_eq(first.state, JobState.RETRYABLE, "state after the first of two attempts")
            await storage.promote_due(T0 + 2, BIG)
            await _claim_one(storage, T0 + 2, job)
            last = await storage.nack(job.id, "w1", FAILURE, False, T0 + 3)
            _expect_eq(last.state, JobState.DISCARDED, f"state after last attempt ({policy})")
            _expect_eq((last.attempt, last.discarded_at), (2, T0 + 3), "attempt, discarded_at")
            _expect_eq(await storage.get(job.id), last, "stored job equals the discarded copy")

        dead = await storage.list_dead_letter(None, BIG, 0)
        _expect_eq((dead.total, len(dead.jobs)), (1, 1), "DLQ size (only dead_letter policy)")
        _expect_eq(dead.jobs[0].queue, "dead-letter", "queue of the dead-lettered job")
        _expect_eq(dead.jobs[0].state, JobState.DISCARDED, "state of the dead-lettered job")
        _expect_eq(await _dead_letter_ids(storage, "discard"), set(), "DLQ of the discard queue")


async def check_nack_requeue_returns_attempt(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job(retry={**NO_JITTER, "max_attempts": 1})
        await _enqueue(storage, job)
        await _claim_one(storage, T0, job)
        requeued = await storage.nack(job.id, "w1", FAILURE, True, T0 + 1)
        _expect_eq(requeued.state, JobState.AVAILABLE, "state after nack requeue")
        _expect_eq(requeued.attempt, 0, "attempt given back by requeue")
        _expect_eq(requeued.lease_expires_at, None, "lease after requeue")
        _expect_eq(await storage.get(job.id), requeued, "stored job equals the requeued copy")
        # A requeue is not a failed attempt, so even a one-attempt job runs again.
        again = await _claim_one(storage, T0 + 1, job, worker_id="w2")
        _expect_eq((again.attempt, again.worker_id), (1, "w2"), "claim after requeue")


async def check_list_dead_letter_pages_and_filters(factory: StorageFactory) -> None:
    async with factory() as storage:
        retry = {**NO_JITTER, "max_attempts": 1, "on_exhaustion": "dead_letter"}
        jobs = [make_job(queue="dl-a", retry=retry) for _ in range(3)]
        jobs.append(make_job(queue="dl-b", retry=retry))
        await _enqueue(storage, *jobs)
        empty = await storage.list_dead_letter(None, 10, 0)
        _expect_eq((empty.total, empty.jobs), (0, []), "DLQ before anything failed")
        for job in jobs:
            await _exhaust(storage, job, T0)

        first = await storage.list_dead_letter(None, 2, 0)
        rest = await storage.list_dead_letter(None, 2, 2)
        _expect_eq((first.total, len(first.jobs)), (4, 2), "first page (total, size)")
        _expect_eq((rest.total, len(rest.jobs)), (4, 2), "second page (total, size)")
        _expect_eq(set(_ids(first.jobs + rest.jobs)), set(_ids(jobs)), "pages cover the DLQ once")
        _expect_eq((await storage.list_dead_letter(None, 2, 4)).jobs, [], "page past the end")

        page_a = await storage.list_dead_letter("dl-a", 10, 0)
        _expect_eq(page_a.total, 3, "DLQ total for queue dl-a")
        _expect_eq(set(_ids(page_a.jobs)), set(_ids(jobs[:3])), "DLQ jobs for queue dl-a")
        _expect_eq(await _dead_letter_ids(storage, "dl-b"), {jobs[3].id}, "DLQ for queue dl-b")


async def check_retry_dead_letter_revives_job(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job(retry={**NO_JITTER, "max_attempts": 1, "on_exhaustion": "dead_letter"})
        await _enqueue(storage, job)
        await _exhaust(storage, job, T0)
        revived = await storage.retry_dead_letter(job.id, T0 + 5)
        _expect_eq((revived.state, revived.attempt), (JobState.AVAILABLE, 0), "after DLQ retry")
        _expect_eq(await storage.get(job.id), revived, "stored job equals the revived copy")
        _expect_eq(await _dead_letter_ids(storage), set(), "DLQ after retry_dead_letter")
        again = await _claim_one(storage, T0 + 5, job)
        _expect_eq(again.attempt, 1, "attempt of a revived job's claim")


async def check_delete_dead_letter_removes_job(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job(retry={**NO_JITTER, "max_attempts": 1, "on_exhaustion": "dead_letter"})
        keep = make_job(retry={**NO_JITTER, "max_attempts": 1, "on_exhaustion": "dead_letter"})
        await _enqueue(storage, job, keep)
        await _exhaust(storage, job, T0)
        await _exhaust(storage, keep, T0)
        deleted = await storage.delete_dead_letter(job.id)
        _expect_eq(deleted.id, job.id, "id of the deleted job")
        with _raises(NotFound, "get of a deleted dead-letter job"):
            await storage.get(job.id)
        _expect_eq(await _dead_letter_ids(storage), {keep.id}, "DLQ after delete_dead_letter")
        with _raises(NotFound, "second delete of the same dead-letter job"):
            await storage.delete_dead_letter(job.id)


async def check_dead_letter_ops_require_dead_lettered_job(factory: StorageFactory) -> None:
    async with factory() as storage:
        available = make_job()
        completed = make_job(queue="done")
        discarded = make_job(queue="gone", retry={**NO_JITTER, "max_attempts": 1})
        await _enqueue(storage, available, completed, discarded)
        await _claim_one(storage, T0, completed)
        await storage.ack(completed.id, "w1", None, False, T0)
        await _exhaust(storage, discarded, T0)  # discarded, but not into the DLQ

        for job_id in (available.id, completed.id, discarded.id, uuid7()):
            before = await _snapshot(storage, job_id)
            with _raises(NotFound, f"retry_dead_letter of non-DLQ job {job_id}"):
                await storage.retry_dead_letter(job_id, T0 + 1)
            with _raises(NotFound, f"delete_dead_letter of non-DLQ job {job_id}"):
                await storage.delete_dead_letter(job_id)
            _expect_eq(await _snapshot(storage, job_id), before, "job after a rejected DLQ op")


# -- cancel --------------------------------------------------------------------


async def check_cancel_non_terminal_jobs(factory: StorageFactory) -> None:
    async with factory() as storage:
        available = make_job(queue="avail")
        scheduled = make_job(queue="sched", delay_ms=60_000)
        active = make_job(queue="act", visibility_timeout_ms=10_000)
        retryable = make_job(queue="retry", retry=NO_JITTER)
        await _enqueue(storage, available, scheduled, active, retryable)
        await _claim_one(storage, T0, active)
        await _claim_one(storage, T0, retryable)
        await storage.nack(retryable.id, "w1", FAILURE, False, T0)

        now = T0 + 1
        for job in (available, scheduled, active, retryable):
            cancelled = await storage.cancel(job.id, now)
            _expect_eq(cancelled.state, JobState.CANCELLED, f"state after cancel of {job.queue}")
            _expect_eq(cancelled.cancelled_at, now, "cancelled_at")
            _expect_eq(await storage.get(job.id), cancelled, "stored job equals cancelled copy")

        # The worker that held the cancelled job can no longer settle or extend it.
        with _raises(InvalidStateTransition, "ack of a job cancelled while active") as raised:
            await storage.ack(active.id, "w1", None, False, now)
        _expect_eq(raised.value.current, "cancelled", "state named by the rejected ack")
        _expect_eq(await storage.heartbeat("w1", [active.id], 60_000, now), [], "heartbeat")
        _expect_eq(await storage.reap(T0 + 100, BIG), [], "reap after a cancelled job's lease")


async def check_cancel_terminal_job_conflicts(factory: StorageFactory) -> None:
    async with factory() as storage:
        completed = make_job(queue="done")
        cancelled = make_job(queue="cancelled")
        discarded = make_job(queue="gone", retry={**NO_JITTER, "max_attempts": 1})
        await _enqueue(storage, completed, cancelled, discarded)
        await _claim_one(storage, T0, completed)
        await storage.ack(completed.id, "w1", None, False, T0)
        await storage.cancel(cancelled.id, T0)
        await _exhaust(storage, discarded, T0)

        for job in (completed, cancelled, discarded):
            before = await storage.get(job.id)
            with _raises(Conflict, f"cancel of a {before.state} job") as raised:
                await storage.cancel(job.id, T0 + 1)
            details = raised.value.details
            _expect_eq(details.get("current_state"), before.state.value, "current_state named")
            _expect_eq(await storage.get(job.id), before, "terminal job after a rejected cancel")


async def check_cancelled_job_is_never_claimed(factory: StorageFactory) -> None:
    async with factory() as storage:
        available = make_job(priority=100)
        scheduled = make_job(delay_ms=5_000)
        retryable = make_job(retry=NO_JITTER)
        await _enqueue(storage, available, scheduled, retryable)
        await _claim(storage, T0, count=2)  # takes available (priority) and retryable
        await storage.nack(retryable.id, "w1", FAILURE, False, T0)  # due again at T0 + 2
        await storage.nack(available.id, "w1", FAILURE, True, T0)  # requeued: available
        for job in (available, scheduled, retryable):
            await storage.cancel(job.id, T0 + 1)

        _expect_eq(await storage.promote_due(T0 + 100, BIG), [], "promotion of cancelled jobs")
        _expect_eq(await _claim(storage, T0 + 100, count=10), [], "claim with only cancelled jobs")
        _expect_eq(await storage.reap(T0 + 100, BIG), [], "reap with only cancelled jobs")
        for job in (available, scheduled, retryable):
            _expect_eq(await _state(storage, job.id), JobState.CANCELLED, "state stays cancelled")


# -- heartbeat and reaping -----------------------------------------------------


async def check_heartbeat_extends_only_own_active_leases(factory: StorageFactory) -> None:
    async with factory() as storage:
        mine = make_job(queue="mine")
        mine_unlisted = make_job(queue="mine")
        theirs = make_job(queue="theirs")
        done = make_job(queue="done")
        idle = make_job(queue="idle")
        await _enqueue(storage, mine, mine_unlisted, theirs, done, idle)
        await _claim(storage, T0, "mine", count=2, visibility_ms=10_000)
        await _claim_one(storage, T0, theirs, worker_id="w2", visibility_ms=10_000)
        await _claim_one(storage, T0, done, visibility_ms=10_000)
        await storage.ack(done.id, "w1", None, False, T0)
        others = [mine_unlisted, theirs, done, idle]
        before = {job.id: await storage.get(job.id) for job in others}

        listed = [mine.id, theirs.id, done.id, idle.id, uuid7()]
        extended = await storage.heartbeat("w1", listed, 60_000, T0 + 5)
        _expect_eq(_ids(extended), [mine.id], "jobs extended by w1's heartbeat")
        _expect_eq(extended[0].lease_expires_at, T0 + 65, "extended lease = now + visibility")
        _expect_eq(extended[0].state, JobState.ACTIVE, "state of the extended job")
        _expect_eq(await storage.get(mine.id), extended[0], "stored job equals the extended copy")
        for job in others:
            _expect_eq(await storage.get(job.id), before[job.id], "job heartbeat must not touch")
        _expect_eq(await storage.heartbeat("w1", [], 60_000, T0 + 5), [], "empty heartbeat")


async def check_reap_expired_lease_returns_job_to_available(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job(retry=NO_JITTER)
        await _enqueue(storage, job)
        await _claim_one(storage, T0, job, visibility_ms=10_000)
        _expect_eq(await storage.reap(T0 + 9.999, BIG), [], "reap before the lease deadline")

        reaped = await storage.reap(T0 + 10, BIG)
        _expect_eq(_ids(reaped), [job.id], "reap at the lease deadline")
        _expect_eq(reaped[0].state, JobState.AVAILABLE, "state after an expired lease")
        _expect_eq(reaped[0].lease_expires_at, None, "lease after reaping")
        _expect_eq(await storage.get(job.id), reaped[0], "stored job equals the reaped copy")

        again = await _claim_one(storage, T0 + 10, job, worker_id="w2")
        _expect_eq(again.attempt, 2, "the expired attempt still counts")


async def check_lease_expiry_clears_started_at(factory: StorageFactory) -> None:
    """ojs-core 6.3: active --Timeout--> available "clear started_at, record timeout error"."""
    async with factory() as storage:
        job = make_job(retry=NO_JITTER)
        await _enqueue(storage, job)
        await _claim_one(storage, T0, job, visibility_ms=10_000)
        (reaped,) = await storage.reap(T0 + 10, BIG)
        _expect_eq(len(reaped.errors), 1, "errors recorded by a lease expiry")
        _expect(reaped.error is not None, "a lease expiry records the timeout as the error")
        _expect_eq(reaped.started_at, None, "started_at after a lease expiry")


async def check_settle_after_lease_reaped_is_rejected(factory: StorageFactory) -> None:
    """Worker protocol 10.4: a worker declared dead cannot settle the job afterwards."""
    async with factory() as storage:
        job = make_job(retry=NO_JITTER)
        await _enqueue(storage, job)
        await _claim_one(storage, T0, job, worker_id="a", visibility_ms=10_000)
        await storage.reap(T0 + 10, BIG)
        with _raises(InvalidStateTransition, "ack by the presumed-dead worker") as raised:
            await storage.ack(job.id, "a", "late", True, T0 + 11)
        _expect_eq(raised.value.current, "available", "state named by the late ack")

        await _claim_one(storage, T0 + 12, job, worker_id="b")
        _expect_eq(await storage.heartbeat("a", [job.id], 60_000, T0 + 13), [], "a's heartbeat")
        for verb in ("ack", "nack"):
            with _raises(Conflict, f"late {verb} by a after b claimed the job"):
                if verb == "ack":
                    await storage.ack(job.id, "a", "late", True, T0 + 13)
                else:
                    await storage.nack(job.id, "a", FAILURE, False, T0 + 13)
        acked = await storage.ack(job.id, "b", "ok", True, T0 + 14)
        _expect_eq((acked.state, acked.result), (JobState.COMPLETED, "ok"), "b's ack")


async def check_reap_expired_lease_on_last_attempt_discards(factory: StorageFactory) -> None:
    async with factory() as storage:
        plain = make_job(queue="plain", retry={**NO_JITTER, "max_attempts": 1})
        dlq = make_job(
            queue="dlq", retry={**NO_JITTER, "max_attempts": 1, "on_exhaustion": "dead_letter"}
        )
        await _enqueue(storage, plain, dlq)
        await _claim_one(storage, T0, plain, visibility_ms=10_000)
        await _claim_one(storage, T0, dlq, visibility_ms=10_000)
        reaped = await storage.reap(T0 + 10, BIG)
        _expect_eq(set(_ids(reaped)), {plain.id, dlq.id}, "reaped exhausted jobs")
        for job in reaped:
            _expect_eq(job.state, JobState.DISCARDED, f"state of exhausted {job.queue} job")
        _expect_eq(await _dead_letter_ids(storage), {dlq.id}, "DLQ after exhausting leases")


async def check_reap_spares_heartbeat_extended_leases(factory: StorageFactory) -> None:
    async with factory() as storage:
        kept = make_job(queue="kept")
        lost = make_job(queue="lost")
        await _enqueue(storage, kept, lost)
        await _claim_one(storage, T0, kept, visibility_ms=10_000)
        await _claim_one(storage, T0, lost, visibility_ms=10_000)
        await storage.heartbeat("w1", [kept.id], 30_000, T0 + 5)  # lease now T0 + 35

        _expect_eq(_ids(await storage.reap(T0 + 10, BIG)), [lost.id], "reap at the old deadline")
        _expect_eq(await _state(storage, kept.id), JobState.ACTIVE, "extended job after reap")
        _expect_eq(await storage.reap(T0 + 34.999, BIG), [], "reap before the extended deadline")
        _expect_eq(_ids(await storage.reap(T0 + 35, BIG)), [kept.id], "reap at extended deadline")


async def check_reap_applies_execution_timeout(factory: StorageFactory) -> None:
    async with factory() as storage:
        job = make_job(timeout_ms=5_000, retry={**NO_JITTER, "initial_interval": "PT1S"})
        await _enqueue(storage, job)
        await _claim_one(storage, T0, job, visibility_ms=60_000)
        # A heartbeat keeps the lease alive but cannot stretch the execution timeout.
        await storage.heartbeat("w1", [job.id], 60_000, T0 + 4)
        _expect_eq(await storage.reap(T0 + 4.999, BIG), [], "reap before the execution timeout")

        reaped = await storage.reap(T0 + 5, BIG)
        _expect_eq(_ids(reaped), [job.id], "reap at started_at + timeout_ms")
        timed_out = reaped[0]
        _expect_eq(timed_out.state, JobState.RETRYABLE, "state after an execution timeout")
        _expect_eq(timed_out.scheduled_at, T0 + 6, "retry time after the timeout (PT1S)")
        _expect_eq((timed_out.error or {}).get("code"), "handler_timeout", "recorded error code")
        _expect_eq(await storage.get(job.id), timed_out, "stored job equals the reaped copy")


async def check_reap_discards_ttl_expired_jobs(factory: StorageFactory) -> None:
    """expires_at passed before the job started: discarded; a running job is left alone."""
    async with factory() as storage:
        available = make_job(queue="ttl", expires_at="+PT10S")
        scheduled = make_job(queue="ttl", delay_ms=60_000, expires_at="+PT30S")
        running = make_job(queue="running", expires_at="+PT10S")
        untimed = make_job(queue="plain")
        await _enqueue(storage, available, scheduled, running, untimed)
        await _claim_one(storage, T0, running, visibility_ms=600_000)

        _expect_eq(await storage.reap(T0 + 9.999, BIG), [], "reap before expires_at")
        reaped = await storage.reap(T0 + 10, BIG)
        _expect_eq(_ids(reaped), [available.id], "reap at the available job's expires_at")
        _expect_eq(reaped[0].state, JobState.DISCARDED, "state of a TTL-expired job")
        _expect_eq(reaped[0].discarded_at, T0 + 10, "discarded_at of a TTL-expired job")
        _expect_eq(await storage.get(available.id), reaped[0], "stored TTL-expired job")
        _expect_eq(await storage.reap(T0 + 10, BIG), [], "second reap at the same now")

        # A scheduled job can expire before it is ever due; it then never runs.
        reaped = await storage.reap(T0 + 30, BIG)
        _expect_eq(_ids(reaped), [scheduled.id], "reap at the scheduled job's expires_at")
        _expect_eq(reaped[0].state, JobState.DISCARDED, "state of the expired scheduled job")
        _expect_eq(await storage.promote_due(T0 + 60, BIG), [], "promotion of an expired job")
        _expect_eq(await _claim(storage, T0 + 60, "ttl", count=10), [], "claim of expired jobs")

        _expect_eq(await _state(storage, running.id), JobState.ACTIVE, "started job past TTL")
        _expect_eq(await _state(storage, untimed.id), JobState.AVAILABLE, "job without TTL")


async def check_claim_skips_ttl_expired_jobs(factory: StorageFactory) -> None:
    async with factory() as storage:
        # Claim order: first, expired, fresh.  The expired job sits between two
        # claimable ones, so skipping it must neither end the claim nor lose `first`.
        first = make_job(priority=100)
        expired = make_job(priority=50, expires_at="+PT10S")
        fresh = make_job()
        await _enqueue(storage, first, expired, fresh)
        got = await _claim(storage, T0 + 10, count=3)
        _expect_eq(_ids(got), [first.id, fresh.id], "claim after the middle job's expires_at")
        _expect_eq(await _claim(storage, T0 + 10, count=3), [], "second claim")
        await storage.reap(T0 + 10, BIG)
        _expect_eq(await _state(storage, expired.id), JobState.DISCARDED, "expired job's state")
        _expect_eq(await storage.reap(T0 + 10, BIG), [], "reap after the expiry was applied")


async def check_promote_and_reap_are_idempotent(factory: StorageFactory) -> None:
    async with factory() as storage:
        scheduled = make_job(queue="later", delay_ms=5_000)
        leased = make_job(queue="leased")
        await _enqueue(storage, scheduled, leased)
        await _claim_one(storage, T0, leased, visibility_ms=5_000)
        now = T0 + 5

        _expect_eq(_ids(await storage.promote_due(now, BIG)), [scheduled.id], "first promote")
        _expect_eq(await storage.promote_due(now, BIG), [], "second promote at the same now")
        _expect_eq(_ids(await storage.reap(now, BIG)), [leased.id], "first reap")
        _expect_eq(await storage.reap(now, BIG), [], "second reap at the same now")
        _expect_eq(await storage.promote_due(now, BIG), [], "promote after reap")
        # The reaped job is available again, not due anywhere: nothing more to do.
        _expect_eq(await storage.reap(now + 1000, BIG), [], "later reap")


async def check_promote_and_reap_honour_limit(factory: StorageFactory) -> None:
    async with factory() as storage:
        scheduled = [make_job(queue="later", delay_ms=1_000) for _ in range(5)]
        leased = [make_job(queue="leased") for _ in range(3)]
        await _enqueue(storage, *scheduled, *leased)
        await _claim(storage, T0, "leased", count=3, visibility_ms=1_000)
        now = T0 + 1

        sizes = [len(await storage.promote_due(now, 2)) for _ in range(4)]
        _expect_eq(sizes, [2, 2, 1, 0], "promote_due batch sizes with limit=2")
        sizes = [len(await storage.reap(now, 2)) for _ in range(3)]
        _expect_eq(sizes, [2, 1, 0], "reap batch sizes with limit=2")
        got = await _claim(storage, now, "later", "leased", count=100)
        _expect_eq(set(_ids(got)), set(_ids(scheduled + leased)), "all jobs available again")


# -- introspection -------------------------------------------------------------


async def check_next_wakeup_reports_earliest_deadline(factory: StorageFactory) -> None:
    async with factory() as storage:
        _expect_eq(await storage.next_wakeup(), None, "next_wakeup of an empty storage")
        runnable = make_job(queue="now")
        await _enqueue(storage, runnable)
        _expect_eq(await storage.next_wakeup(), None, "next_wakeup with only available jobs")

        scheduled = make_job(queue="later", delay_ms=60_000)
        await _enqueue(storage, scheduled)
        _expect_eq(await storage.next_wakeup(), T0 + 60, "next_wakeup = due time")
        await _claim_one(storage, T0, runnable, visibility_ms=30_000)
        _expect_eq(await storage.next_wakeup(), T0 + 30, "next_wakeup = lease deadline")
        expiring = make_job(queue="ttl", expires_at="+PT10S")
        await _enqueue(storage, expiring)
        _expect_eq(await storage.next_wakeup(), T0 + 10, "next_wakeup = TTL deadline")

        await storage.cancel(expiring.id, T0 + 1)
        _expect_eq(await storage.next_wakeup(), T0 + 30, "after cancelling the TTL job")
        await storage.ack(runnable.id, "w1", None, False, T0 + 2)
        _expect_eq(await storage.next_wakeup(), T0 + 60, "after acking the leased job")
        await storage.cancel(scheduled.id, T0 + 3)
        _expect_eq(await storage.next_wakeup(), None, "next_wakeup once idle again")


async def check_list_queues_counts_states(factory: StorageFactory) -> None:
    async with factory() as storage:
        _expect_eq(await storage.list_queues(), [], "queues of an empty storage")
        alpha = [make_job(queue="alpha"), make_job(queue="alpha", delay_ms=60_000)]
        beta = [make_job(queue="beta") for _ in range(3)]
        await _enqueue(storage, *alpha, *beta)
        await storage.cancel(alpha[1].id, T0)
        claimed = await _claim(storage, T0, "beta", count=2)
        await storage.ack(claimed[0].id, "w1", None, False, T0)

        infos = {info.name: info for info in await storage.list_queues()}
        _expect_eq(sorted(infos), ["alpha", "beta"], "queue names")
        # Adapters may or may not list zero counts; compare the non-zero ones.
        counts = {name: {s: n for s, n in i.counts.items() if n} for name, i in infos.items()}
        expected = {
            "alpha": {"available": 1, "cancelled": 1},
            "beta": {"available": 1, "active": 1, "completed": 1},
        }
        _expect_eq(counts, expected, "per-state counts")
        _expect(not any(i.paused for i in infos.values()), "fresh queues are not paused")


async def check_reset_empties_everything(factory: StorageFactory) -> None:
    async with factory() as storage:
        dlq_retry = {**NO_JITTER, "max_attempts": 1, "on_exhaustion": "dead_letter"}
        jobs = [
            make_job(queue="r-avail"),
            make_job(queue="r-sched", delay_ms=5_000),
            make_job(queue="r-active"),
            make_job(queue="r-dead", retry=dlq_retry),
        ]
        await _enqueue(storage, *jobs)
        await _claim_one(storage, T0, jobs[2])
        await _exhaust(storage, jobs[3], T0)

        await storage.reset()
        for job in jobs:
            with _raises(NotFound, f"get of {job.queue} job after reset"):
                await storage.get(job.id)
        _expect_eq(await storage.list_queues(), [], "queues after reset")
        dead = await storage.list_dead_letter(None, BIG, 0)
        _expect_eq((dead.total, dead.jobs), (0, []), "DLQ after reset")
        _expect_eq(await storage.next_wakeup(), None, "next_wakeup after reset")
        queues = tuple(job.queue for job in jobs)
        _expect_eq(await _claim(storage, T0 + 100, *queues, count=10), [], "claim after reset")
        _expect_eq(await storage.promote_due(T0 + 100, BIG), [], "promote after reset")
        _expect_eq(await storage.reap(T0 + 100, BIG), [], "reap after reset")
        # Ids are free again: the store is empty, not merely hidden.
        results = await storage.enqueue(jobs, T0 + 100)
        _expect_eq(len(results), len(jobs), "re-enqueue of the same ids after reset")


CONTRACT_CHECKS: list[ContractCheck] = [
    check_enqueue_returns_stored_copies,
    check_enqueue_batch_is_atomic_on_duplicate,
    check_unknown_job_raises_not_found,
    check_claim_order_queue_then_priority_then_fifo,
    check_claim_count_returns_up_to_n,
    check_claim_requests_in_one_call_are_disjoint,
    check_paused_queue_yields_nothing,
    check_claim_sets_active_fields,
    check_concurrent_claims_are_exclusive,
    check_scheduled_job_claimable_only_after_promote,
    check_ack_completes_active_job,
    check_settle_non_active_job_is_invalid_transition,
    check_settle_by_other_worker_conflicts,
    check_nack_with_retries_left_schedules_retry,
    check_nack_on_last_attempt_discards,
    check_nack_requeue_returns_attempt,
    check_list_dead_letter_pages_and_filters,
    check_retry_dead_letter_revives_job,
    check_delete_dead_letter_removes_job,
    check_dead_letter_ops_require_dead_lettered_job,
    check_cancel_non_terminal_jobs,
    check_cancel_terminal_job_conflicts,
    check_cancelled_job_is_never_claimed,
    check_heartbeat_extends_only_own_active_leases,
    check_reap_expired_lease_returns_job_to_available,
    check_lease_expiry_clears_started_at,
    check_settle_after_lease_reaped_is_rejected,
    check_reap_expired_lease_on_last_attempt_discards,
    check_reap_spares_heartbeat_extended_leases,
    check_reap_applies_execution_timeout,
    check_reap_discards_ttl_expired_jobs,
    check_claim_skips_ttl_expired_jobs,
    check_promote_and_reap_are_idempotent,
    check_promote_and_reap_honour_limit,
    check_next_wakeup_reports_earliest_deadline,
    check_list_queues_counts_states,
    check_reset_empties_everything,
]


async def check_storage(factory: StorageFactory) -> None:
    """Run every contract check against fresh storages from ``factory``.

    Stops at the first failure, with a note naming the check that failed.
    """
    for check in CONTRACT_CHECKS:
        try:
            await check(factory)
        except BaseException as exc:
            exc.add_note(f"storage contract check {check.__name__} failed")
            raise
