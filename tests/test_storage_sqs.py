"""The SQS + DynamoDB adapter on a moto server: the storage contract suite, and what is
particular to SQS (message size, delays, FIFO queues, the storage URL)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import aws_fixtures
import pytest
import trio
import trio.testing

from ojs_trio.engine import unique
from ojs_trio.engine.errors import BackendUnavailable, DuplicateJob, NotFound, PayloadTooLarge
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.states import JobState
from ojs_trio.engine.workflows import Workflow, parse_workflow
from ojs_trio.storage import open_storage
from ojs_trio.storage.port import ClaimRequest
from ojs_trio.storage.sqs.adapter import (
    CAS_ATTEMPTS,
    FINISHED_TTL_SECONDS,
    MAX_JOB_BYTES,
    MAX_WORKFLOW_BYTES,
    SqsStorage,
    _Row,
)
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


async def test_workflow_too_large_for_one_item_is_refused_with_413(
    aws_settings: AwsSettings,
) -> None:
    """One DynamoDB item holds a workflow's members: past MAX_WORKFLOW_BYTES (about
    3,150 group members, 4,800 chain steps) it is refused before anything is written."""
    member = {"type": "m", "args": [], "options": {"queue": "huge"}}
    async with opened(aws_settings) as storage:
        for kind, members in (("group", 3_500), ("chain", 5_000)):
            workflow, jobs = parse_workflow({"type": kind, "jobs": [member] * members}, T0)
            with pytest.raises(PayloadTooLarge) as raised:
                await storage.create_workflow(workflow, jobs, T0)
            assert raised.value.http_status == 413
            assert raised.value.details["max_bytes"] == MAX_WORKFLOW_BYTES
            assert raised.value.details["size"] > MAX_WORKFLOW_BYTES
            with pytest.raises(NotFound):
                await storage.get_workflow(workflow.id)
            with pytest.raises(NotFound):
                await storage.get(jobs[0].id)
        # Within the limit (a chain: one job to write): stored.
        workflow, jobs = parse_workflow({"type": "chain", "jobs": [member] * 4_500}, T0)
        stored = await storage.create_workflow(workflow, jobs, T0)
        assert (await storage.get_workflow_record(stored.id)).total == 4_500


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


async def test_a_second_reset_within_a_minute_still_empties_the_queues(
    aws_settings: AwsSettings,
) -> None:
    """SQS refuses a second purge of a queue within 60 s; reset then deletes the
    messages it can receive, so no stale message is left for later claims."""
    async with opened(aws_settings) as storage:
        await storage.enqueue([make_job(queue="r")], T0)
        await storage.reset()  # purges
        await storage.enqueue([make_job(queue="r") for _ in range(15)], T0)
        await storage.reset()  # purge refused: receives and deletes instead
        urls = (await storage.clients.sqs.list_queues(QueueNamePrefix="ojs-"))["QueueUrls"]
        assert urls
        for url in urls:
            left = await storage.clients.sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
            )
            assert left["Attributes"]["ApproximateNumberOfMessages"] == "0", url


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


async def test_dead_letters_get_no_dynamodb_ttl(aws_settings: AwsSettings) -> None:
    """Dead letters stay until retried or deleted (or the dead-letter retention, when
    set, prunes them); other finished jobs keep the 30-day TTL backstop."""
    wall = [1_000_000.0]
    storage = SqsStorage(aws_settings, rng=random.Random(0), wall=lambda: wall[0])
    async with storage_factory(lambda: storage)():
        expired = make_job(queue="dlq-ttl", expires_at="+PT10S")
        done = make_job(queue="dlq-ttl")
        await storage.enqueue([expired, done], T0)
        await storage.cancel(done.id, T0)
        (reaped,) = await storage.reap(T0 + 10, 10)
        assert (reaped.id, reaped.dead_letter) == (expired.id, True)
        assert (await storage._load(expired.id)).expires_ttl is None
        assert (await storage._load(done.id)).expires_ttl == wall[0] + FINISHED_TTL_SECONDS
        wall[0] += 31 * 86400
        assert [j.id for j in (await storage.list_dead_letter(None, 10, 0)).jobs] == [expired.id]
        with pytest.raises(NotFound):
            await storage.get(done.id)


# -- unique keys of an enqueue too large for one transaction ------------------------------

UNIQUE_TYPE = "sqs.unique"
BY_ARGS = {"keys": ["type", "args"]}


def unique_jobs(keys: range, queue: str = "big-unique", **policy: str) -> list[Job]:
    return [
        make_job(queue=queue, job_type=UNIQUE_TYPE, args=[k], unique={**BY_ARGS, **policy})
        for k in keys
    ]


def is_job_write(items: list[dict[str, Any]]) -> bool:
    return any(
        i.get("Put", {}).get("Item", {}).get("pk", {}).get("S", "").startswith("JOB#")
        for i in items
    )


async def test_large_unique_batch_holds_every_key(aws_settings: AwsSettings) -> None:
    """60 jobs with their own keys need 120 items: written in steps, keys first."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        writes: list[list[dict[str, Any]]] = []
        real_write = storage._write

        async def recording_write(items: list[dict[str, Any]]) -> None:
            writes.append(items)
            await real_write(items)

        storage._write = recording_write  # type: ignore[method-assign]
        jobs = unique_jobs(range(60))
        results = await storage.enqueue(jobs, T0)
        assert [(r.job.id, r.created) for r in results] == [(j.id, True) for j in jobs]
        # Every key item was written before the first job item.
        first_job_write = next(n for n, items in enumerate(writes) if is_job_write(items))
        keys_written = sum(len(items) for items in writes[:first_job_write])
        assert keys_written == 60
        for job in jobs[::7]:
            with pytest.raises(DuplicateJob) as raised:
                await storage.enqueue(unique_jobs(range(job.args[0], job.args[0] + 1)), T0 + 1)
            assert raised.value.details["existing_job_id"] == job.id


