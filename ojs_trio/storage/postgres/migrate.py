"""Apply the numbered SQL migrations shipped in the package.

Runs on start-up (and via ``ojs-trio migrate``) under a transaction-scoped
advisory lock, so two servers starting at once apply each migration exactly
once; applied versions are recorded in ``ojs_schema_version``.
"""

from __future__ import annotations

import logging
from typing import Any

from ojs_trio.storage.postgres.sql import migrations

log = logging.getLogger("ojs_trio.postgres")

# An arbitrary fixed key: every ojs-trio process contends for the same lock.
MIGRATION_LOCK_KEY = 0x6F6A735F74726970  # "ojs_trip"


async def migrate(conn: Any) -> list[int]:
    """Bring the schema up to date; return the versions applied now."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS ojs_schema_version ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM ojs_schema_version")
        done = {row[0] for row in await cur.fetchall()}
        for version, name, sql in migrations():
            if version in done:
                continue
            log.info("applying migration %s", name)
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO ojs_schema_version (version, name) VALUES (%s, %s)", (version, name)
            )
            applied.append(version)
    return applied
