"""Every storage adapter against the storage contract suite.

A new adapter joins by adding one ``pytest.param(factory, id=...)`` to
``ADAPTERS``; each contract check then runs as its own test against it.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence

import pytest

from ojs_trio.engine.cron import CronFire
from ojs_trio.engine.job import Job
from ojs_trio.storage.memory import MemoryStorage
from ojs_trio.storage.port import ClaimRequest, EnqueueResult, Storage
from ojs_trio.testing import (
    CONTRACT_CHECKS,
    ContractCheck,
    StorageFactory,
    check_storage,
    storage_contract,
    storage_factory,
)


def _memory() -> Storage:
    # A seeded rng keeps any jittered retry in the suite reproducible.
    return MemoryStorage(rng=random.Random(0))


ADAPTERS = [
    pytest.param(storage_factory(_memory), id="memory"),
]


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("factory", ADAPTERS)
async def test_storage_contract(factory: StorageFactory, check: ContractCheck) -> None:
    await check(factory)


def test_every_check_is_registered() -> None:
    """A check written but left out of CONTRACT_CHECKS would silently never run."""
    defined = {
        name
        for name, _ in inspect.getmembers(storage_contract, callable)
        if name.startswith("check_") and name != "check_storage"
    }
    registered = [check.__name__ for check in CONTRACT_CHECKS]
    duplicates = sorted({name for name in registered if registered.count(name) > 1})
    assert not duplicates, f"registered twice: {duplicates}"
    assert sorted(defined - set(registered)) == [], "defined but not in CONTRACT_CHECKS"
    assert sorted(set(registered) - defined) == [], "registered but not a check_* of the module"
    for check in CONTRACT_CHECKS:
        # The documented shape: `async def check_x(factory)`, run once per adapter.
        assert inspect.iscoroutinefunction(check), f"{check.__name__} is not async"
        params = list(inspect.signature(check).parameters)
        assert params == ["factory"], f"{check.__name__} takes {params}"
        assert check.__module__ == storage_contract.__name__, check.__name__


# -- the suite must bite: deliberately broken adapters fail the relevant check --


class _AliasingStorage(MemoryStorage):
    """Keeps the very objects it hands to callers and reads them back (no copies)."""

    def __init__(self) -> None:
        super().__init__()
        self._shared: dict[str, Job] = {}

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        results = await super().enqueue(jobs, now)
        return [EnqueueResult(self._shared.setdefault(r.job.id, r.job)) for r in results]

    async def get(self, job_id: str) -> Job:
        stored = await super().get(job_id)
        return self._shared.get(job_id, stored)


class _DoubleDealingStorage(MemoryStorage):
    """Serves the first request, then hands the same jobs to every other request."""

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[list[Job]]:
        results = await super().claim(requests[:1], now)
        return results * len(requests)


class _UniqueBlindStorage(MemoryStorage):
    """Ignores unique policies: every job is inserted."""

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        blind = [job.clone() for job in jobs]
        for job in blind:
            job.unique = None
        return await super().enqueue(blind, now)


class _UnlimitedStorage(MemoryStorage):
    """Ignores the queue limits jobs carry (rate_limit, concurrency)."""

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        plain = [job.clone() for job in jobs]
        for job in plain:
            job.options_extra = {}
        return await super().enqueue(plain, now)


class _RefiringCronStorage(MemoryStorage):
    """Forgets that an occurrence already fired (no compare-and-set on next_run_at)."""

    async def fire_cron(
        self, name: str, occurrence: float, next_run_at: float | None, job: Job, now: float
    ) -> CronFire:
        record = self._crons.get(name)
        if record is not None:
            record.next_run_at = occurrence
        return await super().fire_cron(name, occurrence, next_run_at, job, now)


class _EchoingStorage(MemoryStorage):
    """Reports the caller's own enqueued jobs to the listener as if it created them."""

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        results = await super().enqueue(jobs, now)
        if self._listener is not None:
            self._listener.jobs_created([r.job for r in results])
        return results


async def test_suite_detects_aliasing() -> None:
    with pytest.raises(AssertionError, match="stored job after mutating"):
        await storage_contract.check_enqueue_returns_stored_copies(
            storage_factory(_AliasingStorage)
        )


async def test_suite_detects_double_claims() -> None:
    with pytest.raises(AssertionError, match="handed to"):
        await storage_contract.check_claim_requests_in_one_call_are_disjoint(
            storage_factory(_DoubleDealingStorage)
        )


async def test_check_storage_names_the_failing_check() -> None:
    with pytest.raises(AssertionError) as info:
        await check_storage(storage_factory(_AliasingStorage))
    assert "storage contract check check_enqueue_returns_stored_copies failed" in (
        info.value.__notes__
    )


@pytest.mark.parametrize(
    ("adapter", "check", "message"),
    [
        (_UniqueBlindStorage, "check_unique_reject_raises_duplicate", "expected DuplicateJob"),
        (_UniqueBlindStorage, "check_concurrent_unique_enqueues_create_one_job", "created by"),
        (_UnlimitedStorage, "check_rate_limit_throttles_claims", "max_per_second=1"),
        (_UnlimitedStorage, "check_concurrency_limit_caps_active_jobs", "concurrency=2"),
        (_RefiringCronStorage, "check_fire_cron_fires_each_occurrence_once", "second fire_cron"),
        (_EchoingStorage, "check_listener_hears_jobs_the_adapter_creates", "enqueue"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
async def test_suite_detects_broken_level_2_4_verbs(
    adapter: Callable[[], Storage], check: str, message: str
) -> None:
    with pytest.raises(AssertionError, match=message):
        await getattr(storage_contract, check)(storage_factory(adapter))
