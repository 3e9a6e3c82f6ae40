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
Settle = Callable[[], Awaitable[Job]]  # an ack or nack, ready to send

FETCH_RETRY_FIRST = 0.1  # seconds before fetching again after a backend error
FETCH_RETRY_MAX = 5.0


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
        self._outcomes: trio.MemorySendChannel[Settle]
        # Workers without a job, less the jobs fetched for none (at most -prefetch).
        self._free = concurrency
        self._freed = trio.lowlevel.ParkingLot()
        self.completed = 0
        self.failed = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One fetcher asks for as many jobs as there are free workers and hands them
        # over an unbuffered channel: one fetch request per batch instead of one per
        # job.  Settles (ack/nack) run beside the workers: a worker takes its next
        # job while the previous outcome is being written, as a batch with others.
        # `concurrency` settler tasks write them (long-lived tasks: cheaper than one
        # task per outcome), so at most that many are outstanding and a slow
        # database still slows the workers down; the outer nursery lets the
        # settlers finish on the way out.
        send, receive = trio.open_memory_channel[Job](0)
        outcomes, settles = trio.open_memory_channel[Settle](0)
        async with trio.open_nursery() as settling:
            async with settles:
                for _ in range(self.concurrency):
                    settling.start_soon(self._settler, settles.clone())
            async with outcomes:
                self._outcomes = outcomes
                async with trio.open_nursery() as nursery:
                    async with receive:
                        for n in range(self.concurrency):
                            slot = f"{self.worker_id}-{n}"
                            nursery.start_soon(self._work, receive.clone(), slot)
                    nursery.start_soon(self._fetch, send)
                    task_status.started()

    async def _fetch(self, send: trio.MemorySendChannel[Job]) -> None:
        """Long-poll for jobs for every free worker; closing ``send`` stops the workers."""
        engine = self._engine
        delay = FETCH_RETRY_FIRST
        async with send:
            while not engine.draining:
                while self._free + self.prefetch <= 0:
                    await self._freed.park()
                try:
                    jobs = await engine.fetch(
                        self.queues,
                        self._free + self.prefetch,
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
                delay = FETCH_RETRY_FIRST
                self._free -= len(jobs)
                await self._hand_over(jobs, send)

    async def _hand_over(self, jobs: list[Job], send: trio.MemorySendChannel[Job]) -> None:
        """Give each job to the next free worker; release the rest if cancelled.

        Without prefetch a free worker is waiting or about to be, so this does not
        block long.  Prefetched jobs wait here for a worker to finish, their
        leases kept alive meanwhile: the worker's own tracking takes over when it
        receives the job.
        """
        heartbeater = self._engine.heartbeater
        held = [heartbeater.track_nowait(job, self.worker_id, self._visibility_ms) for job in jobs]
        k = 0
        try:
            for k, job in enumerate(jobs):
                await send.send(job)
                heartbeater.untrack_nowait(job.id, held[k])
        except BaseException:
            for job, entry in zip(jobs[k:], held[k:], strict=True):
                heartbeater.untrack_nowait(job.id, entry)
            with trio.CancelScope(shield=True):
                await self._engine.release(jobs[k:])
            raise

    async def _work(self, jobs: trio.MemoryReceiveChannel[Job], slot: str) -> None:
        async with jobs:
            async for job in jobs:
                try:
                    await self._execute(job, slot)
                finally:
                    self._free += 1
                    self._freed.unpark_all()

    async def _execute(self, job: Job, slot: str) -> None:
        engine = self._engine
        handler = self._handlers.get(job.type)
        # The pool is one OJS worker: its id holds the lease; ``slot`` names the task.
        worker_id = self.worker_id
        self._busy += 1
        try:
            if handler is None:
                raise Discard(f"no handler registered for job type {job.type!r}")
            ctx = JobContext(job, engine, worker_id, slot)

            async def terminal(ctx: JobContext) -> Any:
                assert handler is not None
                return await handler(ctx)

            chain = build_execution_chain(engine.execution_middleware, terminal)
            with engine.heartbeater.track(job, worker_id, self._visibility_ms):
                if job.timeout_ms:
                    with trio.fail_after(job.timeout_ms / 1000.0):
                        result = await chain(ctx)
                else:
                    result = await chain(ctx)
            # Storage keeps results as JSON (PostgreSQL, SQS) or marshalled records
            # (memory): anything else would fail the ack, so it fails the job here.
            check_json_native(result, "result")
        except Exception as exc:
            self.failed += 1
            failure = failure_from_exception(exc)
            await self._settle(lambda: engine.nack(job.id, failure, worker_id=worker_id))
        else:
            self.completed += 1
            await self._settle(lambda: engine.ack(job.id, result, worker_id=worker_id))
        finally:
            self._busy -= 1

    async def _settle(self, call: Settle) -> None:
        """Hand a job's outcome to a settler, once one is free."""
        await self._outcomes.send(call)

    async def _settler(self, settles: trio.MemoryReceiveChannel[Settle]) -> None:
        async with settles:
            async for call in settles:
                try:
                    await call()
                except OjsError as exc:
                    # e.g. the job was cancelled meanwhile: its outcome no longer matters.
                    log.info("could not settle job: %s", exc.message)

    def statistics(self) -> WorkerPoolStatistics:
        return WorkerPoolStatistics(self.concurrency, self._busy, self.completed, self.failed)
