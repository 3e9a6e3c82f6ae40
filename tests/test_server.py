"""The server process: signal-driven, ordered shutdown.

Acceptance: SIGTERM answers an in-flight long-poll fetch at once (``jobs: []``)
and the process exits 0.  ``run_server`` is also driven in-process through its
``shutdown`` event.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ojs_trio.config import Settings
from ojs_trio.server import run_server

LONG_POLL_MS = 30_000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_log(path: Path) -> str:
    """The server's output so far (small; read synchronously)."""
    return path.read_text(errors="replace")


def server_env(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OJS_")}
    env.update(
        OJS_HOST="127.0.0.1",
        OJS_PORT=str(port),
        OJS_LOG_LEVEL="INFO",
        OJS_GRACEFUL_TIMEOUT="5",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@asynccontextmanager
async def server_process(
    log_path: Path, *args: str, env: dict[str, str]
) -> AsyncIterator[trio.Process]:
    """``python -m ojs_trio.cli serve ...``; killed on the way out if still running."""
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ojs_trio.cli", "serve", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()


async def wait_for_health(client: httpx.AsyncClient, process: trio.Process, log: Path) -> None:
    # A hang detector, generous because CI starts this process next to busy test workers.
    with trio.fail_after(30):
        while True:
            assert process.poll() is None, read_log(log)
            try:
                response = await client.get("/ojs/v1/health")
            except httpx.TransportError:
                pass  # not listening yet
            else:
                if response.status_code == 200:
                    return
            await trio.sleep(0.05)


async def long_poll_in_background(
    client: httpx.AsyncClient, nursery: trio.Nursery, results: list[httpx.Response]
) -> None:
    """Start a long-poll fetch; return once its request has been sent in full."""
    sent = trio.Event()

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event == "http11.send_request_body.complete":
            sent.set()

    async def fetch() -> None:
        response = await client.post(
            "/ojs/v1/workers/fetch",
            json={"queues": ["default"], "wait_ms": LONG_POLL_MS},
            timeout=LONG_POLL_MS / 1000 + 5,
            extensions={"trace": trace},
        )
        results.append(response)

    nursery.start_soon(fetch)
    with trio.fail_after(5):
        await sent.wait()
    # The server has no outside signal for "this fetch is parked in a pool"; give it
    # a moment to parse the request and hand it to the engine.
    await trio.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_in_flight_long_poll_and_exits_zero(
    tmp_path: Path, signum: signal.Signals
) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    async with server_process(log, "--port", str(port), env=server_env(port)) as process:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_for_health(client, process, log)
            # The server works before we stop it.
            response = await client.post("/ojs/v1/jobs", json={"type": "a.b", "args": []})
            assert response.status_code == 201
            response = await client.post("/ojs/v1/workers/fetch", json={"queues": ["default"]})
            assert len(response.json()["jobs"]) == 1

            results: list[httpx.Response] = []
            async with trio.open_nursery() as nursery:
                await long_poll_in_background(client, nursery, results)
                assert results == []  # still waiting for a job
                signalled_at = trio.current_time()
                process.send_signal(signum)
            answered_after = trio.current_time() - signalled_at

        (response,) = results
        assert response.status_code == 200, response.text
        assert response.json()["jobs"] == []
        assert answered_after < 10.0  # drained at once, not after wait_ms (30 s)

        with trio.fail_after(15):
            code = await process.wait()
    output = read_log(log)
    assert code == 0, output
    assert "shutting down" in output
    assert "ojs-trio stopped" in output


async def test_cli_refuses_public_bind_without_api_key(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    env = server_env(port, OJS_HOST="0.0.0.0")
    async with server_process(log, env=env) as process:
        with trio.fail_after(30):
            code = await process.wait()
    assert code != 0
    assert "refusing to bind 0.0.0.0" in read_log(log)


# -- run_server in-process -------------------------------------------------------------------


async def test_run_server_in_process_serves_until_shutdown_event() -> None:
    """Regression: run_server did ``shutdown or trio.Event()``; trio.Event refuses bool()."""
    stop = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(
                partial(run_server, Settings(port=0), shutdown=stop, handle_signals=False)
            )
            assert addresses[0].startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=addresses[0], timeout=5) as client:
                health = await client.get("/ojs/v1/health")
                assert health.status_code == 200
                assert health.json()["status"] == "ok"
                response = await client.post("/ojs/v1/jobs", json={"type": "a.b", "args": []})
                assert response.status_code == 201
                job_id = response.json()["job"]["id"]
                response = await client.post("/ojs/v1/workers/fetch", json={"queues": ["default"]})
                assert [j["id"] for j in response.json()["jobs"]] == [job_id]
                response = await client.post("/ojs/v1/workers/ack", json={"job_id": job_id})
                assert response.json()["state"] == "completed"
            stopped_at = trio.current_time()
            stop.set()
        # run_server returned by itself: the nursery had nothing else to wait for.
    assert trio.current_time() - stopped_at < 5.0
    async with httpx.AsyncClient(base_url=addresses[0], timeout=2) as client:
        with pytest.raises(httpx.TransportError):
            await client.get("/ojs/v1/health")  # the listener is gone


async def test_run_server_in_process_answers_parked_fetch_empty() -> None:
    stop = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(
                partial(run_server, Settings(port=0), shutdown=stop, handle_signals=False)
            )
            async with httpx.AsyncClient(base_url=addresses[0], timeout=5) as client:
                results: list[httpx.Response] = []
                async with trio.open_nursery() as requests:
                    await long_poll_in_background(client, requests, results)
                    stopped_at = trio.current_time()
                    stop.set()
                answered_after = trio.current_time() - stopped_at
        finished_after = trio.current_time() - stopped_at
    (response,) = results
    assert response.status_code == 200, response.text
    assert response.json()["jobs"] == []
    assert answered_after < 3.0
    assert finished_after < 5.0


async def test_run_server_refuses_public_bind_without_api_key() -> None:
    with pytest.raises(SystemExit, match="refusing to bind"):
        await run_server(Settings(host="0.0.0.0", port=0), handle_signals=False)
