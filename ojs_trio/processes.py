"""Several server processes on one listening socket: ``ojs-trio serve --processes N``.

One Python process serves HTTP on one core; with a shared backend (PostgreSQL,
SQS) more processes can share the work, as several machines would.  The parent
binds the socket, starts ``N`` children that each run a whole server (storage
pool, engine with its actors, Hypercorn) accepting on that inherited socket,
and restarts a child that dies.  The kernel spreads connections over the
processes accepting on the socket.

The parent talks to its children through two pipes per process tree:

* a *lifeline*: the children read it and begin their graceful shutdown when it
  closes, which is what the parent does on SIGINT/SIGTERM, or what the kernel
  does if the parent is killed outright; no child outlives its parent;
* a *ready* pipe per child: the child writes one line once it is serving, so
  ``nursery.start(run_processes, settings)`` returns when every child accepts.

The in-memory storage lives inside one process and is refused here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from functools import partial

import trio

from ojs_trio.config import Settings
from ojs_trio.server import run_server, watch_signals

log = logging.getLogger("ojs_trio.processes")

SETTINGS_ENV = "OJS_PROCESS_SETTINGS"  # the parent's final settings, as JSON
CHILD_FDS_ENV = "OJS_PROCESS_FDS"  # "listen,lifeline,ready"
LISTEN_BACKLOG = 2048
RESTART_FIRST = 1.0  # seconds before restarting a child that died
RESTART_MAX = 30.0
STEADY_AFTER = 60.0  # a child that ran this long is restarted at once again
KILL_GRACE = 5.0  # beyond the graceful timeout, before a stopping child is killed


def check_shareable(storage_url: str) -> None:
    if storage_url.startswith("memory:"):
        raise SystemExit(
            "--processes needs storage the processes can share (PostgreSQL or SQS); "
            "memory:// lives inside one process"
        )


def listen_socket(host: str, port: int) -> socket.socket:
    """The socket every child accepts on (inheritable, non-blocking)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def run_processes(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve with ``settings.processes`` children until SIGINT/SIGTERM or ``shutdown``.

    Returns once every child has drained and exited.
    """
    settings.check_bind()
    check_shareable(settings.storage_url)
    stop = shutdown if shutdown is not None else trio.Event()
    sock = listen_socket(settings.host, settings.port)
    lifeline_read, lifeline_write = os.pipe()
    cut = False

    def cut_lifeline() -> None:
        nonlocal cut
        if not cut:
            cut = True
            os.close(lifeline_write)  # every child begins its graceful shutdown

    async def cut_on_stop() -> None:
        await stop.wait()  # also while children are still starting
        log.info("shutting down: stopping %d processes", settings.processes)
        cut_lifeline()

    try:
        env = dict(os.environ)
        env[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(watch_signals, stop)
            nursery.start_soon(cut_on_stop)
            async with trio.open_nursery() as children:
                for number in range(settings.processes):
                    await children.start(
                        _supervise, number, settings, env, sock.fileno(), lifeline_read, stop
                    )
                addresses = [_address(sock)]
                log.info(
                    "ojs-trio serving on %s with %d processes",
                    addresses[0],
                    settings.processes,
                )
                task_status.started(addresses)
            # Every child has exited after the lifeline was cut.
            nursery.cancel_scope.cancel()
    finally:
        cut_lifeline()
        os.close(lifeline_read)
        sock.close()
    log.info("ojs-trio stopped")


async def _supervise(
    number: int,
    settings: Settings,
    env: dict[str, str],
    listen_fd: int,
    lifeline_fd: int,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run child ``number``; restart it (with backoff) if it dies before ``stop``.

    Started once the first child serves; a first child that dies before serving
    (an unreachable database, say) fails the whole start.
    """
    delay = RESTART_FIRST
    serving = False

    def on_ready() -> None:
        nonlocal serving
        if not serving:
            serving = True
            task_status.started()

    while True:
        if stop.is_set():  # stopped while starting: nothing left to start
            on_ready()
            return
        began = trio.current_time()
        code = await _run_child(settings, env, listen_fd, lifeline_fd, stop, on_ready)
        if not serving:
            raise RuntimeError(f"server process {number} exited with {code} before serving")
        if stop.is_set():
            return
        if trio.current_time() - began >= STEADY_AFTER:
            delay = RESTART_FIRST
        log.error("server process %d exited with %s; restarting in %.0f s", number, code, delay)
        with trio.move_on_after(delay):
            await stop.wait()
        if stop.is_set():
            return
        delay = min(delay * 2, RESTART_MAX)


async def _run_child(
    settings: Settings,
    env: dict[str, str],
    listen_fd: int,
    lifeline_fd: int,
    stop: trio.Event,
    on_ready: Callable[[], None],
) -> int:
    """One child's life: start it, report when it serves, wait for its exit code.

    After ``stop`` it has the graceful timeout plus ``KILL_GRACE`` to exit, then
    it is killed; cancelled, it is killed at once.
    """
    ready_read, ready_write = os.pipe()
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ojs_trio.processes"],
            env={**env, CHILD_FDS_ENV: f"{listen_fd},{lifeline_fd},{ready_write}"},
            pass_fds=(listen_fd, lifeline_fd, ready_write),
        )
    except BaseException:
        os.close(ready_read)
        raise
    finally:
        os.close(ready_write)
    try:
        async with trio.lowlevel.FdStream(ready_read) as ready:
            if await ready.receive_some():  # b"" if it died first
                on_ready()

        async def kill_when_overdue() -> None:
            await stop.wait()
            await trio.sleep(settings.graceful_timeout + KILL_GRACE)
            log.warning("server process %d did not stop in time; killing it", process.pid)
            process.kill()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_when_overdue)
            code = await process.wait()
            nursery.cancel_scope.cancel()
        return code
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


# -- in the child --------------------------------------------------------------------


async def _watch_lifeline(fd: int, stop: trio.Event) -> None:
    async with trio.lowlevel.FdStream(fd) as lifeline:
        while await lifeline.receive_some():
            pass
    log.info("the parent process closed the lifeline")
    stop.set()


async def _child(settings: Settings, listen_fd: int, lifeline_fd: int, ready_fd: int) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_lifeline, lifeline_fd, stop)
        async with trio.open_nursery() as server:
            await server.start(partial(run_server, settings, shutdown=stop, listen_fd=listen_fd))
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        nursery.cancel_scope.cancel()


def child_main() -> int:
    from ojs_trio.logs import configure_logging

    if SETTINGS_ENV not in os.environ or CHILD_FDS_ENV not in os.environ:
        raise SystemExit("ojs_trio.processes is started by `ojs-trio serve --processes N`")
    settings = Settings(**json.loads(os.environ[SETTINGS_ENV]))
    listen_fd, lifeline_fd, ready_fd = (int(fd) for fd in os.environ[CHILD_FDS_ENV].split(","))
    configure_logging(settings.log_level, settings.log_format)
    trio.run(_child, settings, listen_fd, lifeline_fd, ready_fd)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
