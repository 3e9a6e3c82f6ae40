"""The in-memory adapter's job table: each job kept as one marshalled record.

Why records and not :class:`Job` objects: CPython's cyclic garbage collector
walks every tracked container on each full collection, and a resident ``Job``
is a 39-slot object plus its lists and dicts.  With 34,000 jobs resident a full
collection took ~90 ms on the benchmark machine, and full collections come
more often the faster jobs arrive, so an embedded engine's enqueue p99 was a GC
pause.  ``bytes`` are not tracked, so a table of them costs the collector
nothing however large it grows.  Encoding and decoding (``marshal``, in C) is
also cheaper than the deep copy the adapter made at every verb boundary
anyway: a decoded job is a private copy, so storage never shares mutable state
with its callers.

Alongside each record the table keeps a small summary (queue, state, when it
finished, dead letter) so counts and pruning never decode a record, and
per-queue state counts so queue stats are O(queues), not O(jobs).
"""

from __future__ import annotations

import marshal
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

from ojs_trio.engine.job import Job
from ojs_trio.engine.retry import RetryPolicy
from ojs_trio.engine.states import JobState

# What counting and pruning need without decoding: (queue, state value, when it
# finished, dead letter).  A plain tuple of atomic values, which the collector
# stops tracking after its first pass (a NamedTuple it would keep tracking).
Summary = tuple[str, str, float, bool]


def _summarize(job: Job) -> Summary:
    finished = job.completed_at or job.discarded_at or job.cancelled_at or job.created_at
    return (job.queue, job.state.value, finished, job.dead_letter)


_FIELDS = [f.name for f in fields(Job)]
_STATES = {state.value: state for state in JobState}


def _generate_codec() -> tuple[Callable[..., bytes], Callable[..., Job]]:
    """Encoder and decoder unrolled over Job's fields (no per-field loop or getattr)."""
    packed = []
    for name in _FIELDS:
        if name == "state":
            packed.append("job.state._value_")
        elif name == "retry":
            packed.append("policy_id(job.retry)")
        else:
            packed.append(f"job.{name}")
    encode_src = (
        f"def encode(job, policy_id, _dumps=_dumps):\n    return _dumps(({', '.join(packed)},))\n"
    )
    decode_lines = [
        "def decode(record, policies, _loads=_loads, _new=_new, Job=Job, _states=_states):",
        "    t = _loads(record)",
        "    job = _new(Job)",
    ]
    for i, name in enumerate(_FIELDS):
        if name == "state":
            decode_lines.append(f"    job.state = _states[t[{i}]]")
        elif name == "retry":
            decode_lines.append(f"    job.retry = policies[t[{i}]]")
        else:
            decode_lines.append(f"    job.{name} = t[{i}]")
    decode_lines.append("    return job")
    namespace: dict[str, Any] = {
        "_dumps": marshal.dumps,
        "_loads": marshal.loads,
        "_new": object.__new__,
        "Job": Job,
        "_states": _STATES,
    }
    exec(encode_src, namespace)
    exec("\n".join(decode_lines), namespace)
    return namespace["encode"], namespace["decode"]


_encode, _decode = _generate_codec()


def _policy_key(policy: RetryPolicy) -> tuple[Any, ...]:
    extra = marshal.dumps(policy.extra) if policy.extra else b""
    return (
        policy.max_attempts,
        policy.initial_interval,
        policy.backoff_coefficient,
        policy.max_interval,
        policy.jitter,
        policy.non_retryable_errors,
        policy.on_exhaustion,
        policy.backoff_strategy,
        extra,
    )


class JobTable:
    """A mapping of job id to job, stored as records; reads return fresh copies.

    Values must be JSON-like data (what the wire format allows); anything
    ``marshal`` cannot encode raises :class:`ValueError` on store.
    """

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}
        self._summaries: dict[str, Summary] = {}
        self._counts: dict[str, dict[str, int]] = {}  # queue -> state -> jobs
        # Retry policies are interned: most jobs share one, and a policy is
        # immutable, so a record names it by index.
        self._policies: list[RetryPolicy] = []
        self._policy_ids: dict[tuple[Any, ...], int] = {}
        self._last_policy: RetryPolicy | None = None
        self._last_policy_id = -1

    def _policy_id(self, policy: RetryPolicy) -> int:
        if policy is self._last_policy:
            return self._last_policy_id
        key = _policy_key(policy)
        found = self._policy_ids.get(key)
        if found is None:
            found = self._policy_ids[key] = len(self._policies)
            self._policies.append(policy)
        self._last_policy, self._last_policy_id = policy, found
        return found

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def get(self, job_id: str) -> Job | None:
        record = self._records.get(job_id)
        return None if record is None else _decode(record, self._policies)

    def __getitem__(self, job_id: str) -> Job:
        return _decode(self._records[job_id], self._policies)

    def __setitem__(self, job_id: str, job: Job) -> None:
        record = _encode(job, self._policy_id)
        summary = _summarize(job)
        old = self._summaries.get(job_id)
        self._records[job_id] = record
        self._summaries[job_id] = summary
        if old is not None:
            self._count(old, -1)
        self._count(summary, 1)

    def __delitem__(self, job_id: str) -> None:
        del self._records[job_id]
        self._count(self._summaries.pop(job_id), -1)

    def _count(self, summary: Summary, delta: int) -> None:
        queue, state = summary[0], summary[1]
        by_state = self._counts.setdefault(queue, {})
        left = by_state.get(state, 0) + delta
        if left:
            by_state[state] = left
        else:
            del by_state[state]

    def summary(self, job_id: str) -> Summary:
        return self._summaries[job_id]

    def summaries(self) -> Iterator[tuple[str, Summary]]:
        return iter(self._summaries.items())

    def counts(self, queue: str) -> dict[str, int]:
        """Jobs in ``queue`` by state value (states with none are absent)."""
        return dict(self._counts.get(queue, {}))

    def queues(self) -> list[str]:
        return [queue for queue, by_state in self._counts.items() if by_state]
