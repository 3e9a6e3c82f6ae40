"""Serve the app with Hypercorn on Trio."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine
from ojs_trio.http.app import create_app
from ojs_trio.http.fastpath import FastPath


def hypercorn_config(settings: Settings, listen_fd: int | None = None) -> Config:
    config = Config()
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    config.bind = [f"{host}:{settings.port}" if listen_fd is None else f"fd://{listen_fd}"]
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through our formatter
    config.keep_alive_timeout = 75
    # Long-poll fetches hold a request open; hypercorn must not cut them off.
    config.read_timeout = None
    return config


async def serve(
    engine: Engine,
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    fast_path: bool = True,
    listen_fd: int | None = None,
) -> None:
    """Serve the OJS API for ``engine`` until ``shutdown_trigger`` returns.

    ``await nursery.start(serve, engine, settings)`` gives back the bound
    addresses (useful with port 0).  On shutdown Hypercorn stops accepting and
    lets in-flight requests finish within ``settings.graceful_timeout``.

    The hot routes are served by the raw-ASGI fast path in front of Quart
    (fastpath.py); ``fast_path=False`` serves everything through Quart (tests
    compare the two).  ``listen_fd`` serves an inherited listening socket
    instead of binding ``settings.host:port``.
    """
    app = create_app(engine, settings)
    await hypercorn_serve(
        FastPath(app) if fast_path else app,
        hypercorn_config(settings, listen_fd),
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
