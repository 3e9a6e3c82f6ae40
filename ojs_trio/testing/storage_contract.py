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

Beyond the core lifecycle (level 0-1), the checks pin the level 2-4 verbs:
``next_due_at``/``next_reap_at``, unique jobs, pause and queue statistics,
rate and concurrency limits, workflows (chain, group, batch), cron schedules
and the :class:`~ojs_trio.storage.port.StorageListener` reports.  Workflows and
schedules are built with the engine's own parsers (``parse_workflow``,
``parse_cron_request``, ``job_for_occurrence``), as the engine does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, Generic, TypeVar

import trio

from ojs_trio.engine.cron import CronFire, CronRecord, job_for_occurrence, parse_cron_request
from ojs_trio.engine.errors import Conflict, DuplicateJob, InvalidStateTransition, NotFound
from ojs_trio.engine.ids import uuid7
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.states import JobState
from ojs_trio.engine.validation import parse_job
from ojs_trio.engine.workflows import (
    OMITTED_FROM_META,
    PARENT_RESULTS_MAX_BYTES,
    Workflow,
    parse_workflow,
)
from ojs_trio.storage.port import AckRequest, ClaimRequest, Storage

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
        raise AssertionError(
            f"{what}: {_differing(actual, expected)}expected {expected!r}, got {actual!r}"
        )


def _differing(actual: Any, expected: Any) -> str:
    """For two records (jobs, workflows, schedules) of one type: which fields differ."""
    if type(actual) is not type(expected) or not dataclasses.is_dataclass(actual):
        return ""
    names = [
        f.name
        for f in dataclasses.fields(actual)
        if getattr(actual, f.name) != getattr(expected, f.name)
    ]
    return f"{', '.join(names)} differ; " if names else ""


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
    job_type: str = "contract.check",
    **options: Any,
) -> Job:
    """A valid job built the way the engine builds one (via ``parse_job``).

    ``options`` are OJS enqueue options, e.g. ``delay_ms=5000``,
    ``expires_at="+PT10S"`` (relative to ``now``), ``retry={...}``,
    ``unique={...}`` or queue limits such as ``concurrency=2``.
    """
    body = {
        "type": job_type,
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


async def check_ack_many_settles_each_ack_as_ack_would(factory: StorageFactory) -> None:
    """One call, one outcome per ack in order; a rejected ack leaves its job unchanged."""
    async with factory() as storage:
        with_result, without, idle, foreign, repeated = (
            make_job(queue=f"many-{n}") for n in range(5)
        )
        await _enqueue(storage, with_result, without, idle, foreign, repeated)
        for job in (with_result, without, repeated):
            await _claim_one(storage, T0, job)
        await _claim_one(storage, T0, foreign, worker_id="holder")
        chain = await _create_workflow(
            storage, {"type": "chain", "steps": [_member("many-chain-a"), _member("many-chain-b")]}
        )
        (step0,) = await _claim(storage, T0, "many-chain-a")
        before = {job.id: await storage.get(job.id) for job in (idle, foreign)}
        missing = str(uuid7())
        acks = [
            AckRequest(with_result.id, "w1", {"n": 1}, True),
            AckRequest(missing, "w1"),
            AckRequest(without.id, "w1"),
            AckRequest(idle.id, "w1", "x", True),
            AckRequest(foreign.id, "w1", "x", True),
            AckRequest("not-a-job-id", "w1"),
            AckRequest(step0.id, "w1", "step 0", True),
            AckRequest(repeated.id, "w1", "first", True),
            AckRequest(repeated.id, "w1", "second", True),
        ]
        out = await storage.ack_many(acks, T0 + 2)
        _expect_eq(len(out), len(acks), "one outcome per ack")
        kinds = [type(o).__name__ if isinstance(o, Exception) else o.state.value for o in out]
        expected_kinds = [
            "completed", "NotFound", "completed", "InvalidStateTransition", "Conflict",
            "NotFound", "completed", "completed", "InvalidStateTransition",
        ]  # fmt: skip
        _expect_eq(kinds, expected_kinds, "outcomes of ack_many, in order")
        done = out[0]
        assert isinstance(done, Job)
        _expect_eq(
            (done.id, done.result, done.completed_at), (with_result.id, {"n": 1}, T0 + 2), "ack 0"
        )
        _expect_eq(await storage.get(with_result.id), done, "stored job equals the acked copy")
        _expect_eq((await storage.get(without.id)).has_result, False, "ack without a result")
        _expect_eq((await storage.get(repeated.id)).result, "first", "the first of two acks wins")
        for job_id, job in before.items():
            _expect_eq(await storage.get(job_id), job, "job after a rejected ack in ack_many")
        # A workflow member's ack advances its workflow, as ack does.
        current = await storage.get_workflow(chain.id)
        _expect_eq(current.to_wire()["steps_completed"], 1, "chain steps after ack_many")
        (step1,) = await _claim(storage, T0 + 3, "many-chain-b")
        _expect_eq(step1.parent_results, ["step 0"], "next step's parent results")
        _expect_eq(await storage.ack_many([], T0 + 3), [], "ack_many of nothing")


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


async def check_ttl_expired_jobs_are_dead_lettered(factory: StorageFactory) -> None:
    """An expired job lands in the dead letter queue (even with on_exhaustion "discard"),
    whether the reaper found it or a claim skipped it; from there it can be retried."""
    async with factory() as storage:
        reaped = make_job(queue="ttl-reaped", expires_at="+PT10S")
        skipped = make_job(queue="ttl-skipped", expires_at="+PT10S")
        await _enqueue(storage, reaped, skipped)
        _expect_eq(await _claim(storage, T0 + 10, "ttl-skipped"), [], "claim at expires_at")
        await storage.reap(T0 + 10, BIG)
        for job in (reaped, skipped):
            stored = await storage.get(job.id)
            fields = (stored.state, stored.dead_letter, (stored.error or {}).get("code"))
            _expect_eq(fields, (JobState.DISCARDED, True, "expired"), "expired job")
        _expect_eq(await _dead_letter_ids(storage), {reaped.id, skipped.id}, "DLQ after TTL expiry")
        _expect_eq(await _dead_letter_ids(storage, "ttl-reaped"), {reaped.id}, "DLQ of a queue")

        revived = await storage.retry_dead_letter(reaped.id, T0 + 20)
        fields = (revived.state, revived.dead_letter, revived.expires_at)
        _expect_eq(fields, (JobState.AVAILABLE, False, None), "expired job retried from the DLQ")
        _expect_eq(await storage.get(reaped.id), revived, "stored job equals the revived copy")
        _expect_eq(await _dead_letter_ids(storage), {skipped.id}, "DLQ after the retry")
        # Its passed deadline no longer applies: it is claimed, not expired again.
        again = await _claim_one(storage, T0 + 21, reaped)
        _expect_eq((again.state, again.attempt), (JobState.ACTIVE, 1), "claim of the revived job")
        _expect_eq(await storage.reap(T0 + 21, BIG), [], "reap after the revived job's claim")


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


async def _deadlines(storage: Storage) -> tuple[float | None, float | None]:
    return await storage.next_due_at(), await storage.next_reap_at()


async def check_next_due_and_reap_deadlines_are_separate(factory: StorageFactory) -> None:
    """next_due_at is promote_due's next work only; next_reap_at is reap's (lease, timeout, TTL)."""
    async with factory() as storage:
        what = "(next_due_at, next_reap_at)"
        _expect_eq(await _deadlines(storage), (None, None), f"{what} of an empty storage")
        runnable = make_job(queue="now", retry=NO_JITTER)
        await _enqueue(storage, runnable)
        _expect_eq(await _deadlines(storage), (None, None), f"{what} with an available job")

        # One scheduled job with a TTL: due for promotion at one time, for reaping at another.
        later = make_job(queue="later", delay_ms=60_000, expires_at="+PT90S")
        await _enqueue(storage, later)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 90), f"{what}: due time and TTL")
        await _claim_one(storage, T0, runnable, visibility_ms=30_000)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 30), f"{what} with a lease")
        timed = make_job(queue="timed", timeout_ms=20_000)
        await _enqueue(storage, timed)
        await _claim_one(storage, T0, timed, visibility_ms=600_000)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 20), f"{what} with an exec timeout")
        expiring = make_job(queue="ttl", expires_at="+PT10S")
        await _enqueue(storage, expiring)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 10), f"{what} with a job's TTL")
        # Once a job has started its TTL no longer applies, only its lease does.
        running = make_job(queue="running", expires_at="+PT5S")
        await _enqueue(storage, running)
        await _claim_one(storage, T0, running, visibility_ms=600_000)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 10), f"{what}: started job's TTL")
        await storage.ack(running.id, "w1", None, False, T0 + 1)

        await storage.cancel(expiring.id, T0 + 1)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 20), f"{what} after the TTL job")
        await storage.ack(timed.id, "w1", None, False, T0 + 2)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 30), f"{what} after the timed job")
        await storage.heartbeat("w1", [runnable.id], 40_000, T0 + 3)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 43), f"{what} after a heartbeat")
        await storage.nack(runnable.id, "w1", FAILURE, False, T0 + 4)  # retry at T0 + 6
        _expect_eq(await _deadlines(storage), (T0 + 6, T0 + 90), f"{what} after a nack")
        await storage.promote_due(T0 + 6, BIG)
        _expect_eq(await _deadlines(storage), (T0 + 60, T0 + 90), f"{what} after the promote")
        await storage.cancel(later.id, T0 + 7)
        _expect_eq(await _deadlines(storage), (None, None), f"{what} once idle again")

        # A claim that skipped a TTL-expired job leaves reap work due at once.
        stale = make_job(queue="stale", now=T0 + 100, expires_at="+PT1S")
        await _enqueue(storage, stale, now=T0 + 100)
        _expect_eq(await _claim(storage, T0 + 102, "stale"), [], "claim of a TTL-expired job")
        reap_at = await storage.next_reap_at()
        _expect(
            reap_at is not None and reap_at <= T0 + 102,
            f"next_reap_at after a claim skipped an expired job: expected <= now, got {reap_at!r}",
        )
        _expect_eq(_ids(await storage.reap(T0 + 102, BIG)), [stale.id], "reap of the skipped job")
        _expect_eq(await _deadlines(storage), (None, None), f"{what} after that reap")


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


