"""Workflows (ojs-workflows.md): chain, group and batch, as pure rules.

A :class:`Workflow` records its jobs and, for a chain, the templates of the
steps not yet started.  :func:`on_job_finished` is called by an adapter in the
same atomic step as the ack/nack/cancel that ended a member job; it updates the
workflow and returns the jobs to create next (the following chain step, batch
callbacks).  Because both happen in one storage step, a crash can neither lose
nor duplicate a step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ojs_trio.engine.errors import Conflict, InvalidRequest
from ojs_trio.engine.ids import is_uuid7, uuid7
from ojs_trio.engine.job import Job
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.engine.validation import parse_job

KINDS = ("chain", "group", "batch")
CALLBACKS = ("on_complete", "on_success", "on_failure")
TERMINAL = frozenset({"completed", "failed", "cancelled"})
MAX_JOBS = 10_000
#: A chain step's ``parent_results`` carries every earlier step's result while
#: that list, as compact JSON (``json.dumps``, ASCII-escaped: what the SQS adapter
#: measures), stays within this many bytes; beyond it, only the previous step's
#: result (ojs-workflows 7.2's minimum).  A batch callback's list never exceeds it:
#: members' results in member order while they fit, ``null`` from the first that
#: does not (:func:`_keep_batch_result`).  64 KiB leaves a job room for its own
#: args and result within SQS's 256 KB job and DynamoDB's 400 KB item.
PARENT_RESULTS_MAX_BYTES = 64 * 1024
#: The ``meta`` key of a batch callback whose ``parent_results`` left results out:
#: the index of the first member whose result is missing (``null`` from there on).
OMITTED_FROM_META = "parent_results_omitted_from"


@dataclass
class Workflow:
    id: str
    type: str
    name: str | None
    state: str
    created_at: float
    # One entry per member, in definition order: the job id once it exists.
    job_ids: list[str | None]
    # Envelopes of chain steps not yet enqueued (index -> body).
    pending_steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    job_states: dict[str, str] = field(default_factory=dict)
    # Results still to be passed on, by member index: a chain's while later
    # steps may get them, a batch's while they fit its callbacks' list.  A group
    # passes none on and keeps none.
    results: dict[int, Any] = field(default_factory=dict)
    # Batch: results from this member index on no longer fit the callbacks'
    # parent_results and are not kept (None: every result so far fits).
    results_omitted_from: int | None = None
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    fired_callbacks: dict[str, str] = field(default_factory=dict)  # name -> job id
    started_at: float | None = None
    completed_at: float | None = None
    # The member whose settling ended the workflow (None while running, or when
    # the workflow itself was cancelled): the engine publishes the terminal
    # event for that member only, so it goes out once whoever settled it.
    finished_by: str | None = None
    # Record keys this version does not know (written by a newer server): kept
    # and written back as they were, so a rewrite here does not drop them.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.job_ids)

    def count(self, state: str) -> int:
        return sum(1 for s in self.job_states.values() if s == state)

    def index_of(self, job_id: str) -> int:
        return self.job_ids.index(job_id)

    def to_wire(self) -> dict[str, Any]:
        completed = self.count("completed")
        failed = self.count("discarded") + self.count("cancelled")
        wire: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "name": self.name,
            "state": self.state,
            "created_at": format_ts(self.created_at),
            "jobs": [
                {
                    "index": i,
                    "job_id": job_id,
                    "state": self.job_states.get(job_id, "pending") if job_id else "waiting",
                }
                for i, job_id in enumerate(self.job_ids)
            ],
            "metadata": {
                "job_count": self.total,
                "completed_count": completed,
                "failed_count": failed,
                "created_at": format_ts(self.created_at),
            },
        }
        if self.type == "chain":
            wire["steps_total"] = self.total
            wire["steps_completed"] = completed
        else:
            wire["jobs_total"] = self.total
            wire["jobs_completed"] = completed
            wire["jobs_failed"] = failed
        if self.callbacks:
            wire["callbacks"] = {
                name: {
                    "fired": name in self.fired_callbacks,
                    "job_id": self.fired_callbacks.get(name),
                }
                for name in self.callbacks
            }
        if self.started_at is not None:
            wire["started_at"] = format_ts(self.started_at)
            wire["metadata"]["started_at"] = wire["started_at"]
        if self.completed_at is not None:
            wire["completed_at"] = format_ts(self.completed_at)
            wire["metadata"]["completed_at"] = wire["completed_at"]
        return wire

    def clone(self) -> Workflow:
        return copy.deepcopy(self)

    def to_record(self) -> dict[str, Any]:
        """A JSON-safe form for storage (integer dict keys become strings)."""
        record = copy.deepcopy(self.extra)
        for name in _RECORD_FIELDS:
            record[name] = copy.deepcopy(getattr(self, name))
        record["pending_steps"] = {str(k): v for k, v in record["pending_steps"].items()}
        record["results"] = {str(k): v for k, v in record["results"].items()}
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Workflow:
        """Read a stored record, whichever server version wrote it.

        Keys this version does not know go to ``extra`` (and back out with
        :meth:`to_record`) instead of failing the read; missing optional keys
        take their defaults.
        """
        data = {k: v for k, v in record.items() if k in _RECORD_FIELDS}
        extra = {k: v for k, v in record.items() if k not in _RECORD_FIELDS and k != "extra"}
        # Records written before unknown keys were kept at the top level carry
        # an (always empty) "extra" object.
        legacy = record.get("extra")
        if isinstance(legacy, dict):
            extra = {**legacy, **extra}
        data["pending_steps"] = {int(k): v for k, v in data.get("pending_steps", {}).items()}
        data["results"] = {int(k): v for k, v in data.get("results", {}).items()}
        return cls(**data, extra=extra)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Workflow) if f.name != "extra")


def _member(job: Job, workflow_id: str, index: int) -> Job:
    job.workflow_id = workflow_id
    job.workflow_step = index
    return job


def parse_workflow(body: Any, now: float) -> tuple[Workflow, list[Job]]:
    """Validate a create-workflow request; return the workflow and the jobs to enqueue now."""
    if not isinstance(body, dict):
        raise InvalidRequest("workflow must be a JSON object")
    kind = body.get("type")
    if kind not in KINDS:
        raise InvalidRequest(
            "workflow 'type' must be one of chain, group, batch", details={"field": "type"}
        )
    member_field = "steps" if kind == "chain" else "jobs"
    members = body.get(member_field)
    if members is None and (alias := "jobs" if kind == "chain" else "steps") in body:
        # Either name is accepted for any type: errors name the one the client sent.
        member_field, members = alias, body[alias]
    if not isinstance(members, list) or not members:
        raise InvalidRequest(
            f"workflow '{member_field}' must be a non-empty array of jobs",
            details={"field": member_field},
        )
    if len(members) > MAX_JOBS:
        raise InvalidRequest(f"a workflow holds at most {MAX_JOBS} jobs")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("workflow 'name' must be a string", details={"field": "name"})
    wf_id = body.get("id") or uuid7()
    if not isinstance(wf_id, str) or not is_uuid7(wf_id):
        raise InvalidRequest("workflow 'id' must be a lowercase UUIDv7", details={"field": "id"})
    for index, member in enumerate(members):
        # ojs-workflows 10.2: a depth beyond what is supported is refused at creation
        # with a clear message (parsed as a job, it would only say 'args' is missing).
        if (
            isinstance(member, dict)
            and member.get("type") in KINDS
            and ("jobs" in member or "steps" in member)
        ):
            raise InvalidRequest(
                "nested workflows are not supported: every member must be a job",
                details={"field": f"{member_field}[{index}]", "max_nesting_depth": 1},
            )
    # Validate every member (and callback) up front: all or nothing.
    jobs = [parse_job(m, now) for m in members]
    callbacks_raw = body.get("callbacks") or {}
    if not isinstance(callbacks_raw, dict) or set(callbacks_raw) - set(CALLBACKS):
        raise InvalidRequest(
            "workflow 'callbacks' may hold on_complete, on_success, on_failure",
            details={"field": "callbacks"},
        )
    if callbacks_raw and kind != "batch":
        raise InvalidRequest("only batch workflows take callbacks", details={"field": "callbacks"})
    for cb in callbacks_raw.values():
        parse_job(cb, now)
    workflow = Workflow(
        id=wf_id,
        type=kind,
        name=name,
        state="running",
        created_at=now,
        job_ids=[None] * len(jobs),
        callbacks=dict(callbacks_raw),
    )
    if kind == "chain":
        first = _member(jobs[0], wf_id, 0)
        first.parent_results = []
        workflow.pending_steps = {i: members[i] for i in range(1, len(members))}
        start = [first]
    else:
        start = [_member(job, wf_id, i) for i, job in enumerate(jobs)]
    for job in start:
        workflow.job_ids[job.workflow_step or 0] = job.id
        workflow.job_states[job.id] = job.state.value
    return workflow, start


def _finish(workflow: Workflow, state: str, now: float, by: str | None = None) -> None:
    workflow.state = state
    workflow.completed_at = now
    workflow.finished_by = by


def on_job_started(workflow: Workflow, job: Job, now: float) -> None:
    if workflow.started_at is None:
        workflow.started_at = now
    workflow.job_states[job.id] = job.state.value


def on_job_finished(workflow: Workflow, job: Job, now: float) -> list[Job]:
    """Record a member's new state; return jobs to create as a consequence."""
    if job.id not in workflow.job_states:
        return []
    workflow.job_states[job.id] = job.state.value
    if not job.state.is_terminal or workflow.state in TERMINAL:
        return []
    index = workflow.index_of(job.id)
    if workflow.type == "group":
        workflow.results.clear()  # passed on nowhere (records of older servers kept them)
    elif job.state is JobState.COMPLETED:
        workflow.results[index] = job.result
        if workflow.type == "batch":
            _fit_batch_results(workflow)
    if workflow.type == "chain":
        if job.state is not JobState.COMPLETED:
            workflow.pending_steps.clear()
            workflow.results = {}  # no later step gets them
            state = "failed" if job.state is JobState.DISCARDED else "cancelled"
            _finish(workflow, state, now, job.id)
            return []
        nxt = index + 1
        body = workflow.pending_steps.pop(nxt, None)
        if body is None:
            workflow.results = {}  # the last step's result, whatever its size: read by no one
            _finish(workflow, "completed", now, job.id)
            return []
        step = _member(parse_job(body, now), workflow.id, nxt)
        step.parent_results = _chain_parent_results(workflow, nxt)
        workflow.job_ids[nxt] = step.id
        workflow.job_states[step.id] = step.state.value
        return [step]
    # group and batch: done when every member is terminal
    if any(not JobState(s).is_terminal for s in workflow.job_states.values()):
        return []
    all_ok = all(s == "completed" for s in workflow.job_states.values())
    _finish(workflow, "completed" if all_ok else "failed", now, job.id)
    spawned: list[Job] = []
    if workflow.type == "batch":
        _fit_batch_results(workflow)  # a no-op but for records of older servers
        results = [workflow.results.get(i) for i in range(workflow.total)]
        meta: dict[str, Any] = {"workflow_id": workflow.id}
        if workflow.results_omitted_from is not None:
            meta[OMITTED_FROM_META] = workflow.results_omitted_from
        names = ["on_complete", "on_success" if all_ok else "on_failure"]
        for name in names:
            body = workflow.callbacks.get(name)
            if body is None or name in workflow.fired_callbacks:
                continue
            cb = parse_job(body, now)
            cb.parent_results = copy.deepcopy(results)
            cb.meta = {**(cb.meta or {}), **meta, "callback": name}
            workflow.fired_callbacks[name] = cb.id
            spawned.append(cb)
        workflow.results = {}  # passed on: nothing reads them again
    return spawned


