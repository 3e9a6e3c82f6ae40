"""Visibility heartbeater: keeps leases alive.

Two sources: heartbeat requests from remote workers (sent here over a channel
and answered through a reply slot; requests that queue up together are applied
in one pass), and the jobs held by embedded workers, which the heartbeater
extends on its own every ``interval`` seconds while they run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from ojs_trio.engine.errors import OjsError
from ojs_trio.engine.job import Job
from ojs_trio.engine.timeutil import WallClock
from ojs_trio.storage.port import Storage


@dataclass(eq=False)
class HeartbeatCall:
    worker_id: str | None
    job_ids: tuple[str, ...]
    visibility_ms: int | None
    extended: list[Job] = field(default_factory=list)
    error: OjsError | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class HeartbeaterStatistics:
    tracked: int  # jobs held in-process whose leases are being kept alive
    beats: int  # rounds of extensions so far


class VisibilityHeartbeater:
    def __init__(
        self, storage: Storage, clock: WallClock, *, interval: float = 5.0, buffer: int = 256
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._interval = interval
        self.send_channel, self._receive = trio.open_memory_channel[HeartbeatCall](buffer)
        # job id -> (worker id, visibility ms) for jobs running in-process
        self._tracked: dict[str, tuple[str | None, int | None]] = {}
        self.beats = 0

    def statistics(self) -> HeartbeaterStatistics:
        return HeartbeaterStatistics(tracked=len(self._tracked), beats=self.beats)

    @contextmanager
    def track(self, job: Job, worker_id: str | None, visibility_ms: int | None) -> Iterator[None]:
        """Keep ``job``'s lease alive for as long as the ``with`` block runs."""
        entry = self.track_nowait(job, worker_id, visibility_ms)
        try:
            yield
        finally:
            self.untrack_nowait(job.id, entry)

    def track_nowait(
        self, job: Job, worker_id: str | None, visibility_ms: int | None
    ) -> tuple[str | None, int | None]:
        """Start keeping ``job``'s lease alive; returns the entry to untrack with.

        The latest tracker of a job owns it: a job handed from the pool's fetcher
        (which held it while it waited for a worker) to a worker stays tracked
        whichever of the two lets go first.
        """
        entry = (worker_id, visibility_ms)
        self._tracked[job.id] = entry
        return entry

    def untrack_nowait(self, job_id: str, entry: tuple[str | None, int | None]) -> None:
        if self._tracked.get(job_id) is entry:
            del self._tracked[job_id]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._extend_tracked)
            # The channel outlives one run(): a restart after a crash keeps it open.
            async for call in self._receive:
                batch = [call]
                while True:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._apply(batch)

    async def _apply(self, batch: list[HeartbeatCall]) -> None:
        now = self._clock()
        for call in batch:
            try:
                call.extended = await self._storage.heartbeat(
                    call.worker_id, call.job_ids, call.visibility_ms, now
                )
            except OjsError as exc:
                call.error = exc
            finally:
                self.beats += 1
                call.done.set()

    async def _extend_tracked(self) -> None:
        while True:
            await trio.sleep(self._interval)
            by_worker: dict[tuple[str | None, int | None], list[str]] = defaultdict(list)
            for job_id, key in self._tracked.items():
                by_worker[key].append(job_id)
            now = self._clock()
            for (worker_id, visibility_ms), ids in by_worker.items():
                await self._storage.heartbeat(worker_id, ids, visibility_ms, now)
                self.beats += 1
