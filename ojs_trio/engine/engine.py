"""The Engine: owns the actors, the storage handle and the public job API.

``async with open_engine(storage, config) as engine:`` opens storage, starts
the supervised actors in the engine's own nurseries and yields the engine.
Leaving the block drains in order: waiting fetches are answered first, then
fetcher pools stop, then the timed actors (promoter, reaper, heartbeater),
and storage is closed last.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ojs_trio.actors.cron import CronTicker
from ojs_trio.actors.fetcher import FetcherPool, FetchRequest
from ojs_trio.actors.heartbeater import HeartbeatCall, VisibilityHeartbeater
from ojs_trio.actors.promoter import DelayPromoter
from ojs_trio.actors.pruner import Pruner
from ojs_trio.actors.reaper import Reaper
from ojs_trio.actors.supervisor import Supervisor
from ojs_trio.engine.cron import CronFire, CronRecord, parse_cron_request
from ojs_trio.engine.errors import InvalidRequest, OjsError, ShuttingDown
from ojs_trio.engine.events import EventBus, cron_event, workflow_event
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.middleware import EnqueueMiddleware, ExecutionMiddleware, build_enqueue_chain
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import WallClock, system_clock
from ojs_trio.engine.validation import (
    check_json_native,
    parse_job,
    validate_queue,
    validate_type,
)
from ojs_trio.engine.worker import Handler, WorkerPool
from ojs_trio.engine.workflows import Workflow, parse_workflow
from ojs_trio.storage.port import AckRequest, DeadLetterPage, EnqueueResult, QueueInfo, Storage

log = logging.getLogger("ojs_trio.engine")

WORKER_STATES = ("running", "quiet", "terminate")
TERMINAL_WORKFLOW = ("completed", "failed", "cancelled")


@dataclass
class EngineConfig:
    """Tunables.  Defaults suit a server; tests shrink the timers."""

    max_fetch_count: int = 1000
    max_fetch_wait_ms: int = 60_000
    heartbeat_interval: float = 5.0  # embedded workers' lease extension period
    timer_max_sleep: float = 1.0  # promoter/reaper re-check bound (shared backends)
    retention: float | None = 7 * 86400.0  # seconds finished jobs are kept; None: forever
    dead_letter_retention: float | None = None  # dead letters stay until handled
    prune_interval: float = 60.0
    event_log_size: int = 10_000
    event_subscriber_buffer: int = 256
    honour_test_directives: bool = False  # conformance hook; off in production
    clock: WallClock = system_clock
    supervisor: Supervisor = field(default_factory=Supervisor)


@dataclass
class WorkerInfo:
    worker_id: str
    last_seen: float
    directive: str = "running"
    active_jobs: int = 0


@dataclass
class HeartbeatReply:
    state: str
    extended: list[str]
    server_time: float


@dataclass
class EngineStatistics:
    enqueued: int
    fetched: int
    acked: int
    nacked: int
    fetcher_pools: int
    waiting_fetches: int
    promoted: int
    reaped: int
    events: int
    actors: list[dict[str, Any]]


class Engine:
    def __init__(self, storage: Storage, config: EngineConfig | None = None) -> None:
        self.storage = storage
        self.config = config or EngineConfig()
        self.clock = self.config.clock
        self.events = EventBus(self.config.event_log_size, self.config.event_subscriber_buffer)
        self.supervisor = self.config.supervisor
        self._pools: dict[tuple[str, ...], FetcherPool] = {}
        self._pools_by_queue: dict[str, set[FetcherPool]] = {}
        self._pool_nursery: trio.Nursery | None = None
        self._workers: dict[str, WorkerInfo] = {}
        self.handlers: dict[str, Handler] = {}
        self._enqueue_middleware: list[EnqueueMiddleware] = []
        self.execution_middleware: list[ExecutionMiddleware] = []
        self.draining = False
        self.started_at = self.clock()
        self._counters = {"enqueued": 0, "fetched": 0, "acked": 0, "nacked": 0}
        self.promoter = DelayPromoter(
            storage, self.clock, self._jobs_became_available, max_sleep=self.config.timer_max_sleep
        )
        self.reaper = Reaper(
            storage, self.clock, self._jobs_reaped, max_sleep=self.config.timer_max_sleep
        )
        self.cron_ticker = CronTicker(storage, self.clock, self._cron_fired)
        self.pruner = Pruner(
            storage,
            self.clock,
            retention=self.config.retention,
            dead_letter_retention=self.config.dead_letter_retention,
            interval=self.config.prune_interval,
        )
        self.heartbeater = VisibilityHeartbeater(
            storage, self.clock, interval=self.config.heartbeat_interval
        )

    # -- middleware ----------------------------------------------------------------

    def use_enqueue(self, middleware: EnqueueMiddleware) -> None:
        self._enqueue_middleware.append(middleware)

    def use_execution(self, middleware: ExecutionMiddleware) -> None:
        self.execution_middleware.append(middleware)

    # -- embedded workers -------------------------------------------------------------

    def register(self, job_type: str, handler: Handler) -> None:
        """Route jobs of ``job_type`` to ``handler`` in this process's workers."""
        self.handlers[validate_type(job_type)] = handler

    def worker_pool(
        self, queues: Sequence[str], concurrency: int = 1, **options: Any
    ) -> WorkerPool:
        return WorkerPool(self, self.handlers, queues, concurrency, **options)

    async def run_workers(
        self,
        queues: Sequence[str],
        concurrency: int = 1,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        **options: Any,
    ) -> None:
        """Run ``concurrency`` workers until the engine shuts down or the task is cancelled."""
        await self.worker_pool(queues, concurrency, **options).run(task_status=task_status)

    # -- wake-ups and events -------------------------------------------------------

    def notify_available(self, queues: Iterable[str]) -> None:
        """Jobs became available in ``queues``: wake the pools that serve them.

        Adapters shared between processes call this from their own listeners
        (e.g. PostgreSQL LISTEN/NOTIFY) as well.
        """
        for queue in set(queues):
            for pool in self._pools_by_queue.get(queue, ()):
                pool.wake()

    def _publish(self, kind: str, job: Job, **data: Any) -> None:
        self.events.publish_job(kind, job, self.clock(), data)

    def _jobs_became_available(self, jobs: list[Job]) -> None:
        self.notify_available(j.queue for j in jobs if j.state is JobState.AVAILABLE)

    # StorageListener: the adapter reports work it did on its own.

    def queues_ready(self, queues: list[str]) -> None:
        self.notify_available(queues or list(self._pools_by_queue))

    def jobs_created(self, jobs: list[Job]) -> None:
        """Jobs the adapter created or released by itself (workflow steps, callbacks, cron)."""
        for job in jobs:
            self._publish("job.enqueued", job, workflow_id=job.workflow_id)
            if job.state is JobState.SCHEDULED and job.scheduled_at is not None:
                self.promoter.notify_due_nowait(job.scheduled_at)
        self._jobs_became_available(jobs)

    async def _after_settle(self, jobs: Iterable[Job]) -> None:
        """Publish the terminal event of each workflow that settling ``jobs`` ended.

        Called after every path that can end a member: ack, nack, cancel, the
        reaper, a unique ``replace``.  The workflow names the member that ended
        it, so the event goes out once even when several members settle at the
        same instant; the time check leaves out a later settling of that same
        member (retried from the dead letter queue).  Each workflow is read once
        per call, however many of its members settled (a reaper pass may expire
        a whole group).
        """
        members: dict[str, dict[str, Job]] = {}
        for job in jobs:
            if job.workflow_id is not None and job.state.is_terminal:
                members.setdefault(job.workflow_id, {})[job.id] = job
        for workflow_id, settled in members.items():
            try:
                # One read: a finished workflow's record is exact on every adapter.
                workflow = await self.storage.get_workflow_record(workflow_id)
            except OjsError as exc:
                log.warning(
                    "could not read workflow %s after %d of its jobs settled; "
                    "its terminal event, if any, is not published (%r)",
                    workflow_id,
                    len(settled),
                    exc,
                )
                continue
            ender = settled.get(workflow.finished_by or "")
            if (
                ender is not None
                and workflow.state in TERMINAL_WORKFLOW
                and workflow.completed_at == job_settled_at(ender)
            ):
                self.events.publish(
                    workflow_event(f"workflow.{workflow.state}", workflow, self.clock())
                )

    async def _jobs_reaped(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.state is JobState.DISCARDED:
                code = (job.error or {}).get("code")
                self._publish("job.discarded", job, reason=code, dead_letter=job.dead_letter)
            elif job.state is JobState.RETRYABLE:
                self._publish("job.failed", job, error=job.error)
                self._publish("job.retrying", job, retry_delay_ms=job.retry_delay_ms)
                if job.scheduled_at is not None:
                    self.promoter.notify_due_nowait(job.scheduled_at)
            else:
                self._publish("job.requeued", job, reason=(job.error or {}).get("code"))
        self._jobs_became_available(jobs)
        await self._after_settle(jobs)

    def _jobs_claimed(self, jobs: list[Job]) -> None:
        self._counters["fetched"] += len(jobs)
        for job in jobs:
            self._publish("job.started", job, worker_id=job.worker_id)
        deadlines = [d for j in jobs for d in (j.lease_expires_at, j.execution_deadline()) if d]
        if deadlines:
            self.reaper.notify_due_nowait(min(deadlines))

    # -- producing -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self.draining:
            raise ShuttingDown("The engine is shutting down")

    async def submit(self, body: Any) -> EnqueueResult | None:
        """Enqueue one job from an OJS envelope (the HTTP request body).

        Returns None when enqueue middleware dropped the job.  An invalid
        envelope raises its own validation error (no per-item wrapping).
        """
        results = await self.enqueue_jobs([parse_job(body, self.clock())])
        return results[0] if results else None

    async def submit_many(self, bodies: Sequence[Any]) -> list[EnqueueResult]:
        """Validate every envelope first, then store them in one storage call.

        Any invalid envelope fails the whole batch with one error listing each
        invalid item (``details.errors``: ``index`` plus the item's error), also
        for a batch of one.
        """
        now = self.clock()
        errors: list[dict[str, Any]] = []
        jobs: list[Job] = []
        for index, body in enumerate(bodies):
            try:
                jobs.append(parse_job(body, now))
            except OjsError as exc:
                errors.append({"index": index, **exc.to_wire()})
        if errors:
            raise InvalidRequest(
                f"{len(errors)} of {len(bodies)} jobs are invalid; none were enqueued",
                details={"errors": errors},
            )
        return await self.enqueue_jobs(jobs)

    async def enqueue(
        self, job_type: str, args: list[Any] | None = None, **options: Any
    ) -> EnqueueResult | None:
        """Embedded convenience: ``await engine.enqueue("email.send", [to], queue="mail")``."""
        body: dict[str, Any] = {"type": job_type, "args": args if args is not None else []}
        meta = options.pop("meta", None)
        if meta is not None:
            body["meta"] = meta
        job_id = options.pop("id", None)
        if job_id is not None:
            body["id"] = job_id
        if options:
            body["options"] = options
        return await self.submit(body)

    async def enqueue_jobs(self, jobs: Sequence[Job]) -> list[EnqueueResult]:
        self._check_open()
        if self._enqueue_middleware:
            chain = build_enqueue_chain(self._enqueue_middleware, _identity)
            kept = []
            for job in jobs:
                out = await chain(job)
                if out is not None:
                    kept.append(out)
            jobs = kept
        if not jobs:
            return []
        results = await self.storage.enqueue(jobs, self.clock())
        self._counters["enqueued"] += sum(1 for r in results if r.created)
        for result in results:
            if result.replaced is not None:
                self._publish("job.cancelled", result.replaced, reason="unique_replace")
            if not result.created:
                continue
            job = result.job
            self._publish("job.enqueued", job)
            if job.state is JobState.SCHEDULED and job.scheduled_at is not None:
                self.promoter.notify_due_nowait(job.scheduled_at)
            if job.expires_at is not None:
                self.reaper.notify_due_nowait(job.expires_at)
        self._jobs_became_available([r.job for r in results])
        await self._after_settle(r.replaced for r in results if r.replaced is not None)
        return results

    # -- consuming -----------------------------------------------------------------

    def _pool_for(self, queues: tuple[str, ...]) -> FetcherPool:
        pool = self._pools.get(queues)
        if pool is None:
            if self._pool_nursery is None:
                raise ShuttingDown("The engine is not running")
            pool = FetcherPool(queues, self.storage, self.clock, self.release, self._jobs_claimed)
            self._pools[queues] = pool
            for queue in queues:
                self._pools_by_queue.setdefault(queue, set()).add(pool)
            self.supervisor.start(self._pool_nursery, "fetcher:" + ",".join(queues), pool.run)
        return pool

    async def fetch(
        self,
        queues: Sequence[str],
        count: int = 1,
        *,
        worker_id: str | None = None,
        visibility_ms: int | None = None,
        wait_ms: int = 0,
    ) -> list[Job]:
        """Claim up to ``count`` jobs; wait up to ``wait_ms`` for the first to arrive."""
        if not queues:
            raise InvalidRequest(
                "'queues' must list at least one queue", details={"field": "queues"}
            )
        key = tuple(validate_queue(q, "queues") for q in queues)
        count = max(1, min(count, self.config.max_fetch_count))
        wait = min(max(0, wait_ms), self.config.max_fetch_wait_ms) / 1000.0
        if self.draining:
            return []
        if worker_id is not None:
            self._touch_worker(worker_id)
        request = FetchRequest(
            queues=key,
            count=count,
            worker_id=worker_id,
            visibility_ms=visibility_ms,
            deadline=trio.current_time() + wait,
        )
        pool = self._pool_for(key)
        await pool.send_channel.send(request)
        try:
            await request.done.wait()
        except BaseException:
            pool.abandon(request)
            if request.done.is_set() and request.jobs:
                with trio.CancelScope(shield=True):
                    await self.release(request.jobs)
            raise
        if request.error is not None:
            raise request.error
        return request.jobs

    async def release(self, jobs: list[Job]) -> None:
        """Give claimed-but-undelivered jobs back (their fetcher went away)."""
        failure = Failure(code="released", message="fetch abandoned before delivery")
        for job in jobs:
            try:
                await self.storage.nack(job.id, job.worker_id, failure, True, self.clock())
            except OjsError as exc:
                log.warning("could not release job %s; its lease will expire (%r)", job.id, exc)
        self._jobs_became_available(jobs)

    async def ack(
        self,
        job_id: str,
        result: Any = None,
        *,
        has_result: bool = True,
        worker_id: str | None = None,
    ) -> Job:
        if has_result:
            check_json_native(result, "result")
        job = await self.storage.ack(job_id, worker_id, result, has_result, self.clock())
        self._completed(job)
        await self._after_settle([job])
        return job

    async def ack_many(
        self, acks: Sequence[tuple[str, Any]], *, worker_id: str | None = None
    ) -> list[Job | OjsError]:
        """Complete several jobs held by ``worker_id``: ``acks`` are (job id, result).

        One storage call for all of them.  One outcome per ack, in order: the
        completed job, or the error :meth:`ack` would have raised for that job.
        """
        outcomes: list[Job | OjsError | None] = [None] * len(acks)
        requests: list[AckRequest] = []
        where: list[int] = []
        for k, (job_id, result) in enumerate(acks):
            try:
                check_json_native(result, "result")
            except OjsError as exc:
                outcomes[k] = exc
                continue
            requests.append(AckRequest(job_id, worker_id, result, True))
            where.append(k)
        if requests:
            stored = await self.storage.ack_many(requests, self.clock())
            for k, settled in zip(where, stored, strict=True):
                outcomes[k] = settled
        done: list[Job | OjsError] = []
        for outcome in outcomes:
            assert outcome is not None
            done.append(outcome)
            if isinstance(outcome, Job):
                self._completed(outcome)
        await self._after_settle(o for o in done if isinstance(o, Job))
        return done

    def _completed(self, job: Job) -> None:
        self._counters["acked"] += 1
        duration_ms = None
        if job.started_at is not None and job.completed_at is not None:
            duration_ms = round((job.completed_at - job.started_at) * 1000)
        self._publish("job.completed", job, duration_ms=duration_ms)

    async def nack(
        self,
        job_id: str,
        failure: Failure | None = None,
        *,
        worker_id: str | None = None,
        requeue: bool = False,
    ) -> Job:
        job = await self.storage.nack(
            job_id, worker_id, failure or Failure(), requeue, self.clock()
        )
        self._counters["nacked"] += 1
        if requeue:
            self._publish("job.requeued", job)
        else:
            self._publish("job.failed", job, error=job.error)
            if job.state is JobState.RETRYABLE:
                self._publish("job.retrying", job, retry_delay_ms=job.retry_delay_ms)
                if job.scheduled_at is not None:
                    self.promoter.notify_due_nowait(job.scheduled_at)
            elif job.state is JobState.DISCARDED:
                self._publish("job.discarded", job, dead_letter=job.dead_letter)
                await self._after_settle([job])
        self._jobs_became_available([job])
        return job

    def _touch_worker(self, worker_id: str) -> WorkerInfo:
        info = self._workers.get(worker_id)
        if info is None:
            info = self._workers[worker_id] = WorkerInfo(worker_id, self.clock())
        info.last_seen = self.clock()
        return info

    def set_worker_directive(self, worker_id: str, directive: str) -> WorkerInfo:
        if directive not in WORKER_STATES:
            raise InvalidRequest(f"unknown worker directive {directive!r}")
        info = self._touch_worker(worker_id)
        info.directive = directive
        return info

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    async def heartbeat(
        self,
        worker_id: str,
        job_ids: Sequence[str] = (),
        *,
        visibility_ms: int | None = None,
    ) -> HeartbeatReply:
        info = self._touch_worker(worker_id)
        info.active_jobs = len(job_ids)
        call = HeartbeatCall(worker_id, tuple(job_ids), visibility_ms)
        await self.heartbeater.send_channel.send(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        state = info.directive
        if self.draining:
            state = "terminate"
        elif self.config.honour_test_directives:
            for job in call.extended:
                if job.directive in WORKER_STATES:
                    state = job.directive
        return HeartbeatReply(state, [j.id for j in call.extended], self.clock())

    # -- inspection and control ------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        return await self.storage.get(job_id)

    async def cancel(self, job_id: str) -> Job:
        job = await self.storage.cancel(job_id, self.clock())
        self._publish("job.cancelled", job)
        await self._after_settle([job])
        return job

    async def list_dead_letter(
        self, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> DeadLetterPage:
        return await self.storage.list_dead_letter(queue, limit, offset)

    async def retry_dead_letter(self, job_id: str) -> Job:
        job = await self.storage.retry_dead_letter(job_id, self.clock())
        self._publish("job.enqueued", job, from_dead_letter=True)
        self._jobs_became_available([job])
        return job

    async def delete_dead_letter(self, job_id: str) -> Job:
        return await self.storage.delete_dead_letter(job_id)

    async def list_queues(self) -> list[QueueInfo]:
        return await self.storage.list_queues()

    async def queue_info(self, queue: str) -> QueueInfo:
        return await self.storage.queue_info(validate_queue(queue), self.clock())

    async def pause_queue(self, queue: str) -> QueueInfo:
        return await self.storage.set_queue_paused(validate_queue(queue), True, self.clock())

    async def resume_queue(self, queue: str) -> QueueInfo:
        info = await self.storage.set_queue_paused(validate_queue(queue), False, self.clock())
        self.notify_available([queue])
        return info

    # -- cron ------------------------------------------------------------------------

    async def put_cron(self, body: Any) -> CronRecord:
        """Register (or replace) a cron schedule from an OJS cron request body."""
        record = await self.storage.put_cron(parse_cron_request(body, self.clock()))
        self.cron_ticker.notify_changed_nowait()
        return record

    async def list_crons(self) -> list[CronRecord]:
        return await self.storage.list_crons()

    async def get_cron(self, name: str) -> CronRecord:
        return await self.storage.get_cron(name)

    async def set_cron_enabled(self, name: str, enabled: Any) -> CronRecord:
        """Enable or disable a schedule without removing it (ojs-cron 8.5).

        One atomic storage step: a deleted schedule is not recreated, a
        re-registration is not undone, and asking for the state it is in changes
        nothing.  Disabling a schedule whose occurrence was due but not yet
        fired skips that occurrence: this call reports it (``cron.skipped``,
        reason ``disabled``), once, since only the call that changed the record
        sees it go.
        """
        if not isinstance(enabled, bool):
            raise InvalidRequest("'enabled' must be a boolean", details={"field": "enabled"})
        now = self.clock()
        before, after = await self.storage.set_cron_enabled(name, enabled, now)
        due = before.next_run_at
        if before.enabled and not after.enabled and due is not None and due <= now:
            skipped = CronFire(False, reason="disabled", record=after, occurrence=due)
            self.events.publish(cron_event("cron.skipped", skipped, now))
        self.cron_ticker.notify_changed_nowait()
        return after

    async def delete_cron(self, name: str) -> CronRecord:
        record = await self.storage.delete_cron(name)
        self.cron_ticker.notify_changed_nowait()
        return record

    def _cron_fired(self, fire: CronFire) -> None:
        # The job itself reaches us through the storage listener (jobs_created).
        if fire.record is not None:
            kind = "cron.triggered" if fire.fired else "cron.skipped"
            self.events.publish(cron_event(kind, fire, self.clock()))

    # -- workflows -------------------------------------------------------------------

    async def create_workflow(self, body: Any) -> Workflow:
        self._check_open()
        now = self.clock()
        workflow, jobs = parse_workflow(body, now)
        stored = await self.storage.create_workflow(workflow, jobs, now)
        self.events.publish(workflow_event("workflow.started", stored, now))
        for job in jobs:
            self._publish("job.enqueued", job, workflow_id=stored.id)
        self._jobs_became_available(jobs)
        return stored

    async def get_workflow(self, workflow_id: str) -> Workflow:
        return await self.storage.get_workflow(workflow_id)

    async def cancel_workflow(self, workflow_id: str) -> Workflow:
        workflow, cancelled = await self.storage.cancel_workflow(workflow_id, self.clock())
        for job in cancelled:
            self._publish("job.cancelled", job, workflow_id=workflow_id)
        self.events.publish(workflow_event("workflow.cancelled", workflow, self.clock()))
        return workflow

    async def reset(self) -> None:
        """Empty storage and the event log (test isolation)."""
        await self.storage.reset()
        self.events.clear()
        self._workers.clear()

    async def health(self) -> dict[str, Any]:
        backend = await self.storage.ping()
        return {"backend": backend, "uptime_seconds": round(self.clock() - self.started_at)}

    def statistics(self) -> EngineStatistics:
        pools = [p.statistics() for p in self._pools.values()]
        return EngineStatistics(
            enqueued=self._counters["enqueued"],
            fetched=self._counters["fetched"],
            acked=self._counters["acked"],
            nacked=self._counters["nacked"],
            fetcher_pools=len(pools),
            waiting_fetches=sum(p.waiting for p in pools),
            promoted=self.promoter.promoted,
            reaped=self.reaper.reaped,
            events=self.events.statistics().published,
            actors=[vars(s).copy() for s in self.supervisor.statistics()],
        )

    def begin_shutdown(self) -> None:
        """Stop taking work: waiting fetches are answered now, new ones get nothing."""
        self.draining = True
        for pool in self._pools.values():
            pool.drain()


async def _identity(job: Job) -> Job:
    return job


def job_settled_at(job: Job) -> float | None:
    """When a terminal job reached its terminal state."""
    return job.completed_at or job.discarded_at or job.cancelled_at


@asynccontextmanager
async def open_engine(
    storage: Storage, config: EngineConfig | None = None
) -> AsyncIterator[Engine]:
    """Run an engine for the duration of the ``async with`` block."""
    engine = Engine(storage, config)
    storage.set_listener(engine)
    await storage.open()
    try:
        async with trio.open_nursery() as timed_actors:
            sup = engine.supervisor
            sup.start(timed_actors, "promoter", engine.promoter.run)
            sup.start(timed_actors, "reaper", engine.reaper.run)
            sup.start(timed_actors, "heartbeater", engine.heartbeater.run)
            sup.start(timed_actors, "cron", engine.cron_ticker.run)
            sup.start(timed_actors, "storage-listener", storage.listen)
            sup.start(timed_actors, "pruner", engine.pruner.run)
            async with trio.open_nursery() as pools:
                engine._pool_nursery = pools
                try:
                    yield engine
                finally:
                    engine.begin_shutdown()
                    # Let drained fetches reach their callers before pools stop.
                    await trio.lowlevel.checkpoint()
                    engine._pool_nursery = None
                    pools.cancel_scope.cancel()
            timed_actors.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await storage.aclose()