async def check_prune_deletes_only_expired_finished_jobs(factory: StorageFactory) -> None:
    async with factory() as storage:
        dlq_retry = {**NO_JITTER, "max_attempts": 1, "on_exhaustion": "dead_letter"}
        done, cancelled, live, dead = (
            make_job(queue="p-done"),
            make_job(queue="p-cancel"),
            make_job(queue="p-live"),
            make_job(queue="p-dead", retry=dlq_retry),
        )
        await _enqueue(storage, done, cancelled, live, dead)
        await _claim_one(storage, T0, done)
        await storage.ack(done.id, None, {"ok": True}, True, T0 + 1)
        await storage.cancel(cancelled.id, T0 + 2)
        await _exhaust(storage, dead, T0 + 3)

        # Nothing finished before T0: nothing to prune.
        _expect_eq(await storage.prune(T0, T0, BIG), 0, "prune before anything finished")
        # Plain finished jobs go; the dead letter is kept when its cutoff is None.
        _expect_eq(await storage.prune(T0 + 10, None, BIG), 2, "prune of finished jobs")
        for job in (done, cancelled):
            with _raises(NotFound, f"get of pruned {job.queue} job"):
                await storage.get(job.id)
        _expect_eq((await storage.get(live.id)).state, JobState.AVAILABLE, "live job kept")
        page = await storage.list_dead_letter(None, BIG, 0)
        _expect_eq([j.id for j in page.jobs], [dead.id], "dead letter kept")
        # Its own cutoff removes it; a second pass finds nothing (idempotent).
        _expect_eq(await storage.prune(None, T0 + 10, BIG), 1, "prune of the dead letter")
        _expect_eq(await storage.prune(T0 + 10, T0 + 10, BIG), 0, "second prune pass")


# -- unique jobs ---------------------------------------------------------------

BY_ARGS: dict[str, Any] = {"keys": ["type", "args"]}  # on_conflict defaults to reject


async def _blocker(storage: Storage, job: Job, now: float = T0) -> str | None:
    """Enqueue ``job`` alone: None if it was created, else the id DuplicateJob names."""
    try:
        (result,) = await storage.enqueue([job], now)
    except DuplicateJob as exc:
        return str(exc.details.get("existing_job_id"))
    _expect(result.created, f"enqueue of {job.id} neither created it nor raised DuplicateJob")
    return None


async def _job_in_state(storage: Storage, state: JobState, unique: dict[str, Any]) -> Job:
    """A unique job (args ``[state]``, queue ``u-<state>``) driven into ``state``."""
    options: dict[str, Any] = {"queue": f"u-{state.value}", "args": [state.value]}
    options["retry"] = {**NO_JITTER, "max_attempts": 1 if state is JobState.DISCARDED else 3}
    if state is JobState.SCHEDULED:
        options["delay_ms"] = 600_000
    job = make_job(unique=unique, **options)
    await _enqueue(storage, job)
    if state is JobState.CANCELLED:
        await storage.cancel(job.id, T0)
    elif state not in (JobState.SCHEDULED, JobState.AVAILABLE):
        await _claim_one(storage, T0, job)
        if state is JobState.COMPLETED:
            await storage.ack(job.id, "w1", None, False, T0)
        elif state is not JobState.ACTIVE:
            await storage.nack(job.id, "w1", FAILURE, False, T0)
    _expect_eq(await _state(storage, job.id), state, "state of a unique job set up for the check")
    return job


async def check_unique_reject_raises_duplicate(factory: StorageFactory) -> None:
    async with factory() as storage:
        reject = {**BY_ARGS, "on_conflict": "reject"}
        first = make_job(args=[1], unique=reject)
        (result,) = await storage.enqueue([first], T0)
        _expect(result.created, "enqueue of the first unique job reports created=True")
        before = await storage.get(first.id)
        for what, policy in (("on_conflict=reject", reject), ("on_conflict omitted", BY_ARGS)):
            dup = make_job(args=[1], unique=policy, now=T0 + 1)
            with _raises(DuplicateJob, f"enqueue of a duplicate ({what})") as raised:
                await storage.enqueue([dup], T0 + 1)
            existing = raised.value.details.get("existing_job_id")
            _expect_eq(existing, first.id, f"DuplicateJob existing_job_id ({what})")
            with _raises(NotFound, f"get of the rejected duplicate ({what})"):
                await storage.get(dup.id)
        _expect_eq(await storage.get(first.id), before, "existing job after rejected duplicates")
        other = make_job(args=[2], unique=reject, now=T0 + 1)
        _expect_eq(await _blocker(storage, other, T0 + 1), None, "blocker of a job with other args")


async def check_unique_ignore_returns_existing_job(factory: StorageFactory) -> None:
    async with factory() as storage:
        ignore = {**BY_ARGS, "on_conflict": "ignore"}
        first = make_job(args=["a"], unique=ignore)
        await _enqueue(storage, first)
        await _claim_one(storage, T0, first)
        dup = make_job(args=["a"], unique=ignore, now=T0 + 1)
        (result,) = await storage.enqueue([dup], T0 + 1)
        _expect(not result.created, "an ignored duplicate reports created=False")
        _expect_eq(result.job, await storage.get(first.id), "job returned for an ignored duplicate")
        with _raises(NotFound, "get of the ignored duplicate"):
            await storage.get(dup.id)
        _expect_eq(await _claim(storage, T0 + 1, count=10), [], "claim after an ignored duplicate")

        # Twins in one batch: the first is created, the second yields it as stored.
        twins = [make_job(queue="twins", args=["b"], unique=ignore) for _ in range(2)]
        results = await storage.enqueue(twins, T0 + 2)
        outcome = [(r.job.id, r.created) for r in results]
        _expect_eq(outcome, [(twins[0].id, True), (twins[0].id, False)], "results of ignore twins")
        with _raises(NotFound, "get of the ignored twin"):
            await storage.get(twins[1].id)
        stored = await storage.get(twins[0].id)
        _expect_eq(results[0].job, stored, "job returned for the created twin")
        _expect_eq(results[1].job, stored, "job returned for the ignored twin (the stored first)")


async def check_unique_replace_cancels_existing_job(factory: StorageFactory) -> None:
    async with factory() as storage:
        replace = {**BY_ARGS, "on_conflict": "replace"}
        old = make_job(args=["r"], unique=replace)
        await _enqueue(storage, old)
        new = make_job(args=["r"], unique=replace, now=T0 + 1)
        (result,) = await storage.enqueue([new], T0 + 1)
        _expect_eq((result.job.id, result.created), (new.id, True), "result of a replacing enqueue")
        _expect_eq(result.job, await storage.get(new.id), "replacement returned vs stored")
        replaced = await storage.get(old.id)
        state = (replaced.state, replaced.cancelled_at)
        _expect_eq(state, (JobState.CANCELLED, T0 + 1), "replaced job (state, cancelled_at)")
        _expect_eq(_ids(await _claim(storage, T0 + 1, count=10)), [new.id], "claim after replace")
        # The replacement now holds the key (while active, too).
        late = make_job(args=["r"], unique=BY_ARGS, now=T0 + 2)
        _expect_eq(await _blocker(storage, late, T0 + 2), new.id, "blocker after a replace")


async def check_unique_states_choose_blocking_jobs(factory: StorageFactory) -> None:
    """Only existing jobs in the new job's ``states`` block it; by default the non-terminal ones."""
    states = [s for s in JobState if s is not JobState.PENDING]  # no verb makes a pending job
    async with factory() as storage:
        existing = {state: await _job_in_state(storage, state, BY_ARGS) for state in states}
        non_terminal = {s for s in states if not s.is_terminal}
        for extra, blocking in (
            ({}, non_terminal),
            ({"states": ["available"]}, {JobState.AVAILABLE}),
            ({"states": ["completed", "active"]}, {JobState.COMPLETED, JobState.ACTIVE}),
        ):
            for state in states:
                dup = make_job(queue="u-dups", args=[state.value], unique={**BY_ARGS, **extra})
                blocker = await _blocker(storage, dup, T0 + 1)
                what = f"blocker of a duplicate of a {state} job with policy {extra or 'default'}"
                _expect_eq(blocker, existing[state].id if state in blocking else None, what)
                if blocker is None:
                    await storage.cancel(dup.id, T0 + 1)  # keep it from blocking later rounds


