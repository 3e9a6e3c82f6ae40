"""Envelope validation (ojs-core.md, ojs-json-format.md): request JSON -> Job.

Everything here is pure: it never touches storage, so bad input is rejected
before it can reach an adapter or an actor.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ojs_trio.engine.errors import InvalidRequest
from ojs_trio.engine.ids import is_uuid7, uuid7
from ojs_trio.engine.job import DEFAULT_QUEUE, SPEC_VERSION, Job
from ojs_trio.engine.queue_limits import queue_limits_from
from ojs_trio.engine.retry import parse_retry_policy
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import parse_duration, parse_time_spec

# ojs-core.md 5.2: dot-separated lowercase segments.  The official level-1 suite
# enqueues types such as "retry.test.exponential-backoff", so hyphens are
# accepted inside a segment as well.
TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)*$")
QUEUE_RE = re.compile(r"^[a-z0-9][a-z0-9\-.]*$")
MAX_TYPE_LEN = 255
MAX_QUEUE_LEN = 128
PRIORITY_MIN, PRIORITY_MAX = -100, 100
NAMED_PRIORITIES = {"HIGH": 10, "NORMAL": 0, "LOW": -10, "CRITICAL": 100, "BULK": -100}
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000

# Fields the server manages; a client cannot set them (they are ignored, as the
# spec asks, rather than rejected, so clients can resend a fetched envelope).
SYSTEM_FIELDS = frozenset(
    {
        "state",
        "attempt",
        "created_at",
        "enqueued_at",
        "started_at",
        "completed_at",
        "cancelled_at",
        "discarded_at",
        "result",
        "error",
        "errors",
        "max_attempts",
        "retry_delay_ms",
        "next_attempt_at",
        "worker_id",
        "workflow_id",
        "parent_results",
    }
)
KNOWN_TOP = frozenset(
    {
        "specversion",
        "id",
        "type",
        "queue",
        "args",
        "meta",
        "options",
        "schema",
        "scheduled_at",
        "expires_at",
    }
)
KNOWN_OPTIONS = frozenset(
    {
        "queue",
        "priority",
        "timeout_ms",
        "delay_until",
        "scheduled_at",
        "delay_ms",
        "expires_at",
        "retry",
        "unique",
        "tags",
        "visibility_timeout_ms",
    }
)


_TIME_OPTIONS = frozenset({"scheduled_at", "delay_until", "delay_ms", "expires_at"})
_TIME_FIELDS = frozenset({"scheduled_at", "expires_at"})  # envelope attributes


def _fail(message: str, field: str, **details: Any) -> InvalidRequest:
    return InvalidRequest(message, details={"field": field, **details})


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ojs-json-format.md 4.2 wants integers past 2^53 - 1 sent as strings; we take
# anything a 64-bit integer holds, the range every storage codec reads back exactly.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1


def _plainly_json(value: Any) -> bool:
    """Whether ``value`` is JSON data made of the exact built-in types only.

    The quick check every enqueue runs (no paths kept); anything else, including
    subclasses, goes to the slower walk that names the offending field.
    """
    stack = [value]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if INT_MIN <= item <= INT_MAX:
                continue
            return False
        if kind is float:
            if item - item == 0.0:  # NaN and +-inf give NaN
                continue
            return False
        if kind is list:
            extend(item)
        elif kind is dict:
            for key, child in item.items():
                if type(key) is not str:
                    return False
                push(child)
        else:
            return False
    return True


def check_json_native(value: Any, path: str) -> None:
    """Reject values JSON cannot carry faithfully (NaN/Infinity, non-string keys,
    integers beyond 64 bits)."""
    if _plainly_json(value):
        return
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise _fail(f"{where} contains a non-finite number", where)
        if isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    raise _fail(f"{where} has a non-string key", where)
                stack.append((v, f"{where}.{k}"))
        elif isinstance(item, int) and not INT_MIN <= item <= INT_MAX:
            raise _fail(
                f"{where} holds an integer beyond 64 bits; send large integers as strings",
                where,
            )
        elif not (item is None or isinstance(item, str | bool | int | float)):
            raise _fail(f"{where} holds a value that is not JSON-native", where)


def validate_type(value: Any, field: str = "type") -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"'{field}' is required and must be a non-empty string", field)
    if len(value) > MAX_TYPE_LEN or not TYPE_RE.match(value):
        raise _fail(
            f"'{field}' must be dot-separated lowercase segments such as 'email.send'",
            field,
            value=value,
        )
    return value


def validate_queue(value: Any, field: str = "queue") -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"'{field}' must be a non-empty string", field)
    if len(value) > MAX_QUEUE_LEN or not QUEUE_RE.match(value):
        raise _fail(
            f"'{field}' must match ^[a-z0-9][a-z0-9.-]*$ (at most {MAX_QUEUE_LEN} chars)",
            field,
            value=value,
        )
    return value


def _positive_ms(value: Any, field: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _fail(f"options.{field} must be an integer number of milliseconds", field)
    ivalue = int(value)
    if ivalue < 0 or (ivalue == 0 and not allow_zero) or ivalue > MAX_TIMEOUT_MS:
        raise _fail(f"options.{field} must be between 1 and {MAX_TIMEOUT_MS}", field)
    return ivalue


def parse_priority(value: Any) -> int:
    if isinstance(value, str) and value.upper() in NAMED_PRIORITIES:
        return NAMED_PRIORITIES[value.upper()]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise _fail("options.priority must be an integer or HIGH/NORMAL/LOW", "priority")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise _fail(
            f"options.priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}",
            "priority",
            value=value,
        )
    return int(value)


def _time_option(
    options: dict[str, Any],
    name: str,
    now: float,
    texts: dict[str, tuple[str, float]],
    key: str,
) -> float | None:
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(f"options.{name} must be an RFC 3339 timestamp or '+<ISO duration>'", name)
    try:
        parsed = parse_time_spec(value, now)
    except ValueError as exc:
        raise _fail(f"options.{name}: {exc}", name) from None
    if value.endswith("Z"):  # echoed verbatim only when already in the UTC form we emit
        texts[key] = (value, parsed)
    return parsed


def validate_unique(raw: Any) -> dict[str, Any]:
    """Light structural check; the unique-job rules interpret it."""
    if not isinstance(raw, dict):
        raise _fail("options.unique must be an object", "unique")
    keys = raw.get("keys", ["type"])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _fail("options.unique.keys must be an array of strings", "unique.keys")
    on_conflict = raw.get("on_conflict", "reject")
    if on_conflict not in ("reject", "ignore", "replace", "replace_except_schedule"):
        raise _fail(
            "options.unique.on_conflict must be reject, ignore or replace", "unique.on_conflict"
        )
    period = raw.get("period")
    if period is not None:
        if not isinstance(period, str):
            raise _fail("options.unique.period must be an ISO 8601 duration", "unique.period")
        try:
            parse_duration(period)
        except ValueError as exc:
            raise _fail(f"options.unique.period: {exc}", "unique.period") from None
    states = raw.get("states")
    if states is not None and (
        not isinstance(states, list) or not all(s in JobState.__members__.values() for s in states)
    ):
        raise _fail("options.unique.states must be an array of job states", "unique.states")
    return dict(raw)


def _requested_directive(meta: dict[str, Any] | None, options_extra: dict[str, Any]) -> str | None:
    """A worker directive a job asks for (``test_directive``).

    Only honoured when the engine runs with ``honour_test_directives`` (the
    conformance suites drive the quiet/terminate directives this way); it is
    recorded either way so the decision stays with the engine.
    """
    metadata = options_extra.get("metadata")
    for source in (metadata, meta):
        if isinstance(source, dict) and isinstance(source.get("test_directive"), str):
            return str(source["test_directive"])
    return None


def parse_job(body: Any, now: float, *, field_prefix: str = "") -> Job:
    """Validate one enqueue request body and build the job it describes.

    The state is ``scheduled`` for a future ``scheduled_at``/``delay_until``,
    else ``available``; ``created_at``/``enqueued_at`` are ``now``.
    """
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"{field_prefix}job must be a JSON object", details={"received": _json_type(body)}
        )
    specversion = body.get("specversion", SPEC_VERSION)
    if not isinstance(specversion, str):
        raise _fail("'specversion' must be a string", "specversion")
    job_type = validate_type(body.get("type"))
    if "args" not in body:
        raise _fail("'args' is required and must be a JSON array", "args")
    args = body["args"]
    if not isinstance(args, list):
        raise _fail(
            "'args' must be a JSON array", "args", expected="array", received=_json_type(args)
        )
    check_json_native(args, "args")
    meta = body.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise _fail("'meta' must be a JSON object", "meta", received=_json_type(meta))
        check_json_native(meta, "meta")
    job_id = body.get("id")
    if job_id is None:
        job_id = uuid7()
    elif not isinstance(job_id, str) or not is_uuid7(job_id):
        raise _fail("'id' must be a lowercase UUIDv7", "id", value=job_id)
    schema = body.get("schema")
    if schema is not None and not isinstance(schema, str):
        raise _fail("'schema' must be a string", "schema")

    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _fail("'options' must be a JSON object", "options")
    check_json_native(options, "options")
    # The queue may come from options (HTTP binding) or the top level (envelope).
    queue = validate_queue(options.get("queue", body.get("queue", DEFAULT_QUEUE)))
    priority = parse_priority(options.get("priority", body.get("priority", 0)))
    timeout_ms = options.get("timeout_ms")
    if timeout_ms is not None:
        timeout_ms = _positive_ms(timeout_ms, "timeout_ms")
    visibility = options.get("visibility_timeout_ms")
    if visibility is not None:
        visibility = _positive_ms(visibility, "visibility_timeout_ms")
    tags = options.get("tags")
    if tags is not None and (
        not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)
    ):
        raise _fail("options.tags must be an array of strings", "tags")
    retry = parse_retry_policy(options.get("retry"))

    texts: dict[str, tuple[str, float]] = {}
    scheduled_at = expires_at = None
    # Most jobs name no time at all: skip the five lookups then.
    if not (_TIME_OPTIONS.isdisjoint(options) and _TIME_FIELDS.isdisjoint(body)):
        scheduled_at = _time_option(options, "scheduled_at", now, texts, "scheduled_at")
        if scheduled_at is None:
            scheduled_at = _time_option(options, "delay_until", now, texts, "scheduled_at")
        if scheduled_at is None:  # the envelope attribute (ojs-core.md 5.2)
            scheduled_at = _time_option(body, "scheduled_at", now, texts, "scheduled_at")
        if scheduled_at is None and options.get("delay_ms") is not None:
            delay_ms = _positive_ms(options["delay_ms"], "delay_ms", allow_zero=True)
            scheduled_at = now + delay_ms / 1e3
        expires_at = _time_option(options, "expires_at", now, texts, "expires_at")
        if expires_at is None:
            expires_at = _time_option(body, "expires_at", now, texts, "expires_at")
    unique = validate_unique(options["unique"]) if options.get("unique") is not None else None

    state = JobState.AVAILABLE
    if scheduled_at is not None and scheduled_at > now:
        state = JobState.SCHEDULED
    else:
        scheduled_at = None  # a past schedule is an immediate enqueue

    extra: dict[str, Any] = {}
    if not body.keys() <= KNOWN_TOP:
        extra = {k: v for k, v in body.items() if k not in KNOWN_TOP and k not in SYSTEM_FIELDS}
        check_json_native(extra, "job")
    options_extra: dict[str, Any] = {}
    if not options.keys() <= KNOWN_OPTIONS:
        options_extra = {k: v for k, v in options.items() if k not in KNOWN_OPTIONS}
        queue_limits_from(options_extra)  # validate queue limits here, before any storage
    return Job(
        client_times=texts,
        directive=_requested_directive(meta, options_extra),
        id=job_id,
        type=job_type,
        args=args,
        queue=queue,
        meta=meta,
        priority=priority,
        state=state,
        attempt=0,
        retry=retry,
        timeout_ms=timeout_ms,
        visibility_timeout_ms=visibility,
        tags=tags,
        schema=schema,
        specversion=specversion,
        created_at=now,
        enqueued_at=now,
        scheduled_at=scheduled_at,
        expires_at=expires_at,
        unique=unique,
        options_extra=options_extra,
        extra=extra,
    )
