"""The 8-state job lifecycle (ojs-conformance.md 2.1.3, ojs-core.md 6).

The transition table below is transcribed from the spec independently of
``ojs_trio.engine.states`` so that a typo in the engine's table is caught.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from ojs_trio.engine import lifecycle
from ojs_trio.engine.errors import Conflict, InvalidStateTransition, OjsError
from ojs_trio.engine.ids import uuid7
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.retry import RetryPolicy
from ojs_trio.engine.states import (
    ADMIN_TRANSITIONS,
    TERMINAL_STATES,
    TRANSITIONS,
    JobState,
    check_transition,
    is_legal,
)

S = JobState
T0 = 1_750_000_000.0

# L0-LC-002, verbatim.
SPEC_LEGAL: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (S.SCHEDULED, S.AVAILABLE),
        (S.SCHEDULED, S.CANCELLED),
        (S.AVAILABLE, S.ACTIVE),
        (S.AVAILABLE, S.CANCELLED),
        (S.PENDING, S.AVAILABLE),
        (S.PENDING, S.CANCELLED),
        (S.ACTIVE, S.COMPLETED),
        (S.ACTIVE, S.RETRYABLE),
        (S.ACTIVE, S.CANCELLED),
        (S.ACTIVE, S.DISCARDED),
        (S.RETRYABLE, S.AVAILABLE),
        (S.RETRYABLE, S.CANCELLED),
        (S.RETRYABLE, S.DISCARDED),
    }
)
SPEC_TERMINAL = frozenset({S.COMPLETED, S.CANCELLED, S.DISCARDED})

ALL_PAIRS = list(itertools.product(JobState, repeat=2))
LEGAL_PAIRS = [pair for pair in ALL_PAIRS if pair in SPEC_LEGAL]
ILLEGAL_PAIRS = [pair for pair in ALL_PAIRS if pair not in SPEC_LEGAL]


def _pair_id(pair: tuple[JobState, JobState]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


# --------------------------------------------------------------------------
# The static table
# --------------------------------------------------------------------------


def test_there_are_exactly_the_eight_spec_states() -> None:
    assert {s.value for s in JobState} == {
        "scheduled",
        "available",
        "pending",
        "active",
        "completed",
        "retryable",
        "cancelled",
        "discarded",
    }


def test_table_covers_all_64_pairs() -> None:
    assert len(ALL_PAIRS) == 64
    assert len(LEGAL_PAIRS) == 13
    assert len(ILLEGAL_PAIRS) == 51
    assert set(TRANSITIONS) == set(JobState)


def test_engine_table_equals_the_spec_table() -> None:
    engine_pairs = {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets}
    assert engine_pairs == SPEC_LEGAL


@pytest.mark.parametrize("pair", LEGAL_PAIRS, ids=_pair_id)
def test_legal_transition_is_allowed(pair: tuple[JobState, JobState]) -> None:
    current, target = pair
    assert is_legal(current, target)
    check_transition("job-1", current, target, "test")  # does not raise


@pytest.mark.parametrize("pair", ILLEGAL_PAIRS, ids=_pair_id)
def test_illegal_transition_raises_with_current_state_and_attempt(
    pair: tuple[JobState, JobState],
) -> None:
    current, target = pair
    assert not is_legal(current, target)
    with pytest.raises(InvalidStateTransition) as info:
        check_transition("job-1", current, target, "test")
    err = info.value
    assert err.http_status == 409
    assert err.code == "conflict"
    assert err.details["job_id"] == "job-1"
    assert err.details["current_state"] == current.value
    assert err.details["attempted_transition"] == f"{current.value} -> {target.value}"
    wire = err.to_wire()
    assert wire["details"]["current_state"] == current.value
    assert wire["details"]["attempted_transition"] == f"{current.value} -> {target.value}"
    assert current.value in err.message


@pytest.mark.parametrize("state", list(JobState), ids=str)
def test_terminal_flag_matches_spec(state: JobState) -> None:
    assert state.is_terminal == (state in SPEC_TERMINAL)


def test_terminal_state_set() -> None:
    assert TERMINAL_STATES == SPEC_TERMINAL


@pytest.mark.parametrize("state", sorted(SPEC_TERMINAL), ids=str)
def test_terminal_states_have_no_lifecycle_exits(state: JobState) -> None:
    assert TRANSITIONS[state] == frozenset()
    for target in JobState:
        assert not is_legal(state, target)


@pytest.mark.parametrize("state", list(JobState), ids=str)
def test_no_state_transitions_to_itself(state: JobState) -> None:
    assert not is_legal(state, state)


def test_admin_transitions_are_the_documented_escape_hatches() -> None:
    # ojs-core.md 6.3: discarded -> available (manual retry, MAY) and
    # active -> available (visibility timeout); neither is in L0-LC-002.
    assert ADMIN_TRANSITIONS == {
        "retry_dead_letter": (frozenset({S.DISCARDED}), S.AVAILABLE),
        "release": (frozenset({S.ACTIVE}), S.AVAILABLE),
    }
    for sources, target in ADMIN_TRANSITIONS.values():
        for source in sources:
            assert not is_legal(source, target)


# --------------------------------------------------------------------------
# Property: random operation sequences through ojs_trio.engine.lifecycle
# --------------------------------------------------------------------------

OPS = (
    "claim",
    "ack",
    "nack",
    "cancel",
    "promote",
    "expire_lease",
    "execution_timeout",
    "expire_ttl",
    "retry_dead_letter",
)
# Operations that make sense in each state, drawn more often than the rest so
# that sequences reach retries, exhaustion and the DLQ; every operation can
# still be drawn in every state.
LIKELY: dict[JobState, tuple[str, ...]] = {
    S.SCHEDULED: ("promote", "promote", "cancel", "expire_ttl"),
    S.PENDING: ("promote", "promote", "cancel", "expire_ttl"),
    S.RETRYABLE: ("promote", "promote", "promote", "cancel", "expire_ttl"),
    S.AVAILABLE: ("claim", "claim", "claim", "cancel", "expire_ttl"),
    S.ACTIVE: ("ack", "nack", "nack", "nack", "expire_lease", "execution_timeout", "cancel"),
    S.DISCARDED: ("retry_dead_letter", "retry_dead_letter"),
    S.COMPLETED: (),
    S.CANCELLED: (),
}
REAPER_OPS = frozenset({"expire_lease", "execution_timeout"})

_RELEASE = {(src, ADMIN_TRANSITIONS["release"][1]) for src in ADMIN_TRANSITIONS["release"][0]}
_DLQ_RETRY = {
    (src, ADMIN_TRANSITIONS["retry_dead_letter"][1])
    for src in ADMIN_TRANSITIONS["retry_dead_letter"][0]
}
# Moves outside L0-LC-002 that a specific operation may make.
OUT_OF_TABLE: dict[str, set[tuple[JobState, JobState]]] = {
    "nack": _RELEASE,  # requeue=True hands the job back
    "expire_lease": _RELEASE,  # visibility timeout (ojs-core.md 6.3)
    "retry_dead_letter": _DLQ_RETRY,
    # L2-TTL-002: an expired job that never started goes straight to discarded.
    "expire_ttl": {(src, S.DISCARDED) for src in (S.SCHEDULED, S.AVAILABLE, S.PENDING)},
}


@dataclass(frozen=True)
class Step:
    op: str
    dt: float
    worker_id: str | None
    requeue: bool
    code: str
    retryable: bool | None
    error_type: str | None
    seed: int


def step_for(state: JobState) -> st.SearchStrategy[Step]:
    return st.builds(
        Step,
        op=st.sampled_from(LIKELY[state] * 3 + OPS),
        dt=st.floats(min_value=0.0, max_value=120.0, allow_nan=False),
        worker_id=st.sampled_from([None, "w1", "w2"]),
        requeue=st.booleans(),
        code=st.sampled_from(["handler_error", "RETRY", "DISCARD", "FAIL", "DEAD_LETTER"]),
        retryable=st.sampled_from([None, True, False]),
        error_type=st.sampled_from([None, "auth.token_expired", "TimeoutError"]),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
    )


STEPS = {state: step_for(state) for state in JobState}
STEP_COUNTS = st.integers(min_value=1, max_value=40)


@st.composite
def initial_jobs(draw: st.DrawFn) -> Job:
    state = draw(st.sampled_from([S.AVAILABLE, S.SCHEDULED, S.PENDING]))
    policy = RetryPolicy(
        max_attempts=draw(st.integers(min_value=0, max_value=4)),
        jitter=draw(st.booleans()),
        non_retryable_errors=("auth.*",),
        on_exhaustion=draw(st.sampled_from(["discard", "dead_letter"])),
        backoff_strategy=draw(st.sampled_from(["none", "linear", "exponential", "polynomial"])),
    )
    return Job(
        id=uuid7(),
        type="test.job",
        args=[1, "two"],
        state=state,
        retry=policy,
        timeout_ms=draw(st.none() | st.integers(min_value=1, max_value=60_000)),
        created_at=T0,
        enqueued_at=T0,
        scheduled_at=T0 + 10.0 if state is S.SCHEDULED else None,
        expires_at=draw(st.none() | st.floats(min_value=T0, max_value=T0 + 600.0)),
    )


def _apply(job: Job, step: Step, now: float) -> None:
    rng = random.Random(step.seed)
    failure = Failure(
        code=step.code, message="boom", type=step.error_type, retryable=step.retryable
    )
    match step.op:
        case "claim":
            lifecycle.claim(job, step.worker_id, None, now)
        case "ack":
            lifecycle.ack(job, step.worker_id, {"ok": True}, True, now)
        case "nack":
            lifecycle.nack(job, step.worker_id, failure, step.requeue, now, rng)
        case "cancel":
            lifecycle.cancel(job, now)
        case "promote":
            lifecycle.promote(job, now)
        case "expire_lease":
            lifecycle.expire_lease(job, now)
        case "execution_timeout":
            lifecycle.execution_timeout(job, now, rng)
        case "expire_ttl":
            lifecycle.expire_ttl(job, now)
        case "retry_dead_letter":
            lifecycle.retry_dead_letter(job, now)
        case _:  # pragma: no cover
            raise AssertionError(step.op)


def _check_success(before: Job, after: Job, step: Step) -> None:
    move = (before.state, after.state)
    assert move in SPEC_LEGAL or move in OUT_OF_TABLE.get(step.op, set()), (
        f"{step.op} made the illegal move {move[0].value} -> {move[1].value}"
    )
    if after.attempt < before.attempt:
        assert (step.op == "nack" and step.requeue) or step.op == "retry_dead_letter", (
            f"{step.op} decreased attempt {before.attempt} -> {after.attempt}"
        )
    if before.state.is_terminal:
        assert step.op == "retry_dead_letter", f"{step.op} moved a {before.state} job"
        assert before.state is S.DISCARDED and before.dead_letter


def _run(job: Job, data: st.DataObject, *, reaper_guard: bool) -> None:
    now = T0
    for _ in range(data.draw(STEP_COUNTS, label="length")):
        step = data.draw(STEPS[job.state], label=f"step from {job.state.value}")
        now += step.dt
        if reaper_guard and step.op in REAPER_OPS and job.state is not S.ACTIVE:
            continue  # the storage reaper only hands active jobs to these rules
        work = job.clone()
        try:
            _apply(work, step, now)
        except OjsError:
            assert work == job, f"{step.op} raised but still modified the job"
            continue
        _check_success(job, work, step)
        job = work


@settings(max_examples=100, deadline=None)
@given(job=initial_jobs(), data=st.data())
def test_operation_sequences_make_only_legal_moves(job: Job, data: st.DataObject) -> None:
    """Every operation either makes an allowed move or raises and leaves the job as it was.

    expire_lease/execution_timeout are applied to active jobs only, as the
    storage reaper does; the unguarded variant below applies them in any state
    and so checks that the rules themselves refuse a job that is not active.
    """
    _run(job, data, reaper_guard=True)


@settings(max_examples=300, deadline=None, derandomize=True, phases=[Phase.generate])
@given(job=initial_jobs(), data=st.data())
def test_unguarded_reaper_operations_make_only_legal_moves(job: Job, data: st.DataObject) -> None:
    _run(job, data, reaper_guard=False)


def test_retry_dead_letter_is_the_only_way_out_of_a_terminal_state() -> None:
    policy = RetryPolicy(max_attempts=1, on_exhaustion="dead_letter")
    job = Job(id=uuid7(), type="t", args=[], retry=policy)
    lifecycle.claim(job, "w1", None, T0)
    lifecycle.nack(job, "w1", Failure(), False, T0 + 1)
    assert (job.state, job.dead_letter) == (S.DISCARDED, True)
    lifecycle.retry_dead_letter(job, T0 + 2)
    assert job.state is S.AVAILABLE
    assert job.attempt == 0


@pytest.mark.parametrize(
    "state,dead_letter",
    [(S.COMPLETED, False), (S.CANCELLED, False), (S.DISCARDED, False)],
    ids=["completed", "cancelled", "discarded-not-dlq"],
)
def test_retry_dead_letter_rejects_jobs_outside_the_dlq(state: JobState, dead_letter: bool) -> None:
    job = Job(id=uuid7(), type="t", args=[], state=state, dead_letter=dead_letter)
    before = job.clone()
    with pytest.raises(Conflict) as info:
        lifecycle.retry_dead_letter(job, T0)
    assert info.value.details["current_state"] == state.value
    assert job == before
