"""The official OJS conformance suites, levels 0-4, over HTTP, on every storage adapter.

Each JSON case is one test per adapter.  Each test starts its own engine and
Hypercorn server in-process on a free port (on PostgreSQL with a fresh
database cloned from the migrated template, on SQS + DynamoDB against a moto
server wiped before each case), so a failing case cannot leak
state into the next, and runs the case with our DSL runner.

The suites come from ``OJS_CONFORMANCE_SUITES`` (default
``../shared/ojs-conformance/suites``).  When they are missing the module is
skipped with the reason, except under ``CI=true`` where that is a failure.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aws_fixtures
import httpx
import pytest
import trio

from ojs_trio.config import Settings
from ojs_trio.conformance.runner import Case, load_cases, run_case
from ojs_trio.engine.engine import EngineConfig, open_engine
from ojs_trio.http.serve import serve
from ojs_trio.storage.memory import MemoryStorage
from ojs_trio.storage.port import Storage
from ojs_trio.storage.postgres.adapter import PostgresStorage
from ojs_trio.storage.sqs.adapter import SqsStorage
from ojs_trio.storage.sqs.client import AwsSettings

moto_endpoint = aws_fixtures.moto_endpoint
aws_endpoint = aws_fixtures.aws_endpoint
aws_settings = aws_fixtures.aws_settings

ROOT = Path(__file__).resolve().parent.parent
SUITES = Path(
    os.environ.get("OJS_CONFORMANCE_SUITES", ROOT.parent / "shared/ojs-conformance/suites")
)


def _cases() -> list[Case]:
    if SUITES.is_dir():
        return load_cases(SUITES)
    return []


CASES = _cases()


def test_suites_present() -> None:
    if SUITES.is_dir():
        assert len(CASES) == 133, f"expected the 133 official cases, found {len(CASES)}"
        return
    message = f"OJS conformance suites not found at {SUITES} (set OJS_CONFORMANCE_SUITES)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@asynccontextmanager
async def open_server(storage: Storage) -> AsyncIterator[str]:
    settings = Settings(host="127.0.0.1", port=0, enable_reset=True, graceful_timeout=1.0)
    config = EngineConfig(honour_test_directives=True)
    async with open_engine(storage, config) as engine, trio.open_nursery() as nursery:
        stop = trio.Event()

        async def shutdown_trigger() -> None:
            await stop.wait()
            engine.begin_shutdown()

        addresses = await nursery.start(serve, engine, settings, shutdown_trigger)
        try:
            yield addresses[0]
        finally:
            stop.set()


async def run_against(storage: Storage, case: Case) -> None:
    async with (
        open_server(storage) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
    ):
        result = await run_case(client, case)
    assert result.passed, result.describe()


CASE_IDS = [f"{c.test_id}-{c.name}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_conformance_memory(case: Case) -> None:
    await run_against(MemoryStorage(), case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_conformance_postgres(case: Case, fresh_db: str) -> None:
    await run_against(PostgresStorage(fresh_db, apply_migrations=False), case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_conformance_sqs(case: Case, aws_settings: AwsSettings) -> None:
    await run_against(SqsStorage(aws_settings), case)
