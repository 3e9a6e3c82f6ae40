"""Workflows through the engine: chain, group, batch, cancellation, and the
acceptance test "an actor raising mid-workflow does not lose or duplicate a
chain step".

Timer-driven parts run under ``MockClock(autojump_threshold=0)`` with the
engine's wall clock at ``BASE + trio.current_time()``; :func:`real_time_limit`
turns a spinning actor (which would freeze the mock clock) into a failure.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from mockclock import engine_on_clock, real_time_limit

from ojs_trio.engine.engine import Engine
from ojs_trio.engine.errors import BackendUnavailable, InvalidRequest, OjsError
from ojs_trio.engine.job import Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.engine.worker import JobContext
from ojs_trio.engine.workflows import (
    OMITTED_FROM_META,
    PARENT_RESULTS_MAX_BYTES,
    Workflow,
    on_job_finished,
    parse_workflow,
)
from ojs_trio.storage.memory import MemoryStorage

BASE = 1_700_000_000.0


def wall() -> float:
    return BASE + trio.current_time()


def running_engine(
    storage: MemoryStorage | None = None, **config: Any
) -> AbstractAsyncContextManager[Engine]:
    config.setdefault("clock", wall)
    return engine_on_clock(storage, **config)


@asynccontextmanager
async def running_workers(engine: Engine, queues: list[str], concurrency: int, **options: Any):
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(engine.run_workers, queues, concurrency, **options))
        yield
        nursery.cancel_scope.cancel()


def step(n: int, queue: str = "wf", **options: Any) -> dict[str, Any]:
    return {"type": "wf.step", "args": [n], "options": {"queue": queue, **options}}


ONE_ATTEMPT = {"retry": {"max_attempts": 1}}


async def wait_for_workflow(
    engine: Engine, workflow_id: str, *states: str, within: float = 120.0
) -> Workflow:
    with trio.fail_after(within):
        while True:
            workflow = await engine.get_workflow(workflow_id)
            if workflow.state in states:
                return workflow
            await trio.sleep(0.01)


def workflow_events(engine: Engine, workflow_id: str) -> list[str]:
    return [
        e["type"] for e in engine.events.query(limit=10_000) if e.get("workflow_id") == workflow_id
    ]


async def fetch_all(engine: Engine, queue: str = "wf") -> list[Job]:
    return await engine.fetch([queue], 100)


# -- chain -----------------------------------------------------------------------------


async def test_chain_runs_strictly_in_order_passing_parent_results() -> None:
    async with running_engine() as engine:
        workflow = await engine.create_workflow(
            {"type": "chain", "name": "etl", "steps": [step(0), step(1), step(2)]}
        )
        assert workflow.state == "running"
        assert workflow.job_ids[1:] == [None, None]  # later steps do not exist yet
        for n in range(3):
            (job,) = await fetch_all(engine)
            assert job.args == [n]
            assert (job.workflow_id, job.workflow_step) == (workflow.id, n)
            # Every earlier step's result, indexed by step (ojs-workflows 7.2).
            assert job.parent_results == [{"step": k, "out": (k + 1) * 10} for k in range(n)]
            assert await fetch_all(engine) == []  # nothing else while step n runs
            current = await engine.get_workflow(workflow.id)
            assert current.job_ids[n] == job.id
            assert current.job_ids[n + 1 :] == [None] * (2 - n)
            await engine.ack(job.id, {"step": n, "out": (n + 1) * 10})

        done = await engine.get_workflow(workflow.id)
        assert done.state == "completed"
        assert done.completed_at is not None
        assert all(done.job_states[j] == "completed" for j in done.job_ids if j)
        assert done.results == {}  # passed on: the finished record keeps none
        wire = done.to_wire()
        assert (wire["steps_total"], wire["steps_completed"]) == (3, 3)
        assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.completed"]


async def test_chain_step_without_a_result_leaves_null_at_its_index() -> None:
    async with running_engine() as engine:
        await engine.create_workflow({"type": "chain", "steps": [step(0), step(1), step(2)]})
        (first,) = await fetch_all(engine)
        await engine.ack(first.id, has_result=False)
        (second,) = await fetch_all(engine)
        assert second.parent_results == [None]
        await engine.ack(second.id, {"rows": 3})
        (third,) = await fetch_all(engine)
        assert third.parent_results == [None, {"rows": 3}]
        assert third.to_wire()["parent_results"] == [None, {"rows": 3}]


def blob(label: str, size: int) -> dict[str, str]:
    """A result that encodes to about ``size`` bytes of JSON."""
    return {"label": label, "pad": "x" * size}


async def run_chain(engine: Engine, results: list[Any]) -> list[Job]:
    """Run a chain with one step per result, acking each; return the steps as fetched."""
    workflow = await engine.create_workflow(
        {"type": "chain", "steps": [step(n) for n in range(len(results))]}
    )
    fetched = []
    for result in results:
        (job,) = await fetch_all(engine)
        fetched.append(job)
        await engine.ack(job.id, result)
    assert (await engine.get_workflow(workflow.id)).state == "completed"
    return fetched


async def test_chain_parent_results_keep_only_the_previous_result_beyond_64_kib() -> None:
    """Earlier results while they fit in PARENT_RESULTS_MAX_BYTES, then only the
    previous step's (null at the earlier indexes), also for small results later."""
    assert PARENT_RESULTS_MAX_BYTES == 64 * 1024
    big = 30 * 1024
    results = [blob("r0", big), blob("r1", big), blob("r2", big), "r3", "r4", "r5"]
    async with running_engine() as engine:
        steps = await run_chain(engine, results)
    parents = [job.parent_results for job in steps]
    assert parents[0] == []
    assert parents[1] == results[:1]
    assert parents[2] == results[:2]  # about 60 KiB: still fits
    assert parents[3] == [None, None, results[2]]  # about 90 KiB: the previous one only
    # Once dropped, earlier results stay dropped, though these would fit again.
    assert parents[4] == [None, None, None, "r3"]
    assert parents[5] == [None, None, None, None, "r4"]


