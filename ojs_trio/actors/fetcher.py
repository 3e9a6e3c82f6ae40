"""Fetcher pools: one actor per queue set, claiming for all waiting fetches at once.

HTTP handlers and embedded workers do not call storage to fetch.  They send a
:class:`FetchRequest` to the pool for their queue set and wait for it to be
filled.  The pool gathers the waiting requests and serves them with one
``Storage.claim`` call per batch of up to ``max_batch``; requests that got
nothing and asked to wait stay parked until a job arrives in one of the pool's
queues (a wake-up from the engine; a re-check every ``IDLE_RECHECK`` covers a
notification lost on a shared backend) or their deadline passes.  With many
parked, the cost of a round grows with the jobs found, not with the fetches
held.
"""

from __future__ import annotations

import heapq
import logging
import math
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
# Claim rounds a pool runs at once (see _serve).
CONCURRENT_ROUNDS = 2
# Parked fetches a re-check without a wake-up claims for first; only if every one
# of them gets jobs does it go on in full batches.  A claim for 512 fetches took
# one step of 3-16 ms in a PostgreSQL server holding 5,000 (docs/performance.md).
PROBE_BATCH = 16


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
    parked: bool = False  # in the pool's list of parked fetches, still waiting
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
        # Parked fetches (tried at least once), oldest first.  An entry whose wait
        # ended or whose fetcher left (``parked`` false) stays until a round or a
        # compaction passes it: nothing walks the whole list while fetches are held.
        self._waiting: list[FetchRequest] = []
        self._dead = 0  # entries of _waiting no longer parked, not removed yet
        self._deadlines: list[tuple[float, int, FetchRequest]] = []  # heap of parked fetches
        self._parked_seq = 0  # heap tie-breaker: requests do not compare
        self._fresh: list[FetchRequest] = []  # arrived since the last claim round
        self._wake = trio.Event()
        self._jobs_maybe = False  # wake() since the last round over the parked fetches
        self._rounds = 0  # claim rounds running
        self._in_round = 0  # fetches those rounds are claiming for
        self._draining = False
        self._claims = 0
        self._delivered = 0

    def wake(self) -> None:
        """Jobs may have become available in one of our queues."""
        self._jobs_maybe = True
        self._wake.set()

    def abandon(self, request: FetchRequest) -> None:
        """The fetcher gave up (e.g. its client went away): stop waiting for it."""
        request.abandoned = True
        if request.parked:
            request.parked = False
            self._dead += 1

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
            self._fresh.append(request)
            self._wake.set()

    async def _serve(self) -> None:
        # New fetches get one claim round as they arrive; the parked ones (tried
        # and empty) only when jobs may have arrived (wake) or every IDLE_RECHECK,
        # and then from the oldest, a batch at a time, until storage comes back
        # dry.  Re-claiming for every parked fetch on every arrival made the ramp to
        # 10,000 held long-polls quadratic and kept a core busy once they were held;
        # walking all of them once a second (even without claiming) stalled the
        # server for 10-20 ms every second (docs/performance.md).
        # Up to CONCURRENT_ROUNDS rounds run at once: fetches that arrive while a
        # round's statement runs get a round of their own instead of queueing
        # behind it, so a busy pool's claims overlap (docs/performance.md).
        recheck_at = trio.current_time() + IDLE_RECHECK
        async with trio.open_nursery() as rounds:
            while True:
                self._wake = trio.Event()
                if self._draining:
                    for request in self._waiting + self._fresh:
                        if not request.done.is_set():
                            request.fulfil([])
                    self._waiting, self._fresh, self._deadlines = [], [], []
                    self._dead = 0
                now = trio.current_time()
                if self._rounds < CONCURRENT_ROUNDS:
                    parked = probe = False
                    if self._jobs_maybe or now >= recheck_at:
                        probe = not self._jobs_maybe
                        self._jobs_maybe = False
                        recheck_at = now + IDLE_RECHECK
                        parked = len(self._waiting) > self._dead
                    # Without a wake or a re-check, only the arrivals get a round.
                    if parked or self._fresh:
                        fresh, self._fresh = self._fresh, []
                        self._rounds += 1
                        self._in_round += len(fresh)  # still counted as waiting
                        rounds.start_soon(self._round, fresh, parked, probe)
                        continue
                self._expire(now)
                if not self._waiting and not self._fresh and not self._rounds:
                    await self._wake.wait()
                    recheck_at = trio.current_time() + IDLE_RECHECK
                    continue
                # With every round slot taken, a recheck waits for a slot (a wake).
                due = self._deadlines[0][0] if self._deadlines else math.inf
                if self._rounds < CONCURRENT_ROUNDS:
                    due = min(due, recheck_at)
                with trio.move_on_at(due):
                    await self._wake.wait()

    async def _round(self, fresh: list[FetchRequest], parked: bool, probe: bool = False) -> None:
        """Claim for the parked fetches (if ``parked``), then for ``fresh``.

        The parked ones are taken from the oldest, a batch at a time (the first
        only PROBE_BATCH long if ``probe``: a re-check without a wake-up), until
        a claim leaves one of them empty-handed (storage is dry: every fetch of
        a pool asks for the same queues); the rest are not touched.  The fresh
        ones always get their first claim.  Those that got nothing and may wait
        are parked.
        """
        in_flight: list[FetchRequest] = []  # parked fetches in the current claim
        left: list[FetchRequest] = []
        try:
            dry = False
            limit = PROBE_BATCH if probe else self._max_batch
            while parked and not dry and self._waiting:
                in_flight = self._take_parked(limit)
                limit = self._max_batch
                kept, got_jobs = await self._claim_round(in_flight)
                for request in kept:
                    request.parked = True  # its deadline is still in the heap
                self._waiting[:0] = kept  # back in front: still the oldest
                self._in_round -= len(in_flight)
                in_flight = []
                dry = not got_jobs or bool(kept)
            for i in range(0, len(fresh), self._max_batch):
                batch = [r for r in fresh[i : i + self._max_batch] if not r.abandoned]
                left += (await self._claim_round(batch))[0]
        except BaseException:
            # A crash (the supervisor restarts the pool) or cancellation: every
            # fetch not answered yet stays with the pool for the next run.
            self._fresh = [r for r in in_flight + fresh if not r.done.is_set()] + self._fresh
            self._in_round -= len(in_flight)
            raise
        finally:
            self._rounds -= 1
            self._in_round -= len(fresh)
            self._wake.set()  # a round slot is free: arrivals may be waiting for it
        self._park(left)

    def _take_parked(self, limit: int) -> list[FetchRequest]:
        """Remove up to ``limit`` of the oldest parked fetches, and the dead before them."""
        batch: list[FetchRequest] = []
        taken = 0
        for request in self._waiting:
            taken += 1
            if not request.parked:
                self._dead -= 1
                continue
            request.parked = False
            batch.append(request)
            if len(batch) == limit:
                break
        del self._waiting[:taken]
        self._in_round += len(batch)
        return batch

    def _park(self, requests: list[FetchRequest]) -> None:
        """Fetches after their first claim round, empty-handed: wait for jobs."""
        self._waiting += requests
        for request in requests:
            request.parked = True
            self._parked_seq += 1
            heapq.heappush(self._deadlines, (request.deadline, self._parked_seq, request))

    def _expire(self, now: float) -> None:
        """Answer the parked fetches whose wait is over (one heap pop each).

        A fetch in a claim round is not parked: its round answers it, with the
        jobs the claim found if any.  One given up (``abandon``) is not parked either.
        """
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, request = heapq.heappop(self._deadlines)
            if not request.parked:
                continue
            request.parked = False
            self._dead += 1
            request.fulfil([])
        # Drop the entries no longer parked once they are most of the list.
        if self._dead * 2 > len(self._waiting):
            self._waiting = [r for r in self._waiting if r.parked]
            self._dead = 0

    async def _claim_round(self, batch: list[FetchRequest]) -> tuple[list[FetchRequest], bool]:
        """One claim for ``batch``; returns the fetches left waiting and whether any got jobs."""
        if not batch:
            return [], False
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
            return [], False
        self._claims += 1
        now = trio.current_time()
        left: list[FetchRequest] = []
        orphans: list[Job] = []
        for request, jobs in zip(batch, results, strict=True):
            if request.abandoned:
                # The fetcher gave up while we were claiming: hand the jobs back.
                orphans.extend(jobs)
            elif jobs or request.deadline <= now or self._draining:
                self._delivered += len(jobs)
                self._on_claimed(jobs)
                request.fulfil(jobs)
            else:
                left.append(request)
        if orphans:
            await self._release(orphans)
        return left, any(results)

    def statistics(self) -> PoolStatistics:
        waiting = len(self._waiting) - self._dead + len(self._fresh) + self._in_round
        return PoolStatistics(self.queues, waiting, self._claims, self._delivered)
