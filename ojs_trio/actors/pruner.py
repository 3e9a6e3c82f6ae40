"""Pruner: finished jobs are deleted once they are older than the retention period.

Completed, cancelled and plain discarded jobs go after ``retention``;
dead-lettered jobs are kept for inspection until ``dead_letter_retention``
(``None``: until an operator deletes or retries them).  Deleting in bounded
batches keeps each pass short; several servers pruning at once is harmless.
"""

from __future__ import annotations

import logging

import trio

from ojs_trio.engine.timeutil import WallClock
from ojs_trio.storage.port import Storage

log = logging.getLogger("ojs_trio.pruner")


class Pruner:
    def __init__(
        self,
        storage: Storage,
        clock: WallClock,
        *,
        retention: float | None,
        dead_letter_retention: float | None,
        interval: float = 60.0,
        batch: int = 5000,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._retention = retention
        self._dead_letter_retention = dead_letter_retention
        self._interval = interval
        self._batch = batch
        self.pruned = 0

    async def prune_once(self) -> int:
        """One pass: delete every expired finished job, a batch at a time."""
        now = self._clock()
        total = 0
        while True:
            deleted = await self._storage.prune(
                None if self._retention is None else now - self._retention,
                None if self._dead_letter_retention is None else now - self._dead_letter_retention,
                self._batch,
            )
            total += deleted
            if deleted < self._batch:
                break
        if total:
            self.pruned += total
            log.info("pruned %d finished jobs", total)
        return total

    async def run(self) -> None:
        if self._retention is None and self._dead_letter_retention is None:
            return
        while True:
            await self.prune_once()
            await trio.sleep(self._interval)
