"""Embedded workers: run job handlers inside a Trio application.

Register handlers by job type, then run a pool of workers::

    engine.register("email.send", send_email)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run_workers, ["default"], 8)

A handler receives a :class:`JobContext` and returns the job's result.  Raising
fails the attempt (retried per the job's policy); raise :class:`Discard` or
:class:`DeadLetter` to end the job at once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ojs_trio.engine.errors import BackendError, OjsError, ShuttingDown
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.middleware import build_execution_chain
from ojs_trio.engine.validation import check_json_native

if TYPE_CHECKING:
    from ojs_trio.engine.engine import Engine

log = logging.getLogger("ojs_trio.worker")

Handler = Callable[["JobContext"], Awaitable[Any]]
Tracked = tuple[str | None, int | None]  # a heartbeater entry (VisibilityHeartbeater)
Outcome = tuple[str, Any, Failure | None]  # job id, result, failure (None: an ack)

FETCH_RETRY_FIRST = 0.1  # seconds before fetching again after a backend error
FETCH_RETRY_MAX = 5.0
# Fetches and outcome writes a pool keeps in flight.  With one of each, a
# no-op job's pool waited on one statement at a time (docs/performance.md).
FETCHERS = 2
SETTLE_WRITES = 2
LOST_ACKS = "could not ack %d jobs: %s; their leases will run out and they run again"


class HandlerSignal(Exception):
    """Base for exceptions that carry an OJS handler response code."""

    code = "RETRY"


class Retry(HandlerSignal):
    code = "RETRY"


class Discard(HandlerSignal):
    code = "DISCARD"


class DeadLetter(HandlerSignal):
    code = "DEAD_LETTER"


@dataclass
class JobContext:
    job: Job
    engine: Engine
    worker_id: str  # the pool's worker id, which holds the job's lease
    slot: str = ""  # which of the pool's tasks runs the job ("embedded-3")
    state: dict[str, Any] = field(default_factory=dict)  # for middleware to share data

    @property
    def args(self) -> list[Any]:
        return self.job.args


def failure_from_exception(exc: BaseException) -> Failure:
    if isinstance(exc, HandlerSignal):
        return Failure(code=exc.code, message=str(exc) or exc.code, type=type(exc).__name__)
    if isinstance(exc, trio.TooSlowError):
        return Failure(
            code="handler_timeout", message="handler exceeded timeout_ms", type="TimeoutError"
        )
    return Failure(code="handler_error", message=str(exc) or repr(exc), type=type(exc).__name__)


@dataclass
class WorkerPoolStatistics:
    workers: int
    busy: int
    completed: int
    failed: int


class WorkerPool:
    """N concurrent in-process workers fetching from a list of queues."""

    def __init__(
        self,
        engine: Engine,
        handlers: dict[str, Handler],
        queues: Sequence[str],
        concurrency: int,
        *,
        worker_id: str = "embedded",
        visibility_ms: int | None = None,
        poll_wait_ms: int = 30_000,
        prefetch: int = 0,
    ) -> None:
        if prefetch < 0:
            raise ValueError("prefetch must be 0 or more")
        self._engine = engine
        self._handlers = handlers
        self.queues = list(queues)
        self.concurrency = concurrency
        self.worker_id = worker_id
        self._visibility_ms = visibility_ms
        self._poll_wait_ms = poll_wait_ms
        self.prefetch = prefetch
        self._busy = 0
        self._outcomes: list[Outcome] = []  # written by the settler, oldest first
        self._outcome_queued = trio.lowlevel.ParkingLot()  # the settler waits here
        self._outcome_taken = trio.lowlevel.ParkingLot()  # workers wait here when full
        self._closing = False
        # Jobs fetched for the workers and the heartbeater entries that keep them leased.
        self._ready: deque[tuple[Job, Tracked]] = deque()
        self._job_ready = trio.lowlevel.ParkingLot()  # idle workers wait here
        self._fetchers = FETCHERS  # running; the workers stop when none is left
        self._asked = 0  # room reserved by fetches in flight
        self._waking = False  # a worker was woken and has not run yet
        # Workers without a job, less the jobs fetched for none (at most -prefetch).
        self._free = concurrency
        self._freed = trio.lowlevel.ParkingLot()
        self.completed = 0
        self.failed = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Fetchers ask for as many jobs as there are free workers and queue them
        # for the workers: one fetch request per batch instead of one per job.
        # Outcomes (ack/nack) are written beside the workers: a worker queues its
        # job's outcome and takes the next job, and the settler writes everything
        # queued meanwhile with one ``ack_many`` (nacks side by side), up to
        # SETTLE_WRITES writes at once.  At most ``concurrency`` outcomes wait, so a
        # slow database still slows the workers down; the outer nursery lets the
        # settler finish on the way out.
        async with trio.open_nursery() as settling:
            settling.start_soon(self._settler)
            try:
                async with trio.open_nursery() as nursery:
                    for n in range(self.concurrency):
                        nursery.start_soon(self._work, f"{self.worker_id}-{n}")
                    for _ in range(FETCHERS):
                        nursery.start_soon(self._fetch)
                    task_status.started()
            finally:
                self._closing = True
                self._outcome_queued.unpark_all()
                if self._ready:  # cancelled: the jobs no worker took go back
                    await self._release_ready()

    async def _fetch(self) -> None:
        """Long-poll for jobs for free workers; the workers stop when every fetcher returns.

        Room (free workers plus prefetch) is reserved by the fetch that asks for
        it.  A second fetcher asks only once half the pool's room is free: its
        claim then overlaps the first one's instead of waiting for it, without
        splitting the pool's claims into many small ones.
        """
        engine = self._engine
        delay = FETCH_RETRY_FIRST
        try:
            while not engine.draining:
                while not self._should_fetch():
                    await self._freed.park()
                room = self._room()
                self._asked += room
                try:
                    jobs = await engine.fetch(
                        self.queues,
                        room,
                        worker_id=self.worker_id,
                        visibility_ms=self._visibility_ms,
                        wait_ms=self._poll_wait_ms,
                    )
                except ShuttingDown:
                    return
                except BackendError as exc:
                    # The database restarting or out of reach: the pool waits it out.
                    log.warning(
                        "fetch from %s failed (%s); retrying in %.1f s",
                        ",".join(self.queues),
                        exc.message,
                        delay,
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, FETCH_RETRY_MAX)
                    continue
                finally:
                    self._asked -= room
                    self._freed.unpark_all()
                delay = FETCH_RETRY_FIRST
                self._free -= len(jobs)
                # Leased from now on: prefetched jobs may wait for a worker a while.
                track = engine.heartbeater.track_nowait
                for job in jobs:
                    self._ready.append((job, track(job, self.worker_id, self._visibility_ms)))
                if jobs:
                    self._wake_worker()
        finally:
            self._fetchers -= 1
            if not self._fetchers:
                self._job_ready.unpark_all()

    async def _release_ready(self) -> None:
        untrack = self._engine.heartbeater.untrack_nowait
        jobs = []
        while self._ready:
            job, held = self._ready.popleft()
            untrack(job.id, held)
            jobs.append(job)
        with trio.CancelScope(shield=True):
            await self._engine.release(jobs)

    async def _work(self, slot: str) -> None:
        """Run queued jobs one at a time until the fetcher stops and none is left.

        A worker that takes a job while others wait wakes the next worker: with
        handlers that await I/O the jobs fan out over the workers, and handlers
        that never block run one after the other without a task switch each.
        """
        ready = self._ready
        while True:
            if not ready:
                if not self._fetchers:
                    return
                await self._job_ready.park()
                self._waking = False
                continue
            job, held = ready.popleft()
            if ready:
                self._wake_worker()
            try:
                await self._execute(job, slot, held)
            finally:
                self._free += 1
                if self._should_fetch():
                    self._freed.unpark_all()

    def _wake_worker(self) -> None:
        """Wake one idle worker, unless one is already on its way.

        One wake-up at a time still fans jobs out when handlers block (each
        worker woken takes a job and wakes the next), but a worker whose
        handlers never block takes the whole queue before anyone else runs:
        waking a worker per job then cost a task switch per job for nothing.
        """
        if not self._waking and self._job_ready.unpark():
            self._waking = True

    def _room(self) -> int:
        """Free workers plus prefetch, less what fetches in flight asked for."""
        return self._free + self.prefetch - self._asked

    def _should_fetch(self) -> bool:
        """Is there room enough for a fetch (see _fetch)?"""
        room = self._room()
        if not self._asked:
            return room >= 1
        return room >= max(1, (self.concurrency + self.prefetch) // 2)

    async def _execute(self, job: Job, slot: str, held: Tracked) -> None:
        engine = self._engine
        handler = self._handlers.get(job.type)
        # The pool is one OJS worker: its id holds the lease; ``slot`` names the task.
        worker_id = self.worker_id
        self._busy += 1
        try:
            if handler is None:
                raise Discard(f"no handler registered for job type {job.type!r}")
            ctx = JobContext(job, engine, worker_id, slot)
            if engine.execution_middleware:

                async def terminal(ctx: JobContext) -> Any:
                    assert handler is not None
                    return await handler(ctx)

                run = build_execution_chain(engine.execution_middleware, terminal)
            else:
                run = handler
            if job.timeout_ms:
                with trio.fail_after(job.timeout_ms / 1000.0):
                    result = await run(ctx)
            else:
                result = await run(ctx)
            # Storage keeps results as JSON (PostgreSQL, SQS) or marshalled records
            # (memory): anything else would fail the ack, so it fails the job here.
            check_json_native(result, "result")
        except Exception as exc:
            self.failed += 1
            await self._settle(job.id, None, failure_from_exception(exc))
        else:
            self.completed += 1
            await self._settle(job.id, result, None)
        finally:
            # Kept leased until its outcome is queued (which may wait for room).
            engine.heartbeater.untrack_nowait(job.id, held)
            self._busy -= 1

    async def _settle(self, job_id: str, result: Any, failure: Failure | None) -> None:
        """Queue a job's outcome for the settler, once there is room."""
        while len(self._outcomes) >= self.concurrency:
            await self._outcome_taken.park()
        self._outcomes.append((job_id, result, failure))
        self._outcome_queued.unpark_all()

    async def _settler(self) -> None:
        """Write queued outcomes in batches until the workers are gone.

        A batch is everything queued when a write slot is free: while
        SETTLE_WRITES batches are being written, the next one gathers.
        """
        writes = trio.Semaphore(SETTLE_WRITES)
        async with trio.open_nursery() as nursery:
            while True:
                while not self._outcomes:
                    if self._closing:
                        return
                    await self._outcome_queued.park()
                await writes.acquire()
                batch, self._outcomes = self._outcomes, []
                self._outcome_taken.unpark_all()
                nursery.start_soon(self._write_released, batch, writes)

    async def _write_released(self, batch: list[Outcome], writes: trio.Semaphore) -> None:
        try:
            # Shielded: outcomes taken off the queue are written, even on the way out.
            with trio.CancelScope(shield=True):
                await self._write(batch)
        finally:
            writes.release()

    async def _write(self, batch: list[Outcome]) -> None:
        acks = [(job_id, result) for job_id, result, failure in batch if failure is None]
        async with trio.open_nursery() as nursery:
            for job_id, _, failure in batch:
                if failure is not None:
                    nursery.start_soon(self._nack, job_id, failure)
            if acks:
                await self._ack(acks)

    async def _ack(self, acks: list[tuple[str, Any]]) -> None:
        try:
            outcomes = await self._engine.ack_many(acks, worker_id=self.worker_id)
        except OjsError as exc:
            # The database out of reach: the leases run out and the jobs run again.
            log.warning(LOST_ACKS, len(acks), exc.message)
            return
        # A storage may also report a failed write per job (PostgreSQL does when
        # its settle transaction fails): one warning for them all, as above.
        lost: list[BackendError] = []
        for outcome in outcomes:
            if isinstance(outcome, BackendError):
                lost.append(outcome)
            elif isinstance(outcome, OjsError):
                # e.g. the job was cancelled meanwhile: its outcome no longer matters.
                log.info("could not settle job: %s", outcome.message)
        if lost:
            log.warning(LOST_ACKS, len(lost), lost[0].message)

    async def _nack(self, job_id: str, failure: Failure) -> None:
        try:
            await self._engine.nack(job_id, failure, worker_id=self.worker_id)
        except OjsError as exc:
            # e.g. the job was cancelled meanwhile: its outcome no longer matters.
            log.info("could not settle job: %s", exc.message)

    def statistics(self) -> WorkerPoolStatistics:
        return WorkerPoolStatistics(self.concurrency, self._busy, self.completed, self.failed)
