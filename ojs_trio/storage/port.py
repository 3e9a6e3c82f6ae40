"""The storage port: the domain verbs every adapter implements.

Rules about *what* a transition does live in :mod:`ojs_trio.engine.lifecycle`;
an adapter's job is to apply them atomically and durably.  Any step that must
not be split by a crash (claim, ack, nack + retry/dead-letter, cancel) is one
verb here, so the engine never composes two calls where atomicity matters.

Verbs that can batch take sequences: one ``enqueue`` call carries many jobs and
one ``claim`` call serves every waiting fetch of a fetcher pool.  All times are
epoch seconds passed in by the engine (``now``), never read inside an adapter,
so tests can drive time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ojs_trio.engine.cron import CronFire, CronRecord
from ojs_trio.engine.errors import OjsError
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.workflows import Workflow


class StorageListener(Protocol):
    """How an adapter tells the engine about work it did on its own."""

    def jobs_created(self, jobs: list[Job]) -> None:
        """Jobs the adapter created itself (next chain step, batch callback, cron run)."""

    def queues_ready(self, queues: list[str]) -> None:
        """Jobs may be available in these queues (e.g. another server's NOTIFY).

        An empty list means "anything may have changed" (a lost connection was
        restored): every waiting fetch should look again.
        """


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One fetch: up to ``count`` jobs from ``queues`` (checked in the order given)."""

    queues: tuple[str, ...]
    count: int = 1
    worker_id: str | None = None
    visibility_ms: int | None = None


@dataclass(frozen=True, slots=True)
class AckRequest:
    """One job's ack within :meth:`Storage.ack_many` (the arguments of ``ack``)."""

    job_id: str
    worker_id: str | None = None
    result: Any = None
    has_result: bool = False


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    job: Job
    created: bool = True  # False when a unique policy returned an existing job
    replaced: Job | None = None  # the job a unique "replace" cancelled for this one


@dataclass(slots=True)
class QueueInfo:
    name: str
    paused: bool = False
    created_at: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    rate_limit: dict[str, Any] | None = None  # {"max_per_second": n} or per_minute/window_ms
    concurrency: int | None = None  # max active jobs at once
    completed_last_minute: int = 0
    failed_last_minute: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    jobs: list[Job]
    total: int


@runtime_checkable
class Storage(Protocol):
    """What the engine needs from a backend."""

    name: str
    #: ojs-unique-jobs.md 8: (strength, mechanism) of the adapter's unique jobs.
    #: Strength is "strong" or "best-effort"; mechanism says, for people, how the
    #: duplicate check and the insert are kept atomic.  The manifest declares both
    #: (``capabilities.unique_jobs``, ``unique_job_strength``).
    unique_guarantee: tuple[str, str]

    async def open(self) -> None:
        """Connect and prepare (migrations, pools).  Called once by the engine."""

    async def aclose(self) -> None:
        """Release connections.  Called once by the engine on shutdown."""

    async def ping(self) -> dict[str, Any]:
        """Health probe; raises BackendUnavailable when the backend is down."""

    def set_listener(self, listener: StorageListener | None) -> None:
        """Register the engine's callbacks for work the adapter does by itself."""

    async def listen(self) -> None:
        """Run until cancelled, feeding the listener from outside sources.

        Adapters shared between processes watch for other servers' work here
        (PostgreSQL LISTEN/NOTIFY); the engine runs it as a supervised actor.
        Adapters with nothing to watch return at once.
        """

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        """Insert jobs atomically: all or none.

        Raises DuplicateJob on an id clash or a unique-policy ``reject``; a
        unique ``ignore`` yields the existing job with ``created=False``; a
        ``replace`` cancels the existing job in the same step.  A job with
        ``options.rate_limit`` / ``options.concurrency`` sets its queue's limits.
        """

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[list[Job]]:
        """Serve many fetches in one call: available -> active, exclusively.

        Returns one list per request, in request order.  Jobs come by queue
        order of the request, then priority (higher first), then FIFO.  A job
        is never handed to two requests, and paused queues yield nothing.
        """

    async def ack(
        self, job_id: str, worker_id: str | None, result: Any, has_result: bool, now: float
    ) -> Job:
        """active -> completed.  Raises NotFound, InvalidStateTransition, Conflict."""

    async def ack_many(self, acks: Sequence[AckRequest], now: float) -> list[Job | OjsError]:
        """``ack`` for many jobs in one call (a worker pool's finished jobs).

        One outcome per request, in order: the completed job, or the error
        ``ack`` would have raised for it (that job is left unchanged).  Each ack
        is applied as ``ack`` would apply it; the call is not all-or-nothing.
        """

    async def nack(
        self, job_id: str, worker_id: str | None, failure: Failure, requeue: bool, now: float
    ) -> Job:
        """active -> retryable | discarded (dead letter per policy) | available (requeue)."""

    async def heartbeat(
        self, worker_id: str | None, job_ids: Sequence[str], visibility_ms: int | None, now: float
    ) -> list[Job]:
        """Extend the leases of the given active jobs held by ``worker_id``; returns them."""

    async def cancel(self, job_id: str, now: float) -> Job:
        """Any non-terminal state -> cancelled."""

    async def get(self, job_id: str) -> Job:
        """Raises NotFound."""

    async def promote_due(self, now: float, limit: int) -> list[Job]:
        """scheduled/retryable jobs whose time has come -> available."""

    async def reap(self, now: float, limit: int) -> list[Job]:
        """Expired leases -> available/discarded, execution timeouts -> retry/discard,
        TTL-expired jobs -> discarded.  Safe to run concurrently from several servers."""

    async def prune(
        self, finished_before: float | None, dead_letter_before: float | None, limit: int
    ) -> int:
        """Delete up to ``limit`` finished jobs: completed/cancelled/discarded ones that
        finished before ``finished_before`` and dead-lettered ones before
        ``dead_letter_before`` (``None`` keeps that kind).  Returns how many."""

    async def next_wakeup(self) -> float | None:
        """Earliest time at which promote_due or reap would have work, if known."""

    async def next_due_at(self) -> float | None:
        """Earliest time at which promote_due would have work, if known."""

    async def next_reap_at(self) -> float | None:
        """Earliest time at which reap would have work (lease, timeout, TTL), if known."""

    async def list_dead_letter(
        self, queue: str | None, limit: int, offset: int
    ) -> DeadLetterPage: ...

    async def retry_dead_letter(self, job_id: str, now: float) -> Job: ...

    async def delete_dead_letter(self, job_id: str) -> Job: ...

    async def list_queues(self) -> list[QueueInfo]: ...

    async def queue_info(self, queue: str, now: float) -> QueueInfo:
        """One queue with per-state counts and last-minute throughput (NotFound if unknown)."""

    async def set_queue_paused(self, queue: str, paused: bool, now: float) -> QueueInfo:
        """Pause/resume delivery from a queue (created if unknown)."""

    # -- workflows ---------------------------------------------------------------

    async def create_workflow(
        self, workflow: Workflow, jobs: Sequence[Job], now: float
    ) -> Workflow:
        """Store the workflow and its initial jobs in one atomic step."""

    async def get_workflow(self, workflow_id: str) -> Workflow: ...

    async def get_workflow_record(self, workflow_id: str) -> Workflow:
        """The workflow as stored, in one read: exact once it has finished (its
        state, the member that ended it, counts), which is all the engine reads
        after a member settles.  A running workflow's member states may lag
        claims; :meth:`get_workflow` is the live view."""

    async def cancel_workflow(self, workflow_id: str, now: float) -> tuple[Workflow, list[Job]]:
        """Cancel the workflow and its non-terminal jobs atomically; returns both."""

    # -- cron --------------------------------------------------------------------

    async def put_cron(self, record: CronRecord) -> CronRecord:
        """Create or replace the schedule named ``record.name``."""

    async def list_crons(self) -> list[CronRecord]: ...

    async def get_cron(self, name: str) -> CronRecord: ...

    async def delete_cron(self, name: str) -> CronRecord: ...

    async def set_cron_enabled(
        self, name: str, enabled: bool, now: float
    ) -> tuple[CronRecord, CronRecord]:
        """Enable or disable a schedule in one atomic step (``cron.set_enabled``
        under the record's lock or version check): the record before and after.

        ``NotFound`` if there is none (a toggle never recreates a deleted
        schedule); nothing changes when it already is as asked.  Its history
        (runs, last run) and definition stay as stored.
        """

    async def fire_cron(
        self, name: str, occurrence: float, next_run_at: float | None, job: Job, now: float
    ) -> CronFire:
        """Fire one occurrence exactly once.

        Atomically: if the schedule exists, is enabled and its ``next_run_at``
        still equals ``occurrence`` (nobody fired it yet), advance it to
        ``next_run_at`` and, unless the overlap policy is ``skip`` and the
        previous run's job is not terminal, insert ``job``.
        """

    async def reset(self) -> None:
        """Delete everything (test isolation only)."""
