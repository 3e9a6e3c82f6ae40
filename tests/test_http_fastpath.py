"""The raw-ASGI fast path (ojs_trio/http/fastpath.py) answers exactly as Quart does.

Two servers run side by side, each on its own in-memory engine: one with the fast
path in front (what ``serve`` does by default), one with Quart only.  Every
request goes to both; status, headers (in order) and body must match byte for
byte once generated ids and timestamps are masked.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.errors import BackendUnavailable
from ojs_trio.engine.job import Job
from ojs_trio.http import create_app, serve
from ojs_trio.http.fastpath import HOT_ROUTES, FastPath
from ojs_trio.storage.memory import MemoryStorage

OJS_JSON = "application/openjobspec+json"
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
NO_JITTER = {"retry": {"max_attempts": 3, "jitter": False}}


@dataclass
class Side:
    name: str
    engine: Engine
    client: httpx.AsyncClient


@dataclass
class Twin:
    fast: Side
    quart: Side

    def __iter__(self) -> Iterator[Side]:
        return iter((self.fast, self.quart))

    async def same(
        self,
        method: str,
        path: str,
        build: Callable[[Side], dict[str, Any]] | None = None,
        **kw: Any,
    ) -> tuple[httpx.Response, httpx.Response]:
        """Send one request to both servers; assert the replies are the same."""
        fast, quart = [
            await side.client.request(method, path, **(build(side) if build else kw))
            for side in self
        ]
        assert fast.status_code == quart.status_code, (fast.text, quart.text)
        assert _headers(fast) == _headers(quart)
        assert _mask(fast.content) == _mask(quart.content)
        assert fast.headers["content-length"] == str(len(fast.content))
        assert fast.headers["content-type"] == OJS_JSON
        assert fast.headers["OJS-Version"] == "1.0"
        return fast, quart


def _mask(raw: bytes) -> bytes:
    return TIMESTAMP.sub(b"<ts>", UUID.sub(b"<id>", raw))


def _headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [(k, _mask(v)) for k, v in response.headers.raw if k.lower() != b"date"]


@asynccontextmanager
async def twin_servers(settings: Settings | None = None) -> AsyncIterator[Twin]:
    settings = settings or Settings(port=0)
    async with (
        open_engine(MemoryStorage(), EngineConfig()) as fast_engine,
        open_engine(MemoryStorage(), EngineConfig()) as quart_engine,
        trio.open_nursery() as nursery,
    ):
        stop = trio.Event()
        fast_url = await nursery.start(partial(serve, fast_engine, settings, stop.wait))
        quart_url = await nursery.start(
            partial(serve, quart_engine, settings, stop.wait, fast_path=False)
        )
        async with (
            httpx.AsyncClient(base_url=fast_url[0], timeout=10) as fast_client,
            httpx.AsyncClient(base_url=quart_url[0], timeout=10) as quart_client,
        ):
            yield Twin(
                Side("fast", fast_engine, fast_client), Side("quart", quart_engine, quart_client)
            )
        stop.set()


async def _enqueue(side: Side, queue: str = "q") -> str:
    response = await side.client.post(
        "/ojs/v1/jobs", json={"type": "t", "args": [1], "options": {"queue": queue, **NO_JITTER}}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["job"]["id"])


async def _claim(side: Side, queue: str = "q") -> str:
    response = await side.client.post(
        "/ojs/v1/workers/fetch", json={"queues": [queue], "worker_id": "w1"}
    )
    return str(response.json()["job"]["id"])


# -- success ---------------------------------------------------------------------------


async def test_success_replies_are_identical() -> None:
    async with twin_servers() as twin:
        job = {"type": "email.send", "args": ["a@example.com"], "options": {"queue": "q"}}
        fast, _ = await twin.same("POST", "/ojs/v1/jobs", json=job)
        assert fast.status_code == 201 and fast.headers["Location"].startswith("/ojs/v1/jobs/")
        # Own request id echoed, with either accepted content type and a charset.
        for content_type in (OJS_JSON, "application/json; charset=utf-8"):
            fast, _ = await twin.same(
                "POST",
                "/ojs/v1/jobs",
                json=job,
                headers={"X-Request-Id": "req-fixed", "Content-Type": content_type},
            )
            assert fast.headers["X-Request-Id"] == "req-fixed"
        # No content type at all is accepted too.
        await twin.same("POST", "/ojs/v1/jobs", content=b'{"type":"x","args":[]}')
        # Batch, both as an object and as a bare array.
        fast, _ = await twin.same("POST", "/ojs/v1/jobs/batch", json={"jobs": [job, job]})
        assert fast.status_code == 201 and fast.json()["count"] == 2
        await twin.same("POST", "/ojs/v1/jobs/batch", json=[job])
        # Fetch: several jobs, one job (single "queue"), then an empty queue.
        fetch = {"queues": ["q"], "max_jobs": 2, "worker_id": "w1", "visibility_timeout_ms": 60000}
        fast, _ = await twin.same("POST", "/ojs/v1/workers/fetch", json=fetch)
        assert len(fast.json()["jobs"]) == 2
        await twin.same("POST", "/ojs/v1/workers/fetch", json={"queue": "q", "count": 1})
        await twin.same("POST", "/ojs/v1/workers/fetch", json={"queues": ["empty"]})

        ids = {side.name: [await _enqueue(side, "w") for _ in range(3)] for side in twin}
        for side in twin:
            for _ in range(3):
                await _claim(side, "w")

        def body(index: int, **extra: Any) -> Callable[[Side], dict[str, Any]]:
            return lambda side: {"json": {"job_id": ids[side.name][index], **extra}}

        fast, _ = await twin.same(
            "POST", "/ojs/v1/workers/ack", body(0, result={"ok": True}, worker_id="w1")
        )
        assert fast.json()["state"] == "completed"
        fast, _ = await twin.same(
            "POST", "/ojs/v1/workers/nack", body(1, error={"message": "boom"})
        )
        assert fast.json()["state"] == "retryable"
        fast, _ = await twin.same(
            "POST",
            "/ojs/v1/workers/heartbeat",
            lambda side: {"json": {"worker_id": "w1", "active_jobs": ids[side.name][2:]}},
        )
        assert fast.json()["jobs_extended"]
        await twin.same(
            "POST", "/ojs/v1/workers/heartbeat", json={"worker_id": "w2", "job_id": "nope"}
        )
        await twin.same("POST", "/ojs/v1/workers/heartbeat", json={"worker_id": "w3"})


async def test_enqueue_dropped_by_middleware_is_identical() -> None:
    async def drop(job: Job, call_next: Any) -> Job | None:
        return None

    async with twin_servers() as twin:
        for side in twin:
            side.engine.use_enqueue(drop)
        fast, _ = await twin.same("POST", "/ojs/v1/jobs", json={"type": "t", "args": []})
        assert fast.status_code == 200 and fast.json() == {"job": None, "dropped": True}


# -- errors ----------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("wrong content type", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}),
    ("empty body", {"content": b"", "headers": {"Content-Type": OJS_JSON}}),
    ("malformed json", {"content": b"{not json", "headers": {"Content-Type": OJS_JSON}}),
    ("not utf-8", {"content": b'{"a":"\xff"}', "headers": {"Content-Type": OJS_JSON}}),
    ("array", {"json": [1, 2]}),
    ("string", {"json": "job"}),
    ("empty object", {"json": {}}),
    ("wrong field types", {"json": {"type": 1, "queues": "q", "job_id": 2, "worker_id": 3}}),
    ("bad numbers", {"json": {"queues": ["q"], "count": 0, "wait_ms": -1, "job_id": "x"}}),
    ("bad requeue", {"json": {"job_id": "x", "requeue": "yes", "worker_id": "w"}}),
    ("bad error", {"json": {"job_id": "x", "error": "boom", "worker_id": "w"}}),
    ("bad active_jobs", {"json": {"worker_id": "w", "active_jobs": [1]}}),
    ("unknown job", {"json": {"job_id": "01890000-0000-7000-8000-000000000000"}}),
]


@pytest.mark.parametrize("path", sorted(HOT_ROUTES))
async def test_bad_requests_get_identical_errors(path: str) -> None:
    async with twin_servers() as twin:
        for _, request in BAD_BODIES:
            fast, _ = await twin.same("POST", path, **request)
            assert fast.status_code >= 400 or path == "/ojs/v1/workers/heartbeat"
        # Too many jobs in a batch, and a batch holding an invalid job.
        await twin.same("POST", path, json={"jobs": [{"type": "t", "args": []}] * 1001})
        await twin.same("POST", path, json={"jobs": [{"type": "t", "args": []}, {"args": []}]})


@pytest.mark.parametrize("path", sorted(HOT_ROUTES))
async def test_unsupported_content_type_gives_identical_400(path: str) -> None:
    """ojs-http-binding.md 4.1: 400 (not 415); an oversized body is still 413 first."""
    async with twin_servers(Settings(port=0, max_body_bytes=64)) as twin:
        headers = {"Content-Type": "text/csv"}
        fast, _ = await twin.same("POST", path, content=b"{}", headers=headers)
        error = fast.json()["error"]
        assert (fast.status_code, error["code"]) == (400, "invalid_request")
        assert error["details"] == {
            "content_type": "text/csv",
            "accepted": [OJS_JSON, "application/json"],
        }
        fast, _ = await twin.same("POST", path, content=b"x" * 100, headers=headers)
        assert (fast.status_code, fast.json()["error"]["code"]) == (413, "payload_too_large")


@pytest.mark.parametrize("path", sorted(HOT_ROUTES))
async def test_body_limit_gives_identical_413(path: str) -> None:
    async with twin_servers(Settings(port=0, max_body_bytes=64)) as twin:
        big = b'{"type":"t","args":["' + b"x" * 100 + b'"]}'
        fast, _ = await twin.same("POST", path, content=big, headers={"Content-Type": OJS_JSON})
        assert fast.status_code == 413 and f"of {len(big)} bytes" in fast.json()["error"]["message"]

        def chunked(side: Side) -> dict[str, Any]:
            async def chunks() -> AsyncIterator[bytes]:
                yield big[:50]
                yield big[50:]

            return {"content": chunks(), "headers": {"Content-Type": OJS_JSON}}

        fast, _ = await twin.same("POST", path, chunked)
        assert fast.status_code == 413 and "exceeds the limit" in fast.json()["error"]["message"]
        # A small chunked body is read and parsed as usual.
        await twin.same(
            "POST",
            path,
            lambda side: {"content": _single_chunk(b"[]"), "headers": {"Content-Type": OJS_JSON}},
        )


async def _single_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.mark.parametrize("path", sorted(HOT_ROUTES))
async def test_api_key_gives_identical_401(path: str) -> None:
    async with twin_servers(Settings(port=0, api_key="sekret")) as twin:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekret"}):
            fast, _ = await twin.same("POST", path, content=b"{not json", headers=headers)
            assert fast.status_code == 401
            assert fast.headers["WWW-Authenticate"] == 'Bearer realm="ojs"'
        fast, _ = await twin.same("POST", path, json={}, headers={"Authorization": "bearer sekret"})
        assert fast.status_code not in (401, 500)
        for side in twin:
            assert side.engine.statistics().enqueued == 0


async def test_crashes_and_backend_errors_are_identical(caplog: pytest.LogCaptureFixture) -> None:
    async with twin_servers() as twin:
        original = {side.name: side.engine.submit for side in twin}

        async def crash(body: Any) -> Any:
            raise RuntimeError("bug")

        async def unavailable(body: Any) -> Any:
            raise BackendUnavailable("storage is down")

        for fault, status in ((crash, 500), (unavailable, 503)):
            for side in twin:
                side.engine.submit = fault  # type: ignore[method-assign]
            fast, _ = await twin.same("POST", "/ojs/v1/jobs", json={"type": "t", "args": []})
            assert fast.status_code == status
            assert ("Retry-After" in fast.headers) == (status == 503)
        for side in twin:
            side.engine.submit = original[side.name]  # type: ignore[method-assign]
        await twin.same("POST", "/ojs/v1/jobs", json={"type": "t", "args": []})
    crashes = [r for r in caplog.records if r.getMessage().startswith("unhandled error on POST")]
    backend = [r for r in caplog.records if r.getMessage().startswith("backend error on POST")]
    assert len(crashes) == 2 and len(backend) == 2  # logged once per server


# -- routing and connection handling ---------------------------------------------------


async def test_only_hot_routes_bypass_quart() -> None:
    async with open_engine(MemoryStorage(), EngineConfig()) as engine:
        fast = FastPath(create_app(engine, Settings(port=0)))
        reached: list[tuple[str, str]] = []

        async def quart(scope: Any, receive: Any, send: Any) -> None:
            reached.append((scope.get("method", scope["type"]), scope.get("path", "")))

        fast.app = quart
        body = b'{"type":"t","args":[]}'

        async def call(method: str, path: str, root_path: str = "") -> list[dict[str, Any]]:
            sent: list[dict[str, Any]] = []
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop()
                await trio.sleep_forever()
                raise AssertionError

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": method,
                "path": path,
                "root_path": root_path,
                "headers": [(b"content-type", b"application/json")],
            }
            await fast(scope, receive, send)  # type: ignore[arg-type]
            return sent

        for path in HOT_ROUTES:
            sent = await call("POST", path)
            assert sent[0]["type"] == "http.response.start"
        assert reached == []
        passed = [
            ("GET", "/ojs/v1/jobs"),
            ("PUT", "/ojs/v1/jobs"),
            ("POST", "/ojs/v1/jobs/"),
            ("POST", "/ojs/v1/workers/fetch/x"),
            ("POST", "/ojs/v1/queues"),
            ("GET", "/ojs/v1/health"),
        ]
        for method, path in passed:
            assert await call(method, path) == []
        await call("POST", "/ojs/v1/jobs", root_path="/prefix")
        await fast({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
        assert reached == [*passed, ("POST", "/ojs/v1/jobs"), ("lifespan", "")]


@pytest.mark.parametrize("fast_path", [True, False])
async def test_client_disconnect_cancels_a_long_poll(fast_path: bool) -> None:
    """An abandoned long-poll must not claim (and so lose) the next job."""
    settings = Settings(port=0)
    async with (
        open_engine(MemoryStorage(), EngineConfig()) as engine,
        trio.open_nursery() as nursery,
    ):
        stop = trio.Event()
        urls = await nursery.start(partial(serve, engine, settings, stop.wait, fast_path=fast_path))
        async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    "/ojs/v1/workers/fetch",
                    json={"queues": ["lp"], "wait_ms": 10_000},
                    timeout=httpx.Timeout(10, read=0.3),
                )
            await trio.sleep(0.2)  # the server sees the disconnect
            job = {"type": "t", "args": [], "options": {"queue": "lp"}}
            job_id = (await client.post("/ojs/v1/jobs", json=job)).json()["job"]["id"]
            response = await client.post("/ojs/v1/workers/fetch", json={"queues": ["lp"]})
            assert [j["id"] for j in response.json()["jobs"]] == [job_id]
        stop.set()


async def _read_to_close(url: str, request: bytes) -> bytes:
    """Send one raw request; everything the server sends until it closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(5):  # the server must close; a hang fails here
            while chunk := await stream.receive_some():
                received += chunk
        return received


