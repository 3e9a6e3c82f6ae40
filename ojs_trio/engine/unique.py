"""Unique jobs (ojs-unique-jobs.md): fingerprints and the duplicate test.

Adapters keep an index from fingerprint to job ids and call :func:`conflicts`
inside the same atomic step as the insert, so the guarantee is strong (no
window between check and insert) on every backend.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

from ojs_trio.engine.errors import InvalidRequest
from ojs_trio.engine.job import Job
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import parse_duration

DEFAULT_STATES = frozenset(
    {
        JobState.AVAILABLE,
        JobState.ACTIVE,
        JobState.SCHEDULED,
        JobState.RETRYABLE,
        JobState.PENDING,
    }
)
DIMENSIONS = frozenset({"type", "queue", "args", "meta"})


def _nfc(value: Any) -> Any:
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [_nfc(v) for v in value]
    if isinstance(value, dict):
        return {_nfc(k): _nfc(v) for k, v in value.items()}
    return value


def _select(source: Any, keys: list[str] | None, what: str) -> Any:
    if keys is None:
        return source
    # args is a positional array; named keys select from its object elements.
    if isinstance(source, list):
        merged: dict[str, Any] = {}
        for item in source:
            if isinstance(item, dict):
                merged.update(item)
        source = merged
    if not isinstance(source, dict):
        raise InvalidRequest(f"unique.{what}_keys needs {what} with named keys")
    missing = [k for k in keys if k not in source]
    if missing:
        raise InvalidRequest(
            f"unique.{what}_keys names keys missing from {what}: {', '.join(missing)}",
            details={"field": f"unique.{what}_keys", "missing": missing},
        )
    return {k: source[k] for k in keys}


def fingerprint(job: Job) -> str | None:
    """The job's uniqueness key (SHA-256 of canonical JSON), or None if not unique."""
    policy = job.unique
    if policy is None:
        return None
    keys = set(policy.get("keys") or ["type"])
    unknown = keys - DIMENSIONS
    if unknown:
        raise InvalidRequest(
            f"unique.keys has unknown dimensions: {', '.join(sorted(unknown))}",
            details={"field": "unique.keys"},
        )
    dims: dict[str, Any] = {"type": job.type}
    if "queue" in keys:
        dims["queue"] = job.queue
    if "args" in keys:
        dims["args"] = _select(job.args, policy.get("args_keys"), "args")
    if "meta" in keys:
        meta_keys = policy.get("meta_keys")
        if not meta_keys:
            raise InvalidRequest(
                "unique.meta_keys is required when keys includes 'meta'",
                details={"field": "unique.meta_keys"},
            )
        dims["meta"] = _select(job.meta or {}, meta_keys, "meta")
    canonical = json.dumps(_nfc(dims), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def states_of(job: Job) -> frozenset[JobState]:
    states = (job.unique or {}).get("states")
    return DEFAULT_STATES if states is None else frozenset(JobState(s) for s in states)


def on_conflict(job: Job) -> str:
    return str((job.unique or {}).get("on_conflict", "reject"))


def inherit_schedule(new: Job, replaced: Job) -> None:
    """``replace_except_schedule``: the replacement keeps the original's run time."""
    if on_conflict(new) != "replace_except_schedule":
        return
    if replaced.state is JobState.SCHEDULED and replaced.scheduled_at is not None:
        new.state = JobState.SCHEDULED
        new.scheduled_at = replaced.scheduled_at
        new.client_times.pop("scheduled_at", None)


def conflicts(new: Job, existing: Job, now: float) -> bool:
    """Does ``existing`` block ``new`` under ``new``'s unique policy?"""
    if existing.state not in states_of(new):
        return False
    period = (new.unique or {}).get("period")
    if period is not None and existing.created_at + parse_duration(period) <= now:
        return False
    return True
