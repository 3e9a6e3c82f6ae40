"""The Trio PostgreSQL driver layer against a real server (see pg_fixtures.py).

Also the contract test over the private psycopg hooks the driver relies on, so a
psycopg upgrade that moves them fails here, loudly, rather than in production.
"""

from __future__ import annotations

import ast
import inspect
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pg_fixtures
import psycopg
import pytest
import trio
import trio.testing
from pg_fixtures import create_template, database_of, fresh_database, start_throwaway_cluster
from psycopg import errors as pg_errors
from psycopg import pq, sql
from psycopg.rows import dict_row

from ojs_trio.engine.errors import BackendError, BackendUnavailable, InvalidRequest
from ojs_trio.storage.postgres import driver
from ojs_trio.storage.postgres.driver import (
    ConnectionLock,
    Notification,
    PoolClosed,
    PoolTimeout,
    Reconnected,
    TrioConnection,
    is_unavailable,
    map_errors,
    open_listener,
    open_pool,
    to_backend_error,
)

# Fixtures from pg_fixtures (bound here, so that pytest finds them in this module).
pg_dsn = pg_fixtures.pg_dsn
pg_template = pg_fixtures.pg_template
fresh_db = pg_fixtures.fresh_db

# Every test that talks to the server runs under this deadline.
DEADLINE = 20.0


def _channel() -> str:
    return f"ojs_test_{uuid.uuid4().hex[:10]}"


def _dead_port() -> int:
    """A loopback port nothing listens on (bound, never listened, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _connect(dsn: str, **kwargs: Any) -> TrioConnection:
    return await TrioConnection.connect(dsn, autocommit=True, **kwargs)


async def _scalar(conn: TrioConnection, query: str, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await trio.sleep(0.01)
    pytest.fail("condition not reached in time")


async def _terminate(dsn: str, pid: int) -> None:
    """Kill a backend and wait (server side) until it has exited."""
    conn = await _connect(dsn)
    async with conn:
        assert await _scalar(conn, "SELECT pg_terminate_backend(%s, 5000)", (pid,))


async def _notify(dsn: str, channel: str, payload: str) -> None:
    conn = await _connect(dsn)
    async with conn:
        await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


# -- contract over psycopg's private hooks ------------------------------------------------


def _functions_mentioning(path: Path, needles: tuple[str, ...]) -> set[str]:
    """Qualified names of the functions in ``path`` whose source contains a needle."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    found: set[str] = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                end = child.end_lineno or child.lineno
                body = "\n".join(lines[child.lineno - 1 : end])
                if any(n in body for n in needles):
                    found.add(prefix + child.name)

    visit(tree, "")
    return found


