"""The 8-state job lifecycle (ojs-conformance.md section 2.1.3)."""

from __future__ import annotations

from enum import StrEnum

from ojs_trio.engine.errors import InvalidStateTransition


class JobState(StrEnum):
    SCHEDULED = "scheduled"
    AVAILABLE = "available"
    PENDING = "pending"
    ACTIVE = "active"
    COMPLETED = "completed"
    RETRYABLE = "retryable"
    CANCELLED = "cancelled"
    DISCARDED = "discarded"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.CANCELLED, JobState.DISCARDED})

# L0-LC-002: the only legal transitions.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SCHEDULED: frozenset({JobState.AVAILABLE, JobState.CANCELLED}),
    JobState.AVAILABLE: frozenset({JobState.ACTIVE, JobState.CANCELLED}),
    JobState.PENDING: frozenset({JobState.AVAILABLE, JobState.CANCELLED}),
    JobState.ACTIVE: frozenset(
        {JobState.COMPLETED, JobState.RETRYABLE, JobState.CANCELLED, JobState.DISCARDED}
    ),
    JobState.RETRYABLE: frozenset({JobState.AVAILABLE, JobState.CANCELLED, JobState.DISCARDED}),
    JobState.COMPLETED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.DISCARDED: frozenset(),
}

# Operator actions that move a job out of the lifecycle on purpose; they are not
# lifecycle transitions and so are listed separately (dead-letter retry revives a
# discarded job, a visibility timeout releases an active job back to available).
ADMIN_TRANSITIONS: dict[str, tuple[frozenset[JobState], JobState]] = {
    "retry_dead_letter": (frozenset({JobState.DISCARDED}), JobState.AVAILABLE),
    "release": (frozenset({JobState.ACTIVE}), JobState.AVAILABLE),
}


def is_legal(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]


def check_transition(job_id: str, current: JobState, target: JobState, action: str) -> None:
    """Raise :class:`InvalidStateTransition` unless ``current -> target`` is legal."""
    if not is_legal(current, target):
        raise InvalidStateTransition(job_id, current.value, action, target.value)
