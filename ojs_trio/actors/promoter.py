"""Delay promoter: scheduled and retryable jobs become available when due.

It keeps the next due time, sleeps until then, and is woken early over its
channel when a job due sooner arrives (a new delayed job, a retry with a short
backoff).  ``max_sleep`` bounds the sleep so due times set by other server
processes on a shared backend are still noticed.
"""

from __future__ import annotations

from collections.abc import Callable

from ojs_trio.actors.timers import DueTimes
from ojs_trio.engine.job import Job
from ojs_trio.engine.timeutil import WallClock
from ojs_trio.storage.port import Storage


class DelayPromoter:
    def __init__(
        self,
        storage: Storage,
        clock: WallClock,
        on_promoted: Callable[[list[Job]], None],
        *,
        batch: int = 1000,
        max_sleep: float = 1.0,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._on_promoted = on_promoted
        self._batch = batch
        self._max_sleep = max_sleep
        self._due = DueTimes()
        self.promoted = 0
        self.passes = 0

    def notify_due_nowait(self, due_at: float) -> None:
        """A job is due at ``due_at`` (wall clock).  Never blocks the caller."""
        self._due.notify_nowait(due_at)

    async def run(self) -> None:
        while True:
            self.passes += 1
            promoted = await self._storage.promote_due(self._clock(), self._batch)
            if promoted:
                self.promoted += len(promoted)
                self._on_promoted(promoted)
                if len(promoted) >= self._batch:
                    continue
            next_due = await self._storage.next_due_at()
            await self._due.sleep_until(next_due, self._clock, self._max_sleep)