@pytest.mark.parametrize("wait_ms", [0, 200])
async def test_a_fetch_asking_for_connection_close_gets_its_reply_and_the_close(
    wait_ms: int,
) -> None:
    # A client that reads a reply to the end (HTTP/1.0 style) must not be left waiting:
    # with the disconnect watcher still receiving, Hypercorn kept the connection open.
    body = b'{"queues": ["cc"], "wait_ms": %d}' % wait_ms
    request = (
        b"POST /ojs/v1/workers/fetch HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"Content-Type: application/openjobspec+json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    async with twin_servers() as twin:
        job_id = await _enqueue(twin.fast, "cc")
        url = str(twin.fast.client.base_url)
        first = await _read_to_close(url, request)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert job_id.encode() in first
        empty = await _read_to_close(url, request)  # nothing left: waits wait_ms first
        assert empty.startswith(b"HTTP/1.1 200 ") and empty.endswith(b'{"jobs":[]}')


async def test_a_quart_route_asking_for_connection_close_gets_the_close() -> None:
    # Quart-Trio's disconnect watcher has a receive() pending as the reply ends.
    async with twin_servers() as twin:
        url = str(twin.fast.client.base_url)
        for path in (b"/ojs/v1/health", b"/ojs/v1/queues"):
            reply = await _read_to_close(
                url, b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path
            )
            assert reply.startswith(b"HTTP/1.1 200 "), reply
        # Keep-alive still holds: two requests on one connection.
        for _ in range(2):
            assert (await twin.fast.client.get("/ojs/v1/health")).status_code == 200
