"""In-memory storage: the embedded adapter.

Each verb runs to completion without awaiting in the middle (one checkpoint at
the start), so under Trio's cooperative scheduling a verb is atomic without a
lock.  Indexes are heaps with lazy invalidation: an entry carries the version
stamp the job had when it was pushed, and a popped entry whose stamp no longer
matches is skipped.  Claims, promotion and reaping therefore touch only the
jobs they act on, never the whole store.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Sequence
from typing import Any

import trio

from ojs_trio.engine import lifecycle
from ojs_trio.engine.errors import DuplicateJob, NotFound
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.states import JobState
from ojs_trio.storage.port import ClaimRequest, DeadLetterPage, EnqueueResult, QueueInfo


class MemoryStorage:
    name = "memory"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._seq = itertools.count()
        self.reset_nowait()

    def reset_nowait(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._stamp: dict[str, int] = {}  # job id -> version of its current index entries
        self._ready: dict[str, list[tuple[int, int, str]]] = {}  # queue -> (-prio, seq, id)
        self._due: list[tuple[float, int, str]] = []  # scheduled/retryable by due time
        self._leases: list[tuple[float, int, str]] = []  # active by lease/exec deadline
        self._ttl: list[tuple[float, int, str]] = []  # not-yet-started jobs with expires_at
        self._dead: dict[str, None] = {}  # insertion-ordered dead letter ids
        self._queues: dict[str, QueueInfo] = {}
        self._expired_unreported: list[Job] = []

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

    def _live(self, stamp: int, job_id: str) -> Job | None:
        if self._stamp.get(job_id) != stamp:
            return None
        return self._jobs.get(job_id)

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
        seen: set[str] = set()
        for job in jobs:  # validate the whole batch first: all or nothing
            if job.id in self._jobs or job.id in seen:
                raise DuplicateJob(
                    f"A job with id {job.id} already exists",
                    details={"existing_job_id": job.id},
                )
            seen.add(job.id)
        results = []
        for job in jobs:
            stored = job.clone()
            self._jobs[stored.id] = stored
            self._queue(stored.queue, now)
            self._index(stored, now)
            results.append(EnqueueResult(stored.clone(), created=True))
        return results

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[list[Job]]:
        await trio.lowlevel.checkpoint()
        out: list[list[Job]] = []
        for request in requests:
            got: list[Job] = []
            for queue in request.queues:
                info = self._queues.get(queue)
                if info is None or info.paused:
                    continue
                heap = self._ready.get(queue)
                while heap and len(got) < request.count:
                    _, stamp, job_id = heapq.heappop(heap)
                    job = self._live(stamp, job_id)
                    if job is None or job.state is not JobState.AVAILABLE:
                        continue
                    if lifecycle.is_expired(job, now):
                        lifecycle.expire_ttl(job, now)
                        self._index(job, now)
                        self._expired_unreported.append(job.clone())
                        continue
                    lifecycle.claim(job, request.worker_id, request.visibility_ms, now)
                    self._index(job, now)
                    got.append(job.clone())
                if len(got) >= request.count:
                    break
            out.append(got)
        return out

    async def ack(
        self, job_id: str, worker_id: str | None, result: Any, has_result: bool, now: float
    ) -> Job:
        await trio.lowlevel.checkpoint()
        job = self._lookup(job_id)
        updated = job.clone()
        lifecycle.ack(updated, worker_id, result, has_result, now)
        self._jobs[job_id] = updated
        self._index(updated, now)
        return updated.clone()

    async def nack(
        self, job_id: str, worker_id: str | None, failure: Failure, requeue: bool, now: float
    ) -> Job:
        await trio.lowlevel.checkpoint()
        job = self._lookup(job_id)
        updated = job.clone()
        lifecycle.nack(updated, worker_id, failure, requeue, now, self._rng)
        self._jobs[job_id] = updated
        self._index(updated, now)
        return updated.clone()

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
            ms = visibility_ms or job.visibility_timeout_ms or 30_000
            job.lease_expires_at = now + ms / 1000.0
            self._index(job, now)
            extended.append(job.clone())
        return extended

    async def cancel(self, job_id: str, now: float) -> Job:
        await trio.lowlevel.checkpoint()
        updated = self._lookup(job_id).clone()
        lifecycle.cancel(updated, now)
        self._jobs[job_id] = updated
        self._index(updated, now)
        return updated.clone()

    async def get(self, job_id: str) -> Job:
        await trio.lowlevel.checkpoint()
        return self._lookup(job_id).clone()

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
            self._index(job, now)
            promoted.append(job.clone())
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
            self._index(job, now)
            reaped.append(job.clone())
        while self._ttl and self._ttl[0][0] <= now and len(reaped) < limit:
            _, stamp, job_id = heapq.heappop(self._ttl)
            job = self._live(stamp, job_id)
            if job is None or job.state.is_terminal or job.state is JobState.ACTIVE:
                continue
            lifecycle.expire_ttl(job, now)
            self._index(job, now)
            reaped.append(job.clone())
        return reaped

    async def next_wakeup(self) -> float | None:
        await trio.lowlevel.checkpoint()
        candidates = []
        for heap in (self._due, self._leases, self._ttl):
            # Drop stale heads so a cancelled job does not cause a wasted wakeup.
            while heap and self._live(heap[0][1], heap[0][2]) is None:
                heapq.heappop(heap)
            if heap:
                candidates.append(heap[0][0])
        return min(candidates) if candidates else None

    async def list_dead_letter(self, queue: str | None, limit: int, offset: int) -> DeadLetterPage:
        await trio.lowlevel.checkpoint()
        ids = [i for i in self._dead if queue is None or self._jobs[i].queue == queue]
        page = [self._jobs[i].clone() for i in ids[offset : offset + limit]]
        return DeadLetterPage(jobs=page, total=len(ids))

    def _dead_letter_job(self, job_id: str) -> Job:
        if job_id not in self._dead:
            raise NotFound(
                f"Job {job_id} is not in the dead letter queue", details={"job_id": job_id}
            )
        return self._jobs[job_id]

    async def retry_dead_letter(self, job_id: str, now: float) -> Job:
        await trio.lowlevel.checkpoint()
        updated = self._dead_letter_job(job_id).clone()
        lifecycle.retry_dead_letter(updated, now)
        self._jobs[job_id] = updated
        self._index(updated, now)
        return updated.clone()

    async def delete_dead_letter(self, job_id: str) -> Job:
        await trio.lowlevel.checkpoint()
        job = self._dead_letter_job(job_id)
        del self._dead[job_id]
        del self._jobs[job_id]
        self._stamp.pop(job_id, None)
        return job.clone()

    async def list_queues(self) -> list[QueueInfo]:
        await trio.lowlevel.checkpoint()
        counts: dict[str, dict[str, int]] = {name: {} for name in self._queues}
        for job in self._jobs.values():
            by_state = counts.setdefault(job.queue, {})
            by_state[job.state.value] = by_state.get(job.state.value, 0) + 1
        return [
            QueueInfo(name=i.name, paused=i.paused, created_at=i.created_at, counts=counts[i.name])
            for i in sorted(self._queues.values(), key=lambda q: q.name)
        ]