async def check_unique_period_bounds_the_window(factory: StorageFactory) -> None:
    """The window is [created_at, created_at + period) of the existing job."""
    async with factory() as storage:
        policy = {**BY_ARGS, "period": "PT60S"}
        first = make_job(args=["p"], unique=policy)
        await _enqueue(storage, first)
        early = make_job(args=["p"], unique=policy, now=T0 + 59.5)
        _expect_eq(await _blocker(storage, early, T0 + 59.5), first.id, "blocker within the period")
        # A rejected attempt does not extend the window: it ends at first.created_at + 60.
        fresh = make_job(args=["p"], unique=policy, now=T0 + 60)
        _expect_eq(await _blocker(storage, fresh, T0 + 60), None, "blocker once the period ended")
        _expect_eq(await _state(storage, first.id), JobState.AVAILABLE, "the older job, left alone")
        later = make_job(args=["p"], unique=policy, now=T0 + 61)
        _expect_eq(await _blocker(storage, later, T0 + 61), fresh.id, "blocker in fresh's period")


async def check_unique_keys_choose_the_dimensions(factory: StorageFactory) -> None:
    async with factory() as storage:
        by_type: dict[str, Any] = {"on_conflict": "reject"}  # keys omitted: type only
        by_queue = {"keys": ["type", "queue"]}
        by_user = {**BY_ARGS, "args_keys": ["user"]}
        t1 = make_job(job_type="contract.by-type", args=[1], unique=by_type)
        a1 = make_job(job_type="contract.by-args", args=[1, {"x": 1, "y": 2}], unique=BY_ARGS)
        u1 = make_job(job_type="contract.by-user", args=[{"user": 7, "nonce": "a"}], unique=by_user)
        q1 = make_job(job_type="contract.by-queue", queue="qa", unique=by_queue)
        n1 = make_job(job_type="contract.by-nfc", args=["caf\u00e9"], unique=BY_ARGS)
        cases: list[tuple[str, Job, str | None]] = [
            ("first of its type", t1, None),
            (
                "type-only key, other args",
                make_job(job_type=t1.type, args=[2], unique=by_type),
                t1.id,
            ),
            (
                "type-only key, other queue",
                make_job(job_type=t1.type, queue="elsewhere", unique=by_type),
                t1.id,
            ),
            (
                "type-only key, other type",
                make_job(job_type="contract.by-type2", args=[1], unique=by_type),
                None,
            ),
            ("first with type+args", a1, None),
            ("type+args, other args", make_job(job_type=a1.type, args=[2], unique=BY_ARGS), None),
            (
                "type+args, same args with keys reordered",
                make_job(job_type=a1.type, args=[1, {"y": 2, "x": 1}], unique=BY_ARGS),
                a1.id,
            ),
            ("first with args_keys", u1, None),
            (
                "args_keys [user], same user",
                make_job(job_type=u1.type, args=[{"user": 7, "nonce": "b"}], unique=by_user),
                u1.id,
            ),
            (
                "args_keys [user], other user",
                make_job(job_type=u1.type, args=[{"user": 8, "nonce": "a"}], unique=by_user),
                None,
            ),
            ("first with type+queue", q1, None),
            (
                "type+queue, other queue",
                make_job(job_type=q1.type, queue="qb", unique=by_queue),
                None,
            ),
            (
                "type+queue, same queue",
                make_job(job_type=q1.type, queue="qa", unique=by_queue),
                q1.id,
            ),
            ("first with an accented arg", n1, None),
            (
                "same arg in decomposed Unicode (NFC-equal)",
                make_job(job_type=n1.type, args=["cafe\u0301"], unique=BY_ARGS),
                n1.id,
            ),
        ]
        for what, job, expected in cases:
            _expect_eq(await _blocker(storage, job), expected, f"blocker: {what}")


async def check_unique_duplicates_within_one_batch(factory: StorageFactory) -> None:
    async with factory() as storage:
        bystander = make_job(queue="bystander")
        first, second = (make_job(args=["twin"], unique=BY_ARGS) for _ in range(2))
        with _raises(DuplicateJob, "batch holding two jobs with one unique key") as raised:
            await storage.enqueue([bystander, first, second], T0)
        existing = raised.value.details.get("existing_job_id")
        _expect_eq(existing, first.id, "existing_job_id for the second twin")
        for job in (bystander, first, second):
            with _raises(NotFound, f"get of job {job.id} from the rejected batch"):
                await storage.get(job.id)
        _expect_eq(await _claim(storage, T0, QUEUE, "bystander", count=10), [], "claim after")
        # Nothing of the rejected batch holds the key.
        _expect_eq(await _blocker(storage, second, T0 + 1), None, "blocker of one twin alone")


async def _enqueue_racing(
    storage: Storage, job: Job, created: list[str], others: list[str]
) -> None:
    try:
        (result,) = await storage.enqueue([job], T0)
    except DuplicateJob as exc:
        others.append(str(exc.details.get("existing_job_id")))
        return
    (created if result.created else others).append(result.job.id)


async def check_concurrent_unique_enqueues_create_one_job(factory: StorageFactory) -> None:
    """20 tasks enqueueing one unique job at once: exactly one is created (strong uniqueness)."""
    tasks = 20
    async with factory() as storage:
        for on_conflict in ("reject", "ignore"):
            queue = f"race-{on_conflict}"
            policy = {**BY_ARGS, "on_conflict": on_conflict}
            jobs = [make_job(queue=queue, args=[on_conflict], unique=policy) for _ in range(tasks)]
            created: list[str] = []
            others: list[str] = []  # the existing job each other enqueue was told about
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(_enqueue_racing, storage, job, created, others)
            _expect_eq(len(created), 1, f"jobs created by {tasks} racing enqueues ({on_conflict})")
            _expect_eq(others, created * (tasks - 1), f"existing job reported ({on_conflict})")
            counts = {i.name: i.counts for i in await storage.list_queues()}[queue]
            _expect_eq({s: n for s, n in counts.items() if n}, {"available": 1}, f"{queue} counts")


async def check_workflow_members_hold_their_unique_keys(factory: StorageFactory) -> None:
    """A member with ``options.unique`` holds its key like an enqueued job: a later
    enqueue with that key conflicts with it (a chain step once it is created)."""
    unique_type = "contract.unique-member"

    def member(queue: str, key: str) -> dict[str, Any]:
        options = {"queue": queue, "unique": BY_ARGS}
        return {"type": unique_type, "args": [key], "options": options}

    def duplicate(key: str, **policy: Any) -> Job:
        return make_job(job_type=unique_type, args=[key], unique={**BY_ARGS, **policy})

    async with factory() as storage:
        members = [member("um-group", "g0"), member("um-group", "g1")]
        group = await _create_workflow(storage, {"type": "group", "jobs": members})
        for index, key in enumerate(("g0", "g1")):
            blocker = await _blocker(storage, duplicate(key), T0 + 1)
            _expect_eq(blocker, _job_id(group, index), f"blocker of a duplicate of member {key}")
        (ignored,) = await storage.enqueue([duplicate("g1", on_conflict="ignore")], T0 + 1)
        outcome = (ignored.job.id, ignored.created)
        _expect_eq(outcome, (_job_id(group, 1), False), "ignored duplicate of a member")

        steps = [member("um-chain", "c0"), member("um-chain", "c1")]
        chain = await _create_workflow(storage, {"type": "chain", "steps": steps})
        blocker = await _blocker(storage, duplicate("c0"), T0 + 1)
        _expect_eq(blocker, _job_id(chain, 0), "blocker of a duplicate of chain step 0")
        (first,) = await _claim(storage, T0 + 2, "um-chain")
        await storage.ack(first.id, "w1", None, False, T0 + 3)
        step1 = _job_id(await storage.get_workflow(chain.id), 1)
        blocker = await _blocker(storage, duplicate("c1"), T0 + 4)
        _expect_eq(blocker, step1, "blocker of a duplicate of chain step 1 (created by the ack)")
        _expect_eq(await _claim(storage, T0 + 4, QUEUE, count=10), [], "no duplicate was stored")

        # A replace cancels the member in the same step and settles its workflow:
        # g0 cancelled and g1 ending leave the group failed.
        (result,) = await storage.enqueue([duplicate("g0", on_conflict="replace")], T0 + 5)
        replaced = (result.replaced.id, result.replaced.state) if result.replaced else None
        _expect_eq(replaced, (_job_id(group, 0), JobState.CANCELLED), "member replaced")
        _expect_eq(await _state(storage, _job_id(group, 0)), JobState.CANCELLED, "stored member")
        await storage.cancel(_job_id(group, 1), T0 + 6)
        summary = await _group_summary(storage, group.id)
        _expect_eq(summary, ("failed", T0 + 6, 0, 2), "group after a replace and a cancel")


# -- queue control and limits ----------------------------------------------------


