"""Load the adapter's named SQL (``queries.sql``) and numbered migrations."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_COMMENT_LINE = re.compile(r"^\s*--.*\n", re.MULTILINE)

# psycopg caches the conversion of a statement's ``%(name)s`` placeholders only
# for statements up to this many bytes (psycopg/_queries.py); a longer one is
# parsed again on every execution.  The claim crossing it cost a fetch about 6 %
# more CPU (docs/performance.md), so tests/test_pg_sql.py holds every query to it.
CACHED_STATEMENT_BYTES = 4096


@cache
def queries() -> dict[str, str]:
    """Each named statement, its whole-line comments left in the file.

    The comments say why; the server needs none of them, and kept they would
    be sent with every execution and count towards ``CACHED_STATEMENT_BYTES``.
    A first line naming the statement is kept instead, so it can be told apart
    in ``pg_stat_activity`` and the server's log.
    """
    text = resources.files(__package__).joinpath("queries.sql").read_text()
    parts = _NAME.split(text)
    # parts: [preamble, name1, body1, name2, body2, ...]
    return {
        name: f"-- {name}\n" + _COMMENT_LINE.sub("", body.strip() + "\n").strip()
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def q(name: str) -> str:
    return queries()[name]


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every numbered migration, in order."""
    folder = resources.files(__package__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.match(r"^(\d{4})_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)
