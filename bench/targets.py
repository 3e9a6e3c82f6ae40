"""What the scenarios drive: the engine embedded in-process, or the HTTP API.

A :class:`Target` offers the four operations every scenario needs (enqueue one or a
batch, fetch, ack, reset), the same way for both transports, so one scenario body
measures both.  :func:`open_target` opens one for a storage URL:

* ``embedded``: ``open_engine(open_storage(url))`` in this process; the calls are
  ``Engine.submit``/``submit_many``/``fetch``/``ack``.
* ``http``: ``python -m bench.server`` in a child process (engine + Hypercorn on an
  ephemeral port) and :class:`bench.http_client.HttpClient` pools here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import trio

from bench.http_client import HttpClient
from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.worker import JobContext
from ojs_trio.storage import open_storage

JOB_TYPE = "bench.noop"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_body(queue: str, i: int) -> dict[str, Any]:
    return {"type": JOB_TYPE, "args": [i], "options": {"queue": queue}}


class Target(Protocol):
    storage: str  # "memory" | "postgres"
    transport: str  # "embedded" | "http"

    async def enqueue(self, queue: str, n: int = 1, start: int = 0) -> None:
        """One job (n == 1: the single-job call) or a batch of ``n`` in one call."""

    async def fetch(
        self, queue: str, count: int = 1, *, wait_ms: int = 0, worker_id: str | None = None
    ) -> list[str]:
        """Claim up to ``count`` jobs; returns their ids."""
        ...

    async def ack(self, job_id: str, worker_id: str | None = None) -> None: ...

    async def reset(self) -> None: ...

    async def waiting_workers(self) -> int:
        """Workers the server has seen since the last reset (a long-poll progress probe)."""
        ...

    async def wait_caught_up(self) -> None:
        """Return once the server has worked through what it was sent.

        Only needed where ``waiting_workers`` counts from the client side: a server
        of several processes may still be parking fetches the client has sent.
        """
        ...

    def new_client(self, connections: int) -> Target:
        """A target sharing the same server but with its own connection pool (HTTP)."""
        ...

    async def aclose(self) -> None: ...


class EmbeddedTarget:
    transport = "embedded"

    def __init__(self, storage: str, engine: Engine) -> None:
        self.storage = storage
        self.engine = engine

    async def enqueue(self, queue: str, n: int = 1, start: int = 0) -> None:
        if n == 1:
            await self.engine.submit(job_body(queue, start))
        else:
            await self.engine.submit_many([job_body(queue, start + k) for k in range(n)])

    async def fetch(
        self, queue: str, count: int = 1, *, wait_ms: int = 0, worker_id: str | None = None
    ) -> list[str]:
        jobs = await self.engine.fetch([queue], count, worker_id=worker_id, wait_ms=wait_ms)
        return [job.id for job in jobs]

    async def ack(self, job_id: str, worker_id: str | None = None) -> None:
        await self.engine.ack(job_id, None, has_result=False, worker_id=worker_id)

    async def reset(self) -> None:
        await self.engine.reset()

    async def waiting_workers(self) -> int:
        return self.engine.statistics().waiting_fetches

    async def wait_caught_up(self) -> None:
        return None

    def new_client(self, connections: int) -> EmbeddedTarget:
        return self

    async def aclose(self) -> None:
        return None


class HttpError(Exception):
    pass


class HttpTarget:
    transport = "http"

    def __init__(
        self,
        storage: str,
        url: str,
        connections: int = 512,
        *,
        backend_url: str = "",
        server_processes: int = 1,
    ) -> None:
        self.storage = storage
        self.url = url
        self.backend_url = backend_url  # the server's storage URL
        self.server_processes = server_processes
        self.client = HttpClient(url, max_connections=connections)
        self._clients = [self.client]  # this one and those of new_client()

    async def _post(self, path: str, body: Any, expect: int = 200) -> dict[str, Any]:
        response = await self.client.post(path, body)
        if response.status != expect:
            raise HttpError(f"{path}: {response.status} {response.text[:200]}")
        result: dict[str, Any] = response.json()
        return result

    async def enqueue(self, queue: str, n: int = 1, start: int = 0) -> None:
        if n == 1:
            await self._post("/ojs/v1/jobs", job_body(queue, start), 201)
        else:
            jobs = [job_body(queue, start + k) for k in range(n)]
            await self._post("/ojs/v1/jobs/batch", {"jobs": jobs}, 201)

    async def fetch(
        self, queue: str, count: int = 1, *, wait_ms: int = 0, worker_id: str | None = None
    ) -> list[str]:
        body: dict[str, Any] = {"queues": [queue], "count": count, "wait_ms": wait_ms}
        if worker_id is not None:
            body["worker_id"] = worker_id
        reply = await self._post("/ojs/v1/workers/fetch", body)
        return [job["id"] for job in reply["jobs"]]

    async def ack(self, job_id: str, worker_id: str | None = None) -> None:
        body: dict[str, Any] = {"job_id": job_id}
        if worker_id is not None:
            body["worker_id"] = worker_id
        await self._post("/ojs/v1/workers/ack", body)

    async def reset(self) -> None:
        await self._post("/ojs/v1/admin/reset", {})

    async def waiting_workers(self) -> int:
        if self.server_processes > 1:
            # Each process knows only its own workers: count fetches sent in full
            # and not answered yet, from this side.
            return sum(client.awaiting for client in self._clients)
        response = await self.client.get("/ojs/v1/admin/workers")
        return len(response.json()["workers"])

    async def wait_caught_up(self, quick_ms: float = 5.0, in_a_row: int = 5) -> None:
        if self.server_processes == 1:
            return  # waiting_workers asked the server itself
        # A busy server answers slowly: wait (up to 30 s) for a run of quick health answers.
        quick = 0
        with trio.move_on_after(30):
            while quick < in_a_row:
                started = trio.current_time()
                await self.client.get("/ojs/v1/health")
                fast = (trio.current_time() - started) * 1000 < quick_ms
                quick = quick + 1 if fast else 0
                await trio.sleep(0.01)

    def new_client(self, connections: int) -> HttpTarget:
        other = HttpTarget(
            self.storage,
            self.url,
            connections,
            backend_url=self.backend_url,
            server_processes=self.server_processes,
        )
        self._clients.append(other.client)
        return other

    async def aclose(self) -> None:
        await self.client.aclose()


# -- PostgreSQL databases --------------------------------------------------------------


def pg_admin_dsn(url: str) -> str:
    """The maintenance database next to the one in ``url``."""
    base, _, _ = url.rpartition("/")
    return base + "/postgres"


def recreate_database(url: str) -> None:
    """Drop and create the database named in ``url`` (sync; before any engine opens it).

    Then a CHECKPOINT, so every run (ours and each peer's) starts with no dirty
    buffers and no checkpoint of the previous run's WAL due: without it a run
    could pay for the checkpoint its predecessor's writes triggered, and each
    first write to a page after a checkpoint logs the whole page.
    """
    import psycopg
    from psycopg import sql

    name = url.rpartition("/")[2].split("?")[0]
    with psycopg.connect(pg_admin_dsn(url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass  # needs superuser or pg_checkpoint: runs then start as they find it


def drop_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    name = url.rpartition("/")[2].split("?")[0]
    with psycopg.connect(pg_admin_dsn(url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def postgres_version(url: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(pg_admin_dsn(url), autocommit=True, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else None
    except Exception:
        return None


# -- opening targets --------------------------------------------------------------------


async def noop(ctx: JobContext) -> None:
    return None


@asynccontextmanager
async def open_embedded(storage: str, url: str) -> AsyncIterator[EmbeddedTarget]:
    async with open_engine(open_storage(url), EngineConfig()) as engine:
        engine.register(JOB_TYPE, noop)
        yield EmbeddedTarget(storage, engine)


@asynccontextmanager
async def open_http(storage: str, url: str, processes: int = 1) -> AsyncIterator[HttpTarget]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.server", "--storage", url, "--processes", str(processes)],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                if not chunk:
                    raise RuntimeError("bench.server exited before reporting its address")
                line += chunk
        server_url = json.loads(line)["url"]
        target = HttpTarget(storage, server_url, backend_url=url, server_processes=processes)
        try:
            yield target
        finally:
            await target.aclose()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(15):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


def open_target(
    transport: str, storage: str, url: str, server_processes: int = 1
) -> AbstractAsyncContextManager[Target]:
    if transport == "embedded":
        return open_embedded(storage, url)
    if transport == "http":
        return open_http(storage, url, server_processes)
    raise ValueError(f"unknown transport {transport!r}")
