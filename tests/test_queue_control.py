"""Queue control: pause/resume, stats, bulk enqueue, rate and concurrency limits.

HTTP tests run against a real Hypercorn server on an ephemeral port; the
timer-dependent limits run at engine level under
``MockClock(autojump_threshold=0)`` with the engine's wall clock at
``BASE + trio.current_time()``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.errors import InvalidRequest
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.http import serve
from ojs_trio.storage.memory import MemoryStorage

OJS_JSON = "application/openjobspec+json"
BASE = 1_700_000_000.0


def wall() -> float:
    return BASE + trio.current_time()


@asynccontextmanager
async def http_server(**config: Any) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    async with open_engine(MemoryStorage(), EngineConfig(**config)) as engine:
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            addresses = await nursery.start(serve, engine, Settings(port=0), stop.wait)
            async with httpx.AsyncClient(base_url=addresses[0], timeout=10) as client:
                yield engine, client
            stop.set()


@asynccontextmanager
async def running_engine(**config: Any) -> AsyncIterator[Engine]:
    config.setdefault("clock", wall)
    async with open_engine(MemoryStorage(rng=random.Random(0)), EngineConfig(**config)) as engine:
        yield engine


async def enqueue(client: httpx.AsyncClient, queue: str, **options: Any) -> str:
    response = await client.post(
        "/ojs/v1/jobs", json={"type": "t.job", "args": [], "options": {"queue": queue, **options}}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["job"]["id"])


async def fetch(client: httpx.AsyncClient, *queues: str, **body: Any) -> list[str]:
    response = await client.post(
        "/ojs/v1/workers/fetch", json={"queues": list(queues), "count": 100, **body}
    )
    assert response.status_code == 200, response.text
    return [j["id"] for j in response.json()["jobs"]]


async def stats(client: httpx.AsyncClient, queue: str) -> dict[str, Any]:
    response = await client.get(f"/ojs/v1/queues/{queue}/stats")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(OJS_JSON)
    return dict(response.json()["queue"])


# -- pause / resume ---------------------------------------------------------------------


async def test_pause_holds_delivery_but_accepts_jobs_and_resume_delivers() -> None:
    async with http_server() as (_, client):
        response = await client.post("/ojs/v1/queues/mail/pause")
        assert response.status_code == 200, response.text
        queue = response.json()["queue"]
        assert (queue["name"], queue["status"], queue["paused"]) == ("mail", "paused", True)

        held = [await enqueue(client, "mail") for _ in range(3)]  # enqueue still accepted
        other = await enqueue(client, "other")
        assert await fetch(client, "mail") == []
        assert await fetch(client, "mail", "other") == [other]  # other queues unaffected
        paused = await stats(client, "mail")
        assert paused["paused"] is True and paused["status"] == "paused"
        assert paused["available"] == 3

        listed = (await client.get("/ojs/v1/queues")).json()["queues"]
        assert {q["name"]: q["status"] for q in listed} == {"mail": "paused", "other": "active"}

        response = await client.post("/ojs/v1/queues/mail/resume")
        assert response.status_code == 200, response.text
        assert response.json()["queue"]["status"] == "active"
        assert await fetch(client, "mail") == held
        assert (await stats(client, "mail"))["active"] == 3


async def test_long_poll_on_a_paused_queue_is_answered_by_resume() -> None:
    async with http_server() as (_, client):
        await client.post("/ojs/v1/queues/mail/pause")
        job = await enqueue(client, "mail")
        got: list[list[str]] = []

        async def long_poll() -> None:
            got.append(await fetch(client, "mail", wait_ms=30_000))

        with trio.fail_after(10):  # well before the 30 s wait would run out
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                await trio.sleep(0.2)
                assert got == []
                await client.post("/ojs/v1/queues/mail/resume")
        assert got == [[job]]


async def test_pause_and_resume_are_exact_at_engine_level(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        await engine.pause_queue("mail")
        job = (await engine.enqueue("t.job", queue="mail")).job
        returned: list[float] = []

        async def long_poll() -> None:
            jobs = await engine.fetch(["mail"], wait_ms=30_000)
            assert [j.id for j in jobs] == [job.id]
            returned.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.sleep(5.0)
            assert returned == []
            resumed_at = trio.current_time()
            await engine.resume_queue("mail")
        assert returned == [pytest.approx(resumed_at, abs=1e-6)]  # woken, not polled


async def test_pause_and_resume_of_an_unknown_queue_name() -> None:
    async with http_server() as (_, client):
        response = await client.post("/ojs/v1/queues/Not%20Valid/pause")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_request"
        response = await client.get("/ojs/v1/queues/nothing-here/stats")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


# -- stats ---------------------------------------------------------------------------------


async def test_stats_counts_and_throughput() -> None:
    async with http_server() as (_, client):
        retry_once = {"retry": {"max_attempts": 1}}
        ids = [await enqueue(client, "work", **retry_once) for _ in range(7)]
        await enqueue(client, "work", delay_ms=3_600_000)
        fetched = await fetch(client, "work", worker_id="w1")
        assert fetched == ids
        for job_id in fetched[:3]:
            response = await client.post(
                "/ojs/v1/workers/ack", json={"job_id": job_id, "worker_id": "w1"}
            )
            assert response.status_code == 200, response.text
        response = await client.post(
            "/ojs/v1/workers/nack",
            json={"job_id": fetched[3], "worker_id": "w1", "error": {"code": "x", "message": "y"}},
        )
        assert response.status_code == 200, response.text
        await client.delete(f"/ojs/v1/jobs/{fetched[4]}")

        queue = await stats(client, "work")
        assert queue["counts"]["completed"] == 3
        assert queue["counts"]["discarded"] == 1
        assert queue["counts"]["cancelled"] == 1
        assert queue["counts"]["active"] == 2
        assert queue["counts"]["scheduled"] == 1
        assert queue["counts"]["available"] == 0
        assert queue["total"] == 8
        assert queue["completed"] == 3 and queue["active"] == 2  # also at top level
        assert queue["throughput"] == {
            "completed_last_minute": 3,
            "failed_last_minute": 1,
            "per_second": 0.05,
        }
        assert queue["status"] == "active"


async def test_throughput_window_slides(autojump_clock: trio.testing.MockClock) -> None:
    async with running_engine() as engine:
        for _ in range(4):
            job = (await engine.enqueue("t.job", queue="work")).job
            await engine.fetch(["work"])
            await engine.ack(job.id)
        failing = (await engine.enqueue("t.job", queue="work", retry={"max_attempts": 1})).job
        await engine.fetch(["work"])
        await engine.nack(failing.id, Failure(code="x", message="y"))
        info = await engine.queue_info("work")
        assert (info.completed_last_minute, info.failed_last_minute) == (4, 1)
        await trio.sleep(61.0)
        info = await engine.queue_info("work")
        assert (info.completed_last_minute, info.failed_last_minute) == (0, 0)
        assert info.counts["completed"] == 4  # counts are not windowed


# -- bulk enqueue --------------------------------------------------------------------------


async def test_bulk_enqueue_of_a_thousand_jobs_in_one_request() -> None:
    async with http_server() as (engine, client):
        jobs = [
            {"type": "bulk.item", "args": [n], "options": {"queue": "bulk"}} for n in range(1000)
        ]
        response = await client.post("/ojs/v1/jobs/batch", json={"jobs": jobs})
        assert response.status_code == 201, response.text[:500]
        body = response.json()
        assert (body["count"], body["created"]) == (1000, 1000)
        assert [j["args"] for j in body["jobs"]] == [[n] for n in range(1000)]
        assert len({j["id"] for j in body["jobs"]}) == 1000
        assert all(j["state"] == "available" for j in body["jobs"])

        queue = await stats(client, "bulk")
        assert queue["available"] == 1000
        assert queue["total"] == 1000
        assert engine.statistics().enqueued == 1000
        first = await fetch(client, "bulk")
        assert first == [j["id"] for j in body["jobs"][:100]]  # FIFO, in request order


async def test_bulk_enqueue_is_atomic_when_an_item_is_invalid() -> None:
    async with http_server() as (engine, client):
        jobs: list[Any] = [
            {"type": "bulk.item", "args": [n], "options": {"queue": "bulk"}} for n in range(1000)
        ]
        jobs[17] = {"type": "bulk.item", "options": {"queue": "bulk"}}  # no args
        jobs[640] = {"type": "Not A Type!", "args": [], "options": {"queue": "bulk"}}
        jobs[999] = "not an object"
        response = await client.post("/ojs/v1/jobs/batch", json={"jobs": jobs})
        assert response.status_code == 400, response.text[:500]
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        errors = error["details"]["errors"]
        assert [e["index"] for e in errors] == [17, 640, 999]
        assert all(isinstance(e["message"], str) and e["message"] for e in errors)
        assert all(e["code"] == "invalid_request" for e in errors)

        assert engine.statistics().enqueued == 0
        missing = await client.get("/ojs/v1/queues/bulk/stats")
        assert missing.status_code == 404  # the queue was never even created
        assert await fetch(client, "bulk") == []


async def test_bulk_enqueue_with_a_duplicate_id_creates_nothing() -> None:
    async with http_server() as (engine, client):
        job_id = "01890000-0000-7000-8000-00000000abcd"
        jobs = [
            {"type": "bulk.item", "args": [1], "id": job_id},
            {"type": "bulk.item", "args": [2]},
            {"type": "bulk.item", "args": [3], "id": job_id},
        ]
        response = await client.post("/ojs/v1/jobs/batch", json={"jobs": jobs})
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "duplicate"
        assert engine.statistics().enqueued == 0
        assert await fetch(client, "default") == []


@pytest.mark.parametrize("body", [{"jobs": []}, {"jobs": "x"}, {}, []])
async def test_bulk_enqueue_rejects_a_malformed_batch(body: Any) -> None:
    async with http_server() as (_, client):
        response = await client.post("/ojs/v1/jobs/batch", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_request"


async def test_bulk_enqueue_limit_is_enforced() -> None:
    async with open_engine(MemoryStorage(), EngineConfig()) as engine:
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            settings = Settings(port=0, max_batch_jobs=10)
            addresses = await nursery.start(serve, engine, settings, stop.wait)
            async with httpx.AsyncClient(base_url=addresses[0], timeout=10) as client:
                jobs = [{"type": "t.job", "args": []}] * 11
                response = await client.post("/ojs/v1/jobs/batch", json={"jobs": jobs})
                assert response.status_code == 400
                assert response.json()["error"]["details"]["count"] == 11
            stop.set()


async def test_engine_submit_many_reports_every_invalid_index() -> None:
    async with running_engine() as engine:
        with pytest.raises(InvalidRequest) as excinfo:
            await engine.submit_many(
                [
                    {"type": "ok", "args": []},
                    {"type": "ok"},
                    {"args": []},
                    {"type": "ok", "args": []},
                ]
            )
        assert [e["index"] for e in excinfo.value.details["errors"]] == [1, 2]
        assert engine.statistics().enqueued == 0


# -- rate and concurrency limits (MockClock) -------------------------------------------------


async def test_rate_limit_one_per_second(autojump_clock: trio.testing.MockClock) -> None:
    async with running_engine() as engine:
        limit = {"max_per_second": 1}
        ids = [(await engine.enqueue("t.job", queue="limited", rate_limit=limit)).job.id]
        ids += [(await engine.enqueue("t.job", queue="limited")).job.id for _ in range(4)]
        free = (await engine.enqueue("t.job", queue="free")).job
        start = trio.current_time()

        got = [j.id for j in await engine.fetch(["limited"], 10)]
        assert got == ids[:1]  # one start per second, however many are asked for
        assert await engine.fetch(["limited"], 10) == []
        assert [j.id for j in await engine.fetch(["limited", "free"], 10)] == [free.id]

        await trio.sleep_until(start + 0.999)
        assert await engine.fetch(["limited"], 10) == []
        for n in range(1, 5):
            await trio.sleep_until(start + n)
            got = [j.id for j in await engine.fetch(["limited"], 10)]
            assert got == [ids[n]], f"second {n}"
            assert await engine.fetch(["limited"], 10) == []

        info = await engine.queue_info("limited")
        assert info.rate_limit == {"limit": 1, "window_ms": 1000}


async def test_rate_limited_long_poll_gets_the_next_job_when_the_window_opens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_engine() as engine:
        limit = {"max_per_second": 1}
        for _ in range(3):
            await engine.enqueue("t.job", queue="limited", rate_limit=limit)
        start = trio.current_time()
        times = []
        for _ in range(3):
            jobs = await engine.fetch(["limited"], 10, wait_ms=30_000)
            assert len(jobs) == 1
            times.append(trio.current_time() - start)
        assert times[0] == 0.0
        # Each next start waits for the window: at least 1 s apart, and no later than
        # one idle re-check of the fetcher after the window opened.
        for earlier, later in itertools.pairwise(times):
            assert 1.0 <= later - earlier <= 2.0


async def test_rate_limit_per_minute_over_http_stats() -> None:
    async with http_server() as (_, client):
        await enqueue(client, "slow", rate_limit={"max_per_minute": 2})
        await enqueue(client, "slow")
        await enqueue(client, "slow")
        assert len(await fetch(client, "slow")) == 2
        assert await fetch(client, "slow") == []
        queue = await stats(client, "slow")
        assert queue["rate_limit"] == {"limit": 2, "window_ms": 60_000}


async def test_concurrency_limit_caps_active_jobs() -> None:
    async with running_engine() as engine:
        ids = [(await engine.enqueue("t.job", queue="capped", concurrency=2)).job.id]
        ids += [(await engine.enqueue("t.job", queue="capped")).job.id for _ in range(3)]
        first = await engine.fetch(["capped"], 10)
        assert [j.id for j in first] == ids[:2]
        assert await engine.fetch(["capped"], 10) == []
        await engine.ack(first[0].id)
        assert [j.id for j in await engine.fetch(["capped"], 10)] == [ids[2]]
        assert (await engine.queue_info("capped")).concurrency == 2


async def test_invalid_rate_limit_is_rejected() -> None:
    async with running_engine() as engine:
        with pytest.raises(InvalidRequest):
            await engine.enqueue("t.job", rate_limit={"max_per_second": 0})
        with pytest.raises(InvalidRequest):
            await engine.enqueue("t.job", concurrency=-1)
