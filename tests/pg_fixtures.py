"""Reusable PostgreSQL fixtures for tests that need a real server.

Bind the fixtures in a test module (there is no shared conftest; ``tests/`` is on
``sys.path`` under pytest's default import mode)::

    import pg_fixtures

    pg_dsn = pg_fixtures.pg_dsn
    fresh_db = pg_fixtures.fresh_db

* ``pg_dsn`` (session): an admin DSN (a role that may CREATE DATABASE). Taken from
  ``$OJS_TEST_DATABASE_URL``, else ``host=127.0.0.1 port=5432 user=postgres
  dbname=test``. If nothing answers there (and the variable is unset), a throwaway
  cluster is started with ``initdb``/``pg_ctl`` from ``/usr/lib/postgresql/*/bin``
  in a temporary directory on a free port, and removed after the session.
  ``OJS_TEST_PG_THROWAWAY=1`` forces the throwaway cluster. Without PostgreSQL the
  tests are skipped -- unless ``CI=true``, where that is a failure.
* ``pg_template`` (session): the template each fresh database is cloned from;
  ``template0`` unless overridden. Override it to return a migrated template::

      @pytest.fixture(scope="session")
      def pg_template(pg_dsn: str) -> str:
          return create_template(pg_dsn, "ojs_tpl", migrate, fingerprint=fingerprint_files(
              sorted(MIGRATIONS.glob("*.sql"))))

* ``fresh_db``: a DSN for a new database (``CREATE DATABASE ... TEMPLATE
  <pg_template>``) created for one test and dropped after it.

pytest-trio runs every test in its own ``trio.run``, so session-scoped state lives in
sync code: these fixtures use sync psycopg connections (and ``trio.run`` for an async
``migrate``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode

import psycopg
import pytest
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ENV_URL = "OJS_TEST_DATABASE_URL"
ENV_THROWAWAY = "OJS_TEST_PG_THROWAWAY"
DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
TEMPLATE_READY = "ojs-test-template ready"

__all__ = [
    "DEFAULT_DSN",
    "ThrowawayCluster",
    "create_template",
    "database_of",
    "dsn_for",
    "fingerprint_files",
    "fresh_database",
    "fresh_db",
    "give_up",
    "pg_dsn",
    "pg_template",
    "resolve_pg_dsn",
    "start_throwaway_cluster",
]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _in_ci() -> bool:
    return _truthy(os.environ.get("CI"))


def dsn_for(dsn: str, dbname: str) -> str:
    """``dsn`` pointing at database ``dbname`` instead (URLs are accepted)."""
    return make_conninfo(dsn, dbname=dbname)


def _probe(dsn: str) -> str | None:
    """Return None if a server answers at ``dsn``, else why not."""
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as ex:
        return f"{type(ex).__name__}: {str(ex).strip().splitlines()[0]}"
    return None


# -- throwaway cluster ----------------------------------------------------------------


def _bindirs() -> list[Path]:
    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if found := shutil.which("pg_ctl"):
        dirs.append(Path(found).parent)
    return [d for d in dirs if (d / "initdb").exists() and (d / "pg_ctl").exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ThrowawayCluster:
    """A PostgreSQL cluster in a temporary directory, for one test session."""

    bindir: Path
    root: Path
    port: int
    run_as: tuple[int, int] | None

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, *args: str) -> None:
        kwargs: dict[str, Any] = {}
        if self.run_as is not None:
            kwargs = {"user": self.run_as[0], "group": self.run_as[1]}
        subprocess.run(args, check=True, capture_output=True, timeout=120, **kwargs)

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = str(self.root / "server.log")
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", log, "-o", opts, "-w",
            "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"
            )

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_throwaway_cluster() -> ThrowawayCluster | str:
    """Start a throwaway cluster; return it, or the reason it couldn't be started."""
    bindirs = _bindirs()
    if not bindirs:
        return "no initdb/pg_ctl found under /usr/lib/postgresql/*/bin or on PATH"
    run_as: tuple[int, int] | None = None
    if os.geteuid() == 0:
        # initdb refuses to run as root.
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
        run_as = (pw.pw_uid, pw.pw_gid)
    root = Path(tempfile.mkdtemp(prefix="ojs-pg-"))
    if run_as is not None:
        os.chown(root, *run_as)
    cluster = ThrowawayCluster(bindirs[0], root, _free_port(), run_as)
    try:
        cluster._run(
            str(cluster.bindir / "initdb"), "-D", str(cluster.datadir), "-U", "postgres",
            "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        cluster.start()
    except (subprocess.SubprocessError, OSError) as ex:
        detail = getattr(ex, "stderr", b"") or b""
        cluster.remove()
        return f"throwaway cluster failed to start: {ex} {detail.decode(errors='replace')}"
    return cluster


def resolve_pg_dsn() -> Iterator[str]:
    """Generator behind the ``pg_dsn`` fixture (yields once, cleans up after)."""
    url = os.environ.get(ENV_URL)
    reasons: list[str] = []
    if not _truthy(os.environ.get(ENV_THROWAWAY)):
        dsn = url or DEFAULT_DSN
        why = _probe(dsn)
        if why is None:
            yield dsn
            return
        reasons.append(f"{ENV_URL if url else 'default DSN'} {dsn!r} unreachable: {why}")
        if url:
            give_up(reasons)
    cluster = start_throwaway_cluster()
    if isinstance(cluster, str):
        reasons.append(cluster)
        give_up(reasons)
    try:
        yield cluster.dsn
    finally:
        cluster.remove()


def give_up(reasons: list[str]) -> NoReturn:
    """Skip the test for want of PostgreSQL -- or fail it under ``CI=true``."""
    message = "PostgreSQL not available: " + "; ".join(reasons)
    if _in_ci():
        pytest.fail(message + " (CI=true: PostgreSQL is required)", pytrace=False)
    pytest.skip(message)


# -- template and per-test databases ----------------------------------------------------


def fingerprint_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """A short content hash of ``paths`` (e.g. migration files), for templates."""
    digest = hashlib.sha256()
    for path in paths:
        p = Path(path)
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run_migrate(migrate: Callable[[Any], object], dsn: str) -> None:
    if inspect.iscoroutinefunction(migrate):
        from ojs_trio.storage.postgres.driver import TrioConnection

        async def run() -> None:
            conn = await TrioConnection.connect(dsn)
            async with conn:  # commits on success
                await migrate(conn)

        trio.run(run)
    else:
        with psycopg.connect(dsn) as conn:  # commits on success
            migrate(conn)


def create_template(
    admin_dsn: str,
    name: str,
    migrate: Callable[[psycopg.Connection[Any]], object] | Callable[[Any], Awaitable[object]],
    *,
    fingerprint: str | None = None,
    refresh: bool = False,
) -> str:
    """Create a template database by running ``migrate`` on an empty one; return its name.

    ``migrate`` gets a connection to the new database: a sync
    :class:`psycopg.Connection`, or a :class:`TrioConnection` if it is an ``async``
    function (run under its own ``trio.run``); the transaction is committed after it.
    The template is called ``name``, or ``name_<fingerprint>`` when a fingerprint
    (e.g. :func:`fingerprint_files` of the migrations) is given, so that changed
    migrations get a new template and concurrent test runs of different code don't
    pull one another's template away. An existing, complete template is reused
    unless ``refresh=True``. Building is serialized across processes (pytest-xdist
    workers) with an advisory lock. The template is marked ``IS_TEMPLATE`` and
    ``ALLOW_CONNECTIONS false``, so nothing blocks cloning it.
    """
    if fingerprint is not None:
        if not re.fullmatch(r"[0-9A-Za-z_]+", fingerprint):
            raise ValueError(f"fingerprint must be alphanumeric, got {fingerprint!r}")
        name = f"{name}_{fingerprint}"[:63]
    ident = sql.Identifier(name)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"ojs-template:{name}",))
        try:
            row = admin.execute(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                (name,),
            ).fetchone()
            if row is not None and row[0] == TEMPLATE_READY and not refresh:
                return name
            if row is not None:
                admin.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident))
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident))
            _run_migrate(migrate, dsn_for(admin_dsn, name))
            admin.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                    ident
                )
            )
            admin.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(TEMPLATE_READY))
            )
        finally:
            admin.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"ojs-template:{name}",))
    return name