def _fit_batch_results(workflow: Workflow) -> None:
    """Keep only the batch results its callbacks' ``parent_results`` will carry.

    The callbacks get the members' results in member order while the list (``null``
    for members without one) fits in :data:`PARENT_RESULTS_MAX_BYTES`, and ``null``
    from the first result that does not fit on, whatever order the members finish
    in.  Applied as each result comes, so the workflow record never holds more than
    that: while the list is too large, the highest-indexed result goes (the newest
    one, if it is the highest), and as results from the lowest index dropped on can
    never be passed on, they are not kept from then on.
    """
    cut = workflow.results_omitted_from
    if cut is not None:
        for index in [i for i in workflow.results if i >= cut]:
            del workflow.results[index]
    size = _encoded_size([workflow.results.get(i) for i in range(workflow.total)])
    while size > PARENT_RESULTS_MAX_BYTES and workflow.results:
        highest = max(workflow.results)
        # A dropped result leaves null (4 bytes) at its index.
        size -= _encoded_size(workflow.results.pop(highest)) - len("null")
        workflow.results_omitted_from = highest


def _chain_parent_results(workflow: Workflow, step: int) -> list[Any]:
    """``parent_results`` of chain step ``step`` (steps before it all completed).

    ojs-workflows 7.2: every earlier step's result, by step index (the SHOULD),
    while they fit in :data:`PARENT_RESULTS_MAX_BYTES`; otherwise ``null`` at the
    earlier indexes and the previous step's result last (the MUST), whatever its
    size.  A list rather than the spec's object keyed "0", "1", ...: the official
    conformance case reads ``parent_results[0]`` (docs/workflows.md).

    Once the results no longer fit they never will again (later lists only add
    results), so the workflow then keeps none: the next step's list needs only
    the result of the step created here, which its ack adds.  A later step
    knows the earlier ones were cut because index 0 is missing from
    ``results``.  So the record keeps at most 64 KiB of results while a step
    runs, whatever the size of one result (DynamoDB items stop at 400 KB).
    """
    previous = step - 1
    if all(i in workflow.results for i in range(previous)):
        earlier = [workflow.results.get(i) for i in range(step)]
        if _encoded_size(earlier) <= PARENT_RESULTS_MAX_BYTES:
            return earlier
        if step <= 1:
            # The first result alone is too large: passed on whole (the MUST), but
            # not kept, and the next step's list is cut (index 0 missing).
            workflow.results = {}
            return earlier
    last = workflow.results.get(previous)
    workflow.results = {}
    return [None] * previous + [last]


def _encoded_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def cancel(workflow: Workflow, now: float) -> list[str]:
    """Cancel the workflow; return ids of member jobs that must be cancelled."""
    if workflow.state in TERMINAL:
        raise Conflict(
            f"Workflow {workflow.id} is already {workflow.state}",
            details={"workflow_id": workflow.id, "current_state": workflow.state},
        )
    workflow.pending_steps.clear()
    _finish(workflow, "cancelled", now)
    return [
        job_id for job_id, state in workflow.job_states.items() if not JobState(state).is_terminal
    ]
