"""In-memory storage: the embedded adapter.

Each verb runs to completion without awaiting in the middle (one checkpoint at
the start), so under Trio's cooperative scheduling a verb is atomic without a
lock.  Indexes are heaps with lazy invalidation: an entry carries the version
stamp the job had when it was pushed, and a popped entry whose stamp no longer
matches is skipped.  Claims, promotion and reaping therefore touch only the
jobs they act on, never the whole store.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio

from ojs_trio.engine import lifecycle, unique, workflows
from ojs_trio.engine.cron import CronFire, CronRecord, set_enabled
from ojs_trio.engine.errors import DuplicateJob, NotFound, OjsError
from ojs_trio.engine.job import DEFAULT_VISIBILITY_MS, Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.queue_limits import RateWindow, queue_limits_from
from ojs_trio.engine.states import TERMINAL_STATES, JobState
from ojs_trio.engine.workflows import Workflow
from ojs_trio.storage.jobtable import JobTable
from ojs_trio.storage.port import (
    AckRequest,
    ClaimRequest,
    DeadLetterPage,
    EnqueueResult,
    QueueInfo,
    StorageListener,
)

_TERMINAL = frozenset(state.value for state in TERMINAL_STATES)


class MemoryStorage:
    name = "memory"
    #: ojs-unique-jobs.md 8 (docs/unique-jobs.md explains).
    unique_guarantee = (
        "strong",
        "duplicate check and insert in one step of the single-threaded in-memory "
        "store: the enqueue never yields between them",
    )

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._seq = itertools.count()
        self._listener: StorageListener | None = None
        self.reset_nowait()

    def set_listener(self, listener: StorageListener | None) -> None:
        self._listener = listener

    async def listen(self) -> None:
        await trio.lowlevel.checkpoint()  # one process owns the data: nothing to watch

    def reset_nowait(self) -> None:
        # Jobs are stored as records (see jobtable): every read is a private copy.
        self._jobs = JobTable()
        self._stamp: dict[str, int] = {}  # job id -> version of its current index entries
        self._ready: dict[str, list[tuple[int, int, str]]] = {}  # queue -> (-prio, seq, id)
        self._due: list[tuple[float, int, str]] = []  # scheduled/retryable by due time
        self._leases: list[tuple[float, int, str]] = []  # active by lease/exec deadline
        self._ttl: list[tuple[float, int, str]] = []  # not-yet-started jobs with expires_at
        self._dead: dict[str, None] = {}  # insertion-ordered dead letter ids
        self._queues: dict[str, QueueInfo] = {}
        self._expired_unreported: list[Job] = []
        self._unique: dict[str, list[str]] = {}  # fingerprint -> job ids
        self._active: dict[str, set[str]] = {}  # queue -> active job ids
        self._starts: dict[str, RateWindow] = {}  # queue -> recent claim times
        self._finished: dict[str, deque[tuple[float, bool]]] = {}  # queue -> (t, ok)
        self._workflows: dict[str, Workflow] = {}
        self._crons: dict[str, CronRecord] = {}

    # -- lifecycle of the adapter ------------------------------------------------

    async def open(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def ping(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"type": self.name, "status": "connected", "jobs": len(self._jobs)}

    async def reset(self) -> None:
        await trio.lowlevel.checkpoint()
        self.reset_nowait()

    # -- indexing ----------------------------------------------------------------

    def _index(self, job: Job, now: float) -> None:
        """(Re)file a job in the index its state calls for."""
        stamp = next(self._seq)
        self._stamp[job.id] = stamp
        if job.state is JobState.AVAILABLE:
            heap = self._ready.setdefault(job.queue, [])
            heapq.heappush(heap, (-job.priority, stamp, job.id))
        elif job.state in (JobState.SCHEDULED, JobState.RETRYABLE) and job.scheduled_at:
            heapq.heappush(self._due, (job.scheduled_at, stamp, job.id))
        elif job.state is JobState.ACTIVE:
            deadline = job.lease_expires_at or now
            exec_deadline = job.execution_deadline()
            if exec_deadline is not None:
                deadline = min(deadline, exec_deadline)
            heapq.heappush(self._leases, (deadline, stamp, job.id))
        if job.expires_at is not None and job.state in (
            JobState.AVAILABLE,
            JobState.SCHEDULED,
            JobState.RETRYABLE,
            JobState.PENDING,
        ):
            heapq.heappush(self._ttl, (job.expires_at, stamp, job.id))
        if job.state is JobState.DISCARDED and job.dead_letter:
            self._dead[job.id] = None
        else:
            self._dead.pop(job.id, None)
        active = self._active.setdefault(job.queue, set())
        if job.state is JobState.ACTIVE:
            active.add(job.id)
        else:
            active.discard(job.id)
        if job.state in (JobState.COMPLETED, JobState.DISCARDED):
            done = self._finished.setdefault(job.queue, deque(maxlen=100_000))
            done.append((now, job.state is JobState.COMPLETED))

    def _store(self, job: Job, now: float) -> None:
        """Make ``job`` the current version and file it; run workflow rules on settling."""
        self._jobs[job.id] = job
        self._index(job, now)
        if job.workflow_id is None:
            return
        workflow = self._workflows.get(job.workflow_id)
        if workflow is None:
            return
        # The workflow keeps the job's result: give it its own copy, not the
        # object the verb is about to hand to its caller.
        job = self._jobs[job.id]
        if job.state is JobState.ACTIVE:
            workflows.on_job_started(workflow, job, now)
            return
        spawned = workflows.on_job_finished(workflow, job, now)
        for new in spawned:
            self._insert(new, now)
        if spawned and self._listener is not None:
            self._listener.jobs_created([j.clone() for j in spawned])

    def _insert(self, job: Job, now: float) -> None:
        key = unique.fingerprint(job)
        if key != job.unique_key:
            job = job.clone()  # the caller's job stays as it was given
            job.unique_key = key
        if key is not None:
            self._unique.setdefault(key, []).append(job.id)
        self._queue(job.queue, now)
        self._store(job, now)

    def _live(self, stamp: int, job_id: str) -> Job | None:
        if self._stamp.get(job_id) != stamp:
            return None
        return self._jobs.get(job_id)

    def _is_live(self, stamp: int, job_id: str) -> bool:
        # Deleting a job drops its stamp, so this needs no decode.
        return self._stamp.get(job_id) == stamp

    def _queue(self, name: str, now: float) -> QueueInfo:
        info = self._queues.get(name)
        if info is None:
            info = self._queues[name] = QueueInfo(name=name, created_at=now)
        return info

    def _lookup(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"Job {job_id} not found", details={"job_id": job_id})
        return job

    # -- verbs -------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        await trio.lowlevel.checkpoint()
        # Decide everything before changing anything, so the batch is all or nothing.
        seen: set[str] = set()
        keys: dict[str, str] = {}  # fingerprint -> id of the batch job that claimed it
        plan: list[tuple[Job, Job | None]] = []  # (job, existing duplicate)
        for job in jobs:
            if job.id in self._jobs or job.id in seen:
                raise DuplicateJob(
                    f"A job with id {job.id} already exists", details={"existing_job_id": job.id}
                )
            seen.add(job.id)
            key = unique.fingerprint(job)
            existing = None
            if key is not None:
                existing = self._find_duplicate(job, key, now)
                if existing is None and key in keys:
                    existing = next(j for j in jobs if j.id == keys[key])
                if existing is not None and unique.on_conflict(job) == "reject":
                    raise DuplicateJob(
                        "A job with the same unique key already exists",
                        details={"existing_job_id": existing.id, "unique_key": key},
                    )
                if existing is None or unique.on_conflict(job) != "ignore":
                    keys[key] = job.id
            plan.append((job, existing))
        results = []
        for job, existing in plan:
            if existing is not None and unique.on_conflict(job) == "ignore":
                # A twin earlier in this batch is stored by now: return the stored copy.
                stored = self._jobs.get(existing.id)
                results.append(EnqueueResult(stored or existing.clone(), False))
                continue
            replaced = None
            current = self._jobs.get(existing.id) if existing is not None else None
            if current is not None and not current.state.is_terminal:
                job = job.clone()
                unique.inherit_schedule(job, current)
                lifecycle.cancel(current, now)
                self._store(current, now)
                replaced = current
            self._apply_queue_limits(job, now)
            self._insert(job, now)
            results.append(EnqueueResult(self._jobs[job.id], True, replaced))
        return results

    def _find_duplicate(self, job: Job, key: str, now: float) -> Job | None:
        ids = self._unique.get(key, [])
        # Drop ids of jobs that are gone or can no longer block anyone.
        ids[:] = [i for i in ids if i in self._jobs]
        for job_id in reversed(ids):
            holder = self._jobs[job_id]
            if unique.conflicts(job, holder, now):
                return holder
        return None

    def _apply_queue_limits(self, job: Job, now: float) -> None:
        limits = queue_limits_from(job.options_extra)
        if limits is None:
            return
        info = self._queue(job.queue, now)
        rate, concurrency = limits
        if rate is not None:
            if info.rate_limit != rate:
                self._starts.pop(job.queue, None)  # a new limit starts a new window
            info.rate_limit = rate
        if concurrency is not None:
            info.concurrency = concurrency

    def _budget(self, queue: QueueInfo, now: float) -> int | None:
        """How many more jobs this queue may start now (None: unlimited)."""
        budget: int | None = None
        if queue.rate_limit is not None:
            window = self._starts.setdefault(queue.name, RateWindow.from_config(queue.rate_limit))
            budget = window.remaining(now)
        if queue.concurrency is not None:
            room = max(0, queue.concurrency - len(self._active.get(queue.name, ())))
            budget = room if budget is None else min(budget, room)
        return budget

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[list[Job]]:
        await trio.lowlevel.checkpoint()
        out: list[list[Job]] = []
        for request in requests:
            got: list[Job] = []
            for queue in request.queues:
                info = self._queues.get(queue)
                if info is None or info.paused:
                    continue
                budget = self._budget(info, now)
                heap = self._ready.get(queue)
                while heap and len(got) < request.count and budget != 0:
                    _, stamp, job_id = heapq.heappop(heap)
                    job = self._live(stamp, job_id)
                    if job is None or job.state is not JobState.AVAILABLE:
                        continue
                    if lifecycle.is_expired(job, now):
                        lifecycle.expire_ttl(job, now)
                        self._store(job, now)
                        self._expired_unreported.append(job)
                        continue
                    lifecycle.claim(job, request.worker_id, request.visibility_ms, now)
                    self._store(job, now)
                    if budget is not None:
                        budget -= 1
                    window = self._starts.get(queue)
                    if window is not None:
                        window.record(now)
                    got.append(job)
                if len(got) >= request.count:
                    break
            out.append(got)
        return out

    async def ack(
        self, job_id: str, worker_id: str | None, result: Any, has_result: bool, now: float
    ) -> Job:
        await trio.lowlevel.checkpoint()
        job = self._lookup(job_id)
        lifecycle.ack(job, worker_id, result, has_result, now)
        self._store(job, now)
        return job

    async def ack_many(self, acks: Sequence[AckRequest], now: float) -> list[Job | OjsError]:
        await trio.lowlevel.checkpoint()
        outcomes: list[Job | OjsError] = []
        for ack in acks:
            try:
                job = self._lookup(ack.job_id)
                lifecycle.ack(job, ack.worker_id, ack.result, ack.has_result, now)
            except OjsError as exc:
                outcomes.append(exc)
                continue
            self._store(job, now)
            outcomes.append(job)
        return outcomes

    async def nack(
        self, job_id: str, worker_id: str | None, failure: Failure, requeue: bool, now: float
    ) -> Job:
        await trio.lowlevel.checkpoint()
        job = self._lookup(job_id)
        lifecycle.nack(job, worker_id, failure, requeue, now, self._rng)
        self._store(job, now)
        return job

    async def heartbeat(
        self, worker_id: str | None, job_ids: Sequence[str], visibility_ms: int | None, now: float
    ) -> list[Job]:
        await trio.lowlevel.checkpoint()
        extended: list[Job] = []
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None or job.state is not JobState.ACTIVE:
                continue
            if worker_id is not None and job.worker_id not in (None, worker_id):
                continue
            ms = visibility_ms or job.visibility_timeout_ms or DEFAULT_VISIBILITY_MS
            job.lease_expires_at = now + ms / 1000.0
            self._jobs[job_id] = job
            self._index(job, now)
            extended.append(job)
        return extended

    async def cancel(self, job_id: str, now: float) -> Job:
        await trio.lowlevel.checkpoint()
        job = self._lookup(job_id)
        lifecycle.cancel(job, now)
        self._store(job, now)
        return job

    async def get(self, job_id: str) -> Job:
        await trio.lowlevel.checkpoint()
        return self._lookup(job_id)

    async def promote_due(self, now: float, limit: int) -> list[Job]:
        await trio.lowlevel.checkpoint()
        promoted: list[Job] = []
        while self._due and self._due[0][0] <= now and len(promoted) < limit:
            _, stamp, job_id = heapq.heappop(self._due)
            job = self._live(stamp, job_id)
            if job is None or job.state not in (JobState.SCHEDULED, JobState.RETRYABLE):
                continue
            if lifecycle.is_expired(job, now):
                continue  # the reaper discards it through the TTL index
            lifecycle.promote(job, now)
            self._store(job, now)
            promoted.append(job)
        return promoted

    async def reap(self, now: float, limit: int) -> list[Job]:
        await trio.lowlevel.checkpoint()
        reaped, self._expired_unreported = self._expired_unreported, []
        while self._leases and self._leases[0][0] <= now and len(reaped) < limit:
            _, stamp, job_id = heapq.heappop(self._leases)
            job = self._live(stamp, job_id)
            if job is None or job.state is not JobState.ACTIVE:
                continue
            exec_deadline = job.execution_deadline()
            if exec_deadline is not None and exec_deadline <= now:
                lifecycle.execution_timeout(job, now, self._rng)
            else:
                lifecycle.expire_lease(job, now)
            self._store(job, now)
            reaped.append(job)
        while self._ttl and self._ttl[0][0] <= now and len(reaped) < limit:
            _, stamp, job_id = heapq.heappop(self._ttl)
            job = self._live(stamp, job_id)
            if job is None or job.state.is_terminal or job.state is JobState.ACTIVE:
                continue
            lifecycle.expire_ttl(job, now)
            self._store(job, now)
            reaped.append(job)
        return reaped

    def _earliest(self, *heaps: list[tuple[float, int, str]]) -> float | None:
        candidates = []
        for heap in heaps:
            # Drop stale heads so a cancelled job does not cause a wasted wakeup.
            while heap and not self._is_live(heap[0][1], heap[0][2]):
                heapq.heappop(heap)
            if heap:
                candidates.append(heap[0][0])
        return min(candidates) if candidates else None

    async def prune(
        self, finished_before: float | None, dead_letter_before: float | None, limit: int
    ) -> int:
        await trio.lowlevel.checkpoint()
        doomed: list[str] = []
        for job_id, (_, state, finished, dead_letter) in self._jobs.summaries():
            if len(doomed) >= limit:
                break
            if state not in _TERMINAL:
                continue
            cutoff = dead_letter_before if dead_letter else finished_before
            if cutoff is not None and finished < cutoff:
                doomed.append(job_id)
        for job_id in doomed:
            del self._jobs[job_id]
            self._stamp.pop(job_id, None)
            self._dead.pop(job_id, None)
        return len(doomed)

    async def next_wakeup(self) -> float | None:
        await trio.lowlevel.checkpoint()
        return self._earliest(self._due, self._leases, self._ttl)

    async def next_due_at(self) -> float | None:
        await trio.lowlevel.checkpoint()
        return self._earliest(self._due)

    async def next_reap_at(self) -> float | None:
        await trio.lowlevel.checkpoint()
        if self._expired_unreported:
            return float("-inf")  # claim already expired some: report them now
        return self._earliest(self._leases, self._ttl)

    async def list_dead_letter(self, queue: str | None, limit: int, offset: int) -> DeadLetterPage:
        await trio.lowlevel.checkpoint()
        ids = [i for i in self._dead if queue is None or self._jobs.summary(i)[0] == queue]
        page = [self._jobs[i] for i in ids[offset : offset + limit]]
        return DeadLetterPage(jobs=page, total=len(ids))

    def _dead_letter_job(self, job_id: str) -> Job:
        if job_id not in self._dead:
            raise NotFound(
                f"Job {job_id} is not in the dead letter queue", details={"job_id": job_id}
            )
        return self._jobs[job_id]

    async def retry_dead_letter(self, job_id: str, now: float) -> Job:
        await trio.lowlevel.checkpoint()
        job = self._dead_letter_job(job_id)
        lifecycle.retry_dead_letter(job, now)
        self._store(job, now)
        return job

    async def delete_dead_letter(self, job_id: str) -> Job:
        await trio.lowlevel.checkpoint()
        job = self._dead_letter_job(job_id)
        del self._dead[job_id]
        del self._jobs[job_id]
        self._stamp.pop(job_id, None)
        return job

    async def list_queues(self) -> list[QueueInfo]:
        await trio.lowlevel.checkpoint()
        return [
            QueueInfo(
                name=i.name,
                paused=i.paused,
                created_at=i.created_at,
                counts=self._jobs.counts(i.name),
            )
            for i in sorted(self._queues.values(), key=lambda q: q.name)
        ]

    async def queue_info(self, queue: str, now: float) -> QueueInfo:
        await trio.lowlevel.checkpoint()
        info = self._queues.get(queue)
        if info is None:
            raise NotFound(f"Queue {queue} not found", details={"queue": queue})
        counts: dict[str, int] = {state.value: 0 for state in JobState}
        counts.update(self._jobs.counts(queue))
        finished = self._finished.get(queue, deque())
        while finished and finished[0][0] < now - 3600:
            finished.popleft()
        recent = [ok for t, ok in finished if t >= now - 60]
        return QueueInfo(
            name=info.name,
            paused=info.paused,
            created_at=info.created_at,
            counts=counts,
            rate_limit=info.rate_limit,
            concurrency=info.concurrency,
            completed_last_minute=sum(1 for ok in recent if ok),
            failed_last_minute=sum(1 for ok in recent if not ok),
        )

    async def set_queue_paused(self, queue: str, paused: bool, now: float) -> QueueInfo:
        await trio.lowlevel.checkpoint()
        info = self._queue(queue, now)
        info.paused = paused
        if not paused and self._listener is not None:
            self._listener.queues_ready([queue])
        return QueueInfo(name=info.name, paused=info.paused, created_at=info.created_at)

    # -- workflows -----------------------------------------------------------------

    async def create_workflow(
        self, workflow: Workflow, jobs: Sequence[Job], now: float
    ) -> Workflow:
        await trio.lowlevel.checkpoint()
        if workflow.id in self._workflows:
            raise DuplicateJob(
                f"A workflow with id {workflow.id} already exists",
                details={"existing_workflow_id": workflow.id},
            )
        for job in jobs:
            if job.id in self._jobs:
                raise DuplicateJob(
                    f"A job with id {job.id} already exists", details={"existing_job_id": job.id}
                )
        self._workflows[workflow.id] = workflow.clone()
        for job in jobs:
            self._insert(job, now)
        return self._workflows[workflow.id].clone()

    def _workflow(self, workflow_id: str) -> Workflow:
        workflow = self._workflows.get(workflow_id)
        if workflow is None:
            raise NotFound(
                f"Workflow {workflow_id} not found", details={"workflow_id": workflow_id}
            )
        return workflow

    async def get_workflow_record(self, workflow_id: str) -> Workflow:
        return await self.get_workflow(workflow_id)  # the record is the live view here

    async def get_workflow(self, workflow_id: str) -> Workflow:
        await trio.lowlevel.checkpoint()
        return self._workflow(workflow_id).clone()

    async def cancel_workflow(self, workflow_id: str, now: float) -> tuple[Workflow, list[Job]]:
        await trio.lowlevel.checkpoint()
        workflow = self._workflow(workflow_id).clone()
        to_cancel = workflows.cancel(workflow, now)
        self._workflows[workflow_id] = workflow
        cancelled = []
        for job_id in to_cancel:
            job = self._jobs[job_id]
            lifecycle.cancel(job, now)
            self._store(job, now)
            cancelled.append(job)
        return workflow.clone(), cancelled

    # -- cron ----------------------------------------------------------------------

    async def put_cron(self, record: CronRecord) -> CronRecord:
        await trio.lowlevel.checkpoint()
        existing = self._crons.get(record.name)
        stored = copy.deepcopy(record)
        if existing is not None:
            stored.created_at = existing.created_at
            stored.last_run_at = existing.last_run_at
            stored.last_job_id = existing.last_job_id
            stored.runs = existing.runs
            stored.skipped = existing.skipped
        self._crons[record.name] = stored
        return copy.deepcopy(stored)

    async def list_crons(self) -> list[CronRecord]:
        await trio.lowlevel.checkpoint()
        return [copy.deepcopy(c) for c in sorted(self._crons.values(), key=lambda c: c.name)]

    def _cron(self, name: str) -> CronRecord:
        record = self._crons.get(name)
        if record is None:
            raise NotFound(f"Cron schedule {name!r} not found", details={"name": name})
        return record

    async def get_cron(self, name: str) -> CronRecord:
        await trio.lowlevel.checkpoint()
        return copy.deepcopy(self._cron(name))

    async def delete_cron(self, name: str) -> CronRecord:
        await trio.lowlevel.checkpoint()
        record = self._cron(name)
        del self._crons[name]
        return copy.deepcopy(record)

    async def set_cron_enabled(
        self, name: str, enabled: bool, now: float
    ) -> tuple[CronRecord, CronRecord]:
        await trio.lowlevel.checkpoint()
        record = self._cron(name)
        before = copy.deepcopy(record)
        set_enabled(record, enabled, now)
        return before, copy.deepcopy(record)

    async def fire_cron(
        self, name: str, occurrence: float, next_run_at: float | None, job: Job, now: float
    ) -> CronFire:
        await trio.lowlevel.checkpoint()
        record = self._crons.get(name)
        if record is None:
            return CronFire(False, reason="missing")
        if not record.enabled:  # disabled since the ticker read it: nothing to advance
            return CronFire(False, reason="disabled", record=copy.deepcopy(record))
        if record.next_run_at != occurrence:
            return CronFire(False, reason="already_fired", record=copy.deepcopy(record))
        record.next_run_at = next_run_at
        previous = self._jobs.get(record.last_job_id) if record.last_job_id else None
        if previous is not None and not previous.state.is_terminal:
            if record.overlap_policy == "skip":
                record.skipped += 1
                return CronFire(False, reason="overlap", record=copy.deepcopy(record))
            if record.overlap_policy == "cancel_previous":
                lifecycle.cancel(previous, now)
                self._store(previous, now)
        self._insert(job, now)
        record.last_run_at = occurrence
        record.last_job_id = job.id
        record.runs += 1
        created = self._jobs[job.id].clone()
        if self._listener is not None:
            self._listener.jobs_created([created.clone()])
        return CronFire(True, job=created, record=copy.deepcopy(record))
