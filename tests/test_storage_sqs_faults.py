"""Faults moto never produces: duplicate deliveries and throttling, injected.

moto's standard queues deliver each message once and in order, and never throttle,
so these tests inject what real SQS and DynamoDB do: the same message delivered
twice (in one receive, and again later while its job is held), and throttling
errors (DynamoDB ``ProvisionedThroughputExceededException``, a throttled
transaction, SQS ``RequestThrottled``). No job may be handed to two holders, and a
throttled call must be retried with backoff until it succeeds or, when AWS keeps
throttling, fail as a 503 ``backend_unavailable``.

A write too large for one DynamoDB transaction that fails part way (a transaction
that committed but reported an error, a Trio cancel in flight, AWS unreachable, a
step too slow for the window its unique keys are reserved for) is undone without
deleting what a worker claimed already, and is never written again.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import aws_fixtures
import pytest
import trio
from botocore.exceptions import ClientError

from ojs_trio.engine import unique
from ojs_trio.engine.errors import BackendUnavailable, DuplicateJob, NotFound
from ojs_trio.engine.job import Job
from ojs_trio.engine.states import JobState
from ojs_trio.engine.workflows import parse_workflow
from ojs_trio.storage.port import ClaimRequest, Storage
from ojs_trio.storage.sqs import adapter as sqs_adapter
from ojs_trio.storage.sqs import client as sqs_client
from ojs_trio.storage.sqs.adapter import SqsStorage, _Message
from ojs_trio.storage.sqs.client import AwsSettings, Throttled
from ojs_trio.testing import T0, make_job, storage_factory

moto_endpoint = aws_fixtures.moto_endpoint
aws_endpoint = aws_fixtures.aws_endpoint
aws_settings = aws_fixtures.aws_settings

DEADLINE = 120.0


class DuplicatingStorage(SqsStorage):
    """Delivers every message twice per receive, and replays earlier deliveries."""

    def __init__(self, settings: AwsSettings) -> None:
        super().__init__(settings, rng=random.Random(0))
        self.delivered: list[_Message] = []
        self.duplicates = 0

    async def _receive(self, url: str, count: int, visibility: int) -> list[_Message]:
        fresh = await super()._receive(url, count, visibility)
        # Copies of messages already delivered, as SQS may hand out again at any time.
        replays = [replace(m) for m in self.delivered[-5:] if m.url == url]
        self.delivered += fresh
        out = [copy for m in fresh for copy in (m, replace(m))] + replays
        self.duplicates += len(out) - len(fresh)
        return out


def opened(storage: SqsStorage) -> AbstractAsyncContextManager[Storage]:
    """Open ``storage`` and empty it, as the contract suite does."""
    return storage_factory(lambda: storage)()


async def test_duplicate_deliveries_never_make_two_holders(aws_settings: AwsSettings) -> None:
    jobs = [make_job(queue=f"dup{i % 2}") for i in range(120)]
    held: dict[str, str] = {}  # job id -> worker currently holding it
    handed: dict[str, list[str]] = {}  # job id -> every worker it was handed to
    with trio.fail_after(DEADLINE):
        storage = DuplicatingStorage(aws_settings)
        async with opened(storage):
            await storage.enqueue(jobs[:60], T0)
            await storage.enqueue(jobs[60:], T0)

            async def worker(n: int) -> None:
                worker_id = f"w{n}"
                queues = ("dup0", "dup1") if n % 2 else ("dup1", "dup0")
                idle = 0
                while idle < 3:
                    (got,) = await storage.claim([ClaimRequest(queues, 3, worker_id)], T0)
                    idle = 0 if got else idle + 1
                    for job in got:
                        assert job.id not in held, f"{job.id} handed out while held"
                        held[job.id] = worker_id
                        handed.setdefault(job.id, []).append(worker_id)
                    await trio.lowlevel.checkpoint()  # others claim while these are held
                    for job in got:
                        await storage.ack(job.id, worker_id, None, False, T0 + 1)
                        del held[job.id]

            async with trio.open_nursery() as nursery:
                for n in range(6):
                    nursery.start_soon(worker, n)

            assert storage.duplicates > len(jobs), "the fault injection did not happen"
            assert sorted(handed) == sorted(j.id for j in jobs)
            assert {i: ws for i, ws in handed.items() if len(ws) > 1} == {}
            for job in jobs:
                assert (await storage.get(job.id)).state is JobState.COMPLETED
            # Replayed copies of finished jobs' messages are never delivered again.
            (again,) = await storage.claim([ClaimRequest(("dup0", "dup1"), 10, "late")], T0 + 2)
            assert again == []


async def test_duplicate_delivery_of_a_held_job_keeps_its_lease(
    aws_settings: AwsSettings,
) -> None:
    """A second copy of the current message, received while the job is held, is not
    delivered and does not disturb the holder: ack still works."""
    with trio.fail_after(DEADLINE):
        storage = DuplicatingStorage(aws_settings)
        async with opened(storage):
            job = make_job(queue="held")
            await storage.enqueue([job], T0)
            (got,) = await storage.claim([ClaimRequest(("held",), 1, "w1")], T0)
            assert [j.id for j in got] == [job.id]
            (again,) = await storage.claim([ClaimRequest(("held",), 1, "w2")], T0)
            assert again == []
            stored = await storage.get(job.id)
            assert (stored.state, stored.worker_id) == (JobState.ACTIVE, "w1")
            done = await storage.ack(job.id, "w1", "ok", True, T0 + 1)
            assert done.state is JobState.COMPLETED


# -- throttling --------------------------------------------------------------------------


def _throttle(
    client: Any, operation: str, code: str, times: int, **response: Any
) -> Callable[[], int]:
    """Make ``client.<operation>`` fail with AWS error ``code`` for its next ``times``
    calls; returns a function telling how many calls were refused."""
    original = getattr(client, operation)
    refused = 0

    async def flaky(**kwargs: Any) -> Any:
        nonlocal refused
        if refused < times:
            refused += 1
            raise ClientError(
                {
                    "Error": {"Code": code, "Message": "Rate exceeded"},
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                    **response,
                },
                operation,
            )
        return await original(**kwargs)

    setattr(client, operation, flaky)
    return lambda: refused


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every backoff sleep of the AWS retry helper, recorded (and still slept)."""
    recorded: list[float] = []
    real_sleep = trio.sleep

    async def sleep(seconds: float) -> None:
        recorded.append(seconds)
        await real_sleep(seconds)

    monkeypatch.setattr(sqs_client.trio, "sleep", sleep)
    return recorded