async def check_pause_holds_every_request_until_resumed(factory: StorageFactory) -> None:
    async with factory() as storage:
        # Pausing a queue nobody used yet creates it, paused: its first jobs wait.
        info = await storage.set_queue_paused("early", True, T0)
        _expect_eq((info.name, info.paused), ("early", True), "pause of an unknown queue")
        listed = {i.name: i.paused for i in await storage.list_queues()}
        _expect_eq(listed, {"early": True}, "list_queues after pausing an unknown queue")
        held = make_job(queue="early")
        free = make_job(queue="free")
        await _enqueue(storage, held, free)
        requests = [ClaimRequest(("early",), 5, "w1"), ClaimRequest(("early", "free"), 5, "w2")]
        results = await storage.claim(requests, T0 + 1)
        _expect_eq([_ids(r) for r in results], [[], [free.id]], "claims across a paused queue")
        _expect_eq((await storage.queue_info("early", T0 + 1)).paused, True, "queue_info.paused")

        # Pause and resume are idempotent.
        await storage.set_queue_paused("early", True, T0 + 2)
        _expect_eq(await _claim(storage, T0 + 2, "early"), [], "claim after pausing twice")
        await storage.set_queue_paused("early", False, T0 + 3)
        info = await storage.set_queue_paused("early", False, T0 + 3)
        _expect_eq((info.name, info.paused), ("early", False), "queue info after resuming twice")
        _expect_eq(_ids(await _claim(storage, T0 + 3, "early")), [held.id], "claim after resume")


async def check_queue_info_counts_states_and_throughput(factory: StorageFactory) -> None:
    async with factory() as storage:
        with _raises(NotFound, "queue_info of an unknown queue"):
            await storage.queue_info("nowhere", T0)
        q = "stats"
        retrying = make_job(queue=q, retry=NO_JITTER)
        done = make_job(queue=q)
        failed = make_job(queue=q, retry={**NO_JITTER, "max_attempts": 1})
        running = make_job(queue=q)
        await _enqueue(storage, retrying, done, failed, running)
        claimed = await _claim(storage, T0, q, count=4)
        _expect_eq(_ids(claimed), _ids([retrying, done, failed, running]), "claim of stats jobs")
        scheduled = make_job(queue=q, delay_ms=600_000)
        cancelled = make_job(queue=q)
        await _enqueue(storage, scheduled, make_job(queue=q), cancelled)
        # At T0 + 1, before every window below: a retry (not an outcome) and a cancel.
        await storage.nack(retrying.id, "w1", FAILURE, False, T0 + 1)
        await storage.cancel(cancelled.id, T0 + 1)
        await storage.ack(done.id, "w1", None, False, T0 + 10)
        await storage.nack(failed.id, "w1", FAILURE, False, T0 + 20)
        elsewhere = make_job(queue="other-stats")
        await _enqueue(storage, elsewhere)
        await _claim_one(storage, T0, elsewhere)
        await storage.ack(elsewhere.id, "w1", None, False, T0 + 10)

        info = await storage.queue_info(q, T0 + 62)
        _expect_eq((info.name, info.paused), (q, False), "queue_info name and paused flag")
        expected = {state.value: 1 for state in JobState}
        expected["pending"] = 0
        _expect_eq(info.counts, expected, "queue_info counts (every state is a key)")
        for now, throughput in ((T0 + 62, (1, 1)), (T0 + 75, (0, 1)), (T0 + 85, (0, 0))):
            info = await storage.queue_info(q, now)
            got = (info.completed_last_minute, info.failed_last_minute)
            what = f"(completed, failed) last minute at T0 + {now - T0:g} (ack +10, discard +20)"
            _expect_eq(got, throughput, what)
        await storage.set_queue_paused(q, True, T0 + 90)
        _expect_eq((await storage.queue_info(q, T0 + 90)).paused, True, "queue_info once paused")


async def check_rate_limit_throttles_claims(factory: StorageFactory) -> None:
    """options.rate_limit limits how many jobs of the queue start per window (sliding)."""
    async with factory() as storage:
        limit = {"max_per_second": 1}
        # The limit belongs to the queue: the plain job in the middle is throttled too.
        rated = [
            make_job(queue="rated", rate_limit=limit),
            make_job(queue="rated"),
            make_job(queue="rated", rate_limit=limit),
        ]
        free = [make_job(queue="free") for _ in range(2)]
        await _enqueue(storage, *rated, *free)
        got = await _claim(storage, T0, "rated", count=3)
        _expect_eq(_ids(got), [rated[0].id], "claim of 3 under max_per_second=1")
        _expect_eq(await _claim(storage, T0 + 0.5, "rated", count=3), [], "claim at T0 + 0.5")
        got = await _claim(storage, T0 + 0.5, "rated", "free", count=3)
        _expect_eq(_ids(got), _ids(free), "claim across a throttled and a free queue")

        requests = [ClaimRequest(("rated",), 1, "w1"), ClaimRequest(("rated",), 1, "w2")]
        results = await storage.claim(requests, T0 + 1.5)
        _expect_eq([_ids(r) for r in results], [[rated[1].id], []], "two requests at T0 + 1.5")
        _expect_eq(await _claim(storage, T0 + 1.9, "rated"), [], "claim 0.4 s after the last start")
        got = await _claim(storage, T0 + 3, "rated")
        _expect_eq(_ids(got), [rated[2].id], "claim at T0 + 3")
        info = await storage.queue_info("rated", T0 + 3)
        _expect(info.rate_limit is not None, "queue_info of a rate-limited queue has a rate_limit")


async def check_concurrency_limit_caps_active_jobs(factory: StorageFactory) -> None:
    async with factory() as storage:
        jobs = [make_job(queue="capped", concurrency=2, retry=NO_JITTER) for _ in range(5)]
        await _enqueue(storage, *jobs)
        got = await _claim(storage, T0, "capped", count=5)
        _expect_eq(_ids(got), _ids(jobs[:2]), "claim of 5 under concurrency=2")
        _expect_eq(await _claim(storage, T0, "capped", count=5), [], "claim with 2 of 2 active")

        await storage.ack(jobs[0].id, "w1", None, False, T0 + 1)
        requests = [ClaimRequest(("capped",), 2, "w2"), ClaimRequest(("capped",), 2, "w3")]
        results = await storage.claim(requests, T0 + 1)
        _expect_eq([_ids(r) for r in results], [[jobs[2].id], []], "requests after an ack")
        await storage.nack(jobs[1].id, "w1", FAILURE, False, T0 + 2)
        got = await _claim(storage, T0 + 2, "capped", count=5)
        _expect_eq(_ids(got), [jobs[3].id], "claim after a nack freed a slot")
        info = await storage.queue_info("capped", T0 + 2)
        _expect_eq((info.concurrency, info.counts.get("active")), (2, 2), "capped queue_info")


# -- workflows -------------------------------------------------------------------

LAST_TRY: dict[str, Any] = {**NO_JITTER, "max_attempts": 1}
CALLBACK_QUEUES = {
    "on_complete": "cb-complete",
    "on_success": "cb-success",
    "on_failure": "cb-failure",
}


def _member(queue: str, **options: Any) -> dict[str, Any]:
    """The envelope of a workflow member (or batch callback) in ``queue``."""
    return {"type": "contract.step", "args": [], "options": {"queue": queue, **options}}


async def _create_workflow(storage: Storage, body: dict[str, Any], now: float = T0) -> Workflow:
    """Create a workflow the way the engine does (parse_workflow, then create_workflow)."""
    workflow, jobs = parse_workflow(body, now)
    stored = await storage.create_workflow(workflow, jobs, now)
    _expect_eq(stored, workflow, f"{workflow.type} workflow returned by create_workflow")
    return stored


def _job_id(workflow: Workflow, index: int) -> str:
    job_id = workflow.job_ids[index]
    _expect(job_id is not None, f"workflow {workflow.id} has no job for member {index} yet")
    return str(job_id)


async def check_chain_creates_each_step_on_ack(factory: StorageFactory) -> None:
    async with factory() as storage:
        queues = ("chain-a", "chain-b", "chain-c")
        body = {"type": "chain", "name": "contract", "steps": [_member(q) for q in queues]}
        chain = await _create_workflow(storage, body)
        _expect_eq(chain.job_ids[1:], [None, None], "job ids of steps not started yet")
        results: list[Any] = [{"n": 0}, "one", [2]]
        for step, queue in enumerate(queues):
            now = T0 + step
            got = await _claim(storage, now, *queues, count=10)
            current = await storage.get_workflow(chain.id)
            _expect_eq(_ids(got), [_job_id(current, step)], f"claimable jobs at step {step}")
            parents = results[:step]  # every earlier step's result, by index
            fields = (got[0].queue, got[0].workflow_id, got[0].workflow_step, got[0].parent_results)
            _expect_eq(
                fields, (queue, chain.id, step, parents), f"step {step} (queue, wf, parents)"
            )

            await storage.ack(got[0].id, "w1", results[step], True, now + 0.5)
            # In the same step as the ack: the next step exists, the workflow counts this one.
            current = await storage.get_workflow(chain.id)
            last = step == len(queues) - 1
            wire = current.to_wire()
            state = (wire["state"], wire["steps_completed"])
            expected = ("completed" if last else "running", step + 1)
            _expect_eq(state, expected, f"(state, steps_completed) after step {step}'s ack")
            if not last:
                nxt = await storage.get(_job_id(current, step + 1))
                _expect_eq(nxt.state, JobState.AVAILABLE, f"step {step + 1} right after the ack")

        final = await storage.get_workflow(chain.id)
        _expect_eq(final.completed_at, T0 + 2.5, "completed_at of the chain (last ack)")
        _expect_eq(await _claim(storage, T0 + 3, *queues, count=10), [], "claim after the chain")
        _expect_eq(len(set(final.job_ids)), 3, "distinct jobs of a 3-step chain")
        final.state = "cancelled"
        final.job_ids.clear()
        _expect_eq(
            (await storage.get_workflow(chain.id)).state, "completed", "after mutating a get"
        )


