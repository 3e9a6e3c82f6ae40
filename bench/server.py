"""The server under test for HTTP runs, in its own process.

    python -m bench.server --storage memory:// [--pool-size 10] [--processes 1]

Starts the engine and Hypercorn on an ephemeral loopback port (``nursery.start``
reports the bound address), prints ``{"url": ...}`` as one JSON line on stdout and
serves until SIGTERM/SIGINT.  ``POST /ojs/v1/admin/reset`` is enabled so the harness
can empty storage between scenarios; test directives stay off.  The load generator
runs in the parent process.  With ``--processes N`` (shared storage only) the
server is ``N`` processes on one socket, as ``ojs-trio serve --processes N`` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import signal
import sys

import trio

from ojs_trio.config import Settings
from ojs_trio.engine.engine import EngineConfig, open_engine
from ojs_trio.http.serve import serve
from ojs_trio.processes import run_processes
from ojs_trio.runtime import freeze_startup_heap, raise_gc_threshold
from ojs_trio.storage import open_storage


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


async def main(storage_url: str, pool_size: int, processes: int) -> None:
    settings = Settings(
        port=0,
        storage_url=storage_url,
        enable_reset=True,
        pool_size=pool_size,
        processes=processes,
    )
    settings.graceful_timeout = 2.0
    if processes > 1:
        # `ojs-trio serve --processes N`: children share the socket and the database.
        settings.log_level = "ERROR"  # see the engine logger's level below
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(run_processes, settings)
            _report(addresses[0])
        return
    storage = open_storage(storage_url, pool_size=pool_size)
    stop = trio.Event()
    async with open_engine(storage, EngineConfig()) as engine:

        async def shutdown_trigger() -> None:
            await stop.wait()
            engine.begin_shutdown()

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            addresses = await nursery.start(serve, engine, settings, shutdown_trigger)
            freeze_startup_heap()  # as ojs-trio serve does once it listens
            raise_gc_threshold()
            _report(addresses[0])
        # serve() returned after the graceful drain; the signal watcher has exited.


def _report(url: str) -> None:
    sys.stdout.write(json.dumps({"url": url}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", default="memory://")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1, help="as ojs-trio serve --processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # When the harness cancels in-flight fetches and resets storage right away, the
    # engine's release of jobs claimed for them can find them gone; that is expected.
    logging.getLogger("ojs_trio.engine").setLevel(logging.ERROR)
    raise_nofile_limit()
    trio.run(main, args.storage, args.pool_size, args.processes)
