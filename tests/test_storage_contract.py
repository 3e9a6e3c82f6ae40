"""Every storage adapter against the storage contract suite.

A new adapter joins by adding one ``pytest.param(factory, id=...)`` to
``ADAPTERS``; each contract check then runs as its own test against it.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence

import pytest

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
        for name, fn in inspect.getmembers(storage_contract, inspect.iscoroutinefunction)
        if name.startswith("check_") and name != "check_storage"
    }
    registered = [check.__name__ for check in CONTRACT_CHECKS]
    assert len(registered) == len(set(registered))
    assert set(registered) == defined


# -- the suite must bite: deliberately broken adapters fail the relevant check --


class _AliasingStorage(MemoryStorage):
    """Hands callers the stored objects themselves instead of copies."""

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        results = await super().enqueue(jobs, now)
        return [EnqueueResult(self._jobs[r.job.id]) for r in results]


class _DoubleDealingStorage(MemoryStorage):
    """Serves the first request, then hands the same jobs to every other request."""

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[list[Job]]:
        results = await super().claim(requests[:1], now)
        return results * len(requests)


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