async def test_throttled_calls_are_retried_with_backoff(
    aws_settings: AwsSettings, sleeps: list[float]
) -> None:
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        async with opened(storage):
            ddb, sqs = storage.clients.dynamodb, storage.clients.sqs
            jobs = [make_job(queue="slow") for _ in range(3)]
            refused = [
                _throttle(
                    ddb,
                    "transact_write_items",
                    "TransactionCanceledException",
                    2,
                    CancellationReasons=[{"Code": "ThrottlingError"}] * 6,
                ),
                _throttle(sqs, "send_message_batch", "RequestThrottled", 2),
                _throttle(sqs, "receive_message", "AWS.SimpleQueueService.RequestThrottled", 1),
                _throttle(ddb, "put_item", "ProvisionedThroughputExceededException", 3),
            ]
            sleeps.clear()
            created = await storage.enqueue(jobs, T0)
            assert all(r.created for r in created)
            (got,) = await storage.claim([ClaimRequest(("slow",), 3, "w1")], T0)
            assert sorted(j.id for j in got) == sorted(j.id for j in jobs)
            for job in got:
                assert (
                    await storage.ack(job.id, "w1", None, False, T0)
                ).state is JobState.COMPLETED
            assert [r() for r in refused] == [2, 2, 1, 3]
            # One backoff sleep per refused call, each within the capped jitter range.
            assert len(sleeps) >= 8
            assert all(0 <= s <= 2.0 for s in sleeps)
            assert sum(sleeps) > 0


async def test_persistent_throttling_fails_as_backend_unavailable(
    aws_settings: AwsSettings, sleeps: list[float]
) -> None:
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        async with opened(storage):
            job = make_job(queue="stuck")
            await storage.enqueue([job], T0)
            refused = _throttle(
                storage.clients.dynamodb,
                "get_item",
                "ProvisionedThroughputExceededException",
                10**6,
            )
            sleeps.clear()
            with pytest.raises(Throttled) as raised:
                await storage.get(job.id)
            assert raised.value.http_status == 503
            assert raised.value.to_wire()["code"] == "backend_unavailable"
            assert refused() == 6  # the first try and five retries
            assert len(sleeps) == 5