def test_psycopg_private_hooks() -> None:
    """Fail loudly if a psycopg upgrade moves a hook TrioConnection depends on."""
    base = psycopg.AsyncConnection
    # Signatures we override or call.
    assert list(inspect.signature(base.wait).parameters) == ["self", "gen", "interval", "timeout"]
    assert list(inspect.signature(base.cancel_safe).parameters) == ["self", "timeout"]
    assert list(inspect.signature(base._try_cancel).parameters) == ["self", "timeout"]
    connect_params = inspect.signature(base.connect).parameters
    for name in ("autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"):
        assert name in connect_params
    assert inspect.isgeneratorfunction(inspect.unwrap(base._connect_gen.__func__))  # type: ignore[attr-defined]
    assert inspect.isgeneratorfunction(base._cancel_gen)
    assert callable(base._should_cancel)
    assert inspect.iscoroutinefunction(base._get_connection_params.__func__)  # type: ignore[attr-defined]
    # The attributes connect() sets after the generator returns.
    init_src = inspect.getsource(psycopg.BaseConnection.__init__)
    attrs = ("_autocommit", "_adapters", "_pipeline", "_notify_handlers", "_closed")
    for attr in (f"self.{a}" for a in attrs):
        assert attr in init_src, attr
    assert "self.lock = ALock()" in inspect.getsource(base.__init__)
    assert "not self._closed" in inspect.getsource(psycopg.BaseConnection.broken.fget)  # type: ignore[attr-defined]
    # Generators and waiting helpers.
    assert inspect.isgeneratorfunction(psycopg.generators.notifies)
    assert issubclass(pg_errors._WaitTimeout, psycopg.OperationalError)
    assert callable(getattr(psycopg.waiting, "_ready", None)), "fast readiness check moved"
    assert driver._ready_now is psycopg.waiting._ready
    wait, ready = psycopg.waiting.Wait, psycopg.waiting.Ready
    assert (int(wait.R), int(wait.W), int(wait.RW)) == (1, 2, 3)
    assert (int(ready.NONE), int(ready.R), int(ready.W), int(ready.RW)) == (0, 1, 2, 3)
    # notifies() must reach the connection's wait() with a timeout, and map its expiry.
    notifies_src = inspect.getsource(base.notifies)
    assert "self.wait(" in notifies_src and "_WaitTimeout" in notifies_src

    # Every asyncio tie in psycopg must sit in a method TrioConnection overrides, or in
    # a place we document as unsupported / unused. New ties fail this test.
    pkg = Path(psycopg.__file__).parent
    needles = ("wait_async(", "wait_conn_async(", "asyncio.", "ALock(", "aspawn(", "AQueue(")
    allowed = {
        "connection_async.py": {"AsyncConnection.connect", "AsyncConnection.cancel_safe"}
        | {"AsyncConnection.wait", "AsyncConnection.__init__"},
        # conninfo_attempts_async: we call the sync conninfo_attempts instead.
        "_conninfo_attempts_async.py": {"_resolve_hostnames"},
        # The queued COPY writer (never the default) needs asyncio: documented.
        "_copy_async.py": {"AsyncQueuedLibpqWriter.__init__", "AsyncQueuedLibpqWriter.write"},
    }
    ignored = {"_acompat.py", "waiting.py", "_compat.py", "errors.py"}
    for path in sorted(pkg.rglob("*.py")):
        rel = str(path.relative_to(pkg))
        if rel in ignored:
            continue
        hits = _functions_mentioning(path, needles)
        assert hits <= allowed.get(rel, set()), f"new asyncio tie in psycopg/{rel}: {hits}"
    for name in ("connect", "wait", "cancel_safe", "_try_cancel", "close", "__init__"):
        assert name in TrioConnection.__dict__, name


async def test_private_hooks_live(pg_dsn: str) -> None:
    """The runtime half of the contract: attributes exist and behave on a real connection."""
    with trio.fail_after(DEADLINE):
        conn = await TrioConnection.connect(pg_dsn, autocommit=True, prepare_threshold=None)
        async with conn:
            assert isinstance(conn.lock, ConnectionLock)
            assert isinstance(conn.lock._lock, trio.Lock)
            assert conn.autocommit is True and conn._autocommit is True
            assert conn.prepare_threshold is None
            pgconn = conn.pgconn
            assert isinstance(pgconn.socket, int)
            assert pgconn.transaction_status == pq.TransactionStatus.IDLE
            assert pgconn.pipeline_status == pq.PipelineStatus.OFF
            assert conn._pipeline is None
            assert callable(pgconn.consume_input) and callable(pgconn.is_busy)
            # A registered notify handler sees notifications drained by the generator.
            seen: list[psycopg.Notify] = []
            conn.add_notify_handler(seen.append)
            ch = _channel()
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
            await _notify(pg_dsn, ch, "x")
            with trio.move_on_after(5):
                while not seen:
                    await conn.wait(psycopg.generators.notifies(conn.pgconn))
            assert [(n.channel, n.payload) for n in seen] == [(ch, "x")]


# -- connection ----------------------------------------------------------------------


