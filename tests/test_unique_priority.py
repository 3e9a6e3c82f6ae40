"""Unique jobs (reject / ignore / replace) and delivery order (priority, FIFO, queues).

Unique jobs are exercised through the engine and over HTTP (a real Hypercorn
server on an ephemeral port).  Delivery order is checked with Hypothesis
against a reference model: within a queue, higher priority first and
enqueue order (FIFO) among equal priorities; across queues, the order the
fetch request lists them.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.errors import DuplicateJob, InvalidRequest
from ojs_trio.engine.states import JobState
from ojs_trio.http import serve
from ojs_trio.storage.memory import MemoryStorage

BASE = 1_700_000_000.0


def wall() -> float:
    return BASE + trio.current_time()


@asynccontextmanager
async def running_engine(**config: Any) -> AsyncIterator[Engine]:
    config.setdefault("clock", wall)
    async with open_engine(MemoryStorage(rng=random.Random(0)), EngineConfig(**config)) as engine:
        yield engine


@asynccontextmanager
async def http_server() -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    async with open_engine(MemoryStorage(), EngineConfig()) as engine:
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            addresses = await nursery.start(serve, engine, Settings(port=0), stop.wait)
            async with httpx.AsyncClient(base_url=addresses[0], timeout=10) as client:
                yield engine, client
            stop.set()


def unique(on_conflict: str = "reject", **policy: Any) -> dict[str, Any]:
    return {"on_conflict": on_conflict, **policy}


async def queued(engine: Engine, queue: str = "default") -> list[str]:
    """Ids of the jobs a fetch would hand out now, in order (claims them)."""
    return [j.id for j in await engine.fetch([queue], 1000)]


# -- unique jobs through the engine ------------------------------------------------------


async def test_unique_reject_refuses_a_duplicate_while_the_first_is_live() -> None:
    async with running_engine() as engine:
        policy = unique("reject", keys=["type", "args"])
        first = (await engine.enqueue("report.build", [1], unique=policy)).job
        with pytest.raises(DuplicateJob) as excinfo:
            await engine.enqueue("report.build", [1], unique=policy)
        assert excinfo.value.http_status == 409
        assert excinfo.value.code == "duplicate"
        assert excinfo.value.details["existing_job_id"] == first.id

        other_args = (await engine.enqueue("report.build", [2], unique=policy)).job
        other_type = (await engine.enqueue("report.other", [1], unique=policy)).job

        # Still blocked while active; released once the first job completes.
        await engine.fetch(["default"], 1)  # first is now active
        with pytest.raises(DuplicateJob):
            await engine.enqueue("report.build", [1], unique=policy)
        await engine.ack(first.id)
        again = (await engine.enqueue("report.build", [1], unique=policy)).job
        assert again.id != first.id
        assert set(await queued(engine)) == {other_args.id, other_type.id, again.id}
        assert engine.statistics().enqueued == 4


async def test_unique_default_keys_are_type_only() -> None:
    async with running_engine() as engine:
        await engine.enqueue("report.build", [1], unique={})
        with pytest.raises(DuplicateJob):
            await engine.enqueue("report.build", [2], unique={})  # args do not count


async def test_unique_ignore_returns_the_existing_job() -> None:
    async with running_engine() as engine:
        policy = unique("ignore", keys=["type", "args"])
        first = await engine.enqueue("report.build", [1], unique=policy)
        assert first is not None and first.created
        second = await engine.enqueue("report.build", [1], unique=policy)
        assert second is not None
        assert not second.created
        assert second.job.id == first.job.id
        assert second.job.state is JobState.AVAILABLE
        assert await queued(engine) == [first.job.id]
        assert engine.statistics().enqueued == 1
        assert len(engine.events.query(types=["job.enqueued"])) == 1


async def test_unique_replace_cancels_the_existing_job() -> None:
    async with running_engine() as engine:
        policy = unique("replace", keys=["type", "args"], args_keys=["user"])
        old = (await engine.enqueue("avatar.resize", [{"user": 7, "v": 1}], unique=policy)).job
        new = (await engine.enqueue("avatar.resize", [{"user": 7, "v": 2}], unique=policy)).job
        assert new.id != old.id
        assert (await engine.get(old.id)).state is JobState.CANCELLED
        (fetched,) = await engine.fetch(["default"], 10)
        assert fetched.id == new.id
        assert fetched.args == [{"user": 7, "v": 2}]


async def test_unique_replace_publishes_job_cancelled_for_the_replaced_job() -> None:
    async with running_engine() as engine:
        policy = unique("replace", keys=["type"])
        old = (await engine.enqueue("avatar.resize", [1], unique=policy)).job
        await engine.enqueue("avatar.resize", [2], unique=policy)
        assert [e["job_id"] for e in engine.events.query(types=["job.cancelled"])] == [old.id]


async def test_unique_replace_of_a_scheduled_job(autojump_clock: trio.testing.MockClock) -> None:
    async with running_engine() as engine:
        policy = unique("replace", keys=["type"])
        old = (await engine.enqueue("digest.send", [1], unique=policy, delay_ms=60_000)).job
        new = (await engine.enqueue("digest.send", [2], unique=policy, delay_ms=5_000)).job
        assert (await engine.get(old.id)).state is JobState.CANCELLED
        await trio.sleep(120.0)
        assert await queued(engine) == [new.id]  # the cancelled one is never promoted
        assert engine.statistics().promoted == 1


async def test_unique_replace_except_schedule_keeps_the_original_time() -> None:
    async with running_engine(clock=lambda: BASE) as engine:
        policy = unique("replace_except_schedule", keys=["type"])
        old = (await engine.enqueue("note.send", ["v1"], unique=policy, delay_ms=3_600_000)).job
        new = (await engine.enqueue("note.send", ["v2"], unique=policy, delay_ms=60_000)).job
        current = await engine.get(new.id)
        assert current.args == ["v2"]
        assert current.scheduled_at == old.scheduled_at == BASE + 3600.0


async def test_unique_period_expires_the_constraint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        policy = unique("reject", keys=["type"], period="PT10S")
        await engine.enqueue("ping", unique=policy)
        await trio.sleep(9.9)
        with pytest.raises(DuplicateJob):
            await engine.enqueue("ping", unique=policy)
        await trio.sleep(0.2)
        assert (await engine.enqueue("ping", unique=policy)).created


async def test_unique_states_can_include_completed() -> None:
    async with running_engine() as engine:
        policy = unique("reject", keys=["type"], states=["completed"])
        first = (await engine.enqueue("once", unique=policy)).job
        second = (await engine.enqueue("once", unique=policy)).job  # first not completed yet
        await engine.fetch(["default"], 1)
        await engine.ack(first.id)
        with pytest.raises(DuplicateJob) as excinfo:
            await engine.enqueue("once", unique=policy)
        assert excinfo.value.details["existing_job_id"] == first.id
        assert second.id != first.id


async def test_unique_queue_dimension() -> None:
    async with running_engine() as engine:
        policy = unique("reject", keys=["type", "queue"])
        await engine.enqueue("sync", queue="a", unique=policy)
        await engine.enqueue("sync", queue="b", unique=policy)
        with pytest.raises(DuplicateJob):
            await engine.enqueue("sync", queue="a", unique=policy)


async def test_unique_meta_keys_required_with_meta() -> None:
    async with running_engine() as engine:
        with pytest.raises(InvalidRequest):
            await engine.enqueue("sync", unique=unique("reject", keys=["type", "meta"]))
        policy = unique("reject", keys=["type", "meta"], meta_keys=["tenant"])
        await engine.enqueue("sync", meta={"tenant": "t1", "trace": "x"}, unique=policy)
        await engine.enqueue("sync", meta={"tenant": "t2", "trace": "x"}, unique=policy)
        with pytest.raises(DuplicateJob):
            await engine.enqueue("sync", meta={"tenant": "t1", "trace": "y"}, unique=policy)


async def test_unique_duplicates_within_one_batch() -> None:
    async with running_engine() as engine:
        body = {"type": "dedupe", "args": [], "options": {"unique": unique("reject")}}
        with pytest.raises(DuplicateJob):
            await engine.submit_many([body, {"type": "other", "args": []}, body])
        assert await queued(engine) == []  # all or nothing

        ignore = {"type": "dedupe", "args": [], "options": {"unique": unique("ignore")}}
        results = await engine.submit_many([ignore, ignore, ignore])
        assert [r.created for r in results] == [True, False, False]
        assert len({r.job.id for r in results}) == 1
        assert await queued(engine) == [results[0].job.id]


async def test_concurrent_unique_enqueues_create_exactly_one_job() -> None:
    async with running_engine() as engine:
        outcomes: list[str] = []

        async def attempt() -> None:
            try:
                await engine.enqueue("race", unique=unique("reject"))
                outcomes.append("created")
            except DuplicateJob:
                outcomes.append("duplicate")

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(attempt)
        assert sorted(outcomes) == ["created"] + ["duplicate"] * 49
        assert len(await queued(engine)) == 1


# -- unique jobs over HTTP -----------------------------------------------------------------


async def test_unique_over_http() -> None:
    async with http_server() as (_, client):

        async def post(policy: dict[str, Any], args: list[Any]) -> httpx.Response:
            return await client.post(
                "/ojs/v1/jobs",
                json={"type": "invoice.generate", "args": args, "options": {"unique": policy}},
            )

        keys = {"keys": ["type", "args"]}
        first = await post(unique("reject", **keys), [42])
        assert first.status_code == 201, first.text
        first_id = first.json()["job"]["id"]

        rejected = await post(unique("reject", **keys), [42])
        assert rejected.status_code == 409, rejected.text
        error = rejected.json()["error"]
        assert error["code"] == "duplicate"
        assert error["details"]["existing_job_id"] == first_id

        ignored = await post(unique("ignore", **keys), [42])
        assert ignored.status_code == 200, ignored.text
        assert ignored.json()["job"]["id"] == first_id
        assert ignored.json()["job"]["state"] == "available"

        replaced = await post(unique("replace", **keys), [42])
        assert replaced.status_code == 201, replaced.text
        new_id = replaced.json()["job"]["id"]
        assert new_id != first_id
        old = (await client.get(f"/ojs/v1/jobs/{first_id}")).json()["job"]
        assert old["state"] == "cancelled"

        fetched = await client.post("/ojs/v1/workers/fetch", json={"queues": ["default"]})
        assert [j["id"] for j in fetched.json()["jobs"]] == [new_id]

        bad = await post({"on_conflict": "sometimes"}, [1])
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_request"


# -- priority and FIFO ----------------------------------------------------------------------

PRIORITIES = st.integers(min_value=-100, max_value=100)
# Few distinct values make equal priorities (the FIFO part) common.
CLUSTERED = st.one_of(PRIORITIES, st.sampled_from([-100, -1, 0, 1, 100]))
EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@EXAMPLES
@given(priorities=st.lists(CLUSTERED, max_size=40), batch=st.integers(min_value=1, max_value=7))
async def test_fetch_order_is_priority_desc_then_fifo(priorities: list[int], batch: int) -> None:
    async with running_engine(clock=lambda: BASE) as engine:
        ids = []
        for n, priority in enumerate(priorities):
            ids.append((await engine.enqueue("t.job", [n], priority=priority)).job.id)
        expected = [ids[n] for n in sorted(range(len(ids)), key=lambda n: (-priorities[n], n))]
        got: list[str] = []
        while True:
            jobs = await engine.fetch(["default"], batch)
            if not jobs:
                break
            assert len(jobs) <= batch
            got.extend(j.id for j in jobs)
        assert got == expected


@EXAMPLES
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("enqueue"), CLUSTERED),
            st.tuples(st.just("fetch"), st.integers(min_value=1, max_value=5)),
        ),
        max_size=60,
    )
)
async def test_interleaved_enqueues_and_fetches_follow_the_priority_model(
    ops: list[tuple[str, int]],
) -> None:
    """A model check: whatever the interleaving, each fetch returns the best
    waiting jobs by (priority desc, enqueue order)."""
    async with running_engine(clock=lambda: BASE) as engine:
        model: list[tuple[int, int, str]] = []  # (-priority, sequence, id)
        for seq, (op, value) in enumerate(ops):
            if op == "enqueue":
                job = (await engine.enqueue("t.job", [seq], priority=value)).job
                model.append((-value, seq, job.id))
            else:
                model.sort()
                expected, model[:] = [m[2] for m in model[:value]], model[value:]
                assert [j.id for j in await engine.fetch(["default"], value)] == expected


@EXAMPLES
@given(
    jobs=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), CLUSTERED), max_size=30),
    order=st.permutations(["a", "b", "c"]),
    batch=st.integers(min_value=1, max_value=6),
)
async def test_multi_queue_fetch_follows_the_requested_queue_order(
    jobs: list[tuple[str, int]], order: list[str], batch: int
) -> None:
    """Queues are strict precedence in the order given: a lower-priority job in an
    earlier queue comes before a higher-priority job in a later one."""
    async with running_engine(clock=lambda: BASE) as engine:
        enqueued: list[tuple[str, int, int, str]] = []
        for n, (queue, priority) in enumerate(jobs):
            job = (await engine.enqueue("t.job", [n], queue=queue, priority=priority)).job
            enqueued.append((queue, priority, n, job.id))
        expected = [
            job_id
            for queue in order
            for _, _, _, job_id in sorted(
                (e for e in enqueued if e[0] == queue), key=lambda e: (-e[1], e[2])
            )
        ]
        got: list[str] = []
        while jobs_now := await engine.fetch(order, batch):
            got.extend(j.id for j in jobs_now)
        assert got == expected


async def test_multi_queue_order_beats_priority() -> None:
    async with running_engine() as engine:
        low_b = (await engine.enqueue("t.job", queue="b", priority=-100)).job
        high_a = (await engine.enqueue("t.job", queue="a", priority=100)).job
        assert [j.id for j in await engine.fetch(["b", "a"], 1)] == [low_b.id]
        assert [j.id for j in await engine.fetch(["b", "a"], 1)] == [high_a.id]


async def test_named_priorities_order_like_their_numbers() -> None:
    async with running_engine() as engine:
        names = ["LOW", "BULK", "CRITICAL", "NORMAL", "HIGH"]
        ids = {name: (await engine.enqueue("t.job", priority=name)).job.id for name in names}
        order = ["CRITICAL", "HIGH", "NORMAL", "LOW", "BULK"]
        assert await queued(engine) == [ids[n] for n in order]


async def test_priority_order_over_http() -> None:
    async with http_server() as (_, client):
        ids = {}
        for queue, priority in [("low", 50), ("high", -5), ("high", 7), ("low", 60), ("high", 7)]:
            response = await client.post(
                "/ojs/v1/jobs",
                json={
                    "type": "t.job",
                    "args": [],
                    "options": {"queue": queue, "priority": priority},
                },
            )
            assert response.status_code == 201, response.text
            ids.setdefault(queue, []).append(response.json()["job"]["id"])
        response = await client.post(
            "/ojs/v1/workers/fetch", json={"queues": ["high", "low"], "count": 10}
        )
        got = [j["id"] for j in response.json()["jobs"]]
        high, low = ids["high"], ids["low"]
        assert got == [high[1], high[2], high[0], low[1], low[0]]