# -- failures part way through a write too large for one transaction ---------------------

UNIQUE_TYPE = "faults.unique"
BY_ARGS = {"keys": ["type", "args"]}


def unique_jobs(keys: range, queue: str) -> list[Job]:
    return [make_job(queue=queue, job_type=UNIQUE_TYPE, args=[k], unique=BY_ARGS) for k in keys]


def job_ids_created(items: list[dict[str, Any]]) -> list[str]:
    """Ids of the jobs a transaction creates (Puts of new job items)."""
    puts = [i["Put"] for i in items if "Put" in i]
    return [
        put["Item"]["pk"]["S"].removeprefix("JOB#")
        for put in puts
        if put["Item"]["pk"]["S"].startswith("JOB#")
        and put.get("ConditionExpression") == "attribute_not_exists(pk)"
    ]


async def _exists(storage: SqsStorage, job_id: str) -> bool:
    return await storage._load_or_none(job_id) is not None


@pytest.mark.parametrize("failure", ["error", "cancelled"])
async def test_job_chunk_that_committed_then_failed_is_undone_with_the_rest(
    aws_settings: AwsSettings, failure: str
) -> None:
    """A job chunk whose transaction committed but whose call failed (a read timeout,
    a Trio cancel in flight) counts as written: the undo deletes its jobs too, so no
    job of the failed call is left without its unique key."""
    jobs = unique_jobs(range(120), "ambiguous")  # 240 items: 2 of keys, 3 of jobs
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        async with opened(storage):
            real_write = storage._write
            failed = False
            with trio.CancelScope() as scope:

                async def committing_then_failing(items: list[dict[str, Any]]) -> None:
                    nonlocal failed
                    await real_write(items)
                    if job_ids_created(items) and not failed:
                        failed = True
                        if failure == "error":
                            raise BackendUnavailable("AWS is unreachable (ReadTimeoutError)")
                        scope.cancel()
                        await trio.lowlevel.checkpoint()

                storage._write = committing_then_failing  # type: ignore[method-assign]
                if failure == "error":
                    with pytest.raises(BackendUnavailable):
                        await storage.enqueue(jobs, T0)
                else:
                    await storage.enqueue(jobs, T0)
            storage._write = real_write  # type: ignore[method-assign]
            assert failed and scope.cancelled_caught == (failure == "cancelled")
            assert [j.id for j in jobs if await _exists(storage, j.id)] == []
            # Every key is free again: the same keys can be taken, by one large call.
            again = await storage.enqueue(unique_jobs(range(120), "again"), T0 + 1)
            assert all(r.created for r in again)


