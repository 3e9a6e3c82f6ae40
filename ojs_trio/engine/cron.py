"""Cron schedules (ojs-cron.md): the record adapters store.

The scheduling math (expression parsing, time zones, next occurrence) lives
below the record; the storage port only stores records and performs the atomic
"fire this occurrence" step, guarded by ``next_run_at`` so that an occurrence
fires once even when several server processes tick on one backend.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from ojs_trio.engine.errors import InvalidCronExpression, InvalidRequest
from ojs_trio.engine.job import Job
from ojs_trio.engine.timeutil import format_ts, parse_duration
from ojs_trio.engine.validation import parse_job

OVERLAP_POLICIES = ("skip", "allow", "cancel_previous")


@dataclass
class CronRecord:
    name: str
    expression: str
    job_template: dict[str, Any]  # a validated enqueue body
    timezone: str = "UTC"
    overlap_policy: str = "skip"
    enabled: bool = True
    description: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    next_run_at: float | None = None
    last_run_at: float | None = None
    last_job_id: str | None = None
    runs: int = 0
    skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # the request's other fields
    # Record keys this version does not know (written by a newer server): kept
    # and written back as they were, never shown on the wire.
    unknown_fields: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = dict(self.extra)
        wire.update(
            name=self.name,
            expression=self.expression,
            timezone=self.timezone,
            overlap_policy=self.overlap_policy,
            enabled=self.enabled,
            job_template=self.job_template,
            created_at=format_ts(self.created_at),
            updated_at=format_ts(self.updated_at),
            next_run_at=format_ts(self.next_run_at) if self.next_run_at is not None else None,
            last_run_at=format_ts(self.last_run_at) if self.last_run_at is not None else None,
            last_job_id=self.last_job_id,
            runs=self.runs,
            skipped=self.skipped,
        )
        if self.description is not None:
            wire["description"] = self.description
        return wire

    def to_record(self) -> dict[str, Any]:
        record = copy.deepcopy(self.unknown_fields)
        for name in _RECORD_FIELDS:
            record[name] = copy.deepcopy(getattr(self, name))
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CronRecord:
        """Read a stored record, whichever server version wrote it: keys this
        version does not know go to ``unknown_fields`` instead of failing the read."""
        data = {k: v for k, v in record.items() if k in _RECORD_FIELDS}
        unknown = {k: v for k, v in record.items() if k not in _RECORD_FIELDS}
        return cls(**data, unknown_fields=unknown)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(CronRecord) if f.name != "unknown_fields")


@dataclass(frozen=True)
class CronFire:
    """Outcome of one occurrence: a job was created, or why not.

    Adapters fill in the first four fields; the ticker adds ``occurrence`` (and
    builds the ``dst_skip`` outcomes itself, see :func:`skipped_by_dst`).
    """

    fired: bool
    job: Any = None  # the created Job when fired
    # "overlap", "already_fired", "disabled", "missing"; "dst_skip" from the ticker
    reason: str | None = None
    record: CronRecord | None = None
    occurrence: float | None = None  # the scheduled time (epoch seconds)
    local_time: str | None = None  # dst_skip: the local wall time that did not exist


# -- scheduling math ---------------------------------------------------------------

_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")


def _interval(expression: str) -> float | None:
    """Seconds for ``@every <ISO 8601 duration | Go-style 30s/5m/1h>``, else None."""
    if not expression.startswith("@every"):
        return None
    text = expression[len("@every") :].strip()
    try:
        seconds = parse_duration(text.upper()) if text.upper().startswith("P") else _go(text)
    except ValueError:
        raise InvalidCronExpression(
            f"invalid @every interval {text!r}", details={"field": "expression"}
        ) from None
    if seconds < 1:
        raise InvalidCronExpression("@every interval must be at least 1s")
    return seconds


def _go(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(text)
    unit = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * unit[u] for n, u in parts)


def normalize_expression(expression: str) -> str:
    """The 5/6-field form croniter evaluates; raises InvalidCronExpression."""
    expr = " ".join(expression.split())
    expr = _NICKNAMES.get(expr.lower(), expr)
    fields = expr.split(" ")
    # ojs-cron 3.2: in the 6-field form the seconds field comes first.
    if len(fields) not in (5, 6) or not croniter.is_valid(expr, second_at_beginning=True):
        raise InvalidCronExpression(
            f"invalid cron expression {expression!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week), 6 with seconds, "
            "or @hourly/@daily/@weekly/@monthly/@yearly/@every <duration>",
            details={"field": "expression", "value": expression},
        )
    return expr


def zone(name: str) -> ZoneInfo:
    """An IANA zone; fixed offsets and abbreviations are refused (ojs-cron 5.1)."""
    if not isinstance(name, str) or not name or ("/" not in name and name != "UTC"):
        raise InvalidRequest(
            f"timezone must be an IANA name such as 'America/New_York', got {name!r}",
            details={"field": "timezone"},
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(
            f"unknown IANA timezone {name!r}", details={"field": "timezone"}
        ) from None


def next_occurrence(expression: str, timezone: str, after: float) -> float:
    """The first occurrence strictly after ``after`` (epoch seconds).

    Evaluated in the schedule's local wall time so the hour stays put across
    DST: a wall time skipped by spring-forward does not fire that day, and a
    wall time repeated by fall-back fires once (its first instance).
    """
    interval = _interval(expression)
    if interval is not None:
        return after + interval
    tz = zone(timezone)
    expr = normalize_expression(expression)
    local_after = datetime.fromtimestamp(after, tz).replace(tzinfo=None)
    # A candidate in the second pass of a repeated (fall-back) hour maps to its
    # first instance, which lies before ``after`` and is skipped below: the
    # repeated wall time fires once.
    it = croniter(expr, local_after, second_at_beginning=True)
    for _ in range(MAX_CANDIDATES):
        candidate: datetime = it.get_next(datetime)
        aware = candidate.replace(tzinfo=tz, fold=0)
        if not _exists(aware):
            continue  # nonexistent local time (spring-forward gap)
        epoch = aware.timestamp()
        if epoch > after:
            return epoch
    raise InvalidCronExpression(f"cron expression {expression!r} never fires")


# Bounds the candidates one planning step looks at: a per-second schedule crosses
# a one-hour DST gap in 3,600 of them.
MAX_CANDIDATES = 100_000


def _exists(aware: datetime) -> bool:
    """Whether a local wall time (fold=0) exists: a spring-forward gap's does not."""
    naive = aware.replace(tzinfo=None)
    return aware.astimezone(UTC).astimezone(aware.tzinfo).replace(tzinfo=None) == naive