async def test_enqueue_waits_for_a_large_enqueue_still_writing_its_jobs(
    aws_settings: AwsSettings,
) -> None:
    """Between the key items and the job items of a large enqueue, another enqueue of
    one of its keys neither takes the missing jobs for pruned ones nor creates a
    duplicate: it waits, then sees the holder."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        keys_written = trio.Event()
        release = trio.Event()
        reread = trio.Event()  # the rival read the pending key twice: it is waiting
        rival_reads = [0]
        real_write = storage._write
        real_unique_key = storage._unique_key

        async def pausing_write(items: list[dict[str, Any]]) -> None:
            await real_write(items)
            if not is_job_write(items) and not keys_written.is_set():
                keys_written.set()
                await release.wait()

        async def counting_unique_key(key: str) -> Any:
            if keys_written.is_set():
                rival_reads[0] += 1
                if rival_reads[0] >= 2:
                    reread.set()
            return await real_unique_key(key)

        storage._write = pausing_write  # type: ignore[method-assign]
        storage._unique_key = counting_unique_key  # type: ignore[method-assign]
        large = unique_jobs(range(60))
        (rival,) = unique_jobs(range(5, 6), queue="rival")
        outcome: list[BaseException | None] = []

        async def enqueue_rival() -> None:
            try:
                await storage.enqueue([rival], T0)
            except DuplicateJob as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(storage.enqueue, large, T0)
            await keys_written.wait()
            nursery.start_soon(enqueue_rival)
            with trio.fail_after(10):
                await reread.wait()
            assert outcome == []  # still waiting
            release.set()
        (error,) = outcome
        assert isinstance(error, DuplicateJob)
        assert error.details["existing_job_id"] == large[5].id
        with pytest.raises(NotFound):
            await storage.get(rival.id)


async def test_large_enqueue_losing_a_key_race_writes_no_job(aws_settings: AwsSettings) -> None:
    """The key items go first, so a large enqueue that loses one never shows a job, and
    the key items it had written already are put back."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        large = unique_jobs(range(120))  # 120 key items: two transactions of them
        (rival,) = unique_jobs(range(119, 120), queue="rival")
        job_writes: list[int] = []
        key_writes = [0]
        real_write = storage._write

        async def racing_write(items: list[dict[str, Any]]) -> None:
            if is_job_write(items):
                job_writes.append(len(items))
            else:
                key_writes[0] += 1
                if key_writes[0] == 2:  # the large call's second key transaction
                    await storage.enqueue([rival], T0)  # takes key 119 first
            await real_write(items)

        storage._write = racing_write  # type: ignore[method-assign]
        with pytest.raises(DuplicateJob) as raised:
            await storage.enqueue(large, T0)
        storage._write = real_write  # type: ignore[method-assign]
        assert raised.value.details["existing_job_id"] == rival.id
        assert job_writes == [2]  # the rival's (its job and its key); none of the large call's
        for job in large[::10]:
            with pytest.raises(NotFound):
                await storage.get(job.id)
        # The first 100 keys it had claimed are free again (not pending).
        with trio.fail_after(5):
            (again,) = await storage.enqueue(unique_jobs(range(0, 1)), T0 + 1)
        assert again.created