async def test_failed_large_create_workflow_keeps_claimed_members_and_is_not_retried(
    aws_settings: AwsSettings,
) -> None:
    """A workflow written in chunks whose second job chunk fails is undone without
    touching what a worker claimed from the first: the claimed member stays active
    with its unique key, the other members and the workflow go, and nothing is
    written again (a retry would deliver the claimed member twice)."""
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        async with opened(storage):
            warm = make_job(queue="wf")  # the tier is known: members are claimable at once
            await storage.enqueue([warm], T0)
            await storage.cancel(warm.id, T0)
            member = {"type": UNIQUE_TYPE, "options": {"queue": "wf", "unique": BY_ARGS}}
            body = {"type": "group", "jobs": [{**member, "args": [k]} for k in range(60)]}
            workflow, members = parse_workflow(body, T0)
            created: list[str] = []
            claimed: list[Job] = []
            real_write = storage._write

            async def failing_second_job_chunk(items: list[dict[str, Any]]) -> None:
                ids = job_ids_created(items)
                if ids and created:
                    raise BackendUnavailable("AWS is unreachable (EndpointConnectionError)")
                await real_write(items)
                created.extend(ids)
                if ids:
                    (got,) = await storage.claim([ClaimRequest(("wf",), 1, "w1")], T0)
                    claimed.extend(got)

            storage._write = failing_second_job_chunk  # type: ignore[method-assign]
            with pytest.raises(BackendUnavailable) as raised:
                await storage.create_workflow(workflow, members, T0)
            storage._write = real_write  # type: ignore[method-assign]
            assert len(created) == len(set(created)) < len(members)  # never written again
            (kept,) = claimed
            assert raised.value.details["kept_job_ids"] == [kept.id]
            held = await storage.get(kept.id)
            assert (held.state, held.attempt, held.worker_id) == (JobState.ACTIVE, 1, "w1")
            assert [m.id for m in members if await _exists(storage, m.id)] == [kept.id]
            with pytest.raises(NotFound):
                await storage.get_workflow(workflow.id)
            # The kept member holds its key; the others' keys are free.
            step = kept.workflow_step
            assert step is not None
            with pytest.raises(DuplicateJob) as raised:
                await storage.enqueue(unique_jobs(range(step, step + 1), "other"), T0 + 1)
            assert raised.value.details["existing_job_id"] == kept.id
            other = (step + 1) % len(members)
            (free,) = await storage.enqueue(unique_jobs(range(other, other + 1), "other"), T0 + 1)
            assert free.created
            # It runs to the end as a plain job.
            done = await storage.ack(kept.id, "w1", None, False, T0 + 2)
            assert done.state is JobState.COMPLETED


async def test_large_enqueue_gives_up_before_its_keys_reservation_ends(
    aws_settings: AwsSettings,
) -> None:
    """A large enqueue whose key items took most of the window they reserve the keys
    for (a concurrent enqueue stops waiting for its jobs then) writes no job: it
    undoes the keys and fails with 503."""
    # The storage's clock moves only with the writes, so how long moto and a loaded
    # machine really take cannot push the call past its window.
    start, offset = time.time(), 0.0
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0), wall=lambda: start + offset)
        async with opened(storage):
            real_write = storage._write
            created: list[str] = []

            async def slow_key_write(items: list[dict[str, Any]]) -> None:
                nonlocal offset
                await real_write(items)
                created.extend(job_ids_created(items))
                if not job_ids_created(items):  # AWS throttled the keys for a while
                    until = float(items[0]["Put"]["Item"]["pend_until"]["N"])
                    offset += until - storage._wall() - sqs_adapter.PENDING_MARGIN_SECONDS + 1

            storage._write = slow_key_write  # type: ignore[method-assign]
            jobs = unique_jobs(range(60), "slow")
            with pytest.raises(BackendUnavailable) as raised:
                await storage.enqueue(jobs, T0)
            storage._write = real_write  # type: ignore[method-assign]
            assert "reserved" in raised.value.message
            assert created == []
            again = await storage.enqueue(unique_jobs(range(60), "again"), T0 + 1)
            assert all(r.created for r in again)


def _refuse_sends(storage: SqsStorage) -> Callable[[], None]:
    """Make SQS refuse every message batch (``Failed`` entries, as SQS reports them);
    returns a function that puts the real sends back."""
    sqs = storage.clients.sqs
    original = sqs.send_message_batch

    async def refusing(**kwargs: Any) -> Any:
        failed = [
            {"Id": e["Id"], "Code": "InternalError", "SenderFault": False}
            for e in kwargs["Entries"]
        ]
        return {"Successful": [], "Failed": failed}

    sqs.send_message_batch = refusing

    def restore() -> None:
        sqs.send_message_batch = original

    return restore


