"""The server process: storage, engine and HTTP, with ordered, signal-driven shutdown."""

from __future__ import annotations

import logging
import signal
from functools import partial

import trio

from ojs_trio.config import Settings
from ojs_trio.engine.engine import EngineConfig, open_engine
from ojs_trio.http.serve import serve
from ojs_trio.runtime import freeze_startup_heap, raise_gc_threshold
from ojs_trio.storage import open_storage

log = logging.getLogger("ojs_trio.server")


async def run_server(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    listen_fd: int | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGINT/SIGTERM (or ``shutdown`` is set), then drain and return.

    ``listen_fd``: accept on this already listening socket instead of binding
    ``settings.host:port`` (the children of ``ojs-trio serve --processes``).

    Shutdown order: waiting long-poll fetches are answered at once, Hypercorn
    stops accepting and finishes in-flight requests (bounded by the graceful
    timeout), then the actors stop and storage closes.
    """
    settings.check_bind()
    stop = shutdown if shutdown is not None else trio.Event()
    storage = open_storage(settings.storage_url, pool_size=settings.pool_size)
    engine_config = EngineConfig(
        honour_test_directives=settings.enable_reset,
        retention=settings.retention_seconds,
        dead_letter_retention=settings.dead_letter_retention_seconds,
    )
    async with open_engine(storage, engine_config) as engine:

        async def shutdown_trigger() -> None:
            await stop.wait()
            log.info("shutting down: draining in-flight requests")
            engine.begin_shutdown()

        async with trio.open_nursery() as signal_scope:
            if handle_signals:
                signal_scope.start_soon(watch_signals, stop)
            async with trio.open_nursery() as http:
                addresses = await http.start(
                    partial(serve, engine, settings, shutdown_trigger, listen_fd=listen_fd)
                )
                log.info("ojs-trio serving on %s (storage %s)", ", ".join(addresses), storage.name)
                freeze_startup_heap()  # no collector walks over start-up objects
                raise_gc_threshold()  # no young collection per claimed batch
                task_status.started(addresses)
            # serve() has returned: the graceful drain is over.
            signal_scope.cancel_scope.cancel()
    log.info("ojs-trio stopped")


async def watch_signals(stop: trio.Event) -> None:
    """Set ``stop`` on the first SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()
            return
