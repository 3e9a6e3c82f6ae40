"""Server-Sent Event streams over a real Hypercorn server on an ephemeral port.

Streams are read with httpx's streaming API.  A stream's subscription exists
once its first (comment) frame has arrived, so each test waits for that frame
before causing events; every wait has a real-time deadline.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.http import serve
from ojs_trio.storage.memory import MemoryStorage

OJS_JSON = "application/openjobspec+json"
MISSING = "01890000-0000-7000-8000-000000000000"
DEADLINE = 10.0  # real seconds for any single wait


@asynccontextmanager
async def http_server(**config: Any) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    settings = Settings(port=0, graceful_timeout=1.0)
    async with open_engine(MemoryStorage(), EngineConfig(**config)) as engine:
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            addresses = await nursery.start(serve, engine, settings, stop.wait)
            async with httpx.AsyncClient(base_url=addresses[0], timeout=DEADLINE) as client:
                yield engine, client
            stop.set()


@dataclass
class Frame:
    event: str | None = None
    data: str | None = None
    id: str | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


class SseReader:
    """Parses an ``text/event-stream`` body frame by frame."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def frame(self) -> Frame:
        frame = Frame()
        seen = False
        with trio.fail_after(DEADLINE):
            async for line in self._lines:
                if line == "":
                    if seen:
                        return frame
                    continue
                seen = True
                if line.startswith(":"):
                    frame.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    frame.event = value
                elif name == "data":
                    frame.data = value if frame.data is None else frame.data + "\n" + value
                elif name == "id":
                    frame.id = value
        raise AssertionError("the event stream ended")

    async def event(self) -> Frame:
        """The next frame that carries an event (skipping comments/keepalives)."""
        while True:
            frame = await self.frame()
            if frame.event is not None:
                return frame

    async def events_until(self, event_type: str, job_id: str) -> list[Frame]:
        frames = []
        while True:
            frame = await self.event()
            frames.append(frame)
            if frame.event == event_type and frame.json().get("job_id") == job_id:
                return frames


@asynccontextmanager
async def open_stream(client: httpx.AsyncClient, path: str) -> AsyncIterator[SseReader]:
    async with client.stream("GET", path) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        reader = SseReader(response)
        hello = await reader.frame()  # the subscription exists from here on
        assert hello.event is None and hello.comments
        yield reader


async def wait_for_subscribers(engine: Engine, count: int) -> None:
    with trio.fail_after(DEADLINE):
        while True:
            if engine.events.statistics().subscribers == count:
                return
            await trio.sleep(0.01)


async def test_job_stream_carries_only_that_jobs_events() -> None:
    async with http_server() as (engine, client):
        watched = (await engine.enqueue("t.watched")).job
        other = (await engine.enqueue("t.other")).job
        async with open_stream(client, f"/ojs/v1/jobs/{watched.id}/events") as stream:
            assert engine.events.statistics().subscribers == 1
            fetched = await engine.fetch(["default"], 2, worker_id="w1")
            assert {j.id for j in fetched} == {watched.id, other.id}
            await engine.ack(other.id, worker_id="w1")  # before ours: must not show up
            await engine.ack(watched.id, {"ok": True}, worker_id="w1")

            frames = await stream.events_until("job.completed", watched.id)
            assert [f.event for f in frames] == ["job.started", "job.completed"]
            for frame in frames:
                body = frame.json()
                assert body["job_id"] == watched.id
                assert body["type"] == frame.event
                assert frame.id == body["id"]
            assert frames[0].json()["data"]["worker_id"] == "w1"
            assert frames[1].json()["state"] == "completed"
        await wait_for_subscribers(engine, 0)  # closing the stream unsubscribes


async def test_job_stream_types_filter() -> None:
    async with http_server() as (engine, client):
        job = (await engine.enqueue("t.job")).job
        path = f"/ojs/v1/jobs/{job.id}/events?types=job.completed"
        async with open_stream(client, path) as stream:
            await engine.fetch(["default"])
            await engine.ack(job.id)
            frame = await stream.event()
            assert frame.event == "job.completed"  # job.started was filtered out


async def test_queue_stream_carries_only_that_queue() -> None:
    async with http_server() as (engine, client):
        async with open_stream(client, "/ojs/v1/queues/mail/events") as stream:
            noise = (await engine.enqueue("t.job", queue="other")).job
            mine = (await engine.enqueue("t.job", queue="mail")).job
            await engine.fetch(["other", "mail"], 2)
            await engine.ack(noise.id)
            await engine.ack(mine.id)

            frames = await stream.events_until("job.completed", mine.id)
            assert [f.event for f in frames] == ["job.enqueued", "job.started", "job.completed"]
            assert {f.json()["queue"] for f in frames} == {"mail"}
            assert {f.json()["job_id"] for f in frames} == {mine.id}


async def test_unknown_job_is_a_404_before_any_stream() -> None:
    async with http_server() as (engine, client):
        async with client.stream("GET", f"/ojs/v1/jobs/{MISSING}/events") as response:
            body = await response.aread()
        assert response.status_code == 404
        assert response.headers["content-type"].startswith(OJS_JSON)
        error = json.loads(body)["error"]
        assert error["code"] == "not_found"
        assert error["details"]["job_id"] == MISSING
        assert engine.events.statistics().subscribers == 0


async def test_slow_subscriber_does_not_block_the_engine_and_is_told_what_it_lost() -> None:
    async with http_server(event_subscriber_buffer=2) as (engine, client):
        async with open_stream(client, "/ojs/v1/queues/bulk/events") as stream:
            # Publish far more than the buffer holds while nobody reads the stream.
            total = 0
            with trio.fail_after(DEADLINE):
                for n in range(10):
                    bodies = [
                        {"type": "t.job", "args": [n, i], "options": {"queue": "bulk"}}
                        for i in range(100)
                    ]
                    results = await engine.submit_many(bodies)
                    total += len(results)
                # The engine carries on serving meanwhile.
                jobs = await engine.fetch(["bulk"], 5)
                for job in jobs:
                    await engine.ack(job.id)
                    total += 2  # job.started, job.completed
            assert engine.statistics().enqueued == 1000
            assert engine.events.statistics().dropped > 0

            # Now read: a dropped frame says how much was lost; nothing is lost silently.
            received, dropped, drop_frames = 0, 0, 0
            with trio.fail_after(DEADLINE):
                while received + dropped < total:
                    frame = await stream.event()
                    if frame.event == "dropped":
                        drop_frames += 1
                        dropped += frame.json()["dropped"]
                    else:
                        assert frame.json()["queue"] == "bulk"
                        received += 1
            assert drop_frames >= 1
            assert dropped > 0
            assert received + dropped == total
            assert dropped == engine.events.statistics().dropped

            # After catching up the stream flows normally again.
            late = (await engine.enqueue("t.late", queue="bulk")).job
            frame = await stream.event()
            assert (frame.event, frame.json()["job_id"]) == ("job.enqueued", late.id)


async def test_stalled_client_never_blocks_enqueue() -> None:
    """Even with the client never reading at all (its socket buffer fills up),
    publishing stays synchronous and cheap."""
    async with http_server(event_subscriber_buffer=2) as (engine, client):
        async with open_stream(client, "/ojs/v1/events/stream"):
            with trio.fail_after(DEADLINE):
                for n in range(20):
                    await engine.submit_many(
                        [{"type": "t.job", "args": ["x" * 1000, n, i]} for i in range(100)]
                    )
            assert engine.statistics().enqueued == 2000
            assert engine.events.statistics().dropped >= 2000 - 2 - 100
        await wait_for_subscribers(engine, 0)
