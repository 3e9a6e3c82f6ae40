"""The memory adapter's job table: exact round trips, counts, and no GC-tracked records."""

from __future__ import annotations

import gc
from dataclasses import fields

import pytest

from ojs_trio.engine import lifecycle
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.retry import parse_retry_policy
from ojs_trio.engine.states import JobState
from ojs_trio.storage.jobtable import JobTable
from ojs_trio.testing.storage_contract import T0, make_job


def _busy_job() -> lifecycle.Job:
    """A job with every kind of field set: nested args, meta, errors, times, extras."""
    job = make_job(
        args=[{"n": 1, "nested": [1.5, None, True, "x"]}, [], "é"],
        tags=["a", "b"],
        retry={"max_attempts": 5, "non_retryable_errors": ["fatal.*"], "x-custom": {"k": 1}},
        unique={"keys": ["type"], "on_conflict": "reject"},
        expires_at="+PT1H",
    )
    job.meta = {"trace": {"id": "t-1"}}
    job.extra = {"x-field": [1, {"deep": "yes"}]}
    job.client_times = {"scheduled_at": ("2026-01-01T00:00:00Z", 1767225600.0)}
    lifecycle.claim(job, "w-1", 30_000, T0 + 1)
    lifecycle.nack(job, "w-1", Failure(code="boom", message="failed"), False, T0 + 2, None)
    return job


def test_a_job_reads_back_equal_field_by_field_and_as_a_private_copy() -> None:
    table = JobTable()
    job = _busy_job()
    table[job.id] = job
    back = table[job.id]
    for f in fields(job):
        assert getattr(back, f.name) == getattr(job, f.name), f.name
    assert back.state is job.state and back.retry == job.retry
    assert back.retry.non_retryable_errors == ("fatal.*",)  # a tuple, as parsed
    back.args[0]["n"] = 2
    back.errors.append({"code": "mine"})
    job.meta = {"changed": True}
    assert table[job.id].args[0]["n"] == 1  # neither side aliases the record
    assert table[job.id].errors == _busy_job().errors
    assert table[job.id].meta == {"trace": {"id": "t-1"}}


def test_retry_policies_are_interned_by_value() -> None:
    table = JobTable()
    policy = {"max_attempts": 7, "initial_interval": "PT2S"}
    for i in range(3):
        job = make_job(args=[i], retry=dict(policy))  # a separately parsed policy each
        table[job.id] = job
    other = make_job(retry={"max_attempts": 7, "initial_interval": "PT2S", "x-a": 1})
    table[other.id] = other
    retries = [table[i].retry for i in table]
    assert retries[0] is retries[1] is retries[2]
    assert retries[3].extra == {"x-a": 1} and retries[3] is not retries[0]
    assert retries[0] == parse_retry_policy(policy)


def test_counts_follow_every_store_and_delete() -> None:
    table = JobTable()
    a, b = make_job(queue="q1"), make_job(queue="q1")
    c = make_job(queue="q2")
    for job in (a, b, c):
        table[job.id] = job
    assert table.counts("q1") == {"available": 2} and table.counts("q2") == {"available": 1}
    lifecycle.claim(a, "w", 1000, T0)
    table[a.id] = a
    assert table.counts("q1") == {"available": 1, "active": 1}
    del table[b.id]
    del table[c.id]
    assert table.counts("q1") == {"active": 1} and table.counts("q2") == {}
    assert table.queues() == ["q1"]
    assert table.summary(a.id)[:2] == ("q1", JobState.ACTIVE.value)
    assert len(table) == 1 and b.id not in table and table.get(b.id) is None


def test_values_marshal_cannot_encode_are_refused() -> None:
    table = JobTable()
    job = make_job()
    job.result = object()
    with pytest.raises(ValueError):
        table[job.id] = job
    assert job.id not in table and table.counts(job.queue) == {}


def test_stored_records_are_invisible_to_the_cyclic_gc() -> None:
    # The reason for the table: full collections must not grow with resident jobs.
    table = JobTable()
    jobs = [make_job(args=[i, {"k": [i]}]) for i in range(500)]
    for job in jobs:
        table[job.id] = job
    del jobs, job
    gc.collect()  # tuples of atomic values are untracked by the first pass over them
    assert not any(gc.is_tracked(record) for record in table._records.values())
    assert not any(gc.is_tracked(summary) for summary in table._summaries.values())
