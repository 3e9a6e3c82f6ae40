"""Envelope validation (ojs-core.md 5, job.schema.json), the error wire format,
and the storage record round trip."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ojs_trio.engine import lifecycle
from ojs_trio.engine.errors import (
    DOCS_BASE,
    BackendError,
    BackendUnavailable,
    Conflict,
    DuplicateJob,
    InvalidPayload,
    InvalidRequest,
    InvalidRetryPolicy,
    InvalidStateTransition,
    NotFound,
    OjsError,
    QueuePaused,
)
from ojs_trio.engine.ids import is_uuid7, uuid7
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts, parse_ts
from ojs_trio.engine.validation import MAX_TIMEOUT_MS, parse_job

NOW = 1_750_000_000.0
CLIENT_ID = "019461a8-1a2b-7c3d-8e4f-5a6b7c8d9e0f"  # the spec's example UUIDv7


def body(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "email.send", "args": ["a@example.com"]}
    out.update(fields)
    return out


def with_options(**options: Any) -> dict[str, Any]:
    return body(options=options)


def rejects(raw: Any, field: str | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_job(raw, NOW)
    err = info.value
    assert err.http_status == 400
    assert err.code == "invalid_request"
    if field is not None:
        assert err.details["field"] == field
    return err


# --------------------------------------------------------------------------
# The minimal job
# --------------------------------------------------------------------------


def test_minimal_job_gets_the_defaults() -> None:
    job = parse_job(body(), NOW)
    assert job.state is JobState.AVAILABLE
    assert job.queue == "default"
    assert job.priority == 0
    assert job.attempt == 0
    assert job.specversion == "1.0"
    assert job.created_at == job.enqueued_at == NOW
    assert job.scheduled_at is None and job.expires_at is None
    assert job.timeout_ms is None
    wire = job.to_wire()
    for name in ("specversion", "id", "type", "queue", "args"):  # L0-ENV-001
        assert name in wire
    assert wire["state"] == "available"
    assert wire["max_attempts"] == 3


@pytest.mark.parametrize("raw", [None, [], "job", 3, True], ids=repr)
def test_body_must_be_an_object(raw: Any) -> None:
    err = rejects(raw)
    assert "received" in err.details


# --------------------------------------------------------------------------
# type (ojs-core.md 5.1: dot-separated [a-z][a-z0-9_]* segments)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job_type",
    [
        "a",
        "email.send",
        "data.etl.transform",
        "billing.invoice.generate",
        "a_b.c1",
        "x9.y_z",
        "a" * 255,
        # documented relaxation: the level-1 suite uses hyphens inside segments
        "retry.test.exponential-backoff",
    ],
)
def test_valid_types(job_type: str) -> None:
    assert parse_job(body(type=job_type), NOW).type == job_type


@pytest.mark.parametrize(
    "job_type",
    [
        "",
        "Email.send",
        "email.Send",
        "EMAIL",
        "email send",
        " email.send",
        "email.send ",
        "1email",
        "email.1send",
        "_email",
        "email.",
        ".email",
        "email..send",
        "email@send",
        "email/send",
        "email:send",
        "email!",
        "émail",
        "email\nsend",
        "a" * 256,
    ],
    ids=repr,
)
def test_invalid_type_strings(job_type: str) -> None:
    rejects(body(type=job_type), "type")


@pytest.mark.parametrize("job_type", [None, 1, ["email.send"], {"name": "x"}, True], ids=repr)
def test_type_must_be_a_string(job_type: Any) -> None:
    rejects(body(type=job_type), "type")


def test_missing_type() -> None:
    rejects({"args": []}, "type")


# --------------------------------------------------------------------------
# args (L0-ENV-005)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,received",
    [
        ({"to": "a@example.com"}, "object"),
        ("a@example.com", "string"),
        (42, "number"),
        (1.5, "number"),
        (True, "boolean"),
        (None, "null"),
    ],
    ids=["object", "string", "int", "float", "bool", "null"],
)
def test_args_must_be_an_array(args: Any, received: str) -> None:
    err = rejects(body(args=args), "args")
    assert err.details["received"] == received


def test_args_is_required() -> None:
    rejects({"type": "email.send"}, "args")


@pytest.mark.parametrize(
    "args",
    [
        [],
        [None, True, 1, -1.5, "s", [1, [2]], {"k": {"n": None}}],
        [{"": 0}],
        [2**63],
    ],
)
def test_json_native_args_are_kept_verbatim(args: list[Any]) -> None:
    assert parse_job(body(args=args), NOW).args == args


@pytest.mark.parametrize(
    "args",
    [
        [math.nan],
        [math.inf],
        [-math.inf],
        [1, [2, [math.nan]]],
        [{"deep": {"x": math.inf}}],
    ],
    ids=["nan", "inf", "-inf", "nested-list", "nested-object"],
)
def test_non_finite_numbers_in_args_are_rejected(args: list[Any]) -> None:
    err = rejects(body(args=args))
    assert err.details["field"].startswith("args")


@pytest.mark.parametrize(
    "args",
    [[(1, 2)], [{1: "a"}], [b"bytes"], [{"s": {1, 2}}], [object()]],
    ids=["tuple", "int-key", "bytes", "set", "object"],
)
def test_non_json_values_in_args_are_rejected(args: list[Any]) -> None:
    rejects(body(args=args))


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30], ids=str)
def test_integers_beyond_64_bits_are_rejected(value: int) -> None:
    # ojs-json-format.md 4.2: large integers travel as strings; a storage codec
    # (orjson) would read a bigger one back as a float.
    err = rejects(body(args=[{"n": [value]}]))
    assert err.details["field"] == "args[0].n[0]"
    assert "64 bits" in err.message


def test_integers_within_64_bits_are_kept_exactly() -> None:
    args = [2**64 - 1, -(2**63), 2**53 + 1]
    assert parse_job(body(args=args), NOW).args == args


def test_a_failure_report_with_a_huge_integer_in_its_details_is_rejected() -> None:
    with pytest.raises(InvalidRequest):
        Failure.from_wire({"code": "x", "message": "m", "details": {"n": 2**70}})


@pytest.mark.parametrize(
    "raw",
    [
        body(meta={"x": math.nan}),
        body(options={"x_vendor": math.inf}),
        body(options={"priority": math.nan}),
        body(options={"timeout_ms": math.inf}),
        body(x_unknown=[math.nan]),
    ],
    ids=["meta", "unknown-option", "options.priority", "options.timeout_ms", "unknown-field"],
)
def test_non_finite_numbers_elsewhere_are_rejected(raw: dict[str, Any]) -> None:
    rejects(raw)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=str)
def test_non_finite_top_level_priority_is_a_validation_error(value: float) -> None:
    rejects(body(priority=value), "priority")


# --------------------------------------------------------------------------
# queue (L0-ENV-004)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queue", ["default", "email", "high-priority", "a.b", "0q", "q-1.v2", "a" * 128]
)
def test_valid_queues(queue: str) -> None:
    assert parse_job(with_options(queue=queue), NOW).queue == queue


@pytest.mark.parametrize(
    "queue",
    [
        "",
        "Default",
        "HIGH",
        "-q",
        ".q",
        "my queue",
        "q_1",
        "q/1",
        "q:1",
        "é",
        "a" * 129,
        12,
        None,
        ["default"],
    ],
    ids=repr,
)
def test_invalid_queues(queue: Any) -> None:
    rejects(with_options(queue=queue), "queue")


def test_top_level_queue_is_accepted_and_options_queue_wins() -> None:
    assert parse_job(body(queue="email"), NOW).queue == "email"
    assert parse_job(body(queue="email", options={"queue": "bulk"}), NOW).queue == "bulk"
    rejects(body(queue="Email"), "queue")


# --------------------------------------------------------------------------
# priority (ojs-core.md 5.2: at least -100..100, named HIGH/NORMAL/LOW)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        (-100, -100),
        (100, 100),
        (0, 0),
        (7, 7),
        (5.0, 5),
        ("HIGH", 10),
        ("NORMAL", 0),
        ("LOW", -10),
        ("high", 10),
    ],
    ids=repr,
)
def test_valid_priorities(value: Any, expected: int) -> None:
    assert parse_job(with_options(priority=value), NOW).priority == expected
    assert parse_job(body(priority=value), NOW).priority == expected


@pytest.mark.parametrize(
    "value", [-101, 101, 10**6, 1.5, "10", "URGENT", "", True, [1], {"level": 1}], ids=repr
)
def test_invalid_priorities(value: Any) -> None:
    rejects(with_options(priority=value), "priority")


def test_options_priority_wins_over_top_level() -> None:
    assert parse_job(body(priority=1, options={"priority": 2}), NOW).priority == 2


# --------------------------------------------------------------------------
# timeout_ms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 1000, 1000.0, 30_000, MAX_TIMEOUT_MS], ids=repr)
def test_valid_timeouts(value: Any) -> None:
    job = parse_job(with_options(timeout_ms=value), NOW)
    assert job.timeout_ms == int(value)
    assert job.to_wire()["timeout_ms"] == int(value)


@pytest.mark.parametrize(
    "value", [0, -1, 1.5, "1000", True, MAX_TIMEOUT_MS + 1, [1000], {"ms": 1}], ids=repr
)
def test_invalid_timeouts(value: Any) -> None:
    rejects(with_options(timeout_ms=value), "timeout_ms")


def test_timeout_is_unset_by_default_and_null_means_unset() -> None:
    assert parse_job(body(), NOW).timeout_ms is None
    assert parse_job(with_options(timeout_ms=None), NOW).timeout_ms is None


# --------------------------------------------------------------------------
# id (ojs-core.md 5.1: lowercase UUIDv7; L0-ENV-002)
# --------------------------------------------------------------------------


def test_client_uuid7_is_kept() -> None:
    assert parse_job(body(id=CLIENT_ID), NOW).id == CLIENT_ID


@pytest.mark.parametrize(
    "value",
    [
        "550e8400-e29b-41d4-a716-446655440000",  # v4
        "6ba7b810-9dad-11d1-80b4-00c04fd430c8",  # v1
        CLIENT_ID.upper(),
        "019461a8-1a2b-7c3d-cf4f-5a6b7c8d9e0f",  # wrong variant
        CLIENT_ID.replace("-", ""),
        "{" + CLIENT_ID + "}",
        CLIENT_ID + " ",
        "",
        "job-1",
        42,
        ["x"],
    ],
    ids=repr,
)
def test_invalid_ids_are_rejected(value: Any) -> None:
    rejects(body(id=value), "id")


def test_generated_ids_are_uuid7_and_strictly_increasing() -> None:
    ids = [parse_job(body(), NOW).id for _ in range(2000)]
    assert all(is_uuid7(i) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_uuid7_embeds_the_current_millisecond() -> None:
    import time

    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    stamp = int(value.replace("-", "")[:12], 16)
    assert before <= stamp <= after + 1  # +1: a counter overflow may borrow a millisecond


# --------------------------------------------------------------------------
# unknown fields, meta and system-managed fields
# --------------------------------------------------------------------------


def test_unknown_top_level_fields_are_preserved_in_the_wire_form() -> None:
    job = parse_job(body(x_trace={"a": [1, None]}, vendor_flag=True), NOW)
    wire = job.to_wire()
    assert wire["x_trace"] == {"a": [1, None]}
    assert wire["vendor_flag"] is True


def test_unknown_options_are_preserved_in_the_wire_form() -> None:
    wire = parse_job(with_options(x_vendor={"k": 1}, queue="email"), NOW).to_wire()
    assert wire["options"] == {"x_vendor": {"k": 1}}


def test_meta_is_preserved_exactly() -> None:
    meta = {"trace_id": "4bf92f", "tenant_id": "acme", "nested": {"list": [1, "x", None]}}
    job = parse_job(body(meta=meta), NOW)
    assert job.meta == meta
    assert job.to_wire()["meta"] == meta


@pytest.mark.parametrize("meta", [[], "m", 1, True], ids=repr)
def test_meta_must_be_an_object(meta: Any) -> None:
    rejects(body(meta=meta), "meta")


def test_client_cannot_set_system_managed_fields() -> None:
    job = parse_job(
        body(
            state="completed",
            attempt=9,
            created_at="2000-01-01T00:00:00Z",
            completed_at="2000-01-01T00:00:00Z",
            error={"code": "x"},
            errors=[{"code": "x"}],
            result=42,
            worker_id="w9",
        ),
        NOW,
    )
    assert job.state is JobState.AVAILABLE
    assert job.attempt == 0
    assert job.created_at == NOW
    wire = job.to_wire()
    for name in ("completed_at", "error", "errors", "result", "worker_id"):
        assert name not in wire
    assert wire["state"] == "available"
    assert wire["attempt"] == 0
    assert wire["created_at"] == format_ts(NOW)


@pytest.mark.parametrize(
    "raw,field",
    [
        (body(specversion=1), "specversion"),
        (body(schema=5), "schema"),
        (body(options="retry"), "options"),
        (body(options=[1]), "options"),
        (with_options(tags="a"), "tags"),
        (with_options(tags=["a", 1]), "tags"),
        (with_options(visibility_timeout_ms=0), "visibility_timeout_ms"),
        (with_options(unique=[]), "unique"),
        (with_options(unique={"on_conflict": "merge"}), "unique.on_conflict"),
    ],
    ids=[
        "specversion",
        "schema",
        "options-string",
        "options-array",
        "tags-string",
        "tags-mixed",
        "visibility",
        "unique",
        "unique.on_conflict",
    ],
)
def test_other_option_validation(raw: dict[str, Any], field: str) -> None:
    rejects(raw, field)


@pytest.mark.parametrize("options", [[], "", 0, False], ids=repr)
def test_falsy_non_object_options_are_rejected(options: Any) -> None:
    rejects(body(options=options), "options")


def test_invalid_retry_policy_in_options_is_a_422() -> None:
    with pytest.raises(InvalidRetryPolicy) as info:
        parse_job(with_options(retry={"backoff_coefficient": 0.5}), NOW)
    assert info.value.http_status == 422


# --------------------------------------------------------------------------
# scheduling and expiry
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,state,scheduled_at",
    [
        ({"scheduled_at": format_ts(NOW + 60)}, JobState.SCHEDULED, NOW + 60),
        ({"scheduled_at": format_ts(NOW - 60)}, JobState.AVAILABLE, None),
        ({"scheduled_at": format_ts(NOW)}, JobState.AVAILABLE, None),
        ({"scheduled_at": "+PT5S"}, JobState.SCHEDULED, NOW + 5),
        ({"scheduled_at": "+PT1H"}, JobState.SCHEDULED, NOW + 3600),
        ({"scheduled_at": "+PT0S"}, JobState.AVAILABLE, None),
        ({"delay_until": "+PT5S"}, JobState.SCHEDULED, NOW + 5),
        ({"delay_ms": 5000}, JobState.SCHEDULED, NOW + 5),
        ({"delay_ms": 0}, JobState.AVAILABLE, None),
        ({"scheduled_at": "2099-01-01T02:00:00+02:00"}, JobState.SCHEDULED, None),
    ],
    ids=[
        "future",
        "past",
        "now",
        "relative",
        "relative-hour",
        "relative-zero",
        "delay_until",
        "delay_ms",
        "delay_ms-zero",
        "offset",
    ],
)
def test_scheduling(options: dict[str, Any], state: JobState, scheduled_at: float | None) -> None:
    job = parse_job(with_options(**options), NOW)
    assert job.state is state
    if state is JobState.AVAILABLE:
        assert job.scheduled_at is None
        assert "scheduled_at" not in job.to_wire()
    else:
        assert job.scheduled_at is not None
        expected = scheduled_at if scheduled_at is not None else parse_ts("2099-01-01T00:00:00Z")
        assert job.scheduled_at == pytest.approx(expected, abs=1e-3)
        assert job.to_wire()["scheduled_at"] == format_ts(expected)


@pytest.mark.parametrize(
    "options,field",
    [
        ({"scheduled_at": "tomorrow"}, "scheduled_at"),
        ({"scheduled_at": "2030-01-01T00:00:00"}, "scheduled_at"),  # no timezone
        ({"scheduled_at": "2030-01-01"}, "scheduled_at"),
        ({"scheduled_at": 1893456000}, "scheduled_at"),
        ({"scheduled_at": "+5s"}, "scheduled_at"),
        ({"scheduled_at": "+"}, "scheduled_at"),
        ({"delay_until": "soon"}, "delay_until"),
        ({"delay_ms": -1}, "delay_ms"),
        ({"delay_ms": "5000"}, "delay_ms"),
        ({"expires_at": "never"}, "expires_at"),
        ({"expires_at": 0}, "expires_at"),
    ],
    ids=repr,
)
def test_invalid_time_options(options: dict[str, Any], field: str) -> None:
    rejects(with_options(**options), field)


@pytest.mark.parametrize(
    "value,expected",
    [
        (format_ts(NOW + 600), NOW + 600),
        ("+PT10M", NOW + 600),
        ("+P1D", NOW + 86400),
    ],
)
def test_expires_at(value: str, expected: float) -> None:
    job = parse_job(with_options(expires_at=value), NOW)
    assert job.state is JobState.AVAILABLE
    assert job.expires_at == pytest.approx(expected, abs=1e-3)
    assert job.to_wire()["expires_at"] == format_ts(expected)
    assert not lifecycle.is_expired(job, expected - 1)
    assert lifecycle.is_expired(job, expected)


def test_top_level_envelope_scheduled_at_schedules_the_job() -> None:
    job = parse_job(body(scheduled_at=format_ts(NOW + 60)), NOW)
    assert job.state is JobState.SCHEDULED


# --------------------------------------------------------------------------
# Error wire format (ojs-errors.md / HTTP binding)
# --------------------------------------------------------------------------

ERRORS: list[OjsError] = [
    InvalidRequest("bad", details={"field": "type"}),
    InvalidPayload("not json"),
    InvalidRetryPolicy("bad retry", details={"field": "jitter"}),
    NotFound("no such job"),
    Conflict("busy"),
    InvalidStateTransition("j1", "completed", "cancel", "cancelled"),
    DuplicateJob("dup"),
    QueuePaused("paused"),
    BackendError("boom"),
    BackendUnavailable("down"),
]


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_error_wire_format_has_the_required_fields(err: OjsError) -> None:
    wire = err.to_wire()
    for name in ("code", "message", "retryable", "hint", "docs_url"):
        assert name in wire, name
    assert wire["code"] == err.code and wire["code"] == wire["code"].lower()
    assert wire["message"] == err.message and wire["message"]
    assert isinstance(wire["retryable"], bool)
    assert isinstance(wire["hint"], str) and wire["hint"]
    assert wire["docs_url"] == DOCS_BASE + err.catalog_code
    assert wire["docs_url"].startswith("https://")
    assert 400 <= err.http_status <= 599
    json.dumps(wire)  # serialisable as is


def test_invalid_request_is_a_400_with_code_invalid_request() -> None:
    err = InvalidRequest("'type' is required", details={"field": "type"})
    assert err.http_status == 400
    wire = err.to_wire(request_id="req-1")
    assert wire["code"] == "invalid_request"
    assert wire["type"] == "validation_error"
    assert wire["retryable"] is False
    assert wire["details"] == {"field": "type"}
    assert wire["request_id"] == "req-1"


def test_details_and_request_id_are_omitted_when_absent() -> None:
    wire = NotFound("gone").to_wire()
    assert "details" not in wire and "request_id" not in wire


@pytest.mark.parametrize(
    "err,status,retryable",
    [
        (InvalidRequest("x"), 400, False),
        (InvalidRetryPolicy("x"), 422, False),
        (NotFound("x"), 404, False),
        (Conflict("x"), 409, False),
        (QueuePaused("x"), 422, True),
        (BackendError("x"), 500, True),
        (BackendUnavailable("x"), 503, True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, OjsError) else repr(v),
)
def test_status_and_retryability(err: OjsError, status: int, retryable: bool) -> None:
    assert err.http_status == status
    assert err.to_wire()["retryable"] is retryable


# --------------------------------------------------------------------------
# Storage records: Job.to_record / Job.from_record
# --------------------------------------------------------------------------


def _through_json(job: Job) -> Job:
    return Job.from_record(json.loads(json.dumps(job.to_record())))


STAGES = ("fresh", "scheduled", "active", "retryable", "completed", "dead_letter", "cancelled")


def _advance(job: Job, stage: str, rng: random.Random) -> None:
    t = NOW
    if stage == "fresh":
        return
    if stage == "cancelled":
        lifecycle.cancel(job, t + 1)
        return
    if job.state is JobState.SCHEDULED:
        lifecycle.promote(job, t + 1)
    lifecycle.claim(job, "worker-1", 5000, t + 2)
    if stage == "active":
        return
    if stage == "completed":
        lifecycle.ack(job, "worker-1", {"rows": [1, 2]}, True, t + 3)
        return
    code = "DEAD_LETTER" if stage == "dead_letter" else "RETRY"
    failure = Failure(code=code, message="Database connection timed out")
    lifecycle.nack(job, "worker-1", failure, False, t + 3, rng)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=40, deadline=None)
@given(
    args=st.lists(json_values, max_size=4),
    meta=st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    priority=st.integers(min_value=-100, max_value=100),
    queue=st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,20}", fullmatch=True),
    tags=st.none() | st.lists(st.text(max_size=6), max_size=3),
    timeout_ms=st.none() | st.integers(min_value=1, max_value=MAX_TIMEOUT_MS),
    retry=st.fixed_dictionaries(
        {},
        optional={
            "max_attempts": st.integers(min_value=0, max_value=50),
            "initial_interval_ms": st.integers(min_value=1, max_value=10_000),
            "backoff_coefficient": st.floats(min_value=1.0, max_value=5.0),
            "jitter": st.booleans(),
            "non_retryable_errors": st.lists(st.sampled_from(["auth.*", "ValueError"])),
            "on_exhaustion": st.sampled_from(["discard", "dead_letter"]),
            "backoff_strategy": st.sampled_from(["none", "linear", "exponential"]),
        },
    ),
    extra=st.dictionaries(st.from_regex(r"x_[a-z]{1,6}", fullmatch=True), json_values, max_size=2),
    delay_ms=st.none() | st.integers(min_value=0, max_value=10**7),
    stage=st.sampled_from(STAGES),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_record_round_trip_is_lossless(
    args: list[Any],
    meta: dict[str, Any] | None,
    priority: int,
    queue: str,
    tags: list[str] | None,
    timeout_ms: int | None,
    retry: dict[str, Any],
    extra: dict[str, Any],
    delay_ms: int | None,
    stage: str,
    seed: int,
) -> None:
    options: dict[str, Any] = {"priority": priority, "queue": queue, "retry": retry}
    if tags is not None:
        options["tags"] = tags
    if timeout_ms is not None:
        options["timeout_ms"] = timeout_ms
    if delay_ms is not None:
        options["delay_ms"] = delay_ms
    raw: dict[str, Any] = {"type": "report.generate", "args": args, "options": options, **extra}
    if meta is not None:
        raw["meta"] = meta
    job = parse_job(raw, NOW + 0.123456)
    _advance(job, stage, random.Random(seed))
    assert Job.from_record(job.to_record()) == job
    assert _through_json(job) == job
    assert _through_json(job).to_wire() == json.loads(json.dumps(job.to_wire()))


def _full_record(job: Job) -> dict[str, Any]:
    """The record layout written before records went compact: the wire form plus
    every private field, None included.  Rows written then must still read."""
    record = job.to_wire()
    record["_private"] = {
        "timeout_ms": job.timeout_ms,
        "created_at": job.created_at,
        "enqueued_at": job.enqueued_at,
        "scheduled_at": job.scheduled_at,
        "expires_at": job.expires_at,
        "started_at": job.started_at,
        "completed_at": job.completed_at,
        "cancelled_at": job.cancelled_at,
        "discarded_at": job.discarded_at,
        "has_result": job.has_result,
        "worker_id": job.worker_id,
        "lease_expires_at": job.lease_expires_at,
        "dead_letter": job.dead_letter,
        "unique_key": job.unique_key,
        "workflow_step": job.workflow_step,
        "directive": job.directive,
        "extra_keys": sorted(job.extra),
        "client_times": {k: list(v) for k, v in job.client_times.items()},
    }
    return record


@pytest.mark.parametrize("stage", STAGES)
def test_records_in_the_earlier_full_layout_still_read(stage: str) -> None:
    job = parse_job(
        body(
            meta={"tenant": "acme"},
            x_custom={"kept": True},
            options={"scheduled_at": "2030-01-01T00:00:00.000Z", "timeout_ms": 900},
        ),
        NOW,
    )
    _advance(job, stage, random.Random(7))
    old = json.loads(json.dumps(_full_record(job)))
    assert Job.from_record(old) == job
    assert len(json.dumps(job.to_record())) < len(json.dumps(old))


@pytest.mark.parametrize("stage", STAGES)
def test_record_round_trip_for_each_stage(stage: str) -> None:
    job = parse_job(
        body(
            meta={"tenant": "acme"},
            x_extra={"kept": True},
            options={"x_vendor": 1, "expires_at": "+PT1H", "unique": {"keys": ["type"]}},
        ),
        NOW,
    )
    if stage == "scheduled":
        job = parse_job(with_options(scheduled_at="+PT1M"), NOW)
    _advance(job, stage, random.Random(1))
    restored = _through_json(job)
    assert restored == job
    assert restored.to_wire() == job.to_wire()


@pytest.mark.parametrize("interval_ms", [1500.5, 0.4], ids=repr)
def test_record_round_trip_keeps_sub_millisecond_intervals(interval_ms: float) -> None:
    job = parse_job(with_options(retry={"initial_interval_ms": interval_ms}), NOW)
    assert _through_json(job) == job
