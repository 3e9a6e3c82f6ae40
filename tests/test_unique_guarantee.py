"""The manifest's uniqueness guarantee comes from the storage adapter (ojs-unique-jobs.md 8,
ojs-conformance.md 4.2), not from a table of adapter names in the HTTP layer."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from ojs_trio.http.system import (
    UNDECLARED_UNIQUE_GUARANTEE,
    manifest,
    unique_guarantee,
)
from ojs_trio.storage.memory import MemoryStorage


def manifest_for(storage: Any) -> dict[str, Any]:
    # The manifest reads nothing of its context but the engine's storage.
    ctx: Any = SimpleNamespace(engine=SimpleNamespace(storage=storage))
    return manifest(ctx)


def sqs_storage_class() -> Any:
    pytest.importorskip("aiobotocore")
    from ojs_trio.storage.sqs.adapter import SqsStorage

    return SqsStorage


def postgres_storage_class() -> Any:
    pytest.importorskip("psycopg")
    from ojs_trio.storage.postgres.adapter import PostgresStorage

    return PostgresStorage


def test_every_adapter_declares_a_strong_guarantee() -> None:
    for adapter in (MemoryStorage, sqs_storage_class(), postgres_storage_class()):
        strength, mechanism = adapter.unique_guarantee
        assert strength == "strong"
        assert mechanism
    assert "single-threaded" in MemoryStorage.unique_guarantee[1]
    assert "pg_advisory_xact_lock" in postgres_storage_class().unique_guarantee[1]
    # The SQS text owns up to the large-enqueue path.
    assert "too large for one transaction" in sqs_storage_class().unique_guarantee[1]


def test_manifest_reports_the_adapters_own_guarantee() -> None:
    found = manifest_for(MemoryStorage())
    assert found["capabilities"]["unique_jobs"] == {
        "strength": "strong",
        "mechanism": MemoryStorage.unique_guarantee[1],
    }
    assert found["unique_job_strength"] == "strong"

    declared = SimpleNamespace(name="custom", unique_guarantee=("best-effort", "query then insert"))
    found = manifest_for(declared)
    assert found["capabilities"]["unique_jobs"] == {
        "strength": "best-effort",
        "mechanism": "query then insert",
    }
    # ojs-conformance.md 4.2 spells the top-level value with an underscore.
    assert found["unique_job_strength"] == "best_effort"


def test_adapter_without_a_declaration_is_not_assumed_strong() -> None:
    undeclared: Any = SimpleNamespace(name="someone-elses")
    assert unique_guarantee(undeclared) == UNDECLARED_UNIQUE_GUARANTEE
    assert UNDECLARED_UNIQUE_GUARANTEE[0] == "best-effort"
    found = manifest_for(undeclared)
    assert found["unique_job_strength"] == "best_effort"
