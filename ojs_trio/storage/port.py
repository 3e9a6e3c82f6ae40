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

from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One fetch: up to ``count`` jobs from ``queues`` (checked in the order given)."""

    queues: tuple[str, ...]
    count: int = 1
    worker_id: str | None = None
    visibility_ms: int | None = None


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    job: Job
    created: bool = True  # False when a unique policy returned an existing job


@dataclass(slots=True)
class QueueInfo:
    name: str
    paused: bool = False
    created_at: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    jobs: list[Job]
    total: int


@runtime_checkable
class Storage(Protocol):
    """What the engine needs from a backend."""

    name: str

    async def open(self) -> None:
        """Connect and prepare (migrations, pools).  Called once by the engine."""

    async def aclose(self) -> None:
        """Release connections.  Called once by the engine on shutdown."""

    async def ping(self) -> dict[str, Any]:
        """Health probe; raises BackendUnavailable when the backend is down."""

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        """Insert jobs atomically: all or none.  Raises DuplicateJob on an id clash."""

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

    async def next_wakeup(self) -> float | None:
        """Earliest time at which promote_due or reap would have work, if known."""

    async def list_dead_letter(
        self, queue: str | None, limit: int, offset: int
    ) -> DeadLetterPage: ...

    async def retry_dead_letter(self, job_id: str, now: float) -> Job: ...

    async def delete_dead_letter(self, job_id: str) -> Job: ...

    async def list_queues(self) -> list[QueueInfo]: ...

    async def reset(self) -> None:
        """Delete everything (test isolation only)."""
