"""Faults moto never produces: duplicate deliveries and throttling, injected.

moto's standard queues deliver each message once and in order, and never throttle,
so these tests inject what real SQS and DynamoDB do: the same message delivered
twice (in one receive, and again later while its job is held), and throttling
errors (DynamoDB ``ProvisionedThroughputExceededException``, a throttled
transaction, SQS ``RequestThrottled``). No job may be handed to two holders, and a
throttled call must be retried with backoff until it succeeds or, when AWS keeps
throttling, fail as a 503 ``backend_unavailable``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import aws_fixtures
import pytest
import trio
from botocore.exceptions import ClientError

from ojs_trio.engine.states import JobState
from ojs_trio.storage.port import ClaimRequest, Storage
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
