"""The one-statement PostgreSQL claim and ack write exactly what the engine's rules would.

``claim_plain`` and ``ack_plain`` (queries.sql) apply ``lifecycle.claim`` and
``lifecycle.ack`` in SQL, so that each is one round trip; these checks pin them to
the engine's rules on every kind of job: defaults, the job's and the request's
visibility, an execution timeout, retried and delayed jobs, unknown fields, no
worker id, results of every JSON kind, and the cases the SQL leaves to the
general path (wrong worker, already settled, twice in one batch).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from psycopg.types.json import Jsonb

from ojs_trio.engine import lifecycle
from ojs_trio.engine.errors import Conflict, InvalidStateTransition
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.storage.port import ClaimRequest
from ojs_trio.storage.postgres.adapter import PostgresStorage, _job, _row
from ojs_trio.storage.postgres.sql import q
from ojs_trio.testing.storage_contract import T0, make_job

QUEUE = "claims"


@asynccontextmanager
async def _open(dsn: str) -> AsyncIterator[PostgresStorage]:
    storage = PostgresStorage(dsn, apply_migrations=False)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.aclose()


async def _claim_and_compare(
    storage: PostgresStorage, job_id: str, now: float, worker: str | None, visibility: int | None
) -> Job:
    before = await storage.get(job_id)
    expected = before.clone()
    lifecycle.claim(expected, worker, visibility, now)
    (got,) = await storage.claim([ClaimRequest((QUEUE,), 1, worker, visibility)], now)
    assert [j.id for j in got] == [job_id]
    assert got[0].to_record() == expected.to_record()
    async with storage._pool.connection() as conn:
        cur = await conn.execute(
            "SELECT state, lease_until, worker_id, run_at, finished, record,"
            " attempt, started_at, lease_expires_at FROM ojs_jobs WHERE id = %s",
            (job_id,),
        )
        state, lease_until, worker_id, run_at, finished, record, *claim = await cur.fetchone()
    row = _row(expected)
    assert (state, lease_until, worker_id, run_at, finished) == (
        row["state"],
        row["lease_until"],
        row["worker_id"],
        row["run_at"],
        row["finished"],
    )
    # The claim went to columns (migration 0002); the record is as it was before.
    assert claim == [expected.attempt, expected.started_at, expected.lease_expires_at]
    assert record == before.to_record()
    stored = _job((record, state, worker_id, *claim, None, None))
    assert stored.to_record() == expected.to_record()
    return got[0]


async def _fail_attempt(storage: PostgresStorage, job_id: str) -> float:
    """Fail the attempt ``w1`` holds and promote the retry; returns when it became available."""
    failure = Failure(code="boom", message="attempt failed", retryable=True)
    nacked = await storage.nack(job_id, "w1", failure, False, T0 + 2)
    assert nacked.scheduled_at is not None and nacked.errors
    await storage.promote_due(nacked.scheduled_at + 1, 10)
    return nacked.scheduled_at + 1


async def _columns(storage: PostgresStorage, job_id: str) -> tuple[Any, ...]:
    async with storage._pool.connection() as conn:
        cur = await conn.execute(
            "SELECT state, lease_until, worker_id, run_at, finished, finished_at, dead_letter,"
            " record, attempt, started_at, lease_expires_at, ack_result"
            " FROM ojs_jobs WHERE id = %s",
            (job_id,),
        )
        row = await cur.fetchone()
    assert row is not None
    return tuple(row)


async def _ack_and_compare(
    storage: PostgresStorage, job_id: str, worker: str | None, result: Any, has_result: bool
) -> Job:
    now = T0 + 9.87654321
    record_before = (await _columns(storage, job_id))[7]
    expected = (await storage.get(job_id)).clone()
    lifecycle.ack(expected, worker, result, has_result, now)
    got = await storage.ack(job_id, worker, result, has_result, now)
    assert got.to_record() == expected.to_record()
    # The ack went to columns (migration 0003): the record is as it was before,
    # and the columns hold the attempt, the worker, the time and the result.
    (state, lease_until, worker_id, run_at, finished, finished_at, dead_letter, record,
     *overlay, boxed) = await _columns(storage, job_id)  # fmt: skip
    assert (state, lease_until, worker_id, run_at, finished, finished_at, dead_letter) == (
        "completed",
        None,
        expected.worker_id,
        None,
        True,
        now,
        False,
    )
    assert record == record_before
    assert overlay == [expected.attempt, expected.started_at, None]
    assert boxed == ([result] if has_result else None)
    stored = _job((record, state, worker_id, *overlay, finished_at, boxed))
    assert stored.to_record() == expected.to_record()
    assert (await storage.get(job_id)).to_record() == expected.to_record()
    return got


CASES: list[tuple[str, dict[str, Any], str | None, int | None]] = [
    ("defaults", {}, "w1", None),
    ("no worker id", {}, None, None),
    ("request visibility", {}, "w1", 2_500),
    ("job visibility", {"visibility_timeout_ms": 7_000}, "w1", None),
    ("request beats job visibility", {"visibility_timeout_ms": 7_000}, "w1", 1_234),
    ("execution timeout shorter than the lease", {"timeout_ms": 1_500}, "w1", 60_000),
    ("execution timeout longer than the lease", {"timeout_ms": 90_000}, "w1", 1_000),
    (
        "expires, meta, tags",
        {"expires_at": "+PT1H", "meta": {"k": [1, 2.5]}, "tags": ["a"]},
        "w",
        0,
    ),
]


@pytest.mark.parametrize(
    ("label", "options", "worker", "visibility"), CASES, ids=[c[0] for c in CASES]
)
async def test_claim_matches_lifecycle(
    fresh_db: str, label: str, options: dict[str, Any], worker: str | None, visibility: int | None
) -> None:
    async with _open(fresh_db) as storage:
        job = make_job(queue=QUEUE, args=[label, 1.25, None], **options)
        await storage.enqueue([job], T0)
        await _claim_and_compare(storage, job.id, T0 + 0.123456789, worker, visibility)


async def test_retried_and_delayed_jobs_match_lifecycle(fresh_db: str) -> None:
    async with _open(fresh_db) as storage:
        retried = make_job(queue=QUEUE, retry={"max_attempts": 5, "initial_interval": "PT1S"})
        await storage.enqueue([retried], T0)
        await _claim_and_compare(storage, retried.id, T0 + 1, "w1", None)
        available_at = await _fail_attempt(storage, retried.id)
        second = await _claim_and_compare(storage, retried.id, available_at + 0.5, "w2", None)
        assert second.attempt == 2 and second.scheduled_at is None
        done = await _ack_and_compare(storage, retried.id, None, [1], True)  # no worker id
        assert done.error is None and done.errors  # the latest error goes, the history stays

        delayed = make_job(queue=QUEUE, delay_ms=30_000)
        await storage.enqueue([delayed], T0)
        await storage.promote_due(T0 + 31, 10)
        await _claim_and_compare(storage, delayed.id, T0 + 32, "w3", 5_000)


RESULTS: list[tuple[str, Any, bool]] = [
    ("no result", None, False),
    ("null result", None, True),
    ("object result", {"rows": [1, 2.5, "x", None], "ok": True}, True),
    ("scalar result", 0, True),
]


@pytest.mark.parametrize(("label", "result", "has_result"), RESULTS, ids=[r[0] for r in RESULTS])
async def test_ack_matches_lifecycle(
    fresh_db: str, label: str, result: Any, has_result: bool
) -> None:
    async with _open(fresh_db) as storage:
        job = make_job(queue=QUEUE, args=[label], timeout_ms=5_000, tags=["t"])
        await storage.enqueue([job], T0)
        await _claim_and_compare(storage, job.id, T0 + 1, "w1", None)
        await _ack_and_compare(storage, job.id, "w1", result, has_result)


async def test_ack_after_a_full_write_takes_the_attempt_from_the_record(fresh_db: str) -> None:
    """A heartbeat writes the whole record and clears the claim's columns; the ack
    then copies the attempt and started_at from the record into its columns."""
    async with _open(fresh_db) as storage:
        job = make_job(queue=QUEUE, args=["beat"])
        await storage.enqueue([job], T0)
        await _claim_and_compare(storage, job.id, T0 + 1, "w1", None)
        (beaten,) = await storage.heartbeat("w1", [job.id], 60_000, T0 + 2)
        assert (await _columns(storage, job.id))[8] is None  # the claim's columns cleared
        done = await _ack_and_compare(storage, job.id, "w1", {"ok": True}, True)
        assert (done.attempt, done.started_at) == (beaten.attempt, beaten.started_at)


async def test_acks_the_statement_leaves_get_the_general_paths_errors(fresh_db: str) -> None:
    async with _open(fresh_db) as storage:
        jobs = [make_job(queue=QUEUE, args=[k]) for k in range(3)]
        await storage.enqueue(jobs, T0)
        (claimed,) = await storage.claim([ClaimRequest((QUEUE,), 3, "w1", None)], T0 + 1)
        assert len(claimed) == 3
        with pytest.raises(Conflict) as refused:
            await storage.ack(jobs[0].id, "someone-else", None, False, T0 + 2)
        assert not isinstance(refused.value, InvalidStateTransition)  # held by another worker
        await storage.ack(jobs[0].id, "w1", None, False, T0 + 2)
        with pytest.raises(InvalidStateTransition):
            await storage.ack(jobs[0].id, "w1", None, False, T0 + 3)

        # The same job acked twice in one batch: the first wins, the second is refused.
        outcomes: list[object] = []

        async def ack(job_id: str) -> None:
            try:
                outcomes.append(await storage.ack(job_id, "w1", "r", True, T0 + 4))
            except InvalidStateTransition as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for job_id in (jobs[1].id, jobs[1].id, jobs[2].id):
                nursery.start_soon(ack, job_id)
        assert sum(isinstance(o, Job) for o in outcomes) == 2
        assert sum(isinstance(o, InvalidStateTransition) for o in outcomes) == 1
        assert (await storage.get(jobs[1].id)).result == "r"


async def test_a_claim_commits_without_waiting_for_the_flush_and_only_itself(
    fresh_db: str,
) -> None:
    """``claim_plain`` turns synchronous_commit off for its own transaction only.

    PostgreSQL reads the setting when the transaction commits and resets a local
    one after that, so the claim's commit does not wait for its WAL to reach disk,
    while the connection's next statements (enqueues, acks) still do.
    """
    async with _open(fresh_db) as storage:
        await storage.enqueue([make_job(queue=QUEUE, args=[k]) for k in range(2)], T0)
        async with storage._pool.connection() as conn:

            async def mode() -> str:
                cur = await conn.execute("SHOW synchronous_commit")
                row = await cur.fetchone()
                assert row is not None
                return str(row[0])

            assert await mode() == "on"
            slots = Jsonb([{"n": 1, "worker_id": "w1", "visibility_ms": None}])
            params = {"queue": QUEUE, "now": T0 + 1, "default_ms": 30_000, "slots": slots}
            async with conn.transaction():
                cur = await conn.execute(q("claim_plain"), params)
                assert len(await cur.fetchall()) == 1
                assert await mode() == "off"  # in force when this transaction commits
            assert await mode() == "on"
        # Through the adapter (one autocommitted statement on a pooled connection):
        # the job is claimed and every pooled connection is left as it was.
        (got,) = await storage.claim([ClaimRequest((QUEUE,), 1, "w2", None)], T0 + 2)
        assert len(got) == 1 and (await storage.get(got[0].id)).state == "active"
        async with storage._pool.connection() as conn:
            cur = await conn.execute("SHOW synchronous_commit")
            assert await cur.fetchone() == ("on",)
