"""Shared fixtures: PostgreSQL (see pg_fixtures.py) with a migrated template database."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pg_fixtures"]

MIGRATIONS = Path(__file__).resolve().parent.parent / "ojs_trio/storage/postgres/migrations"


@pytest.fixture(scope="session")
def pg_template(pg_dsn: str) -> str:
    """Every fresh test database is cloned from one migrated template."""
    # Imported here: pg_fixtures is loaded as a plugin (pytest_plugins) first.
    from pg_fixtures import create_template, fingerprint_files

    from ojs_trio.storage.postgres.migrate import migrate

    return create_template(
        pg_dsn,
        "ojs_tpl",
        migrate,
        fingerprint=fingerprint_files(sorted(MIGRATIONS.glob("*.sql")))[:16],
    )