def job_ids_created(items: list[dict[str, Any]]) -> list[str]:
    """Ids of the jobs a transaction creates (Puts of new job items)."""
    puts = [i["Put"] for i in items if "Put" in i]
    return [
        put["Item"]["pk"]["S"].removeprefix("JOB#")
        for put in puts
        if put["Item"]["pk"]["S"].startswith("JOB#")
        and put.get("ConditionExpression") == "attribute_not_exists(pk)"
    ]


async def test_large_enqueue_sends_each_chunks_messages_right_before_writing_it(
    aws_settings: AwsSettings,
) -> None:
    """Messages go chunk by chunk, each right before its chunk's write: none waits
    for the key items and earlier chunks (a receive deletes an item-less message
    older than ORPHAN_GRACE_SECONDS as an orphan)."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        events: list[tuple[str, set[str]]] = []
        real_write, real_send = storage._write, storage._send_tokens

        async def recording_write(items: list[dict[str, Any]]) -> None:
            await real_write(items)
            events.append(("write", set(job_ids_created(items))))

        async def recording_send(sends: Any) -> None:
            events.append(("send", {s.row.job.id for s in sends}))
            await real_send(sends)

        storage._write = recording_write  # type: ignore[method-assign]
        storage._send_tokens = recording_send  # type: ignore[method-assign]
        jobs = unique_jobs(range(150))  # 300 items: 2 of keys, 3 of jobs
        await storage.enqueue(jobs, T0)
        kinds = [kind for kind, _ in events]
        key_writes = kinds.index("send")
        assert key_writes == 2 and events[0] == ("write", set())
        assert kinds[key_writes:-2] == ["send", "write"] * 3  # then the folds of the keys
        chunks = events[key_writes:-2]
        for (_, sent), (_, written) in zip(chunks[::2], chunks[1::2], strict=True):
            assert sent == written
        assert set().union(*(ids for _, ids in chunks)) == {j.id for j in jobs}


async def test_large_enqueue_folds_its_pending_ids_once_written(
    aws_settings: AwsSettings,
) -> None:
    """Once its jobs are written, a large enqueue's ids become ordinary holders of
    their key items: nothing is left pending or bearing the call's mark."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        jobs = unique_jobs(range(60))
        await storage.enqueue(jobs, T0)
        for job in jobs:
            item = await storage._get_item(f"UNIQUE#{unique.fingerprint(job)}", "UNIQUE")
            assert item is not None
            assert json.loads(item["ids"]["S"]) == [job.id]
            assert not {"pend", "pend_until", "pend_by"} & set(item)


def _group_of_unique_members(queue: str, count: int) -> tuple[Workflow, list[Job]]:
    member = {"type": UNIQUE_TYPE, "options": {"queue": queue, "unique": BY_ARGS}}
    body = {"type": "group", "jobs": [{**member, "args": [k]} for k in range(count)]}
    return parse_workflow(body, T0)


async def warm_queue(storage: SqsStorage, queue: str) -> None:
    """Use ``queue`` once, so that its tier is known and new jobs are claimable at once."""
    warm = make_job(queue=queue)
    await storage.enqueue([warm], T0)
    await storage.cancel(warm.id, T0)