async def check_chain_parent_results_stay_bounded_with_large_results(
    factory: StorageFactory,
) -> None:
    """A 4-step chain whose steps return 120 KB each runs to the end (on SQS each job
    and workflow item must stay within DynamoDB's 400 KB): once the earlier results
    exceed PARENT_RESULTS_MAX_BYTES, a step gets only the previous step's result."""
    async with factory() as storage:
        queue = "big-results"
        body = {"type": "chain", "steps": [_member(queue) for _ in range(4)]}
        chain = await _create_workflow(storage, body)
        results = [{"step": n, "pad": "x" * (120 * 1024)} for n in range(4)]
        expected: list[list[Any]] = [[], results[:1], [None, results[1]], [None, None, results[2]]]
        for step, result in enumerate(results):
            now = T0 + step
            (job,) = await _claim(storage, now, queue)
            _expect_eq(job.workflow_step, step, "step claimed")
            _expect(job.parent_results == expected[step], f"parent_results of step {step}")
            await storage.ack(job.id, "w1", result, True, now + 0.5)
        final = await storage.get_workflow(chain.id)
        _expect_eq((final.state, final.completed_at), ("completed", T0 + 3.5), "the chain")


async def check_chain_keeps_no_oversized_result_in_its_record(factory: StorageFactory) -> None:
    """A chain whose waiting steps fill most of its record (10 steps of 25 KB) and
    whose first step returns 250 KB runs to the end: the result is passed on whole
    but the record keeps none larger than PARENT_RESULTS_MAX_BYTES (on SQS the
    record is one DynamoDB item of at most 400 KB; keeping the result there made
    every ack of that step fail)."""
    async with factory() as storage:
        queue = "chain-big-first"
        step = {**_member(queue), "args": ["x" * (25 * 1024)]}
        chain = await _create_workflow(storage, {"type": "chain", "steps": [step] * 10})
        first = {"step": 0, "pad": "y" * (250 * 1024)}
        for n in range(10):
            now = T0 + n
            (job,) = await _claim(storage, now, queue)
            _expect_eq(job.workflow_step, n, "step claimed")
            if n == 1:
                _expect(job.parent_results == [first], "step 1 gets the large result whole")
            elif n == 2:
                _expect(job.parent_results == [None, {"step": 1}], "step 2's parent_results")
            result = first if n == 0 else {"step": n}
            await storage.ack(job.id, "w1", result, True, now + 0.5)
            record = await storage.get_workflow_record(chain.id)
            kept = [record.results[i] for i in sorted(record.results)]
            size = len(json.dumps(kept, separators=(",", ":")))
            _expect(size <= PARENT_RESULTS_MAX_BYTES, f"results kept after step {n}: {size} B")
        _expect_eq(record.state, "completed", "the chain")


async def _claim_all(storage: Storage, now: float, queue: str, count: int) -> list[Job]:
    """Claim ``count`` jobs of ``queue`` (a claim may bring fewer than asked at once)."""
    got: list[Job] = []
    for _ in range(count):
        got += await _claim(storage, now, queue, count=count - len(got))
        if len(got) >= count:
            break
    _expect_eq(len(got), count, f"jobs claimed from {queue!r}")
    return got


def _result_markers(parent_results: list[Any] | None) -> list[Any] | None:
    """The ``member`` marker of each large result in a list (None for a null)."""
    if parent_results is None:
        return None
    return [r["member"] if isinstance(r, dict) else r for r in parent_results]


async def check_large_member_results_stay_bounded_in_groups_and_batches(
    factory: StorageFactory,
) -> None:
    """A group and a batch of 10 members returning 40 KB each run to the end, and the
    batch's callbacks run too (on SQS every job and workflow item must stay within
    DynamoDB's 400 KB): callbacks get the results in member order while the list
    fits in PARENT_RESULTS_MAX_BYTES and null from the first that does not, whichever
    order the members finish in, and say where the omission starts in their meta."""
    size, members = 40 * 1024, 10
    callbacks = {name: _member(queue) for name, queue in CALLBACK_QUEUES.items()}
    async with factory() as storage:
        for kind in ("group", "batch"):
            queue = f"big-{kind}"
            body: dict[str, Any] = {"type": kind, "jobs": [_member(queue)] * members}
            if kind == "batch":
                body["callbacks"] = callbacks
            workflow = await _create_workflow(storage, body)
            claimed = sorted(await _claim_all(storage, T0, queue, members), key=_step_of)
            # Last member first: each result that arrives pushes out higher ones.
            for n, job in enumerate(reversed(claimed)):
                result = {"member": job.workflow_step, "pad": "x" * size}
                await storage.ack(job.id, "w1", result, True, T0 + 1 + n)
            summary = await _group_summary(storage, workflow.id)
            expected = ("completed", T0 + members, members, 0)
            _expect_eq(summary, expected, f"{kind} of large results (state, at, done, failed)")

        # 40 KB results: one fits in 64 KiB beside nine nulls, two do not.
        markers = [0] + [None] * (members - 1)
        fired = await _claim_all(storage, T0 + 20, CALLBACK_QUEUES["on_complete"], 1)
        fired += await _claim_all(storage, T0 + 20, CALLBACK_QUEUES["on_success"], 1)
        for cb in fired:
            what = f"batch callback {cb.queue}"
            _expect_eq(_result_markers(cb.parent_results), markers, f"{what}: parent_results")
            omitted_from = (cb.meta or {}).get(OMITTED_FROM_META)
            _expect_eq(omitted_from, 1, f"{what}: meta {OMITTED_FROM_META}")
            await storage.ack(cb.id, "w1", {"seen": len(cb.parent_results or [])}, True, T0 + 21)
            _expect_eq(await _state(storage, cb.id), JobState.COMPLETED, f"{what} after its ack")
        _expect_eq(await _claim(storage, T0 + 22, *CALLBACK_QUEUES.values()), [], "more callbacks")


async def check_chain_stops_at_a_failed_step(factory: StorageFactory) -> None:
    async with factory() as storage:
        queues = ("fail-a", "fail-b", "fail-c")
        two_tries = {**NO_JITTER, "max_attempts": 2}
        steps = [_member(queues[0]), _member(queues[1], retry=two_tries), _member(queues[2])]
        chain = await _create_workflow(storage, {"type": "chain", "steps": steps})
        (step0,) = await _claim(storage, T0, *queues, count=10)
        await storage.ack(step0.id, "w1", "ok", True, T0 + 1)
        (step1,) = await _claim(storage, T0 + 1, *queues, count=10)
        _expect_eq(step1.workflow_step, 1, "step claimed after step 0's ack")

        # A failed attempt with retries left does not end the step.
        await storage.nack(step1.id, "w1", FAILURE, False, T0 + 2)  # retry at T0 + 4
        current = await storage.get_workflow(chain.id)
        _expect_eq((current.state, current.job_ids[2]), ("running", None), "chain awaiting a retry")
        await storage.promote_due(T0 + 4, BIG)
        await _claim_one(storage, T0 + 4, step1)
        await storage.nack(step1.id, "w1", FAILURE, False, T0 + 5)
        current = await storage.get_workflow(chain.id)
        state = (current.state, current.completed_at, current.job_ids[2])
        _expect_eq(state, ("failed", T0 + 5, None), "chain after step 1 was discarded")
        await storage.promote_due(T0 + 1000, BIG)
        await storage.reap(T0 + 1000, BIG)
        _expect_eq(await _claim(storage, T0 + 1000, *queues, count=10), [], "claim after failing")
        current = await storage.get_workflow(chain.id)
        _expect_eq((current.state, current.job_ids[2]), ("failed", None), "failed chain, later")

        # A cancelled step ends its chain as cancelled.
        stop = ("stop-a", "stop-b")
        stopped = await _create_workflow(
            storage, {"type": "chain", "steps": [_member(q) for q in stop]}
        )
        await storage.cancel(_job_id(stopped, 0), T0 + 11)
        current = await storage.get_workflow(stopped.id)
        ended = (current.state, current.job_ids[1])
        _expect_eq(ended, ("cancelled", None), "chain after its running step was cancelled")
        _expect_eq(await _claim(storage, T0 + 12, *stop, count=10), [], "claim after cancelling")


