"""The storage contract suite against PostgreSQL: a fresh migrated database per check."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
from pg_fixtures import fresh_database

from ojs_trio.engine.errors import BackendError, DuplicateJob, InvalidStateTransition
from ojs_trio.engine.job import Job
from ojs_trio.engine.states import JobState
from ojs_trio.engine.workflows import parse_workflow
from ojs_trio.storage.port import AckRequest, ClaimRequest, Storage
from ojs_trio.storage.postgres.adapter import PostgresStorage
from ojs_trio.storage.postgres.driver import TrioConnection, map_errors
from ojs_trio.storage.postgres.migrate import MIGRATION_LOCK_KEY, migrate
from ojs_trio.storage.postgres.sql import migrations, q
from ojs_trio.testing import CONTRACT_CHECKS, ContractCheck
from ojs_trio.testing.storage_contract import QUEUE, T0, make_job


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=[c.__name__ for c in CONTRACT_CHECKS])
async def test_postgres_contract(check: ContractCheck, fresh_db: str) -> None:
    @asynccontextmanager
    async def factory() -> AsyncIterator[Storage]:
        storage = PostgresStorage(fresh_db, apply_migrations=False)
        await storage.open()
        try:
            await storage.reset()
            yield storage
        finally:
            await storage.aclose()

    await check(factory)


async def test_migrations_apply_once_and_are_recorded(fresh_db: str) -> None:
    # The template is migrated already: opening with migrations on is a no-op.
    storage = PostgresStorage(fresh_db)
    await storage.open()
    try:
        health = await storage.ping()
        assert health["status"] == "connected"
    finally:
        await storage.aclose()


async def test_health_reports_how_many_calls_each_group_commit_batch_carried(
    fresh_db: str,
) -> None:
    # Operators read the batch size (calls / batches) from /health to see whether
    # group commit is coalescing under their load.
    async with opened(fresh_db) as storage:
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(storage.enqueue, [make_job(args=[i])], T0)
        (claimed,) = await storage.claim([ClaimRequest((QUEUE,), 5, "w", None)], T0)
        async with trio.open_nursery() as nursery:
            for job in claimed:
                nursery.start_soon(storage.ack, job.id, "w", None, False, T0 + 1)
        group_commit = (await storage.ping())["group_commit"]
    assert group_commit["enqueue"]["calls"] == 5
    assert group_commit["settle"]["calls"] == 5
    # Calls started in one scheduling round share a batch.
    assert 1 <= group_commit["settle"]["batches"] < 5
    assert group_commit["settle"]["largest_batch"] > 1
    assert group_commit["heartbeat"] == {"calls": 0, "batches": 0, "largest_batch": 0}


async def test_hot_queries_use_indexes_on_a_table_the_planner_has_not_analyzed(
    fresh_db: str,
) -> None:
    # A fresh, never-analyzed table is the worst case for the planner's estimates:
    # without the session settings it seq-scans ojs_jobs_live for a 10-row ack
    # batch, bitmap-scans the claim index, and checks an enqueue's ids for clashes
    # with a hash join over the whole primary key (18 ms per enqueue at 60k rows).
    # Every hot query must look rows up by index, one by one.
    storage = PostgresStorage(fresh_db, apply_migrations=False)
    await storage.open()
    try:
        async with storage._pool.connection() as conn:
            cur = await conn.execute("SHOW jit")
            assert await cur.fetchone() == ("off",)  # JIT cost 137 ms on a 0.25 ms UPDATE
            hot = ("claim_plain", "claim_available", "lock_jobs", "update_jobs")
            for name in (*hot, "enqueue_plain", "ack_plain"):
                ids = [str(uuid.uuid4()) for _ in range(10)]
                params: Any = {
                    "claim_plain": {
                        "queue": "default",
                        "now": 0.0,
                        "default_ms": 1000,
                        "slots": json.dumps([{"n": 1, "worker_id": "w", "visibility_ms": None}]),
                    },
                    "claim_available": ("default", 0.0, 10),
                    "lock_jobs": (ids,),
                    "update_jobs": (json.dumps([{"id": i} for i in ids]),),
                    "enqueue_plain": {
                        "rows": json.dumps([{"call": 0, "id": i, "queue": "q"} for i in ids]),
                        "now": 0.0,
                        "limit": 8000,
                    },
                    "ack_plain": {"acks": json.dumps([{"id": i} for i in ids]), "ids": ids},
                }[name]
                cur = await conn.execute("EXPLAIN " + q(name), params)
                plan = "\n".join(row[0] for row in await cur.fetchall())
                assert "Seq Scan on ojs_jobs_live" not in plan, (name, plan)
                assert "Bitmap" not in plan, (name, plan)
                assert "Hash Join" not in plan and "Merge Join" not in plan, (name, plan)
                assert "Index Scan" in plan or "Index Only Scan" in plan, (name, plan)
                if name == "claim_plain":
                    # A claim's jobs were once joined to their slots by a filter:
                    # quadratic, 380 ms for 1,270 jobs.
                    assert "Join Filter" not in plan, plan
    finally:
        await storage.aclose()


async def test_an_ack_batch_looks_its_jobs_up_by_id_while_many_are_active(
    fresh_db: str,
) -> None:
    # With the table never analyzed, the planner took the partial index of active
    # jobs for a tiny one: every ack batch read all active jobs and matched the
    # acks by filter (17.5 ms with 2,560 active, against 0.75 ms by id).
    storage = PostgresStorage(fresh_db, apply_migrations=False)
    await storage.open()
    try:
        await storage.enqueue([make_job(args=[i]) for i in range(600)], T0)
        (claimed,) = await storage.claim([ClaimRequest((QUEUE,), 600, "w", None)], T0)
        assert len(claimed) == 600
        acks = [{"id": job.id, "worker_id": "w", "now": T0} for job in claimed[:10]]
        params = {"acks": json.dumps(acks), "ids": [a["id"] for a in acks]}
        async with storage._pool.connection() as conn:
            cur = await conn.execute("EXPLAIN " + q("ack_plain"), params)
            plan = "\n".join(row[0] for row in await cur.fetchall())
        # Either side may lead the join; the jobs are read by key either way.
        assert re.search(r"Index Cond: \(\(id = (a\.id|ANY)", plan), plan
        assert "Index Cond: (finished = false)" not in plan, plan
        assert "ojs_jobs_leases" not in plan, plan
    finally:
        await storage.aclose()


async def test_live_partition_is_vacuumed_when_dead_rows_pile_up(fresh_db: str) -> None:
    # With autovacuum off (as on the benchmark machine) or behind, dead row versions
    # of claimed and finished jobs pile up in ojs_jobs_live; the adapter vacuums it.
    storage = PostgresStorage(fresh_db, apply_migrations=False, vacuum_min_dead_rows=200)
    await storage.open()
    try:
        async with storage._pool.connection() as conn:
            await conn.execute("ALTER TABLE ojs_jobs_live SET (autovacuum_enabled = false)")
        assert await storage.vacuum_if_needed() is False  # nothing to do yet
        jobs = [make_job(queue="vac", args=[k]) for k in range(150)]
        await storage.enqueue(jobs, T0)
        (claimed,) = await storage.claim([ClaimRequest(("vac",), 150, "w", None)], T0 + 1)
        for job in claimed:
            await storage.ack(job.id, "w", None, False, T0 + 2)
        # Statistics reach pg_stat_user_tables asynchronously: wait for the count.
        with trio.fail_after(20):
            while not await storage.vacuum_if_needed():  # noqa: ASYNC110 (polls the server)
                await trio.sleep(0.2)
        assert storage.vacuums == 1
        async with storage._pool.connection() as conn:
            cur = await conn.execute(q("live_partition_dead_rows"))
            dead, _ = await cur.fetchone()
        assert dead < 200
    finally:
        await storage.aclose()


@asynccontextmanager
async def opened(dsn: str, **options: Any) -> AsyncIterator[PostgresStorage]:
    """An opened storage on an already migrated database (one "server")."""
    storage = PostgresStorage(dsn, apply_migrations=False, **options)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.aclose()


async def _execute(storage: PostgresStorage, *statements: str) -> None:
    async with storage._pool.connection() as conn:
        for statement in statements:
            await conn.execute(statement)


def _failing_trigger(table: str, when: str = "true") -> tuple[str, ...]:
    """SQL making every UPDATE of ``table`` (rows matching ``when``) fail: a failure
    injected into one statement or transaction, the rest of the database unharmed."""
    return (
        "CREATE OR REPLACE FUNCTION ojs_test_fail() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
        f"CREATE TRIGGER ojs_test_fail_{table} BEFORE UPDATE ON {table}"
        f" FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION ojs_test_fail()",
    )


def _member(queue: str) -> dict[str, Any]:
    return {"type": "pg.step", "args": [], "options": {"queue": queue}}


async def _state(storage: PostgresStorage, job_id: str) -> JobState:
    return (await storage.get(job_id)).state


# -- group commit off ------------------------------------------------------------------


async def test_without_group_commit_each_call_runs_alone_on_its_own_connection(
    fresh_db: str,
) -> None:
    async with opened(fresh_db, group_commit=False, max_size=4) as storage:
        jobs = [make_job(queue="solo", args=[k]) for k in range(12)]
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(storage.enqueue, [job], T0)
        (claimed,) = await storage.claim([ClaimRequest(("solo",), 12, "w", None)], T0)
        assert sorted(j.id for j in claimed) == sorted(j.id for j in jobs)
        async with trio.open_nursery() as nursery:
            for job in claimed:
                nursery.start_soon(storage.heartbeat, "w", [job.id], 60_000, T0 + 1)
        async with trio.open_nursery() as nursery:
            for job in claimed:
                nursery.start_soon(storage.ack, job.id, "w", None, False, T0 + 2)
        for job in jobs:
            assert await _state(storage, job.id) is JobState.COMPLETED
        for coalescer in (storage._enqueues, storage._beats, storage._settles):
            stats = coalescer.statistics()
            assert (stats.calls, stats.batches, stats.largest_batch) == (12, 12, 1)
        # Concurrent calls, not one after another behind a leader: several connections.
        assert storage._pool.statistics().created > 1


# -- a settle batch: each item's outcome is its own --------------------------------------


async def test_a_failed_settle_transaction_leaves_the_plain_acks_before_it_committed(
    fresh_db: str,
) -> None:
    # Plain acks commit by one statement; the batch's other items (here workflow
    # members, whose workflow update fails) by a transaction after it.  That
    # transaction's error is reported to its own items only.
    async with opened(fresh_db) as storage:
        plain = [make_job(queue="plain", args=[k]) for k in range(2)]
        await storage.enqueue(plain, T0)
        workflow, members = parse_workflow(
            {"type": "group", "jobs": [_member("wf"), _member("wf")]}, T0
        )
        await storage.create_workflow(workflow, members, T0)
        (held,) = await storage.claim([ClaimRequest(("plain", "wf"), 4, "w", None)], T0)
        assert len(held) == 4
        await _execute(storage, *_failing_trigger("ojs_workflows"))

        # ack_many: the pool's batch of acks.
        out = await storage.ack_many(
            [AckRequest(plain[0].id, "w"), AckRequest(members[0].id, "w")], T0 + 1
        )
        assert isinstance(out[0], Job) and out[0].state is JobState.COMPLETED, out
        assert isinstance(out[1], BackendError), out

        # Two concurrent acks coalesced into one settle batch.
        outcomes: dict[str, JobState | BackendError] = {}

        async def ack(job_id: str) -> None:
            try:
                outcomes[job_id] = (await storage.ack(job_id, "w", None, False, T0 + 2)).state
            except BackendError as exc:
                outcomes[job_id] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ack, plain[1].id)
            nursery.start_soon(ack, members[1].id)
        assert storage._settles.statistics().largest_batch == 2  # one batch
        assert outcomes[plain[1].id] is JobState.COMPLETED, outcomes
        assert isinstance(outcomes[members[1].id], BackendError), outcomes

        for job in plain:
            assert await _state(storage, job.id) is JobState.COMPLETED
        for job in members:
            assert await _state(storage, job.id) is JobState.ACTIVE  # rolled back


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (psycopg.errors.SerializationFailure, True),
        (psycopg.errors.DeadlockDetected, True),
        (psycopg.errors.DiskFull, False),
    ],
)
async def test_plain_acks_that_lost_a_race_get_the_general_paths_outcome(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch, error: type[psycopg.Error], retried: bool
) -> None:
    # A plain-ack statement that failed with a serialization failure or deadlock
    # committed nothing: its acks are settled by the general path, which sees what
    # the winning transaction left (here a cancel: a conflict, 409) instead of
    # reporting the lost race (a 500).  Any other failure is each ack's error.
    async with opened(fresh_db) as storage:
        acked, cancelled = [make_job(queue="race", args=[k]) for k in range(2)]
        await storage.enqueue([acked, cancelled], T0)
        (held,) = await storage.claim([ClaimRequest(("race",), 2, "w", None)], T0)
        assert len(held) == 2
        ack_plain = storage._ack_plain
        plain_calls: list[list[str]] = []

        async def fails_once(items: Any) -> dict[str, Job]:
            plain_calls.append([item[0] for item in items])
            if len(plain_calls) > 1:
                return await ack_plain(items)
            await storage.cancel(cancelled.id, T0 + 1)  # the transaction that won
            with map_errors():
                raise error("injected")

        monkeypatch.setattr(storage, "_ack_plain", fails_once)
        out = await storage.ack_many(
            [AckRequest(acked.id, "w"), AckRequest(cancelled.id, "w")], T0 + 2
        )
        assert plain_calls == [[acked.id, cancelled.id]]  # the general path did the rest
        if retried:
            assert isinstance(out[0], Job) and out[0].state is JobState.COMPLETED, out
            assert isinstance(out[1], InvalidStateTransition), out
            assert out[1].http_status == 409
            assert await _state(storage, acked.id) is JobState.COMPLETED
        else:
            assert all(type(o) is BackendError for o in out), out
            assert all(f"SQLSTATE {error.sqlstate}" in o.message for o in out), out
            assert await _state(storage, acked.id) is JobState.ACTIVE
        assert await _state(storage, cancelled.id) is JobState.CANCELLED


# -- claim: nothing claimed and not returned ---------------------------------------------


async def test_a_claim_failing_on_a_later_queue_returns_the_jobs_already_claimed(
    fresh_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(fresh_db) as storage:
        first = [make_job(queue="first", args=[k]) for k in range(2)]
        second = [make_job(queue="second", args=[k]) for k in range(2)]
        await storage.enqueue(first + second, T0)
        # Claiming from "second" fails; "first" is claimed (and committed) before it.
        await _execute(storage, *_failing_trigger("ojs_jobs_live", "NEW.queue = 'second'"))
        request = ClaimRequest(("first", "second"), 4, "w", None)
        with caplog.at_level(logging.WARNING, logger="ojs_trio.postgres"):
            (got,) = await storage.claim([request], T0)
        assert [j.id for j in got] == [j.id for j in first]
        assert "claim stopped after 2 jobs" in caplog.text
        for job in first:
            assert await _state(storage, job.id) is JobState.ACTIVE
        for job in second:
            assert await _state(storage, job.id) is JobState.AVAILABLE
        # Nothing claimed before the failure: the error is the caller's.
        with pytest.raises(BackendError):
            await storage.claim([request], T0)


async def test_claimed_workflow_members_are_returned_when_marking_them_started_fails(
    fresh_db: str,
) -> None:
    async with opened(fresh_db) as storage:
        workflow, members = parse_workflow({"type": "group", "jobs": [_member("wf")]}, T0)
        await storage.create_workflow(workflow, members, T0)
        await _execute(storage, *_failing_trigger("ojs_workflows"))
        (got,) = await storage.claim([ClaimRequest(("wf",), 1, "w", None)], T0)
        assert [j.id for j in got] == [members[0].id]
        assert await _state(storage, members[0].id) is JobState.ACTIVE
        stored = await storage.get_workflow(workflow.id)
        assert stored.job_states[members[0].id] == JobState.AVAILABLE.value  # not marked


# -- several servers on one database -----------------------------------------------------

UNIQUE_ROUNDS = 25


@pytest.mark.parametrize("on_conflict", ["reject", "ignore"])
async def test_unique_enqueues_racing_from_two_servers_create_one_job_per_key(
    fresh_db: str, on_conflict: str
) -> None:
    unique = {"keys": ["type", "args"], "on_conflict": on_conflict}

    async def race(n: int, servers: tuple[PostgresStorage, ...]) -> tuple[list[str], list[str]]:
        """The same unique job enqueued once through each server, all at once."""
        created: list[str] = []
        existing: list[str] = []  # the job each losing enqueue was pointed at

        async def enqueue(storage: PostgresStorage) -> None:
            job = make_job(queue="uniq", args=[n], unique=unique)
            try:
                (result,) = await storage.enqueue([job], T0 + n)
            except DuplicateJob as exc:
                existing.append(str(exc.details["existing_job_id"]))
                return
            (created if result.created else existing).append(result.job.id)

        async with trio.open_nursery() as nursery:
            for storage in servers:
                nursery.start_soon(enqueue, storage)
        return created, existing

    async with opened(fresh_db) as a, opened(fresh_db) as b:
        for n in range(UNIQUE_ROUNDS):
            created, existing = await race(n, (a, b, a, b))  # two calls per server
            assert len(created) == 1, (n, created, existing)
            assert existing == created * 3, (n, created, existing)
        async with a._pool.connection() as conn:
            cur = await conn.execute("SELECT count(*), count(DISTINCT unique_key) FROM ojs_jobs")
            assert await cur.fetchone() == (UNIQUE_ROUNDS, UNIQUE_ROUNDS)


class RecordingListener:
    """A StorageListener that records the queues each wake-up named."""

    def __init__(self) -> None:
        self.ready: list[list[str]] = []
        self.woken = trio.Event()

    def jobs_created(self, jobs: list[Job]) -> None:
        return None

    def queues_ready(self, queues: list[str]) -> None:
        self.ready.append(queues)
        self.woken.set()


# A deadline only, so that a lost notification fails the test instead of hanging
# it; not a latency bound (a loaded machine may take any time).  What proves
# the wake-up came from the NOTIFY is its payload: the storage has no poll
# fallback (that is the engine's fetchers re-checking every second), and its
# only other wake-up, after the LISTEN connection reconnects, names no queue.
WAKE_DEADLINE = 10.0


async def test_an_enqueue_on_one_server_wakes_the_listener_of_another_with_its_queue(
    fresh_db: str,
) -> None:
    listener = RecordingListener()
    async with (
        opened(fresh_db) as listening,
        opened(fresh_db) as other,
        trio.open_nursery() as nursery,
    ):
        listening.set_listener(listener)
        nursery.start_soon(listening.listen)
        # The LISTEN connection is up once its last statement was the LISTEN.
        with trio.fail_after(10):
            while True:
                async with other._pool.connection() as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                    )
                    row = await cur.fetchone()
                if row and row[0] == 1:
                    break
                await trio.sleep(0.01)
        latencies = []
        for n in range(5):
            listener.woken = trio.Event()
            started = trio.current_time()
            with trio.fail_after(WAKE_DEADLINE):
                await other.enqueue([make_job(queue=f"wake-{n}")], T0)
                await listener.woken.wait()
            latencies.append(trio.current_time() - started)
            # One wake-up per enqueue, each naming the queue its NOTIFY carried.
            assert listener.ready == [[f"wake-{k}"] for k in range(n + 1)]
        print(f"enqueue on one server -> wake-up on the other: {max(latencies) * 1000:.1f} ms max")
        nursery.cancel_scope.cancel()


# -- migrations --------------------------------------------------------------------------

MIGRATORS = 4


@pytest.fixture
def empty_db(pg_dsn: str) -> Iterator[str]:
    """A database with no schema at all (cloned from template0, not the migrated template)."""
    with fresh_database(pg_dsn, "template0") as dsn:
        yield dsn


async def test_migrations_started_at_once_on_an_empty_database_apply_once(empty_db: str) -> None:
    applied: list[list[int]] = []

    async def run_migrate() -> None:
        conn = await TrioConnection.connect(empty_db, autocommit=True)
        async with conn:
            applied.append(await migrate(conn))

    async def advisory_waiters(conn: TrioConnection) -> int:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    holder = await TrioConnection.connect(empty_db, autocommit=True)
    async with holder:
        # Hold the migration lock until every migrator waits on it: a real race.
        await holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        async with trio.open_nursery() as nursery:
            for _ in range(MIGRATORS):
                nursery.start_soon(run_migrate)
            with trio.fail_after(20):
                while await advisory_waiters(holder) < MIGRATORS:  # noqa: ASYNC110 (polls)
                    await trio.sleep(0.01)
            await holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        versions = [version for version, _, _ in migrations()]
        assert sorted(applied, key=len) == [[]] * (MIGRATORS - 1) + [versions], applied
        cur = await holder.execute("SELECT version, name FROM ojs_schema_version ORDER BY 1")
        assert await cur.fetchall() == [(version, name) for version, name, _ in migrations()]
        cur = await holder.execute("SELECT to_regclass('ojs_jobs') IS NOT NULL")
        assert await cur.fetchone() == (True,)