async def test_refused_messages_fail_as_backend_unavailable_not_a_group(
    aws_settings: AwsSettings,
) -> None:
    """SQS refusing a send reaches the caller as a 503 (not as Trio's ExceptionGroup,
    a 500), and a large write it stops part way reports the jobs it kept."""
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        async with opened(storage):
            warm = make_job(queue="refused")  # the tier is known: jobs are claimable at once
            await storage.enqueue([warm], T0)
            await storage.cancel(warm.id, T0)
            restore = _refuse_sends(storage)
            with pytest.raises(BackendUnavailable):
                await storage.enqueue([make_job(queue="refused")], T0)
            restore()
            # A large enqueue: a worker claims a job of the first job chunk, then SQS
            # refuses the second chunk's messages.
            jobs = unique_jobs(range(60), "refused")  # 120 items: 2 job chunks
            claimed: list[Job] = []
            real_write = storage._write

            async def claiming_write(items: list[dict[str, Any]]) -> None:
                await real_write(items)
                if job_ids_created(items) and not claimed:
                    (got,) = await storage.claim([ClaimRequest(("refused",), 1, "w1")], T0)
                    claimed.extend(got)
                    _refuse_sends(storage)

            storage._write = claiming_write  # type: ignore[method-assign]
            with pytest.raises(BackendUnavailable) as raised:
                await storage.enqueue(jobs, T0)
            storage._write = real_write  # type: ignore[method-assign]
            (kept,) = claimed
            assert raised.value.details["kept_job_ids"] == [kept.id]
            assert [j.id for j in jobs if await _exists(storage, j.id)] == [kept.id]


@pytest.mark.parametrize("call", ["enqueue", "create_workflow"])
async def test_undo_never_deletes_what_a_retry_wrote_at_the_same_ids(
    aws_settings: AwsSettings, call: str
) -> None:
    """A client retries a large call that is slow to write; the retry writes the same
    job ids (and workflow id) first, so the first call's job chunk is refused.  Its
    undo deletes nothing of the retry's, which reported success."""
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        async with opened(storage):
            if call == "enqueue":
                jobs = [make_job(queue="retried") for _ in range(150)]  # 2 job chunks

                async def run() -> None:
                    await storage.enqueue(jobs, T0)

            else:
                member = {"type": "faults.plain", "args": [], "options": {"queue": "retried"}}
                body = {"type": "group", "jobs": [member] * 120}  # 121 items: 2 chunks
                workflow, jobs = parse_workflow(body, T0)

                async def run() -> None:
                    await storage.create_workflow(workflow, jobs, T0)

            real_write = storage._write
            retried = False

            async def write_after_the_retry(items: list[dict[str, Any]]) -> None:
                nonlocal retried
                if job_ids_created(items) and not retried:  # the first call's first chunk
                    retried = True
                    await run()  # the retry runs to the end first
                await real_write(items)

            storage._write = write_after_the_retry  # type: ignore[method-assign]
            with pytest.raises((BackendUnavailable, DuplicateJob)):
                await run()
            storage._write = real_write  # type: ignore[method-assign]
            assert retried
            assert [j.id for j in jobs if not await _exists(storage, j.id)] == []
            if call == "create_workflow":
                got = await storage.get_workflow(workflow.id)
                assert sorted(got.job_states) == sorted(j.id for j in jobs)


@pytest.mark.parametrize("moment", ["writing", "undoing"])
async def test_no_enqueue_is_told_of_a_job_the_undo_then_deletes(
    aws_settings: AwsSettings, moment: str
) -> None:
    """An enqueue of a key whose job a large call has written, while that call may
    still fail (between two job chunks) or is undoing, waits: it is never refused
    naming (nor handed) a job the undo deletes next.  Once the undo is done, the key
    is free and the enqueue creates its job."""
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        async with opened(storage):
            large = unique_jobs(range(60), "large")  # 2 job chunks; key 5's job in the first
            (rival,) = unique_jobs(range(5, 6), "rival")
            at_risk = trio.Event()  # large[5] exists and may be deleted
            rival_seen = trio.Event()  # the rival decided, or read the key again: waiting
            go = trio.Event()
            chunks = 0
            reads = 0
            outcome: list[BaseException | None] = []
            real_write, real_delete = storage._write, storage._delete_unclaimed
            real_unique_key = storage._unique_key

            async def failing_second_chunk(items: list[dict[str, Any]]) -> None:
                nonlocal chunks
                if not job_ids_created(items):
                    return await real_write(items)
                chunks += 1
                if chunks == 2:
                    raise BackendUnavailable("AWS is unreachable (EndpointConnectionError)")
                await real_write(items)
                if moment == "writing":
                    at_risk.set()
                    await go.wait()

            async def pausing_delete(job_id: str, token: str) -> None:
                if moment == "undoing":
                    at_risk.set()
                    await go.wait()
                await real_delete(job_id, token)

            async def counting_unique_key(name: str) -> Any:
                nonlocal reads
                if at_risk.is_set() and not go.is_set():  # the large call is paused
                    reads += 1
                    if reads >= 2:
                        rival_seen.set()
                return await real_unique_key(name)

            async def enqueue_rival() -> None:
                try:
                    await storage.enqueue([rival], T0)
                except DuplicateJob as exc:
                    outcome.append(exc)
                else:
                    outcome.append(None)
                rival_seen.set()

            async def enqueue_large() -> None:
                with pytest.raises(BackendUnavailable):
                    await storage.enqueue(large, T0)

            storage._write = failing_second_chunk  # type: ignore[method-assign]
            storage._delete_unclaimed = pausing_delete  # type: ignore[method-assign]
            storage._unique_key = counting_unique_key  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(enqueue_large)
                await at_risk.wait()
                nursery.start_soon(enqueue_rival)
                await rival_seen.wait()
                go.set()
            assert not await _exists(storage, large[5].id)  # undone
            assert outcome == [None]  # not refused naming large[5]
            assert (await storage.get(rival.id)).state is JobState.AVAILABLE