async def _group_summary(storage: Storage, workflow_id: str) -> tuple[Any, ...]:
    """(state, completed_at, jobs_completed, jobs_failed) of a group or batch."""
    workflow = await storage.get_workflow(workflow_id)
    wire = workflow.to_wire()
    return (workflow.state, workflow.completed_at, wire["jobs_completed"], wire["jobs_failed"])


async def check_group_settles_when_every_member_is_terminal(factory: StorageFactory) -> None:
    async with factory() as storage:
        group = await _create_workflow(
            storage, {"type": "group", "jobs": [_member("grp") for _ in range(3)]}
        )
        members = await _claim(storage, T0, "grp", count=10)
        _expect_eq(set(_ids(members)), set(group.job_ids), "group members claimable at once")
        for n, job in enumerate(members):
            state = (await storage.get_workflow(group.id)).state
            _expect_eq(state, "running", f"group with {n} of 3 members completed")
            await storage.ack(job.id, "w1", n, True, T0 + 1 + n)
        summary = await _group_summary(storage, group.id)
        expected = ("completed", T0 + 3, 3, 0)
        _expect_eq(summary, expected, "group after its last ack (state, at, completed, failed)")

        # One member discarded (by its lease expiring on its last attempt): failed, once all
        # are terminal, not sooner.
        short = _member("grp-f", retry=LAST_TRY, visibility_timeout_ms=10_000)
        body = {"type": "group", "jobs": [_member("grp-f"), short, _member("grp-f")]}
        failing = await _create_workflow(storage, body, T0 + 10)
        by_step = {j.workflow_step: j for j in await _claim(storage, T0 + 10, "grp-f", count=10)}
        await storage.ack(by_step[0].id, "w1", "ok", True, T0 + 11)
        reaped = await storage.reap(T0 + 20, BIG)
        _expect_eq(_ids(reaped), [by_step[1].id], "reap of the member whose lease expired")
        _expect_eq(reaped[0].state, JobState.DISCARDED, "state of the reaped member")
        state = (await storage.get_workflow(failing.id)).state
        _expect_eq(state, "running", "group with a discarded member and one still active")
        await storage.ack(by_step[2].id, "w1", "ok", True, T0 + 21)
        summary = await _group_summary(storage, failing.id)
        expected = ("failed", T0 + 21, 2, 1)
        _expect_eq(summary, expected, "group after its last member settled")


async def _settle(storage: Storage, job: Job, verb: str, now: float) -> None:
    """ack (result: the member's index) or nack (on its last attempt: discarded)."""
    if verb == "ack":
        await storage.ack(job.id, job.worker_id, job.workflow_step, True, now)
    else:
        await storage.nack(job.id, job.worker_id, FAILURE, False, now)


async def check_batch_callbacks_fire_once_by_outcome(factory: StorageFactory) -> None:
    """on_complete always, on_success iff all succeeded, on_failure iff any failed: each once.

    The last two members of every batch are settled from two tasks at once.
    """
    outcomes = [("ack", "ack"), ("ack", "nack"), ("nack", "nack")] * 4
    callbacks = {name: _member(queue) for name, queue in CALLBACK_QUEUES.items()}
    async with factory() as storage:
        totals = dict.fromkeys(CALLBACK_QUEUES.values(), 0)
        for n, (second, third) in enumerate(outcomes):
            queue, now = f"batch-{n}", T0 + 10 * n
            members = [_member(queue, retry=LAST_TRY) for _ in range(3)]
            batch = await _create_workflow(
                storage, {"type": "batch", "jobs": members, "callbacks": callbacks}, now
            )
            claimed = sorted(await _claim(storage, now, queue, count=3), key=_step_of)
            _expect_eq(len(claimed), 3, f"members of batch {n} claimed at once")
            await _settle(storage, claimed[0], "ack", now + 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_settle, storage, claimed[1], second, now + 2)
                nursery.start_soon(_settle, storage, claimed[2], third, now + 2)

            ok = second == third == "ack"
            current = await storage.get_workflow(batch.id)
            what = f"batch {n} settled by ack/{second}/{third}"
            expected = (
                "completed" if ok else "failed",
                {"on_complete", "on_success" if ok else "on_failure"},
            )
            _expect_eq(
                (current.state, set(current.fired_callbacks)), expected, f"{what}: callbacks"
            )
            parents = [0, 1 if second == "ack" else None, 2 if third == "ack" else None]
            for name, job_id in current.fired_callbacks.items():
                cb = await storage.get(job_id)
                got = (cb.queue, cb.state, cb.parent_results)
                _expect_eq(
                    got, (CALLBACK_QUEUES[name], JobState.AVAILABLE, parents), f"{what}: {name}"
                )
                totals[cb.queue] += 1

        by_queue = {info.name: info.counts for info in await storage.list_queues()}
        counts = {q: by_queue.get(q, {}).get("available", 0) for q in totals}
        _expect_eq(counts, totals, "callback jobs over all batches (each exactly once)")
        expected_totals = {"cb-complete": 12, "cb-success": 4, "cb-failure": 8}
        _expect_eq(totals, expected_totals, "callbacks fired over all batches")


def _step_of(job: Job) -> int:
    return job.workflow_step if job.workflow_step is not None else -1


async def check_cancel_workflow_cancels_unfinished_members(factory: StorageFactory) -> None:
    async with factory() as storage:
        with _raises(NotFound, "get_workflow of an unknown id"):
            await storage.get_workflow(uuid7())
        with _raises(NotFound, "cancel_workflow of an unknown id"):
            await storage.cancel_workflow(uuid7(), T0)

        group = await _create_workflow(
            storage, {"type": "group", "jobs": [_member("wfc") for _ in range(3)]}
        )
        done, running = await _claim(storage, T0, "wfc", count=2)
        await storage.ack(done.id, "w1", None, False, T0 + 1)
        waiting = next(i for i in group.job_ids if i not in (done.id, running.id))
        workflow, cancelled = await storage.cancel_workflow(group.id, T0 + 2)
        state = (workflow.state, workflow.completed_at)
        _expect_eq(state, ("cancelled", T0 + 2), "workflow returned by cancel_workflow")
        _expect_eq(sorted(_ids(cancelled)), sorted([running.id, waiting]), "jobs it cancelled")
        for job in cancelled:
            _expect_eq((job.state, job.cancelled_at), (JobState.CANCELLED, T0 + 2), "a member")
            _expect_eq(await storage.get(job.id), job, "stored member equals the returned copy")
        _expect_eq(await _state(storage, done.id), JobState.COMPLETED, "the completed member")
        _expect_eq(await storage.get_workflow(group.id), workflow, "stored vs returned workflow")
        with _raises(Conflict, "second cancel_workflow"):
            await storage.cancel_workflow(group.id, T0 + 3)

        # A cancelled chain never creates its remaining steps.
        queues = ("wfc-a", "wfc-b", "wfc-c")
        chain = await _create_workflow(
            storage, {"type": "chain", "steps": [_member(q) for q in queues]}
        )
        (step0,) = await _claim(storage, T0, *queues, count=10)
        await storage.ack(step0.id, "w1", "ok", True, T0 + 1)
        _, cancelled = await storage.cancel_workflow(chain.id, T0 + 2)
        current = await storage.get_workflow(chain.id)
        _expect_eq(_ids(cancelled), [_job_id(current, 1)], "chain jobs cancel_workflow cancelled")
        _expect_eq(current.job_ids[2], None, "job id of the never-started step")
        _expect_eq(await _claim(storage, T0 + 3, *queues, count=10), [], "claim after cancel")

        # A finished workflow cannot be cancelled.
        single = await _create_workflow(storage, {"type": "chain", "steps": [_member("wfc-one")]})
        (only,) = await _claim(storage, T0, "wfc-one")
        await storage.ack(only.id, "w1", None, False, T0 + 1)
        with _raises(Conflict, "cancel_workflow of a completed workflow"):
            await storage.cancel_workflow(single.id, T0 + 2)


async def check_workflow_reports_current_member_states(factory: StorageFactory) -> None:
    """get_workflow shows each member's state as it is now, whatever verb changed it."""
    async with factory() as storage:
        members = [_member("ms-now", retry=NO_JITTER), _member("ms-later", delay_ms=5_000)]
        group = await _create_workflow(storage, {"type": "group", "jobs": members})

        async def states() -> list[str]:
            wire = (await storage.get_workflow(group.id)).to_wire()
            return [entry["state"] for entry in wire["jobs"]]

        _expect_eq(await states(), ["available", "scheduled"], "member states after create")
        (first,) = await _claim(storage, T0, "ms-now")
        _expect_eq(await states(), ["active", "scheduled"], "member states after a claim")
        await storage.promote_due(T0 + 5, BIG)
        _expect_eq(await states(), ["active", "available"], "member states after promote_due")
        await storage.nack(first.id, "w1", FAILURE, False, T0 + 5)  # retry at T0 + 7
        _expect_eq(await states(), ["retryable", "available"], "member states after a nack")
        await storage.promote_due(T0 + 7, BIG)
        _expect_eq(await states(), ["available", "available"], "after promoting the retry")