@contextlib.contextmanager
def fresh_database(
    admin_dsn: str, template: str = "template0", *, prefix: str = "ojs_test"
) -> Iterator[str]:
    """Create a uniquely named database from ``template``; yield its DSN; drop it after."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    ident = sql.Identifier(name)
    create = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(ident, sql.Identifier(template))
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        for attempt in range(50):
            try:
                admin.execute(create)
                break
            except psycopg.errors.ObjectInUse:
                # Another session is briefly connected to the template (e.g. a
                # CREATE DATABASE running from it elsewhere): retry.
                if attempt == 49:
                    raise
                time.sleep(0.1)
    try:
        yield dsn_for(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """Admin DSN of a reachable PostgreSQL (see the module docstring)."""
    yield from resolve_pg_dsn()


@pytest.fixture(scope="session")
def pg_template(pg_dsn: str) -> str:
    """Template for :func:`fresh_db`; override to return :func:`create_template`'s."""
    return "template0"


@pytest.fixture
def fresh_db(pg_dsn: str, pg_template: str) -> Iterator[str]:
    """DSN of a new database cloned from ``pg_template``, dropped after the test."""
    with fresh_database(pg_dsn, pg_template) as dsn:
        yield dsn


def storage_url(dsn: str) -> str:
    """A ``postgresql://`` URL (what ``--storage`` takes) for a libpq DSN or URL."""
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if v not in (None, "")}
    return "postgresql://?" + urlencode(params)


def database_of(dsn: str) -> str:
    """The database name a DSN points at."""
    return str(conninfo_to_dict(dsn).get("dbname", ""))
