"""Lifecycle events (ojs-events.md): a bounded log plus live subscriptions.

Publishing never blocks the engine: the log is a ring buffer, and each
subscriber has a small buffer; a subscriber that falls behind loses events and
is told so (``dropped`` counts them) instead of slowing anyone down.
"""

from __future__ import annotations

import itertools
import marshal
import os
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from ojs_trio.engine.cron import CronFire
from ojs_trio.engine.ids import format_uuid7, uuid7
from ojs_trio.engine.job import Job
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.engine.workflows import Workflow

JOB_EVENTS = (
    "job.enqueued",
    "job.started",
    "job.completed",
    "job.failed",
    "job.retrying",
    "job.cancelled",
    "job.discarded",
    "job.requeued",
    "job.expired",
)


def job_event(kind: str, job: Job, now: float, **data: Any) -> dict[str, Any]:
    return _job_event(
        kind, uuid7(), job.id, job.type, job.queue, job.state.value, job.attempt, now, data
    )


def _job_event(
    kind: str,
    event_id: str,
    job_id: str,
    job_type: str,
    queue: str,
    state: str,
    attempt: int,
    now: float,
    data: dict[str, Any],
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "job_id": job_id,
        "job_type": job_type,
        "queue": queue,
        "state": state,
        "attempt": attempt,
    }
    payload.update(data)
    stamp = format_ts(now)
    return {
        "specversion": "1.0",
        "id": event_id,
        "type": kind,
        "source": "ojs-trio",
        "subject": job_id,
        "time": stamp,
        "timestamp": stamp,
        "job_id": job_id,
        "queue": queue,
        "state": state,
        "data": payload,
    }


def workflow_event(kind: str, workflow: Workflow, now: float) -> dict[str, Any]:
    wire = workflow.to_wire()
    return {
        "specversion": "1.0",
        "id": uuid7(),
        "type": kind,
        "source": "ojs-trio",
        "subject": workflow.id,
        "time": format_ts(now),
        "timestamp": format_ts(now),
        "workflow_id": workflow.id,
        "state": workflow.state,
        "data": {
            "workflow_id": workflow.id,
            "workflow_type": workflow.type,
            "name": workflow.name,
            "state": workflow.state,
            "metadata": wire["metadata"],
        },
    }


# ojs-cron 9.2: a cron.skipped event's reason is one of these (the adapters'
# CronFire reasons on the left).
CRON_SKIP_REASONS = {"overlap": "overlap_skip", "disabled": "disabled", "dst_skip": "dst_skip"}


def cron_event(kind: str, fire: CronFire, now: float) -> dict[str, Any]:
    """cron.triggered or cron.skipped with the fields of ojs-cron 9.1 / 9.2."""
    record = fire.record
    name = record.name if record is not None else None
    data: dict[str, Any] = {"cron_name": name}
    if record is not None:
        data.update(cron_expression=record.expression, timezone=record.timezone)
    scheduled = format_ts(fire.occurrence) if fire.occurrence is not None else None
    if fire.fired:
        job = fire.job
        data.update(job_id=job.id, job_type=job.type, queue=job.queue)
        data.update(run_count=record.runs if record is not None else None)
        data.update(scheduled_time=scheduled, actual_time=format_ts(now))
    else:
        data["reason"] = CRON_SKIP_REASONS.get(fire.reason or "", fire.reason)
        if fire.reason == "overlap" and record is not None:
            data["active_job_id"] = record.last_job_id
        data["scheduled_time"] = scheduled
        if fire.local_time is not None:
            data["scheduled_local_time"] = fire.local_time
    return {
        "specversion": "1.0",
        "id": uuid7(),
        "type": kind,
        "source": "ojs-trio",
        "subject": name,
        "time": format_ts(now),
        "timestamp": format_ts(now),
        "queue": data.get("queue"),
        "data": data,
    }


@dataclass(eq=False)
class Subscription:
    """A live event feed: ``async for event in sub.receive``; ``dropped`` counts gaps."""

    types: frozenset[str] | None
    queues: frozenset[str] | None
    job_id: str | None
    send: trio.MemorySendChannel[dict[str, Any]]
    receive: trio.MemoryReceiveChannel[dict[str, Any]]
    dropped: int = 0

    def wants(self, event: dict[str, Any]) -> bool:
        if self.types is not None and event["type"] not in self.types:
            return False
        if self.queues is not None and event.get("queue") not in self.queues:
            return False
        return self.job_id is None or event.get("job_id") == self.job_id


@dataclass
class EventStatistics:
    published: int
    retained: int
    subscribers: int
    dropped: int