async def check_workflow_record_is_exact_once_finished(factory: StorageFactory) -> None:
    """get_workflow_record (the engine's one read after a member settles) agrees with
    get_workflow on everything a finished workflow's terminal event carries."""
    async with factory() as storage:
        with _raises(NotFound, "get_workflow_record of an unknown id"):
            await storage.get_workflow_record(uuid7())
        for outcome, queue in (("completed", "wr-ok"), ("failed", "wr-fail")):
            once = {"max_attempts": 1}  # a nack fails the member for good
            members = [_member(queue, retry=once) for _ in range(3)]
            group = await _create_workflow(storage, {"type": "group", "jobs": members})
            claimed = await _claim(storage, T0, queue, count=3)
            for job in claimed[:-1]:
                await storage.ack(job.id, "w1", None, False, T0 + 1)
            if outcome == "completed":
                await storage.ack(claimed[-1].id, "w1", None, False, T0 + 2)
            else:
                await storage.nack(claimed[-1].id, "w1", FAILURE, False, T0 + 2)
            live = await storage.get_workflow(group.id)
            record = await storage.get_workflow_record(group.id)
            got = (record.state, record.finished_by, record.completed_at)
            want = (live.state, live.finished_by, live.completed_at)
            _expect_eq(got, want, f"{outcome} workflow: record vs live (state, ender, time)")
            _expect_eq(record.state, outcome, "finished workflow's state")


# -- cron ------------------------------------------------------------------------


def _cron(name: str, now: float = T0, **fields: Any) -> CronRecord:
    """A schedule firing every 60 s (first at ``now + 60``) into queue ``cron-<name>``."""
    template = {"type": "contract.cron", "args": [], "options": {"queue": f"cron-{name}"}}
    body = {"name": name, "expression": "@every PT60S", "job_template": template, **fields}
    return parse_cron_request(body, now)


async def _fire(
    storage: Storage, record: CronRecord, occurrence: float, now: float | None = None
) -> tuple[CronFire, Job]:
    """Fire ``occurrence`` the way the cron ticker does; the next one is 60 s later."""
    now = occurrence if now is None else now
    job = job_for_occurrence(record, occurrence, now)
    fire = await storage.fire_cron(record.name, occurrence, occurrence + 60, job, now)
    return fire, job


def _history(record: CronRecord | None) -> tuple[Any, ...]:
    """(next_run_at, last_run_at, last_job_id, runs) of a schedule."""
    if record is None:
        raise AssertionError("fire_cron returned no schedule record")
    return (record.next_run_at, record.last_run_at, record.last_job_id, record.runs)


async def _cron_queue_counts(storage: Storage, name: str) -> dict[str, int]:
    for info in await storage.list_queues():
        if info.name == f"cron-{name}":
            return {s: n for s, n in info.counts.items() if n}
    return {}


async def check_cron_records_put_get_list_delete(factory: StorageFactory) -> None:
    async with factory() as storage:
        _expect_eq(await storage.list_crons(), [], "list_crons of an empty storage")
        with _raises(NotFound, "get_cron of an unknown name"):
            await storage.get_cron("nightly")
        with _raises(NotFound, "delete_cron of an unknown name"):
            await storage.delete_cron("nightly")

        record = _cron("nightly", description="contract")
        _expect_eq(await storage.put_cron(record), record, "record returned by put_cron")
        _expect_eq(await storage.get_cron("nightly"), record, "record read back by get_cron")
        alpha = _cron("alpha")
        await storage.put_cron(alpha)
        listed = {r.name: r for r in await storage.list_crons()}
        _expect_eq(listed, {"nightly": record, "alpha": alpha}, "records listed by list_crons")
        snapshot = await storage.get_cron("nightly")
        snapshot.runs = 99
        snapshot.job_template["args"].append("x")
        _expect_eq(await storage.get_cron("nightly"), record, "record after mutating a get_cron")

        # Replacing a schedule takes the new definition and keeps its history.
        occurrence = T0 + 60
        fire, job = await _fire(storage, record, occurrence)
        _expect(fire.fired, f"first firing of nightly: {fire.reason}")
        new = _cron("nightly", T0 + 70, expression="@every PT300S", overlap_policy="allow")
        expected = dataclasses.replace(
            new, created_at=T0, last_run_at=occurrence, last_job_id=job.id, runs=1
        )
        _expect_eq(await storage.put_cron(new), expected, "record after put_cron replaced it")
        _expect_eq(await storage.get_cron("nightly"), expected, "replaced record read back")

        _expect_eq(await storage.delete_cron("nightly"), expected, "record returned by delete")
        with _raises(NotFound, "get_cron after delete"):
            await storage.get_cron("nightly")
        with _raises(NotFound, "second delete_cron"):
            await storage.delete_cron("nightly")
        _expect_eq([r.name for r in await storage.list_crons()], ["alpha"], "names after delete")


async def _fire_racing(
    storage: Storage, record: CronRecord, occurrence: float, out: list[tuple[CronFire, Job]]
) -> None:
    out.append(await _fire(storage, record, occurrence))


async def check_fire_cron_fires_each_occurrence_once(factory: StorageFactory) -> None:
    async with factory() as storage:
        record = _cron("once", overlap_policy="allow")
        await storage.put_cron(record)
        occurrence = T0 + 60
        _expect_eq(record.next_run_at, occurrence, "next_run_at of the test schedule")
        fire, job = await _fire(storage, record, occurrence)
        _expect(fire.fired, f"first fire_cron of an occurrence was refused: {fire.reason}")
        _expect_eq(fire.job, await storage.get(job.id), "job returned by fire_cron vs stored")
        _expect_eq(fire.job.state, JobState.AVAILABLE, "state of the fired job")
        after = (occurrence + 60, occurrence, job.id, 1)
        _expect_eq(_history(fire.record), after, "(next_run_at, last_run_at, last_job_id, runs)")
        _expect_eq(await storage.get_cron("once"), fire.record, "stored vs returned schedule")

        # The same occurrence again (another server's tick): refused, nothing inserted.
        again, duplicate = await _fire(storage, record, occurrence, now=occurrence + 1)
        got = (again.fired, again.reason)
        _expect_eq(got, (False, "already_fired"), "second fire_cron of one occurrence")
        with _raises(NotFound, "job of the refused second firing"):
            await storage.get(duplicate.id)
        _expect_eq(_history(await storage.get_cron("once")), after, "schedule after the refusal")

        # Ten servers ticking at once: one fires the next occurrence.
        nxt = occurrence + 60
        fires: list[tuple[CronFire, Job]] = []
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(_fire_racing, storage, record, nxt, fires)
        fired = [job for fire, job in fires if fire.fired]
        _expect_eq(len(fired), 1, "occurrences fired by 10 racing fire_cron calls")
        reasons = [fire.reason for fire, _ in fires if not fire.fired]
        _expect_eq(reasons, ["already_fired"] * 9, "reasons of the refused racing calls")
        for fire, job in fires:
            if not fire.fired:
                with _raises(NotFound, "job of a refused racing firing"):
                    await storage.get(job.id)
        history = _history(await storage.get_cron("once"))
        _expect_eq(history, (nxt + 60, nxt, fired[0].id, 2), "schedule after the race")
        _expect_eq(await _cron_queue_counts(storage, "once"), {"available": 2}, "fired jobs")


async def check_fire_cron_applies_overlap_policy(factory: StorageFactory) -> None:
    async with factory() as storage:
        # skip (the default): no new job while the previous run's job is not terminal.
        skip = _cron("skip")
        await storage.put_cron(skip)
        occurrence = T0 + 60
        _, first = await _fire(storage, skip, occurrence)
        for n, when in enumerate((occurrence + 60, occurrence + 120), start=1):
            if n == 2:
                await _claim_one(storage, when, first)  # active is not terminal either
            fire, job = await _fire(storage, skip, when)
            _expect_eq((fire.fired, fire.reason), (False, "overlap"), f"skip-overlap firing {n}")
            with _raises(NotFound, f"job of skipped firing {n}"):
                await storage.get(job.id)
            record = await storage.get_cron("skip")
            history = (*_history(record), record.skipped)
            expected = (when + 60, occurrence, first.id, 1, n)
            _expect_eq(history, expected, f"(next, last, last job, runs, skipped) after skip {n}")
        await storage.ack(first.id, "w1", None, False, occurrence + 130)
        fire, job = await _fire(storage, skip, occurrence + 180)
        _expect(fire.fired, f"skip policy once the previous job completed: {fire.reason}")
        _expect_eq(_history(fire.record)[2:], (job.id, 2), "(last job, runs) after it fired")

        # allow: fires while the previous job waits; the previous job is left alone.
        allow = _cron("allow", overlap_policy="allow")
        await storage.put_cron(allow)
        _, previous = await _fire(storage, allow, occurrence)
        fire, _ = await _fire(storage, allow, occurrence + 60)
        _expect(fire.fired, f"allow policy with the previous job available: {fire.reason}")
        _expect_eq(await _state(storage, previous.id), JobState.AVAILABLE, "allow: previous job")
        _expect_eq(await _cron_queue_counts(storage, "allow"), {"available": 2}, "allow: jobs")

        # cancel_previous: the previous job (running here) is cancelled, the new one inserted.
        cancel = _cron("cancel-previous", overlap_policy="cancel_previous")
        await storage.put_cron(cancel)
        _, previous = await _fire(storage, cancel, occurrence)
        await _claim_one(storage, occurrence, previous)
        fire, job = await _fire(storage, cancel, occurrence + 60)
        _expect(fire.fired, f"cancel_previous with the previous job active: {fire.reason}")
        old = await storage.get(previous.id)
        got = (old.state, old.cancelled_at)
        _expect_eq(got, (JobState.CANCELLED, occurrence + 60), "cancel_previous: previous job")
        _expect_eq(await _state(storage, job.id), JobState.AVAILABLE, "cancel_previous: new job")