def skipped_by_dst(
    expression: str, timezone: str, occurrence: float, since: float
) -> list[tuple[datetime, float]]:
    """The schedule's wall times that a spring-forward gap removed just before
    ``occurrence`` (and after ``since``, the registration), oldest first.

    Each comes as (local wall time, naive; where it would have fallen at the UTC
    offset in force before the jump, epoch seconds).  The scan walks back from
    ``occurrence`` and stops at the first wall time that exists: the previous
    occurrence.  ``@every`` schedules and zones without DST have none.
    """
    if _interval(expression) is not None:
        return []
    tz = zone(timezone)
    expr = normalize_expression(expression)
    local_occurrence = datetime.fromtimestamp(occurrence, tz).replace(tzinfo=None)
    local_since = datetime.fromtimestamp(since, tz).replace(tzinfo=None)
    it = croniter(expr, local_occurrence, second_at_beginning=True)
    skipped: list[tuple[datetime, float]] = []
    for _ in range(MAX_CANDIDATES):
        candidate: datetime = it.get_prev(datetime)
        if candidate <= local_since:
            break
        aware = candidate.replace(tzinfo=tz, fold=0)
        if _exists(aware):
            break
        skipped.append((candidate, aware.timestamp()))
    skipped.reverse()
    return skipped


def parse_cron_request(body: Any, now: float) -> CronRecord:
    """Validate a register-cron body (ojs-cron 8.1) into a record with next_run_at."""
    if not isinstance(body, dict):
        raise InvalidRequest("cron registration must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest(
            "'name' is required: letters, digits and _ . : - (at most 200 chars)",
            details={"field": "name"},
        )
    expression = body.get("expression", body.get("schedule"))
    if not isinstance(expression, str) or not expression.strip():
        raise InvalidCronExpression("'expression' is required", details={"field": "expression"})
    timezone = body.get("timezone", "UTC")
    zone(timezone)
    if _interval(expression) is None:
        normalize_expression(expression)
    overlap = body.get("overlap_policy", "skip")
    if overlap == "enqueue":
        overlap = "allow"
    if overlap not in OVERLAP_POLICIES:
        raise InvalidRequest(
            "overlap_policy must be skip, allow or cancel_previous",
            details={"field": "overlap_policy"},
        )
    enabled = body.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidRequest("'enabled' must be a boolean", details={"field": "enabled"})
    template = body.get("job_template", body.get("job"))
    if not isinstance(template, dict):
        raise InvalidRequest(
            "'job_template' must be a job envelope (type, args, options)",
            details={"field": "job_template"},
        )
    parse_job(template, now)  # validate now, not at the first firing
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequest("'description' must be a string", details={"field": "description"})
    known = {
        "name",
        "expression",
        "schedule",
        "timezone",
        "overlap_policy",
        "enabled",
        "job_template",
        "job",
        "description",
    }
    return CronRecord(
        name=name,
        expression=expression,
        job_template=template,
        timezone=timezone,
        overlap_policy=overlap,
        enabled=enabled,
        description=description,
        created_at=now,
        updated_at=now,
        # ojs-cron 8.5: a disabled schedule has no next run.
        next_run_at=next_occurrence(expression, timezone, now) if enabled else None,
        extra={k: v for k, v in body.items() if k not in known},
    )


def set_enabled(record: CronRecord, enabled: Any, now: float) -> bool:
    """Toggle a schedule (ojs-cron 8.5); returns whether it changed.

    Disabled has no ``next_run_at``; enabling plans the next occurrence after
    ``now`` (none missed while disabled is run).  Asking for the state it is in
    changes nothing, so a repeated enable does not move a due occurrence."""
    if not isinstance(enabled, bool):
        raise InvalidRequest("'enabled' must be a boolean", details={"field": "enabled"})
    if record.enabled == enabled:
        return False
    record.enabled = enabled
    record.next_run_at = (
        next_occurrence(record.expression, record.timezone, now) if enabled else None
    )
    record.updated_at = now
    return True


def job_for_occurrence(record: CronRecord, occurrence: float, now: float) -> Job:
    """The job one firing creates: the template, tagged with its schedule."""
    job = parse_job(record.job_template, now)
    job.meta = {
        **(job.meta or {}),
        "cron_name": record.name,
        "cron_occurrence": format_ts(occurrence),
    }
    return job