async def test_chain_passes_a_previous_result_larger_than_the_bound() -> None:
    """ojs-workflows 7.2's MUST: the previous step's result, whatever its size."""
    results = [blob("r0", 100 * 1024), blob("r1", 100 * 1024), "r2"]
    async with running_engine() as engine:
        steps = await run_chain(engine, results)
    assert [job.parent_results for job in steps] == [[], results[:1], [None, results[1]]]


async def test_chain_workflow_keeps_only_the_results_still_passed_on() -> None:
    """The workflow record does not grow with every large result of a long chain."""
    async with running_engine() as engine:
        workflow = await engine.create_workflow(
            {"type": "chain", "steps": [step(n) for n in range(5)]}
        )
        kept: list[set[int]] = []
        for n in range(5):
            (job,) = await fetch_all(engine)
            await engine.ack(job.id, blob(f"r{n}", 40 * 1024))
            kept.append(set((await engine.get_workflow(workflow.id)).results))
    # Step 2's list [r0, r1] (80 KiB) did not fit: from then on the record keeps
    # no result once the next step has its own (the next list needs only the
    # result of the step running, which its ack adds), nor any once finished.
    assert kept == [{0}, set(), set(), set(), set()]


@pytest.mark.parametrize("first_result_kib", [60, 200])
async def test_chain_record_keeps_at_most_64_kib_of_results_while_a_step_runs(
    first_result_kib: int,
) -> None:
    """A result larger than the bound is passed to the next step whole but not kept:
    the record (one DynamoDB item on SQS) stays small whatever one result's size."""
    first = blob("r0", first_result_kib * 1024)
    async with running_engine() as engine:
        workflow = await engine.create_workflow(
            {"type": "chain", "steps": [step(n) for n in range(4)]}
        )
        fetched: list[Job] = []
        for result in (first, "r1", "r2", blob("r3", 200 * 1024)):
            (job,) = await fetch_all(engine)
            fetched.append(job)
            await engine.ack(job.id, result)
            record = await engine.get_workflow(workflow.id)
            kept = [record.results.get(i) for i in sorted(record.results)]
            assert encoded_size(kept) <= PARENT_RESULTS_MAX_BYTES
        assert record.state == "completed"
    parents = [job.parent_results for job in fetched]
    if first_result_kib < 64:  # fits: every earlier result, as before
        assert parents[1:] == [[first], [first, "r1"], [first, "r1", "r2"]]
    else:
        assert parents[1:] == [[first], [None, "r1"], [None, None, "r2"]]


async def test_chain_steps_never_overlap_with_many_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[tuple[str, int]] = []
    with real_time_limit():
        async with running_engine() as engine:

            async def handler(ctx: JobContext) -> Any:
                n = ctx.job.workflow_step
                assert n is not None
                log.append(("start", n))
                assert ctx.job.parent_results == list(range(n))
                await trio.sleep(1.0)
                log.append(("end", n))
                return n

            engine.register("wf.step", handler)
            async with running_workers(engine, ["wf"], 8):
                workflow = await engine.create_workflow(
                    {"type": "chain", "steps": [step(n) for n in range(6)]}
                )
                await wait_for_workflow(engine, workflow.id, "completed")
    assert log == [(kind, n) for n in range(6) for kind in ("start", "end")]


