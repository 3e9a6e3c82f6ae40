"""The storage contract suite against PostgreSQL: a fresh migrated database per check."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from ojs_trio.storage.port import ClaimRequest, Storage
from ojs_trio.storage.postgres.adapter import PostgresStorage
from ojs_trio.storage.postgres.sql import q
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
