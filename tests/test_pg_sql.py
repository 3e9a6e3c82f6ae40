"""The named statements of queries.sql as the adapter sends them (no database needed)."""

from __future__ import annotations

import pytest
from psycopg import _queries
from psycopg.adapt import Transformer
from psycopg.types.json import Jsonb

from ojs_trio.storage.postgres.sql import CACHED_STATEMENT_BYTES, q, queries


def test_our_limit_is_the_one_psycopg_caches_conversions_under() -> None:
    # A psycopg release that moves the limit should be noticed here, not in a profile.
    assert _queries.MAX_CACHED_STATEMENT_LENGTH == CACHED_STATEMENT_BYTES


@pytest.mark.parametrize("name", sorted(queries()))
def test_every_statement_fits_psycopg_s_conversion_cache(name: str) -> None:
    assert len(q(name).encode()) <= CACHED_STATEMENT_BYTES


def test_statements_carry_their_name_and_none_of_the_file_s_comments() -> None:
    for name, text in queries().items():
        first, *rest = text.splitlines()
        assert first == f"-- {name}"
        assert not [line for line in rest if line.lstrip().startswith("--")], name
    # The file's comment on why the claim skips the flush stays in the file only.
    assert "synchronous_commit" in q("claim_plain")
    assert "at-least-once" not in q("claim_plain")


def test_the_claim_is_parsed_once_not_on_every_execution() -> None:
    params = {
        "queue": "default",
        "slots": Jsonb([{"n": 1, "worker_id": "w", "visibility_ms": 0}]),
        "now": 1.0,
        "default_ms": 30_000,
    }
    _queries._query2pg.cache_clear()
    for _ in range(3):
        _queries.PostgresQuery(Transformer()).convert(q("claim_plain"), params)
    info = _queries._query2pg.cache_info()
    assert (info.misses, info.hits) == (1, 2)