async def test_large_enqueue_of_many_steps_gets_a_window_to_match(
    aws_settings: AwsSettings,
) -> None:
    """A batch of many keys takes many steps: at a steady pace slower than moto's (3 s
    a write), 250 keys take longer than PENDING_SECONDS, yet the call is not given
    up: its window grows with its steps (and stays bounded, for a crashed writer)."""
    # The storage's clock moves only with the writes, so how long moto and a loaded
    # machine really take cannot push the call past its window.
    start, offset = time.time(), 0.0
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0), wall=lambda: start + offset)
        async with opened(storage):
            real_write = storage._write
            windows: list[float] = []

            async def steady_write(items: list[dict[str, Any]]) -> None:
                nonlocal offset
                marked = [
                    i["Put"]["Item"] for i in items if "pend_by" in i.get("Put", {}).get("Item", {})
                ]
                if marked and not windows:
                    windows.append(float(marked[0]["pend_until"]["N"]) - storage._wall())
                await real_write(items)
                offset += 3.0

            storage._write = steady_write  # type: ignore[method-assign]
            jobs = unique_jobs(range(250), "steady")  # 3 key steps, 5 job chunks
            results = await storage.enqueue(jobs, T0)
            storage._write = real_write  # type: ignore[method-assign]
            assert all(r.created for r in results)
            assert offset > sqs_adapter.PENDING_SECONDS
            (window,) = windows
            steps = 3 + 5
            assert window == pytest.approx(
                sqs_adapter.PENDING_SECONDS + sqs_adapter.STEP_ALLOWANCE_SECONDS * steps, abs=1
            )
            holders = await storage._unique_key(unique.fingerprint(results[-1].job))
            assert (holders.ids, holders.pending, holders.mark) == ([jobs[-1].id], [], None)


async def test_large_jobs_are_written_in_transactions_under_4_mb(
    aws_settings: AwsSettings,
) -> None:
    """22 jobs of 200 KB fit 100 items but not DynamoDB's 4 MB per transaction (moto
    does not enforce it; checked here): written in several transactions, not refused."""
    with trio.fail_after(DEADLINE):
        storage = SqsStorage(aws_settings, rng=random.Random(0))
        async with opened(storage):
            ddb = storage.clients.dynamodb
            real_transact = ddb.transact_write_items
            sizes: list[int] = []

            async def limited(**kwargs: Any) -> Any:
                size = len(json.dumps(kwargs["TransactItems"]))
                sizes.append(size)
                if size > 4 * 1024 * 1024:
                    raise ClientError(
                        {
                            "Error": {
                                "Code": "ValidationException",
                                "Message": "Transaction request cannot be larger than 4 MB",
                            },
                            "ResponseMetadata": {"HTTPStatusCode": 400},
                        },
                        "TransactWriteItems",
                    )
                return await real_transact(**kwargs)

            ddb.transact_write_items = limited
            jobs = [make_job(queue="heavy", args=["x" * 200_000]) for _ in range(22)]
            results = await storage.enqueue(jobs, T0)
            assert all(r.created for r in results)
            assert len(sizes) >= 2 and max(sizes) <= 4 * 1024 * 1024
            for job in jobs[::5]:
                assert (await storage.get(job.id)).args == job.args
