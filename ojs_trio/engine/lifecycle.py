"""Pure lifecycle rules: each function takes a job (already copied by the caller),
checks the transition, mutates it, and returns what happened.

Every storage adapter calls these inside its own atomic unit (a lock, a
transaction, a conditional write), so all backends share one set of semantics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ojs_trio.engine.errors import Conflict, InvalidRequest, InvalidStateTransition
from ojs_trio.engine.job import DEFAULT_VISIBILITY_MS, MAX_ERROR_HISTORY, Job
from ojs_trio.engine.retry import backoff_delay, matches_non_retryable
from ojs_trio.engine.states import JobState, check_transition
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.engine.validation import check_json_native

HANDLER_CODES = frozenset({"RETRY", "DISCARD", "DEAD_LETTER", "FAIL"})
# ojs-core expires_at: a job not yet started is discarded once its TTL passes.
# That is not a lifecycle transition (the table has no available -> discarded),
# so it is checked here rather than through check_transition.
TTL_EXPIRABLE = frozenset(
    {JobState.SCHEDULED, JobState.AVAILABLE, JobState.PENDING, JobState.RETRYABLE}
)


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure report from a worker (nack) or from the server itself (timeouts)."""

    code: str = "handler_error"
    message: str = "job failed"
    type: str | None = None
    retryable: bool | None = None
    details: dict[str, Any] | None = None

    @classmethod
    def from_wire(cls, raw: Any) -> Failure:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise InvalidRequest("'error' must be an object", details={"field": "error"})
        code = raw.get("code", "handler_error")
        message = raw.get("message", "job failed")
        etype = raw.get("type")
        retryable = raw.get("retryable")
        details = raw.get("details")
        if not isinstance(code, str) or not code:
            raise InvalidRequest("error.code must be a string", details={"field": "error.code"})
        if not isinstance(message, str):
            raise InvalidRequest(
                "error.message must be a string", details={"field": "error.message"}
            )
        if etype is not None and not isinstance(etype, str):
            raise InvalidRequest("error.type must be a string", details={"field": "error.type"})
        if retryable is not None and not isinstance(retryable, bool):
            raise InvalidRequest(
                "error.retryable must be a boolean", details={"field": "error.retryable"}
            )
        if details is not None:
            if not isinstance(details, dict):
                raise InvalidRequest(
                    "error.details must be an object", details={"field": "error.details"}
                )
            check_json_native(details, "error.details")
        return cls(code, message or "job failed", etype, retryable, details)


# Workers that report only a code and a message still deserve a usable error
# type (for non_retryable_errors matching and dashboards).  These rules are the
# documented fallback, applied in order, when neither error.type nor
# details.error_class is given.
_TYPE_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("timed out", "timeout"), "ConnectionTimeout"),
    (("rate limit", "too many requests", "throttl"), "RateLimitExceeded"),
    (("connection refused", "connection reset", "unreachable"), "ConnectionError"),
    (("not found",), "NotFound"),
    (("permission", "forbidden", "unauthori"), "PermissionDenied"),
)


def infer_error_type(failure: Failure) -> str:
    if failure.type:
        return failure.type
    if failure.details and isinstance(failure.details.get("error_class"), str):
        return str(failure.details["error_class"])
    text = failure.message.lower()
    for needles, name in _TYPE_RULES:
        if any(n in text for n in needles):
            return name
    return "InternalServerError"


def _require_active(job: Job, action: str, worker_id: str | None) -> None:
    if job.state is not JobState.ACTIVE:
        target = {"ack": JobState.COMPLETED, "nack": JobState.RETRYABLE}.get(action)
        check_transition(job.id, job.state, target or JobState.ACTIVE, action)
    # Reservation ownership (worker protocol 5.x): only the holder may settle it.
    if worker_id is not None and job.worker_id is not None and worker_id != job.worker_id:
        raise Conflict(
            f"Job {job.id} is reserved by another worker",
            details={"job_id": job.id, "worker_id": worker_id, "holder": job.worker_id},
        )


def _end_lease(job: Job) -> None:
    job.lease_expires_at = None


def claim(job: Job, worker_id: str | None, visibility_ms: int | None, now: float) -> None:
    check_transition(job.id, job.state, JobState.ACTIVE, "fetch")
    job.state = JobState.ACTIVE
    job.attempt += 1  # ojs-core: attempt counts executions, incremented at fetch
    job.started_at = now
    job.worker_id = worker_id
    ms = visibility_ms or job.visibility_timeout_ms or DEFAULT_VISIBILITY_MS
    job.lease_expires_at = now + ms / 1000.0
    job.scheduled_at = None


def ack(job: Job, worker_id: str | None, result: Any, has_result: bool, now: float) -> None:
    _require_active(job, "ack", worker_id)
    job.state = JobState.COMPLETED
    job.completed_at = now
    job.has_result = has_result
    job.result = result if has_result else None
    job.error = None  # the latest attempt succeeded; history stays in `errors`
    _end_lease(job)


def _record_error(job: Job, failure: Failure, now: float) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "code": failure.code,
        "message": failure.message,
        "type": infer_error_type(failure),
        "attempt": job.attempt,
        "occurred_at": format_ts(now),
    }
    if failure.retryable is not None:
        entry["retryable"] = failure.retryable
    if failure.details:
        entry["details"] = failure.details
    job.errors.append(entry)
    del job.errors[:-MAX_ERROR_HISTORY]
    job.error = entry
    return entry