async def check_set_cron_enabled_toggles_in_place(factory: StorageFactory) -> None:
    """set_cron_enabled: one atomic step that keeps the schedule's history, never
    recreates a deleted schedule and changes nothing when asked for its state."""
    async with factory() as storage:
        with _raises(NotFound, "set_cron_enabled of an unknown name"):
            await storage.set_cron_enabled("nobody", False, T0)
        record = _cron("toggle")
        await storage.put_cron(record)
        fire, _ = await _fire(storage, record, T0 + 60)
        _expect(fire.fired, f"the first occurrence fires: {fire.reason}")

        before, after = await storage.set_cron_enabled("toggle", False, T0 + 70)
        _expect_eq((before.enabled, before.next_run_at), (True, T0 + 120), "before disabling")
        _expect_eq((after.enabled, after.next_run_at), (False, None), "after disabling")
        _expect_eq((after.runs, after.last_run_at), (1, T0 + 60), "history kept when disabled")
        _expect_eq(await storage.get_cron("toggle"), after, "stored vs returned (disabled)")
        again = await storage.set_cron_enabled("toggle", False, T0 + 80)
        _expect_eq(again, (after, after), "disabling a disabled schedule changes nothing")

        before, after = await storage.set_cron_enabled("toggle", True, T0 + 200)
        _expect_eq(before.enabled, False, "before enabling")
        _expect(
            after.enabled and after.next_run_at is not None and after.next_run_at > T0 + 200,
            f"enabled again, the next run is after now: {after.next_run_at}",
        )
        _expect_eq(await storage.get_cron("toggle"), after, "stored vs returned (enabled)")
        again = await storage.set_cron_enabled("toggle", True, T0 + 210)
        _expect_eq(again, (after, after), "enabling an enabled schedule changes nothing")

        await storage.delete_cron("toggle")
        with _raises(NotFound, "set_cron_enabled of a deleted schedule"):
            await storage.set_cron_enabled("toggle", False, T0 + 220)
        with _raises(NotFound, "a deleted schedule stays deleted after a toggle"):
            await storage.get_cron("toggle")


async def check_fire_cron_refuses_disabled_and_missing(factory: StorageFactory) -> None:
    async with factory() as storage:
        ghost = _cron("ghost")
        fire, job = await _fire(storage, ghost, T0 + 60)
        _expect_eq((fire.fired, fire.reason), (False, "missing"), "fire_cron of an unknown name")
        with _raises(NotFound, "job of a missing schedule's firing"):
            await storage.get(job.id)

        paused = _cron("paused", enabled=False)
        await storage.put_cron(paused)
        fire, job = await _fire(storage, paused, T0 + 60)
        _expect_eq((fire.fired, fire.reason), (False, "disabled"), "firing a disabled schedule")
        with _raises(NotFound, "job of a disabled schedule's firing"):
            await storage.get(job.id)
        record = await storage.get_cron("paused")
        history = (record.last_run_at, record.last_job_id, record.runs)
        _expect_eq(history, (None, None, 0), "disabled schedule's (last run, last job, runs)")

        enabled = _cron("paused", T0 + 100)  # re-enabled: next run at T0 + 160
        await storage.put_cron(enabled)
        fire, job = await _fire(storage, enabled, T0 + 160)
        _expect(fire.fired, f"firing once re-enabled: {fire.reason}")
        await storage.delete_cron("paused")
        fire, job = await _fire(storage, enabled, T0 + 220)
        _expect_eq((fire.fired, fire.reason), (False, "missing"), "firing a deleted schedule")
        with _raises(NotFound, "job of a deleted schedule's firing"):
            await storage.get(job.id)


# -- the listener ------------------------------------------------------------------


class _Heard:
    """A StorageListener recording the jobs an adapter reports as created by itself."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def jobs_created(self, jobs: list[Job]) -> None:
        self.jobs.extend(jobs)

    def queues_ready(self, queues: list[str]) -> None:
        pass  # a hint only: adapters may send it whenever they like

    async def expect(self, storage: Storage, expected_ids: Sequence[str], what: str) -> None:
        _expect_eq(sorted(_ids(self.jobs)), sorted(expected_ids), f"jobs_created calls: {what}")
        for job in self.jobs:
            _expect_eq(job, await storage.get(job.id), f"job in jobs_created ({what}) vs stored")
        self.jobs.clear()


async def check_listener_hears_jobs_the_adapter_creates(factory: StorageFactory) -> None:
    """set_listener: jobs the adapter creates on its own (next chain step, batch callbacks,
    cron runs) reach ``jobs_created`` by the time the verb returns; jobs the caller
    created are not echoed back (the engine announces those itself)."""
    async with factory() as storage:
        heard = _Heard()
        storage.set_listener(heard)
        await _enqueue(storage, make_job(queue="plain"))
        steps = [_member("ls-a"), _member("ls-b")]
        chain = await _create_workflow(storage, {"type": "chain", "steps": steps})
        (step0,) = await _claim(storage, T0, "ls-a", "ls-b", count=10)
        await heard.expect(storage, [], "enqueue, create_workflow, claim")
        await storage.ack(step0.id, "w1", "ok", True, T0 + 1)
        step1 = _job_id(await storage.get_workflow(chain.id), 1)
        await heard.expect(storage, [step1], "chain step created by an ack")

        callbacks = {"on_complete": _member("ls-cb"), "on_success": _member("ls-cb")}
        body = {"type": "batch", "jobs": [_member("ls-batch")], "callbacks": callbacks}
        batch = await _create_workflow(storage, body, T0 + 2)
        (member,) = await _claim(storage, T0 + 2, "ls-batch")
        await storage.ack(member.id, "w1", 1, True, T0 + 3)
        fired = (await storage.get_workflow(batch.id)).fired_callbacks
        _expect_eq(len(fired), 2, "callbacks of a successful batch")
        await heard.expect(storage, list(fired.values()), "batch callbacks")

        storage.set_listener(None)
        chain = await _create_workflow(
            storage, {"type": "chain", "steps": [_member("lq") for _ in range(2)]}
        )
        (first,) = await _claim(storage, T0 + 4, "lq")
        await storage.ack(first.id, "w1", None, False, T0 + 5)
        _job_id(await storage.get_workflow(chain.id), 1)  # created, with nobody listening
        await heard.expect(storage, [], "after set_listener(None)")
        storage.set_listener(heard)

        record = _cron("listened")
        await storage.put_cron(record)
        fire, job = await _fire(storage, record, T0 + 60)
        _expect(fire.fired, f"firing of the listened schedule: {fire.reason}")
        await heard.expect(storage, [job.id], "job created by fire_cron")


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
    check_ack_many_settles_each_ack_as_ack_would,
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
    check_ttl_expired_jobs_are_dead_lettered,
    check_claim_skips_ttl_expired_jobs,
    check_promote_and_reap_are_idempotent,
    check_promote_and_reap_honour_limit,
    check_next_wakeup_reports_earliest_deadline,
    check_next_due_and_reap_deadlines_are_separate,
    check_list_queues_counts_states,
    check_reset_empties_everything,
    check_prune_deletes_only_expired_finished_jobs,
    # unique jobs
    check_unique_reject_raises_duplicate,
    check_unique_ignore_returns_existing_job,
    check_unique_replace_cancels_existing_job,
    check_unique_states_choose_blocking_jobs,
    check_unique_period_bounds_the_window,
    check_unique_keys_choose_the_dimensions,
    check_unique_duplicates_within_one_batch,
    check_concurrent_unique_enqueues_create_one_job,
    check_workflow_members_hold_their_unique_keys,
    # queue control and limits
    check_pause_holds_every_request_until_resumed,
    check_queue_info_counts_states_and_throughput,
    check_rate_limit_throttles_claims,
    check_concurrency_limit_caps_active_jobs,
    # workflows
    check_chain_creates_each_step_on_ack,
    check_chain_parent_results_stay_bounded_with_large_results,
    check_chain_keeps_no_oversized_result_in_its_record,
    check_large_member_results_stay_bounded_in_groups_and_batches,
    check_chain_stops_at_a_failed_step,
    check_group_settles_when_every_member_is_terminal,
    check_batch_callbacks_fire_once_by_outcome,
    check_cancel_workflow_cancels_unfinished_members,
    check_workflow_reports_current_member_states,
    check_workflow_record_is_exact_once_finished,
    # cron
    check_cron_records_put_get_list_delete,
    check_fire_cron_fires_each_occurrence_once,
    check_fire_cron_applies_overlap_policy,
    check_set_cron_enabled_toggles_in_place,
    check_fire_cron_refuses_disabled_and_missing,
    check_listener_hears_jobs_the_adapter_creates,
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