async def test_large_create_workflow_losing_a_key_race_recreates_no_member(
    aws_settings: AwsSettings,
) -> None:
    """A workflow too large for one transaction writes its members' unique keys first:
    losing a race for one fails before any member exists and is decided again, and a
    member a worker claimed is never deleted and created again (delivered twice)."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        await warm_queue(storage, "wf")
        workflow, members = _group_of_unique_members("wf", 60)  # 121 items
        (rival,) = unique_jobs(range(59, 60), queue="rival")
        written: list[str] = []
        claimed: list[Job] = []
        real_write = storage._write
        raced = False

        async def racing_write(items: list[dict[str, Any]]) -> None:
            nonlocal raced
            if not raced:  # before the call's first write, an enqueue takes key 59
                raced = True
                await storage.enqueue([rival], T0)
            await real_write(items)
            ids = job_ids_created(items)
            written.extend(i for i in ids if i != rival.id)
            if ids and not claimed and rival.id not in ids:  # a worker is quick
                (got,) = await storage.claim([ClaimRequest(("wf",), 1, "w1")], T0)
                claimed.extend(got)

        storage._write = racing_write  # type: ignore[method-assign]
        await storage.create_workflow(workflow, members, T0)
        storage._write = real_write  # type: ignore[method-assign]
        assert sorted(written) == sorted(m.id for m in members)  # each member written once
        (first,) = claimed
        held = await storage.get(first.id)
        assert (held.state, held.attempt, held.worker_id) == (JobState.ACTIVE, 1, "w1")
        # Member 59 and the rival both hold key 59 (members do not look for a holder).
        holders = await storage._unique_key(unique.fingerprint(rival))
        assert sorted(holders.ids) == sorted([rival.id, members[59].id])
        assert (holders.pending, holders.mark) == ([], None)


async def test_enqueue_waits_by_time_for_a_key_reserved_by_a_large_write(
    aws_settings: AwsSettings,
) -> None:
    """A key listing a pending job of a call still writing is waited for by time, up
    to the reservation's end, however many reads that takes; the job appears, the
    call finishes and the waiting enqueue sees it as the holder."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        (writing,) = unique_jobs(range(1))  # a large write has its key, not yet the job
        (rival,) = unique_jobs(range(1), queue="rival")
        key = await storage._unique_key(unique.fingerprint(rival))
        key.pending, key.pending_until, key.mark = [writing.id], storage._wall() + 30, "x"
        await storage._write([storage._unique_put(key, T0)])
        reads = 0
        waited_long = trio.Event()
        real_unique_key = storage._unique_key

        async def counting_unique_key(name: str) -> Any:
            nonlocal reads
            reads += 1
            if reads > CAS_ATTEMPTS + 5:
                waited_long.set()
            return await real_unique_key(name)

        storage._unique_key = counting_unique_key  # type: ignore[method-assign]
        outcome: list[Exception | None] = []

        async def enqueue_rival() -> None:
            try:
                await storage.enqueue([rival], T0)
            except Exception as exc:  # the outcome is asserted below
                outcome.append(exc)
            else:
                outcome.append(None)
            waited_long.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(enqueue_rival)
            with trio.fail_after(20):
                await waited_long.wait()
            assert outcome == []  # still waiting, after more reads than retries of a race
            row = _Row(job=writing.clone())  # the large write gets to the job
            row.job.unique_key = key.key
            await storage._write([{"Put": storage._put(row)}])
            # ... and, done, makes it an ordinary holder (until then it might undo it)
            done = await real_unique_key(key.key)
            done.ids, done.pending, done.mark = [writing.id], [], None
            await storage._write([storage._unique_put(done, T0)])
        (error,) = outcome
        assert isinstance(error, DuplicateJob)
        assert error.details["existing_job_id"] == writing.id


async def test_enqueue_gives_up_at_the_reservation_it_saw_naming_the_key(
    aws_settings: AwsSettings,
) -> None:
    """An enqueue waits for a pending key up to the end of the reservation it saw;
    reserved anew by then, the key gets a 503 that names it and the pending jobs."""
    offset = 0.0
    storage = SqsStorage(aws_settings, rng=random.Random(0), wall=lambda: time.time() + offset)
    await storage.open()
    try:
        await storage.reset()
        (rival,) = unique_jobs(range(1))
        name = unique.fingerprint(rival)
        real_unique_key = storage._unique_key

        async def reserve(job_id: str) -> None:
            key = await real_unique_key(name)
            key.pending, key.pending_until, key.mark = [job_id], storage._wall() + 30, job_id
            await storage._write([storage._unique_put(key, T0)])

        await reserve("first-writer")
        reads = 0

        async def renewing_unique_key(key: str) -> Any:
            nonlocal reads, offset
            reads += 1
            if reads == 2:  # the first reservation ends; another call has the key now
                offset += 31
                await reserve("second-writer")
            return await real_unique_key(key)

        storage._unique_key = renewing_unique_key  # type: ignore[method-assign]
        with trio.fail_after(20), pytest.raises(BackendUnavailable) as raised:
            await storage.enqueue([rival], T0)
        assert raised.value.details["unique_key"] == name
        assert raised.value.details["job_ids"] == ["second-writer"]
        assert name in raised.value.message
        assert reads == 2
    finally:
        await storage.aclose()


