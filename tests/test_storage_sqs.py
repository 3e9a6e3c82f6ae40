"""The SQS + DynamoDB adapter on a moto server: the storage contract suite, and what is
particular to SQS (message size, delays, FIFO queues, the storage URL)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import aws_fixtures
import pytest

from ojs_trio.engine.errors import NotFound, PayloadTooLarge
from ojs_trio.storage import open_storage
from ojs_trio.storage.port import ClaimRequest
from ojs_trio.storage.sqs.adapter import MAX_JOB_BYTES, SqsStorage
from ojs_trio.storage.sqs.client import AwsSettings
from ojs_trio.testing import CONTRACT_CHECKS, T0, ContractCheck, make_job, storage_factory

moto_endpoint = aws_fixtures.moto_endpoint
aws_endpoint = aws_fixtures.aws_endpoint
aws_settings = aws_fixtures.aws_settings


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=[c.__name__ for c in CONTRACT_CHECKS])
async def test_sqs_contract(check: ContractCheck, aws_settings: AwsSettings) -> None:
    await check(storage_factory(lambda: SqsStorage(aws_settings, rng=random.Random(0))))


# -- what is particular to SQS -----------------------------------------------------------


@asynccontextmanager
async def opened(settings: AwsSettings) -> AsyncIterator[SqsStorage]:
    storage = SqsStorage(settings, rng=random.Random(0))
    await storage.open()
    try:
        yield storage
    finally:
        await storage.aclose()


async def _token(storage: SqsStorage, job_id: str) -> str | None:
    return (await storage._load(job_id)).token


async def test_job_over_256_kb_is_refused_with_413(aws_settings: AwsSettings) -> None:
    async with opened(aws_settings) as storage:
        big = make_job(args=["x" * MAX_JOB_BYTES])
        with pytest.raises(PayloadTooLarge) as raised:
            await storage.enqueue([make_job(), big], T0)
        assert raised.value.http_status == 413
        assert raised.value.details["max_bytes"] == MAX_JOB_BYTES
        assert await storage.list_queues() == []  # nothing of the batch was stored


async def test_delays_up_to_15_minutes_ride_on_sqs_longer_ones_wait_in_dynamodb(
    aws_settings: AwsSettings,
) -> None:
    async with opened(aws_settings) as storage:
        soon = make_job(queue="later", delay_ms=600_000)  # 10 min: DelaySeconds
        late = make_job(queue="later", delay_ms=3_600_000)  # 1 h: no message yet
        await storage.enqueue([soon, late], T0)
        assert await _token(storage, soon.id) is not None
        assert await _token(storage, late.id) is None
        promoted = await storage.promote_due(T0 + 3600, 10)
        assert sorted(j.id for j in promoted) == sorted([soon.id, late.id])
        assert await _token(storage, late.id) is not None  # the promoter sent it
        (got,) = await storage.claim([ClaimRequest(("later",), 10, "w1")], T0 + 3600)
        assert sorted(j.id for j in got) == sorted([soon.id, late.id])


async def test_fifo_queues(aws_settings: AwsSettings) -> None:
    settings = replace(aws_settings, use_fifo=True)
    async with opened(settings) as storage:
        jobs = [make_job(queue="orders", priority=p) for p in (0, 5, 0)]
        await storage.enqueue(jobs, T0)
        (got,) = await storage.claim([ClaimRequest(("orders",), 3, "w1")], T0)
        assert [j.id for j in got] == [jobs[1].id, jobs[0].id, jobs[2].id]
        for job in got:
            await storage.ack(job.id, "w1", None, False, T0 + 1)
        urls = (await storage.clients.sqs.list_queues(QueueNamePrefix="ojs-orders"))["QueueUrls"]
        assert urls and all(url.endswith(".fifo") for url in urls)
        (again,) = await storage.claim([ClaimRequest(("orders",), 3, "w1")], T0 + 2)
        assert again == []


async def test_open_storage_builds_the_adapter_from_an_sqs_url(
    aws_settings: AwsSettings,
) -> None:
    url = f"sqs://us-east-1/jobs-by-url?endpoint={aws_settings.endpoint_url}&prefix=byurl"
    storage = open_storage(url)
    assert isinstance(storage, SqsStorage)
    assert (storage.settings.dynamodb_table, storage.settings.queue_prefix) == (
        "jobs-by-url",
        "byurl",
    )


async def test_reads_ignore_items_past_their_dynamodb_ttl(aws_settings: AwsSettings) -> None:
    """DynamoDB deletes TTL-expired items late (moto never): reads must skip them."""
    wall = [1_000_000.0]
    storage = SqsStorage(aws_settings, rng=random.Random(0), wall=lambda: wall[0])
    async with storage_factory(lambda: storage)():
        job = make_job(queue="ttl")
        await storage.enqueue([job], T0)
        await storage.cancel(job.id, T0)
        assert (await storage.queue_info("ttl", T0)).counts["cancelled"] == 1
        wall[0] += 31 * 86400  # past the finished-job TTL backstop
        assert (await storage.queue_info("ttl", T0)).counts["cancelled"] == 0
        with pytest.raises(NotFound):
            await storage.get(job.id)
