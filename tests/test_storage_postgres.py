"""The storage contract suite against PostgreSQL: a fresh migrated database per check."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from ojs_trio.storage.port import Storage
from ojs_trio.storage.postgres.adapter import PostgresStorage
from ojs_trio.testing import CONTRACT_CHECKS, ContractCheck


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=[c.__name__ for c in CONTRACT_CHECKS])
async def test_postgres_contract(check: ContractCheck, fresh_db: str) -> None:
    @asynccontextmanager
    async def factory() -> AsyncIterator[Storage]:
        storage = PostgresStorage(fresh_db, apply_migrations=False)
        await storage.open()
        try:
            await storage.reset()
            yield storage
        finally:
            await storage.aclose()

    await check(factory)


async def test_migrations_apply_once_and_are_recorded(fresh_db: str) -> None:
    # The template is migrated already: opening with migrations on is a no-op.
    storage = PostgresStorage(fresh_db)
    await storage.open()
    try:
        health = await storage.ping()
        assert health["status"] == "connected"
    finally:
        await storage.aclose()
