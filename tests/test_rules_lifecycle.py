"""Pure lifecycle rules (ojs_trio.engine.lifecycle): claim, ack, nack decisions,
timeouts, TTL expiry, dead-letter retry and reservation ownership."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from ojs_trio.engine import lifecycle
from ojs_trio.engine.errors import Conflict, InvalidRequest, InvalidStateTransition
from ojs_trio.engine.ids import uuid7
from ojs_trio.engine.job import DEFAULT_VISIBILITY_MS, MAX_ERROR_HISTORY, Job
from ojs_trio.engine.lifecycle import Failure, infer_error_type
from ojs_trio.engine.retry import RetryPolicy
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts

S = JobState
T0 = 1_750_000_000.0
NOW = T0 + 10.0
NON_ACTIVE = [s for s in JobState if s is not S.ACTIVE]


def new_job(state: JobState = S.AVAILABLE, **policy: Any) -> Job:
    fields: dict[str, Any] = {"jitter": False}
    fields.update(policy)
    return Job(
        id=uuid7(),
        type="test.job",
        args=["x"],
        state=state,
        retry=RetryPolicy(**fields),
        created_at=T0,
        enqueued_at=T0,
        scheduled_at=T0 + 60 if state in (S.SCHEDULED, S.RETRYABLE) else None,
    )


def active_job(attempt: int = 1, worker_id: str | None = "w1", **policy: Any) -> Job:
    """A job in its ``attempt``-th execution, claimed by ``worker_id``."""
    job = new_job(**policy)
    job.attempt = attempt - 1
    lifecycle.claim(job, worker_id, None, T0)
    assert job.attempt == attempt
    return job


def in_state(state: JobState) -> Job:
    job = new_job(state if state is not S.ACTIVE else S.AVAILABLE)
    if state is S.ACTIVE:
        lifecycle.claim(job, "w1", None, T0)
    if state is S.DISCARDED:
        job.discarded_at = T0
    return job


def assert_retryable(job: Job, delay_ms: int | None) -> None:
    assert job.state is S.RETRYABLE
    assert job.retry_delay_ms is not None
    if delay_ms is not None:
        assert job.retry_delay_ms == delay_ms
    assert job.scheduled_at == pytest.approx(NOW + job.retry_delay_ms / 1000, abs=1e-3)
    assert job.lease_expires_at is None
    assert job.completed_at is None and job.discarded_at is None
    assert job.scheduled_at is not None
    assert job.to_wire()["next_attempt_at"] == format_ts(job.scheduled_at)


def assert_discarded(job: Job, *, dead_letter: bool) -> None:
    assert job.state is S.DISCARDED
    assert job.discarded_at == NOW
    assert job.completed_at == NOW
    assert job.dead_letter is dead_letter
    assert job.scheduled_at is None
    assert job.retry_delay_ms is None
    assert job.lease_expires_at is None


# --------------------------------------------------------------------------
# claim
# --------------------------------------------------------------------------


def test_claim_starts_an_attempt_and_a_lease() -> None:
    job = new_job()
    lifecycle.claim(job, "w1", 5_000, NOW)
    assert job.state is S.ACTIVE
    assert job.attempt == 1
    assert job.started_at == NOW
    assert job.worker_id == "w1"
    assert job.lease_expires_at == NOW + 5.0
    assert job.to_wire()["worker_id"] == "w1"


@pytest.mark.parametrize(
    "requested,job_default,expected_ms",
    [(None, None, DEFAULT_VISIBILITY_MS), (None, 12_000, 12_000), (3_000, 12_000, 3_000)],
)
def test_claim_lease_length(
    requested: int | None, job_default: int | None, expected_ms: int
) -> None:
    job = new_job()
    job.visibility_timeout_ms = job_default
    lifecycle.claim(job, None, requested, NOW)
    assert job.lease_expires_at == pytest.approx(NOW + expected_ms / 1000)


@pytest.mark.parametrize("state", [s for s in JobState if s is not S.AVAILABLE], ids=str)
def test_claim_requires_available(state: JobState) -> None:
    job = in_state(state)
    before = job.clone()
    with pytest.raises(InvalidStateTransition) as info:
        lifecycle.claim(job, "w1", None, NOW)
    assert info.value.details["current_state"] == state.value
    assert job == before


# --------------------------------------------------------------------------
# nack decision table (ojs-retry.md 2.2, 6.3, 7.2)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class NackCase:
    name: str
    attempt: int
    failure: Failure
    expect: str  # "retryable" | "discarded" | "dead_letter"
    policy: dict[str, Any] = field(default_factory=dict)
    delay_ms: int | None = None


NACK_CASES = [
    NackCase("first failure retries", 1, Failure(), "retryable", delay_ms=1000),
    NackCase("second failure backs off", 2, Failure(), "retryable", delay_ms=2000),
    NackCase("last attempt discards", 3, Failure(), "discarded"),
    NackCase(
        "last attempt dead-letters", 3, Failure(), "dead_letter", {"on_exhaustion": "dead_letter"}
    ),
    NackCase("max_attempts 1 never retries", 1, Failure(), "discarded", {"max_attempts": 1}),
    NackCase("max_attempts 0 never retries", 1, Failure(), "discarded", {"max_attempts": 0}),
    NackCase("retryable false discards at once", 1, Failure(retryable=False), "discarded"),
    NackCase(
        "retryable false follows on_exhaustion",
        1,
        Failure(retryable=False),
        "dead_letter",
        {"on_exhaustion": "dead_letter"},
    ),
    NackCase("retryable true retries", 1, Failure(retryable=True), "retryable", delay_ms=1000),
    NackCase("retryable true still exhausts", 3, Failure(retryable=True), "discarded"),
    NackCase(
        "non-retryable exact error.type",
        1,
        Failure(type="validation.payload_invalid"),
        "discarded",
        {"non_retryable_errors": ("validation.payload_invalid",)},
    ),
    NackCase(
        "non-retryable prefix error.type",
        1,
        Failure(type="auth.token_expired"),
        "discarded",
        {"non_retryable_errors": ("auth.*",)},
    ),
    NackCase(
        "non-retryable via details.error_class",
        1,
        Failure(details={"error_class": "ValueError"}),
        "discarded",
        {"non_retryable_errors": ("ValueError",)},
    ),
    NackCase(
        "non-retryable via the inferred type",
        1,
        Failure(message="API rate limit reached"),
        "discarded",
        {"non_retryable_errors": ("RateLimitExceeded",)},
    ),
    NackCase(
        "non-retryable match follows on_exhaustion",
        1,
        Failure(type="auth.forbidden"),
        "dead_letter",
        {"non_retryable_errors": ("auth.*",), "on_exhaustion": "dead_letter"},
    ),
    NackCase(
        "error.type takes precedence over error_class",
        1,
        Failure(type="KeyError", details={"error_class": "ValueError"}),
        "retryable",
        {"non_retryable_errors": ("ValueError",)},
        delay_ms=1000,
    ),
    NackCase(
        "other error types retry",
        1,
        Failure(type="external.api_timeout"),
        "retryable",
        {"non_retryable_errors": ("auth.*", "validation.payload_invalid")},
        delay_ms=1000,
    ),
    NackCase("handler DISCARD", 1, Failure(code="DISCARD"), "discarded"),
    NackCase(
        "handler DISCARD ignores dead_letter policy",
        1,
        Failure(code="DISCARD"),
        "discarded",
        {"on_exhaustion": "dead_letter"},
    ),
    NackCase("handler FAIL", 1, Failure(code="FAIL"), "discarded"),
    NackCase(
        "handler FAIL ignores dead_letter policy",
        1,
        Failure(code="FAIL"),
        "discarded",
        {"on_exhaustion": "dead_letter"},
    ),
    NackCase("handler DEAD_LETTER", 1, Failure(code="DEAD_LETTER"), "dead_letter"),
    NackCase("handler codes are case-insensitive", 1, Failure(code="discard"), "discarded"),
    NackCase("handler RETRY", 1, Failure(code="RETRY"), "retryable", delay_ms=1000),
    NackCase(
        "handler RETRY still honours non_retryable_errors",
        1,
        Failure(code="RETRY", type="auth.forbidden"),
        "discarded",
        {"non_retryable_errors": ("auth.*",)},
    ),
    NackCase("handler RETRY still exhausts", 3, Failure(code="RETRY"), "discarded"),
    NackCase(
        "linear backoff",
        3,
        Failure(),
        "retryable",
        {"max_attempts": 5, "backoff_strategy": "linear", "initial_interval": 2.0},
        delay_ms=6000,
    ),
    NackCase(
        "backoff is capped",
        9,
        Failure(),
        "retryable",
        {"max_attempts": 20, "max_interval": 60.0},
        delay_ms=60_000,
    ),
]


@pytest.mark.parametrize("case", NACK_CASES, ids=lambda c: c.name)
def test_nack_decision(case: NackCase) -> None:
    job = active_job(case.attempt, **case.policy)
    lifecycle.nack(job, "w1", case.failure, False, NOW)
    assert job.attempt == case.attempt
    assert len(job.errors) == 1
    if case.expect == "retryable":
        assert_retryable(job, case.delay_ms)
    else:
        assert_discarded(job, dead_letter=case.expect == "dead_letter")


def test_nack_with_jitter_stays_within_the_spec_bounds() -> None:
    for seed in range(50):
        job = active_job(1, jitter=True)
        lifecycle.nack(job, "w1", Failure(), False, NOW, random.Random(seed))
        assert_retryable(job, None)
        assert job.retry_delay_ms is not None
        assert 500 <= job.retry_delay_ms <= 1500


def test_full_retry_cycle_backs_off_exponentially_then_exhausts() -> None:
    job = new_job(max_attempts=5)
    delays: list[int | None] = []
    now = T0
    for _ in range(5):
        lifecycle.claim(job, "w1", None, now)
        lifecycle.nack(job, "w1", Failure(), False, now)
        delays.append(job.retry_delay_ms)
        if job.state is S.RETRYABLE:
            lifecycle.promote(job, now)
        now += 100
    assert delays == [1000, 2000, 4000, 8000, None]
    assert job.state is S.DISCARDED
    assert job.attempt == 5
    assert [e["attempt"] for e in job.errors] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------
# requeue
# --------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_requeue_gives_the_attempt_back(attempt: int) -> None:
    job = active_job(attempt)
    lifecycle.nack(job, "w1", Failure(), True, NOW)
    assert job.state is S.AVAILABLE
    assert job.attempt == attempt - 1
    assert job.worker_id is None
    assert job.lease_expires_at is None
    assert job.errors == [] and job.error is None
    assert "worker_id" not in job.to_wire()


def test_requeue_ignores_the_failure_and_its_handler_code() -> None:
    job = active_job(3)  # the last attempt: a real failure would exhaust it
    lifecycle.nack(job, "w1", Failure(code="DEAD_LETTER", retryable=False), True, NOW)
    assert job.state is S.AVAILABLE
    assert job.attempt == 2
    assert not job.dead_letter


# --------------------------------------------------------------------------
# error history (ojs-retry.md 10.1)
# --------------------------------------------------------------------------


def test_error_entry_shape() -> None:
    job = active_job(1)
    failure = Failure(
        code="handler_error",
        message="Card declined",
        type="external.stripe.card_declined",
        retryable=True,
        details={"last4": "4242"},
    )
    lifecycle.nack(job, "w1", failure, False, NOW)
    entry = job.errors[-1]
    assert entry == {
        "code": "handler_error",
        "message": "Card declined",
        "type": "external.stripe.card_declined",
        "attempt": 1,
        "occurred_at": format_ts(NOW),
        "retryable": True,
        "details": {"last4": "4242"},
    }
    assert job.error == entry
    wire = job.to_wire()
    assert wire["error"] == entry and wire["errors"] == [entry]


def test_error_entry_minimal_fields_and_inferred_type() -> None:
    job = active_job(1)
    lifecycle.nack(job, "w1", Failure(message="Database connection timed out"), False, NOW)
    entry = job.errors[-1]
    assert set(entry) == {"code", "message", "type", "attempt", "occurred_at"}
    assert entry["type"] == "ConnectionTimeout"


def test_error_history_is_capped_keeping_the_most_recent() -> None:
    assert MAX_ERROR_HISTORY >= 10  # RET-15
    total = MAX_ERROR_HISTORY + 15
    job = new_job(max_attempts=total + 1)
    for n in range(1, total + 1):
        lifecycle.claim(job, "w1", None, T0 + n)
        lifecycle.nack(job, "w1", Failure(message=f"failure {n}"), False, T0 + n)
        lifecycle.promote(job, T0 + n)
        assert len(job.errors) == min(n, MAX_ERROR_HISTORY)
    assert [e["attempt"] for e in job.errors] == list(range(16, total + 1))
    assert job.error is not None and job.error["message"] == f"failure {total}"


# --------------------------------------------------------------------------
# error type inference and Failure.from_wire
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure,expected",
    [
        (Failure(message="Database connection timed out"), "ConnectionTimeout"),
        (Failure(message="Request timeout after 30s"), "ConnectionTimeout"),
        (Failure(message="API rate limit reached"), "RateLimitExceeded"),
        (Failure(message="429 Too Many Requests"), "RateLimitExceeded"),
        (Failure(message="Request throttled by upstream"), "RateLimitExceeded"),
        (Failure(message="Connection refused (db:5432)"), "ConnectionError"),
        (Failure(message="Host unreachable"), "ConnectionError"),
        (Failure(message="User 42 not found"), "NotFound"),
        (Failure(message="403 Forbidden"), "PermissionDenied"),
        (Failure(message="Unauthorized: bad token"), "PermissionDenied"),
        (Failure(message="Unexpected null reference"), "InternalServerError"),
        (Failure(message=""), "InternalServerError"),
        (Failure(type="auth.expired", message="timed out"), "auth.expired"),
        (Failure(message="timed out", details={"error_class": "ValueError"}), "ValueError"),
        (Failure(message="timed out", details={"error_class": 7}), "ConnectionTimeout"),
        (Failure(type="", message="rate limit"), "RateLimitExceeded"),
    ],
    ids=lambda v: repr(v.message or v.type) if isinstance(v, Failure) else v,
)
def test_infer_error_type(failure: Failure, expected: str) -> None:
    assert infer_error_type(failure) == expected


def test_failure_from_wire_defaults() -> None:
    assert Failure.from_wire(None) == Failure()
    parsed = Failure.from_wire(
        {"code": "DISCARD", "message": "", "type": "x.y", "retryable": False, "details": {"a": 1}}
    )
    assert parsed == Failure("DISCARD", "job failed", "x.y", False, {"a": 1})


@pytest.mark.parametrize(
    "raw",
    [
        "boom",
        ["boom"],
        {"code": 5},
        {"code": ""},
        {"message": 5},
        {"type": 5},
        {"retryable": "no"},
        {"details": []},
    ],
    ids=repr,
)
def test_failure_from_wire_rejects_bad_shapes(raw: Any) -> None:
    with pytest.raises(InvalidRequest):
        Failure.from_wire(raw)


# --------------------------------------------------------------------------
# ack
# --------------------------------------------------------------------------


def test_ack_completes_and_clears_the_current_error_but_keeps_history() -> None:
    job = active_job(1)
    lifecycle.nack(job, "w1", Failure(message="flaky"), False, T0 + 1)
    lifecycle.promote(job, T0 + 2)
    lifecycle.claim(job, "w1", None, T0 + 3)
    lifecycle.ack(job, "w1", {"rows": 3}, True, NOW)
    assert job.state is S.COMPLETED
    assert job.completed_at == NOW
    assert job.error is None
    assert len(job.errors) == 1 and job.errors[0]["message"] == "flaky"
    assert job.result == {"rows": 3} and job.has_result
    assert job.lease_expires_at is None
    wire = job.to_wire()
    assert "error" not in wire
    assert wire["result"] == {"rows": 3}
    assert len(wire["errors"]) == 1


@pytest.mark.parametrize(
    "result,has_result,wire_has_result",
    [(None, False, False), (None, True, True), ("ignored", False, False), (0, True, True)],
)
def test_ack_result_presence(result: Any, has_result: bool, wire_has_result: bool) -> None:
    job = active_job(1)
    lifecycle.ack(job, "w1", result, has_result, NOW)
    assert ("result" in job.to_wire()) is wire_has_result
    assert job.result == (result if has_result else None)


@pytest.mark.parametrize("state", NON_ACTIVE, ids=str)
@pytest.mark.parametrize("action", ["ack", "nack"])
def test_ack_and_nack_require_active(state: JobState, action: str) -> None:
    job = in_state(state)
    before = job.clone()
    with pytest.raises(InvalidStateTransition) as info:
        if action == "ack":
            lifecycle.ack(job, "w1", None, False, NOW)
        else:
            lifecycle.nack(job, "w1", Failure(), False, NOW)
    target = "completed" if action == "ack" else "retryable"
    assert info.value.details["current_state"] == state.value
    assert info.value.details["attempted_transition"] == f"{state.value} -> {target}"
    assert job == before


# --------------------------------------------------------------------------
# reservation ownership
# --------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["ack", "nack", "requeue"])
def test_settling_another_workers_reservation_is_a_conflict(action: str) -> None:
    job = active_job(1, worker_id="w1")
    before = job.clone()
    with pytest.raises(Conflict) as info:
        if action == "ack":
            lifecycle.ack(job, "w2", None, False, NOW)
        else:
            lifecycle.nack(job, "w2", Failure(), action == "requeue", NOW)
    err = info.value
    assert not isinstance(err, InvalidStateTransition)
    assert err.http_status == 409
    assert err.details["holder"] == "w1" and err.details["worker_id"] == "w2"
    assert job == before


@pytest.mark.parametrize(
    "holder,caller", [("w1", None), (None, "w2"), (None, None), ("w1", "w1")], ids=repr
)
@pytest.mark.parametrize("action", ["ack", "nack"])
def test_missing_worker_ids_are_accepted(
    holder: str | None, caller: str | None, action: str
) -> None:
    job = active_job(1, worker_id=holder)
    if action == "ack":
        lifecycle.ack(job, caller, None, False, NOW)
        assert job.state is S.COMPLETED
    else:
        lifecycle.nack(job, caller, Failure(), False, NOW)
        assert job.state is S.RETRYABLE


# --------------------------------------------------------------------------
# visibility timeout (expire_lease) and execution timeout
# --------------------------------------------------------------------------


def test_expire_lease_returns_the_job_to_available() -> None:
    job = active_job(1, worker_id="w1")
    lifecycle.expire_lease(job, NOW)
    assert job.state is S.AVAILABLE
    assert job.attempt == 1  # the attempt was used up at fetch
    assert job.worker_id is None
    assert job.lease_expires_at is None
    assert job.scheduled_at is None
    assert job.started_at is None  # ojs-core.md 6.3: the timeout clears started_at
    entry = job.errors[-1]
    assert entry["code"] == "visibility_timeout"
    assert entry["type"] == "LeaseExpired"
    assert entry["attempt"] == 1
    assert "w1" in entry["message"]


@pytest.mark.parametrize("on_exhaustion", ["discard", "dead_letter"])
def test_expire_lease_on_the_last_attempt_exhausts(on_exhaustion: str) -> None:
    job = active_job(3, on_exhaustion=on_exhaustion)
    lifecycle.expire_lease(job, NOW)
    assert_discarded(job, dead_letter=on_exhaustion == "dead_letter")
    assert job.errors[-1]["type"] == "LeaseExpired"


def test_execution_timeout_is_a_retryable_failure() -> None:
    job = active_job(1)
    job.timeout_ms = 5_000
    assert job.execution_deadline() == T0 + 5.0
    lifecycle.execution_timeout(job, NOW)
    assert_retryable(job, 1000)
    entry = job.errors[-1]
    assert entry["code"] == "handler_timeout"
    assert entry["type"] == "TimeoutError"
    assert entry["retryable"] is True
    assert "5000" in entry["message"]


@pytest.mark.parametrize("on_exhaustion", ["discard", "dead_letter"])
def test_execution_timeout_on_the_last_attempt_exhausts(on_exhaustion: str) -> None:
    job = active_job(3, on_exhaustion=on_exhaustion)
    lifecycle.execution_timeout(job, NOW)
    assert_discarded(job, dead_letter=on_exhaustion == "dead_letter")


@pytest.mark.parametrize("state", NON_ACTIVE, ids=str)
def test_expire_lease_requires_active(state: JobState) -> None:
    job = in_state(state)
    before = job.clone()
    with pytest.raises(InvalidStateTransition):
        lifecycle.expire_lease(job, NOW)
    assert job == before


@pytest.mark.parametrize("state", NON_ACTIVE, ids=str)
def test_execution_timeout_requires_active(state: JobState) -> None:
    job = in_state(state)
    before = job.clone()
    with pytest.raises(InvalidStateTransition):
        lifecycle.execution_timeout(job, NOW)
    assert job == before


# --------------------------------------------------------------------------
# TTL expiry (ojs-core.md 5.2 expires_at, L2-TTL-002)
# --------------------------------------------------------------------------


def _assert_expired(job: Job) -> None:
    assert job.state is S.DISCARDED
    assert job.discarded_at == NOW
    assert job.completed_at is None  # it never ran
    assert job.scheduled_at is None
    assert job.retry_delay_ms is None
    assert job.dead_letter  # whatever on_exhaustion says: it never got to exhaust anything
    entry = job.errors[-1]
    assert entry["code"] == "expired" and entry["type"] == "JobExpired"


def test_expire_ttl_discards_a_retryable_job_without_completed_at() -> None:
    job = active_job(1)
    lifecycle.nack(job, "w1", Failure(), False, T0 + 1)
    lifecycle.expire_ttl(job, NOW)
    _assert_expired(job)
    assert len(job.errors) == 2


@pytest.mark.parametrize("on_exhaustion", ["discard", "dead_letter"])
@pytest.mark.parametrize("state", [S.SCHEDULED, S.AVAILABLE, S.PENDING], ids=str)
def test_expire_ttl_discards_jobs_that_never_started(state: JobState, on_exhaustion: str) -> None:
    job = new_job(state, on_exhaustion=on_exhaustion)
    job.expires_at = NOW - 1
    lifecycle.expire_ttl(job, NOW)
    _assert_expired(job)


def test_expired_job_retried_from_the_dead_letter_queue_runs_without_its_passed_ttl() -> None:
    job = new_job()
    job.expires_at = NOW - 1
    lifecycle.expire_ttl(job, NOW)
    lifecycle.retry_dead_letter(job, NOW + 5)
    assert (job.state, job.dead_letter, job.expires_at) == (S.AVAILABLE, False, None)
    assert not lifecycle.is_expired(job, NOW + 5)
    lifecycle.claim(job, "w1", None, NOW + 6)
    assert job.attempt == 1


def test_retry_dead_letter_keeps_a_ttl_that_has_not_passed() -> None:
    job = active_job(1, max_attempts=1, on_exhaustion="dead_letter")
    job.expires_at = NOW + 60
    lifecycle.nack(job, "w1", Failure(), False, T0 + 1)
    lifecycle.retry_dead_letter(job, NOW)
    assert job.expires_at == NOW + 60


def test_expire_ttl_leaves_a_running_job_alone() -> None:
    job = active_job(1)
    before = job.clone()
    with pytest.raises(InvalidStateTransition):
        lifecycle.expire_ttl(job, NOW)
    assert job == before


@pytest.mark.parametrize("state", [S.COMPLETED, S.CANCELLED, S.DISCARDED], ids=str)
def test_expire_ttl_rejects_terminal_jobs(state: JobState) -> None:
    job = in_state(state)
    before = job.clone()
    with pytest.raises(InvalidStateTransition):
        lifecycle.expire_ttl(job, NOW)
    assert job == before


@pytest.mark.parametrize(
    "expires_at,expired",
    [(None, False), (NOW + 1, False), (NOW, True), (NOW - 1, True)],
    ids=["unset", "future", "now", "past"],
)
def test_is_expired(expires_at: float | None, expired: bool) -> None:
    job = new_job()
    job.expires_at = expires_at
    assert lifecycle.is_expired(job, NOW) is expired


# --------------------------------------------------------------------------
# cancel, promote, retry_dead_letter
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state", [S.SCHEDULED, S.AVAILABLE, S.PENDING, S.RETRYABLE, S.ACTIVE], ids=str
)
def test_cancel(state: JobState) -> None:
    job = in_state(state)
    lifecycle.cancel(job, NOW)
    assert job.state is S.CANCELLED
    assert job.cancelled_at == NOW
    assert job.scheduled_at is None and job.lease_expires_at is None


@pytest.mark.parametrize("state", [S.COMPLETED, S.CANCELLED, S.DISCARDED], ids=str)
def test_cancel_rejects_terminal_jobs(state: JobState) -> None:
    job = in_state(state)
    with pytest.raises(InvalidStateTransition) as info:
        lifecycle.cancel(job, NOW)
    assert info.value.details["attempted_transition"] == f"{state.value} -> cancelled"


@pytest.mark.parametrize("state", [S.SCHEDULED, S.RETRYABLE, S.PENDING], ids=str)
def test_promote(state: JobState) -> None:
    job = in_state(state)
    lifecycle.promote(job, NOW)
    assert job.state is S.AVAILABLE
    assert job.scheduled_at is None


@pytest.mark.parametrize(
    "state", [S.AVAILABLE, S.ACTIVE, S.COMPLETED, S.CANCELLED, S.DISCARDED], ids=str
)
def test_promote_rejects_other_states(state: JobState) -> None:
    job = in_state(state)
    before = job.clone()
    with pytest.raises(InvalidStateTransition):
        lifecycle.promote(job, NOW)
    assert job == before


def test_retry_dead_letter_revives_the_job_keeping_its_history() -> None:
    job = active_job(3, on_exhaustion="dead_letter")
    lifecycle.nack(job, "w1", Failure(message="bad"), False, T0 + 1)
    assert (job.state, job.dead_letter) == (S.DISCARDED, True)
    job_id, policy, errors = job.id, job.retry, list(job.errors)
    lifecycle.retry_dead_letter(job, NOW)
    assert job.state is S.AVAILABLE
    assert job.attempt == 0
    assert not job.dead_letter
    assert job.discarded_at is None and job.completed_at is None
    assert job.error is None and job.retry_delay_ms is None and job.worker_id is None
    assert job.enqueued_at == NOW
    assert (job.id, job.retry, job.errors) == (job_id, policy, errors)  # ojs-dead-letter 6.1
    lifecycle.claim(job, "w2", None, NOW + 1)
    assert job.attempt == 1


def test_retry_dead_letter_rejects_a_plainly_discarded_job() -> None:
    job = active_job(3)  # on_exhaustion: discard
    lifecycle.nack(job, "w1", Failure(), False, T0 + 1)
    with pytest.raises(Conflict):
        lifecycle.retry_dead_letter(job, NOW)
