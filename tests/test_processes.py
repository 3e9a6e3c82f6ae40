"""``ojs-trio serve --processes N``: children sharing one socket and one database.

The children are found through ``/proc`` (their parent pid), so these tests are
Linux-only, as CI is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pg_fixtures
import pytest
import trio
from pg_fixtures import storage_url
from test_server import free_port, read_log, server_env, server_process, wait_for_health

from ojs_trio.config import Settings
from ojs_trio.processes import run_processes

pg_dsn = pg_fixtures.pg_dsn
pg_template = pg_fixtures.pg_template
fresh_db = pg_fixtures.fresh_db

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


async def wait_until(condition: Callable[[], bool], within: float = 30.0) -> None:
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110 (polls /proc: nothing to wait on)
            await trio.sleep(0.05)


async def full_cycle(client: httpx.AsyncClient) -> None:
    response = await client.post("/ojs/v1/jobs", json={"type": "a.b", "args": [1]})
    assert response.status_code == 201, response.text
    job_id = response.json()["job"]["id"]
    response = await client.post("/ojs/v1/workers/fetch", json={"queues": ["default"]})
    assert [j["id"] for j in response.json()["jobs"]] == [job_id]
    response = await client.post("/ojs/v1/workers/ack", json={"job_id": job_id})
    assert response.json()["state"] == "completed"


async def test_processes_share_the_port_restart_a_dead_child_and_stop_together(
    fresh_db: str,
) -> None:
    settings = Settings(port=0, storage_url=storage_url(fresh_db), processes=2)
    settings.graceful_timeout = 5.0
    stop = trio.Event()
    with trio.fail_after(60):  # a hang detector; CI starts processes next to busy tests
        async with trio.open_nursery() as nursery:
            (address,) = await nursery.start(
                partial(run_processes, settings, shutdown=stop, handle_signals=False)
            )
            children = children_of(os.getpid())
            assert len(children) == 2
            # Each connection goes to whichever child accepts it; every one works.
            for _ in range(4):
                async with httpx.AsyncClient(base_url=address, timeout=10) as client:
                    await full_cycle(client)

            victim = min(children)
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: len(children_of(os.getpid()) - {victim}) == 2)
            async with httpx.AsyncClient(base_url=address, timeout=10) as client:
                await wait_for_any_health(client)
                await full_cycle(client)

            survivors = children_of(os.getpid())
            stop.set()
        # run_processes returned: every child drained and exited.
    assert not any(alive(pid) for pid in survivors)
    async with httpx.AsyncClient(base_url=address, timeout=2) as client:
        with pytest.raises(httpx.TransportError):
            await client.get("/ojs/v1/health")  # the socket is closed


async def wait_for_any_health(client: httpx.AsyncClient) -> None:
    with trio.fail_after(30):
        while True:
            try:
                if (await client.get("/ojs/v1/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


async def test_children_stop_when_the_parent_is_killed(tmp_path: Path, fresh_db: str) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    args = ("--processes", "2", "--storage", storage_url(fresh_db))
    async with server_process(log, *args, env=server_env(port)) as parent:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_for_health(client, parent, log)
            await wait_until(lambda: len(children_of(parent.pid)) == 2)
            children = children_of(parent.pid)
            parent.kill()  # no chance to stop them: the lifeline closes with it
            await parent.wait()
    await wait_until(lambda: not any(alive(pid) for pid in children))
    output = read_log(log)
    assert output.count("the parent process closed the lifeline") == 2, output


async def test_processes_refuse_memory_storage(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    async with server_process(log, "--processes", "2", env=server_env(port)) as process:
        with trio.fail_after(30):
            code = await process.wait()
    assert code != 0
    assert "memory:// lives inside one process" in read_log(log)


def test_a_child_started_without_its_parent_says_what_it_needs() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OJS_")}
    result = subprocess.run(
        [sys.executable, "-m", "ojs_trio.processes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "ojs-trio serve --processes" in result.stderr