def _exhaust(job: Job, now: float, *, dead_letter: bool) -> None:
    job.state = JobState.DISCARDED
    job.discarded_at = now
    job.completed_at = now
    job.dead_letter = dead_letter
    job.scheduled_at = None
    job.retry_delay_ms = None
    _end_lease(job)


def fail(job: Job, failure: Failure, now: float, rng: random.Random | None = None) -> None:
    """Apply a failure of the current attempt: retry with backoff, or exhaust."""
    _record_error(job, failure, now)
    policy = job.retry
    handler_code = failure.code.upper()
    if handler_code in ("DISCARD", "FAIL"):
        _exhaust(job, now, dead_letter=False)
        return
    if handler_code == "DEAD_LETTER":
        _exhaust(job, now, dead_letter=True)
        return
    permanent = failure.retryable is False or matches_non_retryable(
        policy.non_retryable_errors, infer_error_type(failure)
    )
    if permanent or job.attempt >= policy.max_attempts:
        _exhaust(job, now, dead_letter=policy.on_exhaustion == "dead_letter")
        return
    delay = backoff_delay(policy, job.attempt, rng)
    job.state = JobState.RETRYABLE
    job.retry_delay_ms = round(delay * 1000)
    job.scheduled_at = now + delay
    _end_lease(job)


def nack(
    job: Job,
    worker_id: str | None,
    failure: Failure,
    requeue: bool,
    now: float,
    rng: random.Random | None = None,
) -> None:
    _require_active(job, "nack", worker_id)
    if requeue:
        # A worker handing a job back (shutdown, terminate directive) is not a
        # failed execution: the attempt it took is returned with the job.
        job.state = JobState.AVAILABLE
        job.attempt = max(0, job.attempt - 1)
        job.worker_id = None
        _end_lease(job)
        return
    fail(job, failure, now, rng)


def cancel(job: Job, now: float) -> None:
    check_transition(job.id, job.state, JobState.CANCELLED, "cancel")
    job.state = JobState.CANCELLED
    job.cancelled_at = now
    job.scheduled_at = None
    _end_lease(job)


def promote(job: Job, now: float) -> None:
    """scheduled/retryable -> available once due."""
    check_transition(job.id, job.state, JobState.AVAILABLE, "promote")
    job.state = JobState.AVAILABLE
    job.scheduled_at = None


def expire_lease(job: Job, now: float) -> None:
    """The visibility timeout passed with no ack/nack: the worker is presumed gone.

    The attempt was already counted at fetch; the job goes straight back to
    ``available`` (no backoff: nothing failed, the worker vanished) unless that
    was its last attempt, in which case ``on_exhaustion`` applies.
    """
    if job.state is not JobState.ACTIVE:
        raise InvalidStateTransition(
            job.id, job.state.value, "expire_lease", JobState.AVAILABLE.value
        )
    failure = Failure(
        code="visibility_timeout",
        message=f"No ack or heartbeat from worker {job.worker_id!r} before the lease expired",
        type="LeaseExpired",
    )
    _record_error(job, failure, now)
    if job.attempt >= job.retry.max_attempts:
        _exhaust(job, now, dead_letter=job.retry.on_exhaustion == "dead_letter")
        return
    job.state = JobState.AVAILABLE
    job.worker_id = None
    job.started_at = None  # ojs-core 6.3: active -(timeout)-> available clears started_at
    _end_lease(job)


def execution_timeout(job: Job, now: float, rng: random.Random | None = None) -> None:
    """timeout_ms elapsed since start: a failed attempt (retryable per policy)."""
    if job.state is not JobState.ACTIVE:
        raise InvalidStateTransition(job.id, job.state.value, "timeout", None)
    failure = Failure(
        code="handler_timeout",
        message=f"Job exceeded its execution timeout of {job.timeout_ms} ms",
        type="TimeoutError",
        retryable=True,
    )
    fail(job, failure, now, rng)


def expire_ttl(job: Job, now: float) -> None:
    """expires_at passed before the job started: it must never run.

    The job is discarded into the dead letter queue whatever its
    ``on_exhaustion``: that policy decides what happens once attempts run out,
    and an expired job may have had attempts left (or never run at all).  Work
    that was accepted and silently never done is what operators look for in
    the dead letter queue.  ``completed_at`` stays unset: nothing completed.
    """
    if job.state not in TTL_EXPIRABLE:
        raise InvalidStateTransition(job.id, job.state.value, "expire", JobState.DISCARDED.value)
    _record_error(
        job,
        Failure(code="expired", message="Job expired before it could start", type="JobExpired"),
        now,
    )
    job.state = JobState.DISCARDED
    job.discarded_at = now
    job.dead_letter = True
    job.scheduled_at = None
    job.retry_delay_ms = None


def retry_dead_letter(job: Job, now: float) -> None:
    if job.state is not JobState.DISCARDED or not job.dead_letter:
        raise Conflict(
            f"Job {job.id} is not in the dead letter queue",
            details={"job_id": job.id, "current_state": job.state.value},
        )
    job.state = JobState.AVAILABLE
    job.attempt = 0
    job.dead_letter = False
    job.discarded_at = None
    job.completed_at = None
    job.error = None
    job.retry_delay_ms = None
    job.worker_id = None
    job.enqueued_at = now
    if is_expired(job, now):
        # An operator asking to run it again overrides a deadline that has
        # passed; kept, it would expire the job again before any claim.
        job.expires_at = None


def is_expired(job: Job, now: float) -> bool:
    return job.expires_at is not None and job.expires_at <= now
