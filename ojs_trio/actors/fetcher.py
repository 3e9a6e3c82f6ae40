"""Fetcher pools: one actor per queue set, claiming for all waiting fetches at once.

HTTP handlers and embedded workers do not call storage to fetch.  They send a
:class:`FetchRequest` to the pool for their queue set and wait for it to be
filled.  The pool gathers every waiting request and serves them with one
``Storage.claim`` call; requests that got nothing and asked to wait stay
parked until a job arrives in one of the pool's queues (a wake-up from the
engine, never a poll loop) or their deadline passes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ojs_trio.engine.errors import OjsError
from ojs_trio.engine.job import Job
from ojs_trio.engine.timeutil import WallClock
from ojs_trio.storage.port import ClaimRequest, Storage

log = logging.getLogger("ojs_trio.fetcher")

# While fetches are parked, how long the pool waits before re-checking storage
# anyway.  Jobs made available by another server process on a shared backend
# arrive through adapter notifications; this bound only limits a lost one.
IDLE_RECHECK = 1.0


@dataclass(eq=False)
class FetchRequest:
    queues: tuple[str, ...]
    count: int
    worker_id: str | None
    visibility_ms: int | None
    deadline: float  # trio clock; <= now means "do not wait"
    jobs: list[Job] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    abandoned: bool = False
    tried: bool = False  # has a claim round looked for jobs for it yet?
    error: OjsError | None = None  # the claim failed (e.g. the backend is down)

    def claim_request(self) -> ClaimRequest:
        return ClaimRequest(self.queues, self.count, self.worker_id, self.visibility_ms)

    def fulfil(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.done.set()

    def fail(self, error: OjsError) -> None:
        self.error = error
        self.done.set()


@dataclass
class PoolStatistics:
    queues: tuple[str, ...]
    waiting: int
    claims: int
    jobs_delivered: int


Releaser = Callable[[list[Job]], Awaitable[None]]
Notifier = Callable[[list[Job]], None]


class FetcherPool:
    """Owns the waiting fetches of one queue set."""

    def __init__(
        self,
        queues: tuple[str, ...],
        storage: Storage,
        clock: WallClock,
        release: Releaser,
        on_claimed: Notifier,
        buffer: int = 64,
        max_batch: int = 512,
    ) -> None:
        self.queues = queues
        self._storage = storage
        self._clock = clock
        self._release = release
        self._on_claimed = on_claimed
        self._max_batch = max_batch
        self.send_channel, self._receive = trio.open_memory_channel[FetchRequest](buffer)
        self._waiting: list[FetchRequest] = []
        self._wake = trio.Event()
        self._draining = False
        self._claims = 0
        self._delivered = 0

    def wake(self) -> None:
        """Jobs may have become available in one of our queues."""
        self._wake.set()

    def drain(self) -> None:
        """Shutdown: answer every waiting fetch now (with whatever it has: nothing)."""
        self._draining = True
        self._wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_requests)
            await self._serve()
            nursery.cancel_scope.cancel()

    async def _receive_requests(self) -> None:
        # The channel belongs to the pool object, not to one run: a restarted
        # run() keeps receiving on it, so it is never closed here.
        async for request in self._receive:
            self._waiting.append(request)
            self._wake.set()

    async def _serve(self) -> None:
        while True:
            self._wake = trio.Event()
            self._waiting = [r for r in self._waiting if not r.abandoned]
            if self._draining:
                for request in self._waiting:
                    request.fulfil([])
                self._waiting.clear()
            if self._waiting:
                await self._claim_round()
            now = trio.current_time()
            deadline = min((r.deadline for r in self._waiting), default=now + IDLE_RECHECK)
            if not self._waiting:
                await self._wake.wait()
                continue
            with trio.move_on_at(min(deadline, now + IDLE_RECHECK)):
                await self._wake.wait()
            self._expire(trio.current_time())

    def _expire(self, now: float) -> None:
        still = []
        for request in self._waiting:
            # A fetch that never had a claim round gets one before it may expire.
            if request.tried and request.deadline <= now:
                request.fulfil([])
            else:
                still.append(request)
        self._waiting = still

    async def _claim_round(self) -> None:
        batch = self._waiting[: self._max_batch]
        try:
            results = await self._storage.claim([r.claim_request() for r in batch], self._clock())
        except OjsError as exc:
            # The backend failed (e.g. PostgreSQL is down): answer these fetches with
            # the error now (503 for BackendUnavailable) instead of crashing the pool,
            # which left them hanging and, after a few crashes, escalated and stopped
            # the whole engine. Later fetches get a claim round of their own.
            log.warning("claim for %s failed: %s", ",".join(self.queues), exc.message)
            for request in batch:
                request.fail(exc)
            self._waiting = self._waiting[len(batch) :]
            return
        self._claims += 1
        now = trio.current_time()
        served: set[int] = set()
        orphans: list[Job] = []
        for i, (request, jobs) in enumerate(zip(batch, results, strict=True)):
            request.tried = True
            if request.abandoned:
                # The fetcher gave up while we were claiming: hand the jobs back.
                orphans.extend(jobs)
                served.add(i)
            elif jobs or request.deadline <= now or self._draining:
                self._delivered += len(jobs)
                self._on_claimed(jobs)
                request.fulfil(jobs)
                served.add(i)
        self._waiting = [r for i, r in enumerate(batch) if i not in served] + self._waiting[
            len(batch) :
        ]
        if orphans:
            await self._release(orphans)
        if len(batch) == self._max_batch and any(results):
            self._wake.set()  # more requests than one batch: go round again at once

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self.queues, len(self._waiting), self._claims, self._delivered)
