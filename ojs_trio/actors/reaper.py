"""Reaper: expired visibility leases, execution timeouts and TTL expiry.

Leases that ran out go back to ``available`` (or are discarded on their last
attempt); jobs past ``timeout_ms`` fail their attempt; jobs past
``expires_at`` that never started are discarded.  A pass is idempotent, so
several server processes can run reapers on one backend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ojs_trio.actors.timers import DueTimes
from ojs_trio.engine.job import Job
from ojs_trio.engine.timeutil import WallClock
from ojs_trio.storage.port import Storage


class Reaper:
    def __init__(
        self,
        storage: Storage,
        clock: WallClock,
        on_reaped: Callable[[list[Job]], Awaitable[None]],
        *,
        batch: int = 1000,
        max_sleep: float = 1.0,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._on_reaped = on_reaped
        self._batch = batch
        self._max_sleep = max_sleep
        self.reaped = 0
        self.passes = 0
        self._due = DueTimes()

    def notify_due_nowait(self, due_at: float) -> None:
        """A lease or TTL deadline at ``due_at`` (wall clock) exists.  Never blocks."""
        self._due.notify_nowait(due_at)

    async def run(self) -> None:
        while True:
            self.passes += 1
            reaped = await self._storage.reap(self._clock(), self._batch)
            if reaped:
                self.reaped += len(reaped)
                await self._on_reaped(reaped)
                if len(reaped) >= self._batch:
                    continue
            next_due = await self._storage.next_reap_at()
            await self._due.sleep_until(next_due, self._clock, self._max_sleep)