# A retained event: (seq, type, queue, job_id, packed).  Nothing in it is a live
# dict (short of a value marshal cannot encode), so the tuple holds atomic values
# and the cyclic GC stops scanning it (10,000 retained dicts added ~15 ms to every
# full collection).  ``packed`` is the
# marshalled event, or for a job event the fields it is built from (a tuple):
# job events are two or three per job, and building each one (timestamp text,
# event id, two dicts) cost ~10 % of the embedded drain while most are never read.
_Retained = tuple[int, str, Any, Any, bytes | tuple[Any, ...] | dict[str, Any]]


def _retain(seq: int, event: dict[str, Any]) -> _Retained:
    try:
        packed: bytes | dict[str, Any] = marshal.dumps(event)
    except ValueError:  # a value marshal cannot encode: keep the dict itself
        packed = event
    return (seq, event["type"], event.get("queue"), event.get("job_id"), packed)


@dataclass
class EventBus:
    capacity: int = 10_000
    subscriber_buffer: int = 256
    _log: deque[_Retained] = field(init=False)
    _seq: itertools.count[int] = field(init=False, default_factory=itertools.count)
    _subs: set[Subscription] = field(init=False, default_factory=set)
    _published: int = field(init=False, default=0)
    _dropped: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._log = deque(maxlen=self.capacity)
        # Job event ids are made from the event's time and sequence number when
        # the event is first read; this nonce keeps two buses' ids apart.
        self._nonce = random.Random(os.urandom(16)).getrandbits(62)

    def publish(self, event: dict[str, Any]) -> None:
        self._published += 1
        self._log.append(_retain(next(self._seq), event))
        self._deliver(event)

    def _deliver(self, event: dict[str, Any]) -> None:
        for sub in self._subs:
            if not sub.wants(event):
                continue
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.dropped += 1
                self._dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def publish_job(self, kind: str, job: Job, now: float, data: dict[str, Any]) -> None:
        """Publish a job event; its dict is built only if a subscriber or a query reads it."""
        self._published += 1
        seq = next(self._seq)
        packed_data: bytes | dict[str, Any] | None
        try:
            packed_data = marshal.dumps(data) if data else None
        except ValueError:  # a value marshal cannot encode: keep the dict itself
            packed_data = data
        packed = (job.type, job.state.value, job.attempt, now, packed_data)
        self._log.append((seq, kind, job.queue, job.id, packed))
        if self._subs:
            self._deliver(self._unpack(self._log[-1]))

    def _event_id(self, seq: int, now: float) -> str:
        # A UUIDv7 from the event's time; sequence number plus the bus's nonce
        # keep ids apart within a millisecond and between buses.
        return format_uuid7(int(now * 1000), seq, self._nonce + seq)

    def _unpack(self, entry: _Retained) -> dict[str, Any]:
        seq, kind, queue, job_id, packed = entry
        if isinstance(packed, bytes):
            event: dict[str, Any] = marshal.loads(packed)
            return event
        if isinstance(packed, tuple):
            job_type, state, attempt, now, data = packed
            extra: dict[str, Any] = marshal.loads(data) if isinstance(data, bytes) else data or {}
            event_id = self._event_id(seq, now)
            return _job_event(kind, event_id, job_id, job_type, queue, state, attempt, now, extra)
        return packed

    def publish_many(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self.publish(event)

    def query(
        self,
        types: Iterable[str] | None = None,
        queues: Iterable[str] | None = None,
        job_id: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The most recent ``limit`` matching events, oldest first."""
        type_set = frozenset(types) if types else None
        queue_set = frozenset(queues) if queues else None
        matched: list[dict[str, Any]] = []
        for entry in reversed(self._log):
            _, kind, queue, event_job_id, _ = entry
            if type_set is not None and kind not in type_set:
                continue
            if queue_set is not None and queue not in queue_set:
                continue
            if job_id is not None and event_job_id != job_id:
                continue
            matched.append(self._unpack(entry))
            if len(matched) >= limit:
                break
        matched.reverse()
        return matched

    def subscribe(
        self,
        types: Iterable[str] | None = None,
        queues: Iterable[str] | None = None,
        job_id: str | None = None,
    ) -> Subscription:
        send, receive = trio.open_memory_channel[dict[str, Any]](self.subscriber_buffer)
        sub = Subscription(
            types=frozenset(types) if types else None,
            queues=frozenset(queues) if queues else None,
            job_id=job_id,
            send=send,
            receive=receive,
        )
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        sub.send.close()

    def clear(self) -> None:
        self._log.clear()

    def statistics(self) -> EventStatistics:
        return EventStatistics(self._published, len(self._log), len(self._subs), self._dropped)
