"""Helpers for engine tests that run on trio's MockClock."""

from __future__ import annotations

import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio

from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.storage.memory import MemoryStorage


@contextmanager
def real_time_limit(seconds: float = 30.0) -> Iterator[None]:
    """Fail instead of hang if an actor spins (which freezes an autojump MockClock).

    ``trio.fail_after`` measures mock time, which stands still while a task spins,
    so this one counts real seconds on a thread.
    """
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:

        def expire() -> None:
            try:
                token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass

        timer = threading.Timer(seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
    if scope.cancelled_caught:
        pytest.fail(f"did not finish within {seconds}s of real time (busy loop?)")


@asynccontextmanager
async def engine_on_clock(
    storage: MemoryStorage | None = None, *, clock: Callable[[], float], **config: Any
) -> AsyncIterator[Engine]:
    """An engine on memory storage (seeded jitter) whose wall clock is ``clock``."""
    storage = storage or MemoryStorage(rng=random.Random(0))
    async with open_engine(storage, EngineConfig(clock=clock, **config)) as engine:
        yield engine