async def test_failing_chain_step_fails_the_chain_and_later_steps_never_exist(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            workflow = await engine.create_workflow(
                {"type": "chain", "steps": [step(0), step(1, **ONE_ATTEMPT), step(2), step(3)]}
            )
            (first,) = await fetch_all(engine)
            await engine.ack(first.id, "ok")
            (second,) = await fetch_all(engine)
            failed = await engine.nack(second.id, Failure(code="boom", message="step 1 broke"))
            assert failed.state is JobState.DISCARDED

            await trio.sleep(300.0)  # plenty of time for anything to show up
            assert await fetch_all(engine) == []
            final = await engine.get_workflow(workflow.id)
            assert final.state == "failed"
            assert final.job_ids[2:] == [None, None]
            assert final.pending_steps == {}
            assert (await engine.storage.ping())["jobs"] == 2
            assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.failed"]
            assert final.to_wire()["jobs"][2]["state"] == "waiting"


async def test_chain_step_failing_through_a_handler_fails_the_chain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ran: list[int] = []
    with real_time_limit():
        async with running_engine() as engine:

            async def handler(ctx: JobContext) -> Any:
                ran.append(ctx.job.workflow_step or 0)
                if ctx.job.workflow_step == 1:
                    raise RuntimeError("no")
                return "ok"

            engine.register("wf.step", handler)
            async with running_workers(engine, ["wf"], 2):
                workflow = await engine.create_workflow(
                    {"type": "chain", "steps": [step(0), step(1, **ONE_ATTEMPT), step(2)]}
                )
                await wait_for_workflow(engine, workflow.id, "failed")
                await trio.sleep(60.0)
    assert ran == [0, 1]


async def test_nested_workflow_is_refused_at_creation() -> None:
    nested = {"type": "group", "jobs": [step(1), step(2)]}
    async with running_engine() as engine:
        with pytest.raises(InvalidRequest) as excinfo:
            await engine.create_workflow({"type": "chain", "steps": [step(0), nested]})
        assert excinfo.value.http_status == 400
        assert "nested workflows are not supported" in excinfo.value.message
        assert (excinfo.value.details or {})["field"] == "steps[1]"
        assert (await engine.storage.ping())["jobs"] == 0


@pytest.mark.parametrize(
    ("kind", "member_field"),
    [("chain", "jobs"), ("group", "steps"), ("batch", "steps")],
)
async def test_nested_workflow_error_names_the_member_field_the_request_used(
    kind: str, member_field: str
) -> None:
    """Either member name is accepted for any type; the 400 names the one sent."""
    nested = {"type": "chain", "steps": [step(1)]}
    async with running_engine() as engine:
        with pytest.raises(InvalidRequest) as excinfo:
            await engine.create_workflow({"type": kind, member_field: [step(0), nested]})
        assert (excinfo.value.details or {})["field"] == f"{member_field}[1]"
        with pytest.raises(InvalidRequest) as excinfo:
            await engine.create_workflow({"type": kind, member_field: []})
        assert (excinfo.value.details or {})["field"] == member_field


# -- the stored record -------------------------------------------------------------------


def test_workflow_record_from_a_newer_server_is_read_and_rewritten_whole() -> None:
    """Keys this version does not know neither fail the read nor vanish on rewrite."""
    workflow, _ = parse_workflow({"type": "chain", "steps": [step(0), step(1)]}, BASE)
    workflow.results = {0: {"rows": 3}}
    record = workflow.to_record()
    assert "extra" not in record
    newer = {**record, "paused_until": 123.0, "labels": {"team": "etl"}}
    read = Workflow.from_record(newer)
    assert read.extra == {"paused_until": 123.0, "labels": {"team": "etl"}}
    assert (read.id, read.pending_steps, read.results) == (
        workflow.id,
        workflow.pending_steps,
        {0: {"rows": 3}},
    )
    assert read.to_record() == newer


def test_workflow_record_from_an_older_server_is_read() -> None:
    """Written before finished_by existed, with the old (empty) "extra" object."""
    workflow, _ = parse_workflow({"type": "group", "jobs": [step(0)]}, BASE)
    older = workflow.to_record()
    del older["finished_by"]
    older["extra"] = {}
    read = Workflow.from_record(older)
    assert (read.finished_by, read.extra) == (None, {})
    assert read == workflow


# -- group -------------------------------------------------------------------------------


async def test_group_runs_members_in_parallel_and_completes() -> None:
    async with running_engine() as engine:
        workflow = await engine.create_workflow(
            {"type": "group", "jobs": [step(0), step(1), step(2)]}
        )
        jobs = await fetch_all(engine)
        assert sorted(j.workflow_step or 0 for j in jobs) == [0, 1, 2]
        for job in jobs[:-1]:
            await engine.ack(job.id, job.args[0])
            assert (await engine.get_workflow(workflow.id)).state == "running"
        await engine.ack(jobs[-1].id, jobs[-1].args[0])
        done = await engine.get_workflow(workflow.id)
        assert done.state == "completed"
        wire = done.to_wire()
        assert (wire["jobs_total"], wire["jobs_completed"], wire["jobs_failed"]) == (3, 3, 0)


async def test_group_fails_only_once_every_member_is_terminal() -> None:
    async with running_engine() as engine:
        workflow = await engine.create_workflow(
            {"type": "group", "jobs": [step(0, **ONE_ATTEMPT), step(1), step(2)]}
        )
        jobs = {j.workflow_step: j for j in await fetch_all(engine)}
        await engine.nack(jobs[0].id, Failure(code="boom", message="x"))
        assert (await engine.get_workflow(workflow.id)).state == "running"  # others still run
        await engine.ack(jobs[1].id)
        assert (await engine.get_workflow(workflow.id)).state == "running"
        await engine.ack(jobs[2].id)
        done = await engine.get_workflow(workflow.id)
        assert done.state == "failed"
        wire = done.to_wire()
        assert (wire["jobs_completed"], wire["jobs_failed"]) == (2, 1)
        assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.failed"]


# -- batch -------------------------------------------------------------------------------


def batch_body(n: int, **members: Any) -> dict[str, Any]:
    return {
        "type": "batch",
        "jobs": [step(i, **members) for i in range(n)],
        "callbacks": {
            name: {"type": f"cb.{name}", "args": [], "options": {"queue": "callbacks"}}
            for name in ("on_complete", "on_success", "on_failure")
        },
    }


async def test_batch_success_fires_on_complete_and_on_success_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            workflow = await engine.create_workflow(batch_body(3))
            jobs = sorted(await fetch_all(engine), key=lambda j: j.workflow_step or 0)
            for job in reversed(jobs):  # finishing order must not matter for results
                assert await fetch_all(engine, "callbacks") == []
                await engine.ack(job.id, {"n": job.args[0]})
            await trio.sleep(60.0)
            callbacks = await fetch_all(engine, "callbacks")
            assert sorted(c.type for c in callbacks) == ["cb.on_complete", "cb.on_success"]
            for cb in callbacks:
                assert cb.parent_results == [{"n": 0}, {"n": 1}, {"n": 2}]
                assert cb.meta is not None
                assert cb.meta["workflow_id"] == workflow.id
                assert cb.meta["callback"] == cb.type.removeprefix("cb.")
            done = await engine.get_workflow(workflow.id)
            assert done.state == "completed"
            assert set(done.fired_callbacks) == {"on_complete", "on_success"}
            assert done.to_wire()["callbacks"]["on_failure"] == {"fired": False, "job_id": None}
            for cb in callbacks:  # settling a callback does not re-trigger anything
                await engine.ack(cb.id)
            await trio.sleep(60.0)
            assert await fetch_all(engine, "callbacks") == []
            assert (await engine.storage.ping())["jobs"] == 5


async def test_batch_failure_fires_on_complete_and_on_failure_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            workflow = await engine.create_workflow(batch_body(3, **ONE_ATTEMPT))
            jobs = sorted(await fetch_all(engine), key=lambda j: j.workflow_step or 0)
            await engine.ack(jobs[0].id, "a")
            await engine.nack(jobs[1].id, Failure(code="boom", message="b failed"))
            assert await fetch_all(engine, "callbacks") == []
            await engine.ack(jobs[2].id, "c")
            await trio.sleep(60.0)
            callbacks = await fetch_all(engine, "callbacks")
            assert sorted(c.type for c in callbacks) == ["cb.on_complete", "cb.on_failure"]
            assert all(c.parent_results == ["a", None, "c"] for c in callbacks)
            assert (await engine.get_workflow(workflow.id)).state == "failed"
            await trio.sleep(60.0)
            assert await fetch_all(engine, "callbacks") == []


def encoded_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


async def run_batch(engine: Engine, results: list[Any], order: list[int]) -> list[Job]:
    """Run a batch with one member per result, acking them in ``order``; return its
    callbacks (on_complete, on_success), checking the record's kept results as it goes."""
    workflow = await engine.create_workflow(batch_body(len(results)))
    jobs = sorted(await fetch_all(engine), key=lambda j: j.workflow_step or 0)
    for n in order:
        await engine.ack(jobs[n].id, results[n])
        record = await engine.get_workflow(workflow.id)
        kept = [record.results.get(i) for i in range(record.total)]
        assert encoded_size(kept) <= PARENT_RESULTS_MAX_BYTES
    done = await engine.get_workflow(workflow.id)
    assert (done.state, done.results) == ("completed", {})  # passed on, then let go
    callbacks = await fetch_all(engine, "callbacks")
    assert sorted(c.type for c in callbacks) == ["cb.on_complete", "cb.on_success"]
    return callbacks


@pytest.mark.parametrize("order", ["forward", "backward", "shuffled"])
async def test_batch_callbacks_get_results_in_member_order_while_they_fit(order: str) -> None:
    """Results by member index while the list fits in 64 KiB, null from the first that
    does not (also for smaller ones after it), whatever order the members finish in;
    meta says where the omission starts."""
    big = 20 * 1024
    results: list[Any] = [blob("r0", big), "r1", blob("r2", big), blob("r3", big)]
    results += [blob("r4", big), "r5", None]
    acks = list(range(len(results)))
    if order == "backward":
        acks.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(acks)
    async with running_engine() as engine:
        callbacks = await run_batch(engine, results, acks)
    # r0..r3 make about 60 KiB; with r4 the list would be about 80 KiB.
    expected = [*results[:4], None, None, None]
    assert encoded_size(expected) <= PARENT_RESULTS_MAX_BYTES < encoded_size(results)
    for cb in callbacks:
        assert cb.parent_results == expected
        assert cb.meta is not None and cb.meta[OMITTED_FROM_META] == 4


async def test_batch_callbacks_get_null_for_a_first_result_larger_than_the_bound() -> None:
    results = [blob("r0", 70 * 1024), "r1"]
    async with running_engine() as engine:
        callbacks = await run_batch(engine, results, [1, 0])
    for cb in callbacks:
        assert cb.parent_results == [None, None]
        assert cb.meta is not None and cb.meta[OMITTED_FROM_META] == 0


async def test_batch_callbacks_whose_results_all_fit_have_no_omission_meta() -> None:
    async with running_engine() as engine:
        callbacks = await run_batch(engine, [blob("r0", 30 * 1024), "r1", None], [2, 0, 1])
    for cb in callbacks:
        assert cb.parent_results == [blob("r0", 30 * 1024), "r1", None]
        assert cb.meta is not None and OMITTED_FROM_META not in cb.meta


async def test_group_workflow_keeps_no_results() -> None:
    """A group passes no results on: its record does not collect them."""
    async with running_engine() as engine:
        workflow = await engine.create_workflow({"type": "group", "jobs": [step(0), step(1)]})
        for job in await fetch_all(engine):
            await engine.ack(job.id, blob("r", 40 * 1024))
            assert (await engine.get_workflow(workflow.id)).results == {}
        assert (await engine.get_workflow(workflow.id)).state == "completed"


def test_batch_record_of_an_older_server_is_trimmed_to_the_bound() -> None:
    """A batch record written before the bound, holding more results than fit, gives
    callbacks a bounded list all the same."""
    workflow, members = parse_workflow(batch_body(3), BASE)
    record = workflow.to_record()
    del record["results_omitted_from"]
    record["results"] = {"0": blob("r0", 40 * 1024), "1": blob("r1", 40 * 1024)}
    older = Workflow.from_record(record)
    assert older.results_omitted_from is None
    last = members[2]
    for member in members[:2]:
        older.job_states[member.id] = "completed"
    last.state = JobState.COMPLETED
    callbacks = on_job_finished(older, last, BASE + 1)
    assert [cb.parent_results for cb in callbacks] == [[blob("r0", 40 * 1024), None, None]] * 2
    assert all(cb.meta is not None and cb.meta[OMITTED_FROM_META] == 1 for cb in callbacks)


async def test_batch_with_a_cancelled_member_counts_it_as_failed() -> None:
    async with running_engine() as engine:
        workflow = await engine.create_workflow(batch_body(2))
        jobs = sorted(await fetch_all(engine), key=lambda j: j.workflow_step or 0)
        await engine.cancel(jobs[0].id)
        await engine.ack(jobs[1].id, "ok")
        callbacks = await fetch_all(engine, "callbacks")
        assert sorted(c.type for c in callbacks) == ["cb.on_complete", "cb.on_failure"]
        assert (await engine.get_workflow(workflow.id)).state == "failed"


# -- cancel --------------------------------------------------------------------------------


async def test_cancel_workflow_cancels_unfinished_members() -> None:
    async with running_engine() as engine:
        workflow = await engine.create_workflow(
            {"type": "group", "jobs": [step(0), step(1), step(2)]}
        )
        done, active = await engine.fetch(["wf"], 2, worker_id="w1")
        await engine.ack(done.id, worker_id="w1")
        waiting = next(j for j in workflow.job_ids if j not in (done.id, active.id))

        cancelled = await engine.cancel_workflow(workflow.id)
        assert cancelled.state == "cancelled"
        assert (await engine.get(done.id)).state is JobState.COMPLETED
        assert (await engine.get(active.id)).state is JobState.CANCELLED
        assert waiting is not None
        assert (await engine.get(waiting)).state is JobState.CANCELLED
        assert await fetch_all(engine) == []
        with pytest.raises(OjsError):
            await engine.ack(active.id, worker_id="w1")  # its outcome no longer counts
        with pytest.raises(OjsError) as excinfo:
            await engine.cancel_workflow(workflow.id)
        assert excinfo.value.http_status == 409
        assert (await engine.get_workflow(workflow.id)).state == "cancelled"
        types = workflow_events(engine, workflow.id)
        assert types.count("workflow.cancelled") == 1
        assert "workflow.completed" not in types and "workflow.failed" not in types


async def test_cancel_chain_stops_later_steps(autojump_clock: trio.testing.MockClock) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            workflow = await engine.create_workflow(
                {"type": "chain", "steps": [step(0), step(1), step(2)]}
            )
            (first,) = await fetch_all(engine)
            await engine.ack(first.id)
            (second,) = await fetch_all(engine)
            await engine.cancel_workflow(workflow.id)
            assert (await engine.get(second.id)).state is JobState.CANCELLED
            await trio.sleep(300.0)
            assert await fetch_all(engine) == []
            final = await engine.get_workflow(workflow.id)
            assert final.state == "cancelled"
            assert final.job_ids[2] is None
            assert (await engine.storage.ping())["jobs"] == 2


async def test_cancel_batch_fires_no_callbacks() -> None:
    async with running_engine() as engine:
        workflow = await engine.create_workflow(batch_body(2))
        await engine.cancel_workflow(workflow.id)
        assert await fetch_all(engine) == []
        assert await fetch_all(engine, "callbacks") == []


# -- workflows ended by the reaper, or by several members at once ---------------------------


def terminal_events(engine: Engine, workflow_id: str) -> list[dict[str, Any]]:
    kinds = ("workflow.completed", "workflow.failed", "workflow.cancelled")
    events = engine.events.query(types=kinds, limit=10_000)
    return [e for e in events if e["subject"] == workflow_id]


async def test_group_members_expiring_by_ttl_fail_the_group_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two members expire at the same instant, in one reaper pass: one workflow.failed."""
    with real_time_limit():
        async with running_engine() as engine:
            created = wall()
            late = {"expires_at": "+PT10S"}  # in a queue nobody fetches: never started
            workflow = await engine.create_workflow(
                {
                    "type": "group",
                    "jobs": [step(0), step(1, "wf-late", **late), step(2, "wf-late", **late)],
                }
            )
            (done,) = await fetch_all(engine)
            await engine.ack(done.id, "ok")
            final = await wait_for_workflow(engine, workflow.id, "failed")
            await trio.sleep(300.0)  # a duplicate would show up by now

            assert final.completed_at == created + 10.0
            expired = [await engine.get(job_id or "") for job_id in final.job_ids[1:]]
            assert [(j.state, j.dead_letter) for j in expired] == [(JobState.DISCARDED, True)] * 2
            assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.failed"]
            (event,) = terminal_events(engine, workflow.id)
            assert event["data"]["metadata"]["failed_count"] == 2
            assert event["time"] == format_ts(created + 10.0)


async def test_batch_member_expiring_by_ttl_fires_each_callback_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = batch_body(2)
    body["jobs"][1]["options"].update(queue="wf-late", expires_at="+PT10S")
    with real_time_limit():
        async with running_engine() as engine:
            workflow = await engine.create_workflow(body)
            (member,) = await fetch_all(engine)
            await engine.ack(member.id, "ok")
            await wait_for_workflow(engine, workflow.id, "failed")
            await trio.sleep(300.0)
            callbacks = await fetch_all(engine, "callbacks")
            assert sorted(c.type for c in callbacks) == ["cb.on_complete", "cb.on_failure"]
            assert all(c.parent_results == ["ok", None] for c in callbacks)
            assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.failed"]


@pytest.mark.parametrize(
    ("deadline", "code"),
    [
        ({}, "visibility_timeout"),  # the worker vanished: no ack, no heartbeat
        ({"timeout_ms": 2_000}, "handler_timeout"),
    ],
    ids=["lease", "execution-timeout"],
)
async def test_chain_step_out_of_time_on_its_last_attempt_fails_the_chain_once(
    autojump_clock: trio.testing.MockClock, deadline: dict[str, Any], code: str
) -> None:
    with real_time_limit():
        async with running_engine() as engine:
            workflow = await engine.create_workflow(
                {"type": "chain", "steps": [step(0), step(1, **ONE_ATTEMPT, **deadline), step(2)]}
            )
            (first,) = await fetch_all(engine)
            await engine.ack(first.id, "ok")
            (second,) = await engine.fetch(["wf"], 1, worker_id="w1", visibility_ms=5_000)
            final = await wait_for_workflow(engine, workflow.id, "failed")
            await trio.sleep(300.0)

            lost = await engine.get(second.id)
            assert (lost.state, (lost.error or {}).get("code")) == (JobState.DISCARDED, code)
            (discarded,) = engine.events.query(types=["job.discarded"], job_id=second.id)
            # Like a nack's: whether it went to the dead letter queue (on_exhaustion).
            assert discarded["data"] == {**discarded["data"], "reason": code, "dead_letter": False}
            assert final.completed_at == lost.completed_at
            assert final.job_ids[2] is None
            assert await fetch_all(engine) == []
            assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.failed"]


async def test_last_members_acked_together_complete_the_group_once() -> None:
    """ack_many settles both at one instant; only the member that ended it reports."""
    async with running_engine(clock=lambda: BASE) as engine:
        workflow = await engine.create_workflow({"type": "group", "jobs": [step(0), step(1)]})
        jobs = await engine.fetch(["wf"], 2, worker_id="w1")
        outcomes = await engine.ack_many([(j.id, j.args[0]) for j in jobs], worker_id="w1")
        assert all(isinstance(o, Job) and o.state is JobState.COMPLETED for o in outcomes)
        done = await engine.get_workflow(workflow.id)
        assert done.state == "completed"
        assert done.finished_by == jobs[-1].id
        assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.completed"]


class CountingStorage(MemoryStorage):
    """Memory storage that counts workflow reads, or fails them on request."""

    def __init__(self) -> None:
        super().__init__()
        self.workflow_reads: Counter[str] = Counter()
        self.fail_workflow_reads = False

    async def get_workflow_record(self, workflow_id: str) -> Workflow:
        self.workflow_reads[workflow_id] += 1
        if self.fail_workflow_reads:
            raise BackendUnavailable("workflow reads are failing (test)")
        return await super().get_workflow_record(workflow_id)


async def test_reaper_reads_each_workflow_once_per_pass(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A whole group expiring in one pass costs one workflow read, not one per member
    (on SQS a workflow read reads every member)."""
    members = 50
    storage = CountingStorage()
    with real_time_limit():
        async with running_engine(storage) as engine:
            late = {"expires_at": "+PT10S"}
            body = {"type": "group", "jobs": [step(n, "wf-late", **late) for n in range(members)]}
            workflow = await engine.create_workflow(body)
            assert storage.workflow_reads[workflow.id] == 0
            await trio.sleep(300.0)  # mock time: the members expire at +10 s
            assert engine.reaper.reaped == members
            assert storage.workflow_reads[workflow.id] == 1
            assert (await engine.get_workflow(workflow.id)).state == "failed"
            assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.failed"]
            discarded = engine.events.query(types=["job.discarded"], limit=10_000)
            assert len(discarded) == members
            assert {(e["data"]["reason"], e["data"]["dead_letter"]) for e in discarded} == {
                ("expired", True)
            }


async def test_failing_workflow_read_after_a_settle_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = CountingStorage()
    async with running_engine(storage) as engine:
        workflow = await engine.create_workflow({"type": "group", "jobs": [step(0)]})
        (job,) = await fetch_all(engine)
        storage.fail_workflow_reads = True
        with caplog.at_level(logging.WARNING, logger="ojs_trio.engine"):
            await engine.ack(job.id, "ok")
        storage.fail_workflow_reads = False
        assert (await engine.get_workflow(workflow.id)).state == "completed"
    (record,) = [r for r in caplog.records if r.name == "ojs_trio.engine"]
    assert record.levelno == logging.WARNING
    assert f"could not read workflow {workflow.id}" in record.getMessage()
    assert "BackendUnavailable" in record.getMessage()


async def test_unique_replace_of_the_last_member_ends_the_workflow_once() -> None:
    """A plain enqueue whose unique ``replace`` cancels a group's last running member
    ends the group (failed: a member was cancelled) and publishes workflow.failed."""
    unique = {"keys": ["type", "args"], "on_conflict": "replace"}
    async with running_engine() as engine:
        workflow = await engine.create_workflow(
            {"type": "group", "jobs": [step(0), step(1, unique=unique)]}
        )
        jobs = {j.workflow_step: j for j in await fetch_all(engine)}
        await engine.ack(jobs[0].id, "ok")
        result = await engine.submit(step(1, unique=unique))
        assert result is not None and result.created
        assert result.replaced is not None and result.replaced.id == jobs[1].id
        assert (await engine.get(jobs[1].id)).state is JobState.CANCELLED
        done = await engine.get_workflow(workflow.id)
        assert (done.state, done.finished_by) == ("failed", jobs[1].id)
        assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.failed"]
        cancelled = engine.events.query(types=["job.cancelled"], job_id=jobs[1].id)
        assert [e["data"]["reason"] for e in cancelled] == ["unique_replace"]
        # The replacement is an ordinary job, not a member.
        assert result.job.workflow_id is None


async def test_member_retried_from_the_dead_letter_queue_does_not_end_the_workflow_again() -> None:
    clock = [BASE]
    async with running_engine(clock=lambda: clock[0]) as engine:
        dead_letter = {"retry": {"max_attempts": 1, "on_exhaustion": "dead_letter"}}
        workflow = await engine.create_workflow({"type": "group", "jobs": [step(0, **dead_letter)]})
        (job,) = await fetch_all(engine)
        await engine.nack(job.id, Failure(code="boom", message="x"))
        assert (await engine.get_workflow(workflow.id)).state == "failed"
        clock[0] += 10
        await engine.retry_dead_letter(job.id)
        (again,) = await fetch_all(engine)
        await engine.nack(again.id, Failure(code="boom", message="again"))
        assert workflow_events(engine, workflow.id) == ["workflow.started", "workflow.failed"]


# -- acceptance: crashes mid-chain ---------------------------------------------------------

CHAIN_LENGTH = 4
CRASH_STEP = 2


def _jobs_in(result: Any) -> list[Job]:
    if isinstance(result, list) and result and isinstance(result[0], list):
        return [job for batch in result for job in batch]  # claim: one list per request
    return list(result or [])


def actor_stats(engine: Engine, name: str) -> dict[str, Any]:
    found = [a for a in engine.statistics().actors if a["name"] == name]
    return found[0] if found else {"name": name, "restarts": 0}


@pytest.mark.parametrize("when", ["before", "after"], ids=["raise-before", "raise-after-commit"])
@pytest.mark.parametrize(
    ("actor", "method"),
    [("promoter", "promote_due"), ("reaper", "reap"), ("fetcher:wf", "claim")],
)
async def test_actor_raising_mid_chain_neither_loses_nor_duplicates_a_step(
    autojump_clock: trio.testing.MockClock, actor: str, method: str, when: str
) -> None:
    """The storage call an actor makes raises once while the chain is at step 2,
    either before touching storage or after its change was committed (a crash
    between the storage step and the actor's notification).  The supervisor
    restarts the actor, every step runs to completion exactly once, and no step
    is created twice."""
    storage = MemoryStorage(rng=random.Random(0))
    real: Callable[..., Any] = getattr(storage, method)
    crashes: list[str] = []
    armed = trio.Event()  # step CRASH_STEP exists

    async def raise_once(*args: Any) -> Any:
        if when == "before" and armed.is_set() and not crashes:
            crashes.append(method)
            raise RuntimeError(f"simulated {actor} crash")
        result = await real(*args)
        touched = [j.workflow_step for j in _jobs_in(result)]
        if when == "after" and CRASH_STEP in touched and not crashes:
            crashes.append(method)
            raise RuntimeError(f"simulated {actor} crash after commit")
        return result

    setattr(storage, method, raise_once)

    seen: defaultdict[int, list[str]] = defaultdict(list)  # step -> job ids handed to handler

    async def handler(ctx: JobContext) -> Any:
        n = ctx.job.workflow_step
        assert n is not None
        seen[n].append(ctx.job.id)
        assert ctx.job.parent_results == [{"step": k} for k in range(n)]
        if n == CRASH_STEP - 1:
            armed.set()
        if actor == "reaper" and n == CRASH_STEP and len(seen[n]) == 1:
            # The reaper only acts on lapsed leases: this worker hangs without
            # heartbeats, so the reaper must hand step 2 to another worker.
            await trio.sleep_forever()
        return {"step": n}

    # Delayed steps make the promoter part of every hand-over; no heartbeats
    # within a lease makes the reaper the only way back from a hung worker.
    steps = [step(n, delay_ms=500) for n in range(CHAIN_LENGTH)]
    with real_time_limit():
        async with running_engine(storage, heartbeat_interval=3600.0) as engine:
            engine.register("wf.step", handler)
            async with running_workers(engine, ["wf"], 2, visibility_ms=2_000):
                workflow = await engine.create_workflow({"type": "chain", "steps": steps})
                done = await wait_for_workflow(engine, workflow.id, "completed", "failed")
                await trio.sleep(120.0)  # anything duplicated would show up by now
                assert crashes == [method]
                assert actor_stats(engine, actor)["restarts"] == 1

                assert done.state == "completed"
                assert all(job_id is not None for job_id in done.job_ids)
                assert (await engine.storage.ping())["jobs"] == CHAIN_LENGTH
                for n, job_id in enumerate(done.job_ids):
                    assert set(seen[n]) == {job_id}, f"step {n} ran as several jobs"
                    job = await engine.get(job_id or "")
                    assert job.state is JobState.COMPLETED
                    assert job.result == {"step": n}
                completed = Counter(
                    e["job_id"] for e in engine.events.query(types=["job.completed"], limit=1000)
                )
                assert completed == Counter({job_id: 1 for job_id in done.job_ids})
                handed_out = [len(seen[n]) for n in range(CHAIN_LENGTH)]
                expected = [1] * CHAIN_LENGTH
                if actor == "reaper":
                    expected[CRASH_STEP] = 2  # the hung attempt, then the one that finished
                assert handed_out == expected
                assert workflow_events(engine, workflow.id).count("workflow.completed") == 1


async def test_handler_raising_on_a_chain_step_retries_and_the_chain_completes_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    invocations: Counter[int] = Counter()
    completions: Counter[int] = Counter()
    retry = {"max_attempts": 3, "initial_interval": "PT1S", "jitter": False}
    with real_time_limit():
        async with running_engine() as engine:

            async def handler(ctx: JobContext) -> Any:
                n = ctx.job.workflow_step
                assert n is not None
                invocations[n] += 1
                assert ctx.job.parent_results == list(range(n))
                if n == 1 and ctx.job.attempt == 1:
                    raise RuntimeError("transient failure on step 1")
                completions[n] += 1
                return n

            engine.register("wf.step", handler)
            async with running_workers(engine, ["wf"], 3):
                workflow = await engine.create_workflow(
                    {"type": "chain", "steps": [step(n, retry=retry) for n in range(4)]}
                )
                done = await wait_for_workflow(engine, workflow.id, "completed", "failed")
                await trio.sleep(60.0)
            assert done.state == "completed"
            assert completions == Counter({0: 1, 1: 1, 2: 1, 3: 1})
            assert invocations == Counter({0: 1, 1: 2, 2: 1, 3: 1})
            second = await engine.get(done.job_ids[1] or "")
            assert second.attempt == 2
            assert [e["code"] for e in second.errors] == ["handler_error"]
            assert (await engine.storage.ping())["jobs"] == 4
