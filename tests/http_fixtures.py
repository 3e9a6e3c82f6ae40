"""The API served in-process for tests that talk HTTP to it.

Import the helper (``tests/`` is on ``sys.path`` under pytest's default import
mode)::

    from http_fixtures import http_server

    async with http_server() as (engine, client):
        response = await client.post("/ojs/v1/jobs", json={...})
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.http import serve
from ojs_trio.storage.memory import MemoryStorage


@asynccontextmanager
async def http_server(
    settings: Settings | None = None, **config: Any
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """An engine on memory storage plus the API served on an ephemeral loopback
    port, and a client for it.  ``config`` goes to :class:`EngineConfig`."""
    settings = settings or Settings(port=0)
    async with open_engine(MemoryStorage(), EngineConfig(**config)) as engine:
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            addresses = await nursery.start(serve, engine, settings, stop.wait)
            async with httpx.AsyncClient(base_url=addresses[0], timeout=10) as client:
                yield engine, client
            stop.set()
