"""The OJS job envelope as the engine holds it, and its wire form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ojs_trio.engine.retry import DEFAULT_POLICY, RetryPolicy
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts

SPEC_VERSION = "1.0"
DEFAULT_QUEUE = "default"
DEFAULT_VISIBILITY_MS = 1_800_000  # ojs-worker-protocol 5.2: 30 minutes
MAX_ERROR_HISTORY = 25  # the spec asks for at least 10


def _copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value  # str, int, float, bool, None: immutable


@dataclass(slots=True)
class Job:
    """One job.  Times are epoch seconds; ``None`` means "not set"."""

    id: str
    type: str
    args: list[Any]
    queue: str = DEFAULT_QUEUE
    meta: dict[str, Any] | None = None
    priority: int = 0
    state: JobState = JobState.AVAILABLE
    attempt: int = 0
    retry: RetryPolicy = DEFAULT_POLICY
    timeout_ms: int | None = None  # execution timeout; only enforced when set
    visibility_timeout_ms: int | None = None
    tags: list[str] | None = None
    schema: str | None = None
    specversion: str = SPEC_VERSION
    created_at: float = 0.0
    enqueued_at: float | None = None
    scheduled_at: float | None = None  # when scheduled/retryable become available
    expires_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    cancelled_at: float | None = None
    discarded_at: float | None = None
    has_result: bool = False
    result: Any = None
    error: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    retry_delay_ms: int | None = None
    worker_id: str | None = None
    lease_expires_at: float | None = None  # visibility deadline while active
    dead_letter: bool = False
    unique: dict[str, Any] | None = None
    unique_key: str | None = None
    workflow_id: str | None = None
    workflow_step: int | None = None
    parent_results: list[Any] | None = None
    directive: str | None = None  # worker directive requested via the job (test mode)
    options_extra: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level fields
    # Absolute times as the client wrote them (field -> (text, epoch)): echoed back
    # verbatim while the field still holds that value.
    client_times: dict[str, tuple[str, float]] = field(default_factory=dict)

    def _time_text(self, name: str, value: float) -> str:
        given = self.client_times.get(name)
        if given is not None and given[1] == value:
            return given[0]
        return format_ts(value)

    @property
    def max_attempts(self) -> int:
        return self.retry.max_attempts

    def clone(self) -> Job:
        """A deep copy, so storage never shares mutable state with callers.

        Field by field rather than ``copy.deepcopy``: the values are JSON data,
        which :func:`_copy_json` copies several times faster (clones sit on
        every storage verb's path).
        """
        new = _shallow_copy(self)
        new.args = _copy_json(self.args)
        new.meta = _copy_json(self.meta)
        new.result = _copy_json(self.result)
        new.error = _copy_json(self.error)
        new.errors = _copy_json(self.errors)
        new.tags = _copy_json(self.tags)
        new.unique = _copy_json(self.unique)
        new.parent_results = _copy_json(self.parent_results)
        new.options_extra = _copy_json(self.options_extra)
        new.extra = _copy_json(self.extra)
        new.client_times = dict(self.client_times)
        return new

    def execution_deadline(self) -> float | None:
        if self.timeout_ms is None or self.started_at is None:
            return None
        return self.started_at + self.timeout_ms / 1000.0

    def to_wire(self) -> dict[str, Any]:
        """The job envelope as OJS clients see it."""
        wire: dict[str, Any] = dict(self.extra)
        wire.update(
            specversion=self.specversion,
            id=self.id,
            type=self.type,
            queue=self.queue,
            args=self.args,
            state=self.state.value,
            priority=self.priority,
            attempt=self.attempt,
            max_attempts=self.retry.max_attempts,
            retry=self.retry.to_wire(),
            created_at=format_ts(self.created_at),
        )
        if self.meta is not None:
            wire["meta"] = self.meta
        if self.schema is not None:
            wire["schema"] = self.schema
        if self.tags is not None:
            wire["tags"] = self.tags
        if self.timeout_ms is not None:
            wire["timeout_ms"] = self.timeout_ms
        if self.visibility_timeout_ms is not None:
            wire["visibility_timeout_ms"] = self.visibility_timeout_ms
        if self.expires_at is not None:
            wire["expires_at"] = self._time_text("expires_at", self.expires_at)
        for name in (
            "enqueued_at",
            "started_at",
            "completed_at",
            "cancelled_at",
            "discarded_at",
        ):
            value = getattr(self, name)
            if value is not None:
                wire[name] = format_ts(value)
        if self.scheduled_at is not None:
            wire["scheduled_at"] = self._time_text("scheduled_at", self.scheduled_at)
            if self.state is JobState.RETRYABLE:
                wire["next_attempt_at"] = wire["scheduled_at"]
        if self.has_result:
            wire["result"] = self.result
        if self.error is not None:
            wire["error"] = self.error
        if self.errors:
            wire["errors"] = self.errors
        if self.retry_delay_ms is not None:
            wire["retry_delay_ms"] = self.retry_delay_ms
        if self.unique is not None:
            wire["unique"] = self.unique
        if self.workflow_id is not None:
            wire["workflow_id"] = self.workflow_id
        if self.parent_results is not None:
            wire["parent_results"] = self.parent_results
        if self.state is JobState.ACTIVE and self.worker_id is not None:
            wire["worker_id"] = self.worker_id
        if self.options_extra:
            wire["options"] = self.options_extra
        return wire

    # --- storage records: the wire form plus the engine's private fields ---

    def to_record(self) -> dict[str, Any]:
        record = self.to_wire()
        record["_private"] = {
            "timeout_ms": self.timeout_ms,
            "created_at": self.created_at,
            "enqueued_at": self.enqueued_at,
            "scheduled_at": self.scheduled_at,
            "expires_at": self.expires_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "cancelled_at": self.cancelled_at,
            "discarded_at": self.discarded_at,
            "has_result": self.has_result,
            "worker_id": self.worker_id,
            "lease_expires_at": self.lease_expires_at,
            "dead_letter": self.dead_letter,
            "unique_key": self.unique_key,
            "workflow_step": self.workflow_step,
            "directive": self.directive,
            "extra_keys": sorted(self.extra),
            "client_times": {k: list(v) for k, v in self.client_times.items()},
        }
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        p = record["_private"]
        extra = {k: record[k] for k in p["extra_keys"] if k in record}
        return cls(
            id=record["id"],
            type=record["type"],
            args=record["args"],
            queue=record["queue"],
            meta=record.get("meta"),
            priority=record["priority"],
            state=JobState(record["state"]),
            attempt=record["attempt"],
            retry=RetryPolicy.from_wire(record["retry"]),
            timeout_ms=p["timeout_ms"],
            visibility_timeout_ms=record.get("visibility_timeout_ms"),
            tags=record.get("tags"),
            schema=record.get("schema"),
            specversion=record.get("specversion", SPEC_VERSION),
            created_at=p["created_at"],
            enqueued_at=p["enqueued_at"],
            scheduled_at=p["scheduled_at"],
            expires_at=p["expires_at"],
            started_at=p["started_at"],
            completed_at=p["completed_at"],
            cancelled_at=p["cancelled_at"],
            discarded_at=p["discarded_at"],
            has_result=p["has_result"],
            result=record.get("result"),
            error=record.get("error"),
            errors=record.get("errors", []),
            retry_delay_ms=record.get("retry_delay_ms"),
            worker_id=p["worker_id"],
            lease_expires_at=p["lease_expires_at"],
            dead_letter=p["dead_letter"],
            unique=record.get("unique"),
            unique_key=p["unique_key"],
            workflow_id=record.get("workflow_id"),
            workflow_step=p["workflow_step"],
            parent_results=record.get("parent_results"),
            directive=p["directive"],
            options_extra=record.get("options", {}),
            extra=extra,
            client_times={k: (v[0], v[1]) for k, v in p.get("client_times", {}).items()},
        )


def _make_shallow_copy() -> Callable[[Job], Job]:
    """A function copying every field of a Job into a new one, attribute by attribute.

    Generated from the field list: several times faster than ``copy.copy``,
    which goes through ``__reduce_ex__`` for a slots dataclass.
    """
    lines = ["def shallow_copy(self):", "    new = _new(Job)"]
    lines += [f"    new.{f.name} = self.{f.name}" for f in fields(Job)]
    lines.append("    return new")
    namespace: dict[str, Any] = {"_new": object.__new__, "Job": Job}
    exec("\n".join(lines), namespace)
    copier: Callable[[Job], Job] = namespace["shallow_copy"]
    return copier


_shallow_copy = _make_shallow_copy()