async def test_connect_execute_fetch(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await TrioConnection.connect(pg_dsn)
        async with conn:
            assert not conn.autocommit
            cur = await conn.execute("SELECT %s::int + 1, %s::text", (41, "é"))
            assert await cur.fetchall() == [(42, "é")]
            async with conn.cursor(row_factory=dict_row) as dcur:
                await dcur.execute("SELECT generate_series(1, 3) AS n")
                assert [r["n"] async for r in dcur] == [1, 2, 3]
            async with conn.cursor("server_side") as scur:
                await scur.execute("SELECT generate_series(1, 1000)")
                assert len(await scur.fetchmany(10)) == 10
                assert len(await scur.fetchall()) == 990
            assert conn.info.transaction_status == pq.TransactionStatus.INTRANS
        assert conn.closed and not conn.broken


async def test_connect_resolves_host_names(pg_dsn: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    if params.get("host") != "127.0.0.1":
        pytest.skip("needs a DSN on 127.0.0.1 to swap in 'localhost'")
    with trio.fail_after(DEADLINE):
        conn = await TrioConnection.connect(pg_dsn, host="localhost", autocommit=True)
        async with conn:
            assert await _scalar(conn, "SELECT 1") == 1


def test_needs_dns() -> None:
    assert not driver._needs_dns({"host": "127.0.0.1"})
    assert not driver._needs_dns({"host": "::1,10.0.0.1"})
    assert not driver._needs_dns({"host": "/var/run/postgresql"})
    assert not driver._needs_dns({"host": "db.example", "hostaddr": "10.0.0.1"})
    assert driver._needs_dns({"host": "localhost"})
    assert driver._needs_dns({"host": "10.0.0.1,db.example"})


async def test_transactions(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        async with conn:
            await conn.execute("CREATE TEMP TABLE t (n int)")
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (1)")
            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (2)")
                    raise ZeroDivisionError
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (3)")
                with pytest.raises(pg_errors.UniqueViolation):
                    async with conn.transaction():  # a savepoint
                        await conn.execute("INSERT INTO t VALUES (4)")
                        await conn.execute("CREATE TEMP TABLE u (n int PRIMARY KEY)")
                        await conn.execute("INSERT INTO u VALUES (1), (1)")
            cur = await conn.execute("SELECT n FROM t ORDER BY n")
            assert await cur.fetchall() == [(1,), (3,)]
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE


async def test_pipeline(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        async with conn:
            await conn.execute("CREATE TEMP TABLE t (n int)")
            async with conn.pipeline() as p:
                curs = [
                    await conn.execute("INSERT INTO t VALUES (%s) RETURNING n", (i,))
                    for i in range(50)
                ]
                await p.sync()
                total = await conn.execute("SELECT sum(n) FROM t")
            assert [(await c.fetchone()) for c in curs[:3]] == [(0,), (1,), (2,)]
            assert await total.fetchone() == (sum(range(50)),)
            # An error inside a pipeline surfaces (and, as on the server, aborts the
            # statements of its implicit transaction); the connection stays usable.
            with pytest.raises(pg_errors.UndefinedTable):
                async with conn.pipeline():
                    await conn.execute("INSERT INTO t VALUES (1000)")
                    await conn.execute("SELECT * FROM no_such_table")
            assert await _scalar(conn, "SELECT count(*) FROM t") == 50


async def test_executemany(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        async with conn:
            await conn.execute("CREATE TEMP TABLE t (n int, s text)")
            rows = [(i, "x" * (i % 50)) for i in range(3000)]
            async with conn.transaction():
                await conn.cursor().executemany("INSERT INTO t VALUES (%s, %s)", rows)
            assert await _scalar(conn, "SELECT count(*) FROM t") == 3000
            cur = conn.cursor()
            await cur.executemany(
                "INSERT INTO t VALUES (%s, %s) RETURNING n", rows[:5], returning=True
            )
            got = []
            while True:
                got.append((await cur.fetchone() or (None,))[0])
                if not cur.nextset():
                    break
            assert got == [0, 1, 2, 3, 4]


async def test_copy(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        async with conn:
            await conn.execute("CREATE TEMP TABLE t (n int, s text)")
            cur = conn.cursor()
            async with cur.copy("COPY t FROM STDIN") as copy:
                for i in range(20_000):
                    await copy.write_row((i, f"row {i}"))
            assert await _scalar(conn, "SELECT count(*) FROM t") == 20_000
            out = []
            async with cur.copy("COPY (SELECT n, s FROM t ORDER BY n LIMIT 3) TO STDOUT") as copy:
                async for row in copy.rows():
                    out.append(row)
            assert out == [("0", "row 0"), ("1", "row 1"), ("2", "row 2")]


async def test_notifies_timeout(pg_dsn: str) -> None:
    """psycopg's own notifies() works on Trio: timeout= reaches our wait()."""
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        async with conn:
            ch = _channel()
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
            start = trio.current_time()
            assert [n async for n in conn.notifies(timeout=0.2)] == []
            assert 0.15 <= trio.current_time() - start < 2
            await _notify(pg_dsn, ch, "hello")
            await trio.sleep(0.05)  # let it reach our socket
            got = [n async for n in conn.notifies(timeout=0)]  # 0 polls once
            assert [(n.channel, n.payload) for n in got] == [(ch, "hello")]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_notify, pg_dsn, ch, "again")
                got = [n async for n in conn.notifies(timeout=5, stop_after=1)]
            assert [n.payload for n in got] == ["again"]


async def test_concurrent_use_is_serialized(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        results: list[int] = []

        async def worker(i: int) -> None:
            for _ in range(20):
                results.append(await _scalar(conn, "SELECT %s::int", (i,)))

        async with conn, trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(worker, i)
        assert sorted(results) == sorted(i for i in range(5) for _ in range(20))


async def test_cancel_mid_query_breaks_connection(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        pid = conn.info.backend_pid
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await conn.execute("SELECT pg_sleep(5)")
        assert scope.cancelled_caught
        assert trio.current_time() - start < 0.3 + conn.cancel_timeout
        assert conn.closed and conn.broken
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
        # The server stopped the query (the cancel request), not just lost the client.
        admin = await _connect(pg_dsn)
        async with admin:
            for _ in range(100):
                cur = await admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query LIKE %s"
                    " AND state = 'active'",
                    (pid, "%pg_sleep%"),
                )
                if (await cur.fetchone()) == (0,):
                    break
                await trio.sleep(0.02)
            else:
                pytest.fail("pg_sleep still running after the cancellation")


@pytest.mark.parametrize("flavour", ["pipeline", "copy", "stream"])
async def test_cancel_mid_operation_breaks_connection(pg_dsn: str, flavour: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        await conn.execute("CREATE TEMP TABLE t (s text)")
        with trio.move_on_after(0.2) as scope:
            if flavour == "pipeline":
                async with conn.pipeline():
                    await conn.execute("SELECT 1")
                    await conn.execute("SELECT pg_sleep(5)")
                    await conn.execute("SELECT 2")
            elif flavour == "copy":
                async with conn.cursor().copy("COPY t FROM STDIN") as copy:
                    while True:
                        await copy.write_row(("x" * 1000,))
            else:
                query = "SELECT pg_sleep(0.01) FROM generate_series(1, 1000)"
                async for _ in conn.cursor().stream(query):
                    pass
        assert scope.cancelled_caught
        assert conn.broken


async def test_cancel_inside_transaction_leaves_it_open(pg_dsn: str) -> None:
    """Cancelled between statements: nothing in flight, so the connection isn't broken,
    but it is left inside its transaction, so the pool discards it."""
    with trio.fail_after(DEADLINE):
        async with open_pool(pg_dsn, min_size=1, max_size=1) as pool:
            with trio.move_on_after(0.1):
                async with pool.transaction() as conn:
                    await conn.execute("SELECT 1")
                    await trio.sleep(5)
            assert conn.closed and not conn.broken  # closed by the pool, not broken
            assert pool.statistics().discarded == 1
            async with pool.transaction() as conn2:
                assert conn2 is not conn


async def test_cancel_idle_wait_keeps_connection(pg_dsn: str) -> None:
    """Cancelling a wait with nothing in flight (a LISTEN wait) is harmless."""
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        async with conn:
            await conn.execute("LISTEN some_channel")
            with trio.move_on_after(0.1):
                async for _ in conn.notifies():
                    pass
            assert not conn.closed
            assert await _scalar(conn, "SELECT 7") == 7


def _stuffed_socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair whose first socket is neither readable nor writable."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        while True:
            a.send(b"x" * 65536)
    except BlockingIOError:
        pass
    return a, b


async def test_wait_rw_blocking_path() -> None:
    """The two-task RW wait: wakes on either side; cancels as a plain Cancelled."""
    a, b = _stuffed_socketpair()
    with a, b:
        assert driver._poll_ready(a.fileno(), driver.WAIT_RW) == 0
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, b.send, b"ping")
                ready = await driver._wait_rw(a.fileno())
            assert ready & driver.READY_R
            assert await driver._wait_fd(a.fileno(), driver.WAIT_RW, None) & driver.READY_R
    a, b = _stuffed_socketpair()
    with a, b:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, b.recv, 1 << 22)
                ready = await driver._wait_fd(a.fileno(), driver.WAIT_RW, None)
            assert ready & driver.READY_W
    a, b = _stuffed_socketpair()
    with a, b:
        caught: list[BaseException] = []
        with trio.move_on_after(0.05) as scope:
            try:
                await driver._wait_rw(a.fileno())
            except BaseException as ex:
                caught.append(ex)
                raise
        assert scope.cancelled_caught
        assert [type(ex) for ex in caught] == [trio.Cancelled]
        # With a deadline the wait gives up and reports nothing ready.
        deadline = trio.current_time() + 0.05
        assert await driver._wait_fd(a.fileno(), driver.WAIT_RW, deadline) == 0


async def test_wait_timeout_polls_once(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        async with conn:
            gen = psycopg.generators.notifies(conn.pgconn)
            with pytest.raises(pg_errors._WaitTimeout):
                await conn.wait(gen, timeout=0)
            assert not conn.closed


# -- pool -----------------------------------------------------------------------------


async def test_pool_basic_and_statistics(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_pool(pg_dsn, min_size=1, max_size=2, acquire_timeout=0.2) as pool:
            s = pool.statistics()
            assert (s.size, s.idle, s.in_use, s.created, s.discarded) == (1, 1, 0, 1, 0)
            async with pool.connection() as conn:
                assert conn.autocommit
                assert await _scalar(conn, "SELECT 1") == 1
                assert pool.statistics().in_use == 1
            entered = trio.Event()
            release = trio.Event()

            async def hold() -> None:
                async with pool.connection():
                    entered.set()
                    await release.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await entered.wait()
                async with pool.connection():
                    s = pool.statistics()
                    assert (s.size, s.in_use, s.idle) == (2, 2, 0)
                    assert repr(pool) == "<ConnectionPool [size 2/2: 0 idle, 2 in use, 0 waiting]>"
                    waiter_started = trio.Event()

                    async def third() -> None:
                        waiter_started.set()
                        with pytest.raises(PoolTimeout):
                            async with pool.connection():
                                pass

                    nursery.start_soon(third)
                    await waiter_started.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    assert pool.statistics().waiting == 1
                    await trio.sleep(0.3)  # third times out
                release.set()
            s = pool.statistics()
            assert (s.size, s.idle, s.in_use, s.waiting, s.created) == (2, 2, 0, 0, 2)
        assert pool.closed
        with pytest.raises(PoolClosed):
            async with pool.connection():
                pass


async def test_pool_transaction(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_pool(pg_dsn, min_size=1, max_size=1) as pool:
            table = f"ojs_tx_{uuid.uuid4().hex[:8]}"
            async with pool.connection() as conn:
                await conn.execute(sql.SQL("CREATE TABLE {} (n int)").format(sql.Identifier(table)))
            try:
                async with pool.transaction() as conn:
                    await conn.execute(
                        sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(table))
                    )
                with pytest.raises(KeyError):
                    async with pool.transaction() as conn:
                        await conn.execute(
                            sql.SQL("INSERT INTO {} VALUES (2)").format(sql.Identifier(table))
                        )
                        raise KeyError
                async with pool.connection() as conn:
                    q = sql.SQL("SELECT array_agg(n) FROM {}").format(sql.Identifier(table))
                    assert await _scalar(conn, q.as_string(conn)) == [1]
                assert pool.statistics().discarded == 0  # rolled back cleanly, kept
            finally:
                async with pool.connection() as conn:
                    await conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))


async def test_pool_discards_dirty_connection(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_pool(pg_dsn, min_size=1, max_size=1) as pool:
            async with pool.connection() as conn:
                await conn.execute("BEGIN")
                first = conn.info.backend_pid
            assert pool.statistics().discarded == 1
            async with pool.connection() as conn:
                assert conn.info.backend_pid != first
                assert conn.info.transaction_status == pq.TransactionStatus.IDLE
                conn.row_factory = dict_row  # restored on return
                second = conn.info.backend_pid
            async with pool.connection() as conn:
                assert conn.info.backend_pid == second
                assert await _scalar(conn, "SELECT 1") == 1
                await conn.set_autocommit(False)  # not how the pool hands it out: dropped
            assert pool.statistics().discarded == 2
            async with pool.connection() as conn:
                assert conn.info.backend_pid not in (first, second)
                assert conn.autocommit


async def test_pool_under_churn(pg_dsn: str) -> None:
    """Many tasks, few connections, some cancelled mid-query: the books stay balanced."""
    with trio.fail_after(DEADLINE):
        async with open_pool(pg_dsn, min_size=1, max_size=3) as pool:

            async def worker(i: int) -> None:
                for j in range(10):
                    with trio.move_on_after(0.01 if (i + j) % 7 == 0 else 10):
                        async with pool.connection() as conn:
                            await conn.execute(
                                "SELECT pg_sleep(%s)", (0.05 if (i + j) % 7 == 0 else 0,)
                            )

            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(worker, i)
            # Whether a timeout fell mid-query or while waiting for a connection
            # depends on scheduling; either way the books must balance.
            s = pool.statistics()
            assert (s.in_use, s.waiting) == (0, 0)
            assert s.size == s.idle <= 3
            assert s.created == s.discarded + s.size

            # One cancellation that certainly lands mid-query: the connection is dropped.
            marker = f"churn-{uuid.uuid4().hex}"
            before = pool.statistics().discarded
            async with trio.open_nursery() as nursery:
                cancelled = trio.CancelScope()

                async def sleeper() -> None:
                    with cancelled:
                        async with pool.connection() as conn:
                            await conn.execute(f"SELECT pg_sleep(30) /* {marker} */")

                nursery.start_soon(sleeper)
                watcher = await _connect(pg_dsn)
                try:
                    # Poll the server until the query runs (the outer fail_after bounds it).
                    for _ in range(100_000):
                        if await _scalar(
                            watcher,
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE %s",
                            (f"%{marker}%",),
                        ):
                            break
                        await trio.sleep(0.01)
                finally:
                    await watcher.close()
                cancelled.cancel()
            s = pool.statistics()
            assert s.discarded == before + 1
            assert s.created == s.discarded + s.size
            async with pool.connection() as conn:
                assert await _scalar(conn, "SELECT 1") == 1


async def test_pool_discards_terminated_idle_connection(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_pool(pg_dsn, min_size=1, max_size=2) as pool:
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
            await _terminate(pg_dsn, pid)
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid
                assert await _scalar(conn, "SELECT 1") == 1
            s = pool.statistics()
            assert (s.discarded, s.created, s.size) == (1, 2, 1)


async def test_pool_discards_connection_killed_in_use(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_pool(pg_dsn, min_size=1, max_size=1) as pool:
            with pytest.raises(BackendUnavailable) as info:
                async with map_errors(), pool.connection() as conn:
                    pid = conn.info.backend_pid
                    await _terminate(pg_dsn, pid)
                    await conn.execute("SELECT 1")
            assert isinstance(info.value.__cause__, psycopg.OperationalError)
            assert pool.statistics().discarded == 1
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid
                assert await _scalar(conn, "SELECT 1") == 1


async def test_pool_cancel_mid_query_discards(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_pool(pg_dsn, min_size=1, max_size=1) as pool:
            with trio.move_on_after(0.2):
                async with pool.connection() as conn:
                    pid = conn.info.backend_pid
                    await conn.execute("SELECT pg_sleep(5)")
            assert conn.broken
            s = pool.statistics()
            assert (s.discarded, s.in_use, s.size) == (1, 0, 0)
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid
                assert await _scalar(conn, "SELECT 1") == 1


async def test_pool_lifetime_and_idle_check(pg_dsn: str) -> None:
    checks: list[int] = []

    async def check(conn: TrioConnection) -> None:
        checks.append(conn.info.backend_pid)
        await driver.check_connection(conn)

    with trio.fail_after(DEADLINE):
        async with open_pool(
            pg_dsn, min_size=1, max_size=1, max_lifetime=0.5, check=check, check_idle_after=0.1
        ) as pool:
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
            assert checks == []  # fresh: not idle long enough
            await trio.sleep(0.15)
            async with pool.connection() as conn:
                assert conn.info.backend_pid == pid
            assert checks == [pid]
            await trio.sleep(0.5)
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid  # expired, replaced
            assert pool.statistics().discarded == 1


async def test_pool_failed_check_discards(pg_dsn: str) -> None:
    async def check(conn: TrioConnection) -> None:
        raise psycopg.OperationalError("pretend the link is dead")

    with trio.fail_after(DEADLINE):
        async with open_pool(
            pg_dsn, min_size=1, max_size=1, check=check, check_idle_after=0
        ) as pool:
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
            assert pool.statistics().discarded == 1
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid


async def test_pool_unreachable_is_backend_unavailable() -> None:
    with trio.fail_after(5):
        start = trio.current_time()
        with pytest.raises(BackendUnavailable) as info:
            async with open_pool(f"host=127.0.0.1 port={_dead_port()} user=postgres"):
                pass
        assert trio.current_time() - start < 1.0
        assert isinstance(info.value.__cause__, psycopg.OperationalError)


# -- listener ---------------------------------------------------------------------------


async def test_listener_delivers(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        ch1, ch2 = _channel(), f"Odd Channel-{uuid.uuid4().hex[:6]}"
        async with open_listener(pg_dsn, [ch1, ch2, ch1]) as listener:
            assert listener.channels == (ch1, ch2)
            await _notify(pg_dsn, ch1, "a,b")
            await _notify(pg_dsn, ch2, "ünïcode ✓")
            first = await listener.receive()
            second = await listener.__anext__()
            assert isinstance(first, Notification) and isinstance(second, Notification)
            assert (first.channel, first.payload) == (ch1, "a,b")
            assert (second.channel, second.payload) == (ch2, "ünïcode ✓")
            # A receive cancelled while waiting loses nothing.
            with trio.move_on_after(0.1):
                await listener.receive()
            await _notify(pg_dsn, ch1, "after")
            third = await listener.receive()
            assert isinstance(third, Notification) and third.payload == "after"
            s = listener.statistics()
            assert (s.connected, s.received, s.reconnects, s.pending) == (True, 3, 0, 0)
        with pytest.raises(trio.ClosedResourceError):
            await listener.receive()
        assert [e async for e in listener] == []


async def test_listener_reconnects_after_terminate(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        ch = _channel()
        async with open_listener(pg_dsn, [ch]) as listener:
            pid = listener.backend_pid
            assert pid is not None
            await _notify(pg_dsn, ch, "before")
            await _terminate(pg_dsn, pid)
            events = [await listener.receive(), await listener.receive()]
            # The notification read before the loss still comes first.
            assert isinstance(events[0], Notification) and events[0].payload == "before"
            assert isinstance(events[1], Reconnected) and events[1].attempts == 1
            assert listener.backend_pid not in (None, pid)
            await _notify(pg_dsn, ch, "after")
            event = await listener.receive()
            assert isinstance(event, Notification) and event.payload == "after"
            s = listener.statistics()
            assert s.reconnects == 1 and s.connected and s.last_error is not None


async def test_listener_reconnect_backoff(pg_dsn: str) -> None:
    """While the server is unreachable the listener retries with backoff, then recovers."""
    with trio.fail_after(DEADLINE):
        ch = _channel()
        async with open_listener(pg_dsn, [ch], backoff_initial=0.02, backoff_max=0.1) as listener:
            pid = listener.backend_pid
            assert pid is not None
            listener.conninfo = f"host=127.0.0.1 port={_dead_port()} user=postgres"
            await _terminate(pg_dsn, pid)
            got: list[Any] = []

            async def receive() -> None:
                got.append(await listener.receive())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await _eventually(
                    lambda: "Connection refused" in (listener.statistics().last_error or "")
                )
                await trio.sleep(0.3)
                assert not listener.statistics().connected
                listener.conninfo = pg_dsn
            (event,) = got
            assert isinstance(event, Reconnected) and event.attempts >= 3
            assert event.downtime >= 0.3
            await _notify(pg_dsn, ch, "back")
            event = await listener.receive()
            assert isinstance(event, Notification) and event.payload == "back"


async def test_listener_ping_detects_silent_loss(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        ch = _channel()
        async with open_listener(pg_dsn, [ch], ping_interval=0.1) as listener:
            with trio.move_on_after(0.35):  # a few pings on a healthy link
                await listener.receive()
            assert listener.statistics().reconnects == 0
            assert listener.statistics().connected


async def test_open_listener_unreachable() -> None:
    with trio.fail_after(5), pytest.raises(BackendUnavailable):
        async with open_listener(f"host=127.0.0.1 port={_dead_port()} user=postgres", ["x"]):
            pass


async def test_server_restart(pg_dsn: str) -> None:
    """A real restart of a throwaway cluster: pool and listener both recover."""
    cluster = await trio.to_thread.run_sync(start_throwaway_cluster)
    if isinstance(cluster, str):
        pytest.skip(cluster)
    try:
        with trio.fail_after(60):
            ch = _channel()
            async with (
                open_pool(cluster.dsn, min_size=2, max_size=2) as pool,
                open_listener(cluster.dsn, [ch], backoff_initial=0.05) as listener,
            ):
                await trio.to_thread.run_sync(cluster.stop, "fast")
                with pytest.raises(BackendUnavailable):
                    async with map_errors(), pool.connection() as conn:
                        await conn.execute("SELECT 1")
                await trio.to_thread.run_sync(cluster.start)
                async with pool.connection() as conn:
                    assert await _scalar(conn, "SELECT 1") == 1
                event = await listener.receive()
                assert isinstance(event, Reconnected)
                async with pool.connection() as conn:
                    await conn.execute("SELECT pg_notify(%s, 'up')", (ch,))
                event = await listener.receive()
                assert isinstance(event, Notification) and event.payload == "up"
                assert pool.statistics().discarded == 2
    finally:
        await trio.to_thread.run_sync(cluster.remove)


# -- error mapping ----------------------------------------------------------------------


async def test_error_mapping(pg_dsn: str) -> None:
    with trio.fail_after(DEADLINE):
        conn = await _connect(pg_dsn)
        async with conn:
            with pytest.raises(BackendError) as info:
                async with map_errors():
                    await conn.execute("SELEC 1")
            err = info.value
            assert type(err) is BackendError
            assert isinstance(err.__cause__, pg_errors.SyntaxError)
            assert err.details == {"sqlstate": "42601"}
            assert "SyntaxError" in err.message and "SELEC" not in err.message
            # Statement-level OperationalErrors with a SQLSTATE are not "unavailable".
            with pytest.raises(BackendError) as info:
                async with map_errors():
                    await conn.execute("SET statement_timeout = '50ms'")
                    await conn.execute("SELECT pg_sleep(1)")
            assert type(info.value) is BackendError
            assert isinstance(info.value.__cause__, pg_errors.QueryCanceled)
            assert await _scalar(conn, "SELECT 1") == 1
        # Sync form, and pass-through of non-driver errors.
        with pytest.raises(BackendError), map_errors():
            raise pg_errors.UniqueViolation("dup")
        with pytest.raises(InvalidRequest), map_errors():
            raise InvalidRequest("ours")
        with pytest.raises(KeyError), map_errors():
            raise KeyError("x")


async def test_unreachable_port_is_backend_unavailable_fast() -> None:
    with trio.fail_after(5):
        start = trio.current_time()
        with pytest.raises(BackendUnavailable) as info:
            async with map_errors():
                await TrioConnection.connect(f"host=127.0.0.1 port={_dead_port()} user=postgres")
        assert trio.current_time() - start < 1.0
        assert info.value.http_status == 503 and info.value.retryable
        assert isinstance(info.value.__cause__, psycopg.OperationalError)


def test_is_unavailable_classification() -> None:
    assert is_unavailable(psycopg.OperationalError("connection failed"))
    assert is_unavailable(pg_errors.ConnectionTimeout("timeout"))
    assert is_unavailable(pg_errors.AdminShutdown("terminating connection"))
    assert is_unavailable(pg_errors.CannotConnectNow("starting up"))
    assert is_unavailable(pg_errors.ConnectionFailure("08006"))
    assert not is_unavailable(pg_errors.SerializationFailure("40001"))
    assert not is_unavailable(pg_errors.QueryCanceled("57014"))
    assert not is_unavailable(pg_errors.UniqueViolation("23505"))
    assert isinstance(to_backend_error(pg_errors.AdminShutdown("x")), BackendUnavailable)
    assert to_backend_error(pg_errors.AdminShutdown("x")).details == {"sqlstate": "57P01"}


# -- fixtures ---------------------------------------------------------------------------


def test_fresh_db_is_isolated(fresh_db: str, pg_dsn: str) -> None:
    assert database_of(fresh_db).startswith("ojs_test_")
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE only_here (n int)")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (database_of(fresh_db),)
        ).fetchone()
        assert row == (1,)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_create_template_and_clone(pg_dsn: str, kind: str) -> None:
    def migrate_sync(conn: psycopg.Connection[Any]) -> None:
        conn.execute("CREATE TABLE jobs (id text PRIMARY KEY)")
        conn.execute("INSERT INTO jobs VALUES ('seed')")

    async def migrate_async(conn: TrioConnection) -> None:
        await conn.execute("CREATE TABLE jobs (id text PRIMARY KEY)")
        await conn.execute("INSERT INTO jobs VALUES ('seed')")

    migrate: Callable[..., Any] = migrate_sync if kind == "sync" else migrate_async
    base = f"ojs_tpl_{uuid.uuid4().hex[:8]}"
    name = create_template(pg_dsn, base, migrate, fingerprint="abc123")
    try:
        assert name == f"{base}_abc123"
        assert create_template(pg_dsn, base, _fail_if_called, fingerprint="abc123") == name
        names = []
        for _ in range(2):
            with fresh_database(pg_dsn, name) as dsn:
                names.append(database_of(dsn))
                with psycopg.connect(dsn, autocommit=True) as conn:
                    assert conn.execute("SELECT id FROM jobs").fetchall() == [("seed",)]
                    conn.execute("INSERT INTO jobs VALUES ('mine')")
        assert names[0] != names[1]
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            left = conn.execute(
                "SELECT count(*) FROM pg_database WHERE datname = ANY(%s)", (names,)
            ).fetchone()
            assert left == (0,)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident))


def _fail_if_called(conn: Any) -> None:
    raise AssertionError("template should have been reused")