async def test_large_replace_reports_no_replaced_job_that_ended_first(
    aws_settings: AwsSettings,
) -> None:
    """A large ``replace`` cancels the jobs it displaces after writing its keys; one
    that completed meanwhile is left alone and not reported replaced (the engine
    would publish job.cancelled for it)."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        (old,) = unique_jobs(range(1), queue="rep")
        await storage.enqueue([old], T0)
        (got,) = await storage.claim([ClaimRequest(("rep",), 1, "w1")], T0)
        assert [j.id for j in got] == [old.id]
        real_write = storage._write
        acked = False

        async def finishing_write(items: list[dict[str, Any]]) -> None:
            nonlocal acked
            await real_write(items)
            if not acked and not is_job_write(items):  # the keys are written: old ends
                acked = True
                await storage.ack(old.id, "w1", None, False, T0 + 1)

        storage._write = finishing_write  # type: ignore[method-assign]
        large = unique_jobs(range(60), queue="rep", on_conflict="replace")
        results = await storage.enqueue(large, T0 + 1)
        assert acked
        assert [(r.created, r.replaced) for r in results] == [(True, None)] * 60
        assert (await storage.get(old.id)).state is JobState.COMPLETED


async def test_replace_of_a_batch_member_whose_callback_holds_the_same_key(
    aws_settings: AwsSettings,
) -> None:
    """A replace that ends a batch fires its callback in the same transaction; when the
    callback holds the enqueue's unique key, that key item is written once (DynamoDB
    refuses two writes of one item in a transaction)."""
    async with opened(aws_settings) as storage:
        await storage.reset()
        member = {"type": UNIQUE_TYPE, "args": [7], "options": {"queue": "same", "unique": BY_ARGS}}
        body = {"type": "batch", "jobs": [member], "callbacks": {"on_complete": member}}
        workflow, members = parse_workflow(body, T0)
        await storage.create_workflow(workflow, members, T0)
        (new,) = unique_jobs(range(7, 8), queue="same", on_conflict="replace")
        (result,) = await storage.enqueue([new], T0 + 1)
        assert result.created and result.replaced is not None
        assert result.replaced.id == members[0].id
        record = await storage.get_workflow_record(workflow.id)
        callback = record.fired_callbacks["on_complete"]
        holders = await storage._unique_key(unique.fingerprint(new))
        assert set(holders.ids) == {members[0].id, new.id, callback}


# -- DynamoDB reads of workflow member settles ------------------------------------------


class ItemReads:
    """Counts the DynamoDB items a storage reads (GetItem, BatchGetItem keys, Query)."""

    def __init__(self, storage: SqsStorage) -> None:
        self.items = 0
        storage.clients.dynamodb.meta.events.register("provide-client-params.dynamodb", self._count)

    def _count(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name == "GetItem":
            self.items += 1
        elif model.name == "BatchGetItem":
            self.items += sum(len(r["Keys"]) for r in params["RequestItems"].values())
        elif model.name in ("Query", "Scan"):
            raise AssertionError(f"a {model.name} while settling a member")

    async def of(self, call: Awaitable[Any]) -> int:
        before = self.items
        await call
        return self.items - before


async def _member_settle_reads(storage: SqsStorage, members: int) -> list[int]:
    """Settle every member of a batch (acks, a discard, a cancel last); for each, the
    items read by the settle and by the workflow read the engine needs after it."""
    queue = f"reads-{members}"
    one_try = {"max_attempts": 1}
    body: dict[str, Any] = {
        "type": "batch",
        "jobs": [{"type": "m", "args": [], "options": {"queue": queue, "retry": one_try}}]
        * members,
        "callbacks": {
            name: {"type": "cb", "args": [], "options": {"queue": f"{queue}-cb"}}
            for name in ("on_complete", "on_failure")
        },
    }
    workflow, jobs = parse_workflow(body, T0)
    await storage.create_workflow(workflow, jobs, T0)
    claimed: list[Job] = []
    while len(claimed) < members - 1:  # the last one is cancelled unclaimed
        want = min(10, members - 1 - len(claimed))
        (got,) = await storage.claim([ClaimRequest((queue,), want, "w1")], T0)
        claimed += got
    waiting = next(j.id for j in jobs if j.id not in {c.id for c in claimed})
    reads = ItemReads(storage)
    per_settle: list[int] = []
    for n, job in enumerate(claimed):
        now = T0 + 1 + n
        if n == 0:
            settle = storage.nack(job.id, "w1", Failure("boom", "discarded"), False, now)
        else:
            settle = storage.ack(job.id, "w1", {"n": n}, True, now)
        count = await reads.of(settle)
        per_settle.append(count + await reads.of(storage.get_workflow_record(workflow.id)))
    count = await reads.of(storage.cancel(waiting, T0 + members + 1))
    per_settle.append(count + await reads.of(storage.get_workflow_record(workflow.id)))
    finished = await storage.get_workflow_record(workflow.id)
    fired = set(finished.fired_callbacks)
    assert (finished.state, fired) == ("failed", {"on_complete", "on_failure"})
    # A finished workflow is read whole from its item: one read, the same answer.
    assert await reads.of(storage.get_workflow(workflow.id)) == 1
    assert await storage.get_workflow(workflow.id) == finished
    return per_settle


async def test_reads_per_member_settle_do_not_grow_with_the_workflow(
    aws_settings: AwsSettings,
) -> None:
    """A member's ack, nack or cancel reads its job and the workflow item, and the
    record read after it one more item, however many members the workflow has (before:
    the engine's workflow read after each settle read every member, O(n²) a workflow)."""
    async with opened(aws_settings) as storage:
        small = await _member_settle_reads(storage, 10)
        large = await _member_settle_reads(storage, 50)
    assert set(small) == set(large) == {3}


async def test_get_workflow_reads_only_members_not_recorded_finished(
    aws_settings: AwsSettings,
) -> None:
    """The live view reads the members that may have been claimed since the item
    recorded them (claims leave it alone), and only those."""
    async with opened(aws_settings) as storage:
        member = {"type": "m", "args": [], "options": {"queue": "live"}}
        workflow, jobs = parse_workflow({"type": "group", "jobs": [member] * 6}, T0)
        await storage.create_workflow(workflow, jobs, T0)
        (claimed,) = await storage.claim([ClaimRequest(("live",), 4, "w1")], T0 + 1)
        for job in claimed[:2]:
            await storage.ack(job.id, "w1", None, False, T0 + 2)
        reads = ItemReads(storage)
        assert await reads.of(storage.get_workflow(workflow.id)) == 1 + 4
        live = await storage.get_workflow(workflow.id)
        assert (
            sorted(live.job_states.values())
            == ["active"] * 2 + ["available"] * 2 + ["completed"] * 2
        )
        assert live.started_at == T0 + 1
        record = await storage.get_workflow_record(workflow.id)
        assert sorted(record.job_states.values()) == ["available"] * 4 + ["completed"] * 2


async def test_requests_are_limited_to_the_connection_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A wide fan-out (the messages of a large enqueue) waits for a pooled connection
    in our own limiter, not in the HTTP pool, whose waits time out."""
    storage = SqsStorage(AwsSettings(max_pool_connections=3), rng=random.Random(0))
    running = peak = calls = 0

    class FakeSqs:
        async def send_message_batch(self, **kwargs: Any) -> dict[str, Any]:
            nonlocal running, peak, calls
            running += 1
            calls += 1
            peak = max(peak, running)
            await trio.sleep(0.01)
            running -= 1
            return {"Successful": [], "Failed": []}

    fake: Any = type("Clients", (), {"sqs": FakeSqs(), "dynamodb": None})()
    storage._clients = fake
    send = partial(storage._sqs, "send_message_batch", QueueUrl="q", Entries=[])
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(send)
    assert (calls, peak) == (20, 3)
