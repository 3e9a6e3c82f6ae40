"""Trio-native PostgreSQL driver layer: psycopg 3 driven by Trio's I/O waits.

psycopg 3 is written as a sans-I/O core (generators that yield "wait for the socket
to be readable/writable" and are resumed with what became ready) plus wait functions
for blocking code and for asyncio. :class:`TrioConnection` plugs Trio into the same
hooks, so every psycopg feature that runs on :class:`psycopg.AsyncConnection`
(cursors, transactions, pipelines, ``executemany``, COPY, ``notifies()``) runs on
Trio with no thread and no asyncio loop. On top of it:

* :func:`open_pool` -- a small connection pool (``pool.connection()``,
  ``pool.transaction()``, ``statistics()``);
* :func:`open_listener` -- a dedicated LISTEN connection yielding
  :class:`Notification` events and a :class:`Reconnected` event whenever it had to
  reconnect (so the caller re-polls for anything it missed);
* :func:`map_errors` -- the boundary that turns psycopg errors into
  :class:`~ojs_trio.engine.errors.BackendError` /
  :class:`~ojs_trio.engine.errors.BackendUnavailable`.

Private psycopg hooks relied on, guarded by
``tests/test_pg_driver.py::test_psycopg_private_hooks``; pyproject.toml pins
``psycopg>=3.3.9,<3.4`` (the 3.3 line from the release tested, not ``~=3.3``, which
would allow 3.4 and later: private hooks may change in any release):
``AsyncConnection.wait``, ``BaseConnection._connect_gen`` / ``_cancel_gen`` /
``_should_cancel``, the ``lock`` attribute, ``_autocommit`` / ``_adapters`` set after
connecting, ``_closed``, ``psycopg.generators.notifies``, ``psycopg.waiting._ready``
(optional, with a ``poll()`` fallback) and ``psycopg.errors._WaitTimeout``.

Cancellation follows Trio's stream convention: a Trio cancellation (or Ctrl-C) that
interrupts a command in flight sends a cancel request to the server (bounded by
:attr:`TrioConnection.cancel_timeout`, shielded) and then closes the connection, which
becomes ``broken``; the pool discards it. Interrupting a wait with nothing in flight
(e.g. waiting for notifications) leaves the connection usable.
"""

from __future__ import annotations

import logging
import math
import os
import random
import select
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import psycopg
import trio
from psycopg import errors as pg_errors
from psycopg import generators, pq, sql, waiting
from psycopg.abc import AdaptContext, ConnParam, PQGen, PQGenConn
from psycopg.adapt import AdaptersMap
from psycopg.conninfo import (
    conninfo_attempts,
    make_conninfo,
    timeout_from_conninfo,
)
from psycopg.cursor_async import AsyncCursor
from psycopg.pq.abc import PGconn
from psycopg.rows import AsyncRowFactory, tuple_row

from ojs_trio.engine.errors import BackendError, BackendUnavailable
from ojs_trio.storage.errormap import ErrorMapper, exception_leaves

__all__ = [
    "ConnectionLock",
    "ConnectionPool",
    "Listener",
    "ListenerEvent",
    "ListenerStatistics",
    "Notification",
    "PoolClosed",
    "PoolStatistics",
    "PoolTimeout",
    "Reconnected",
    "TrioConnection",
    "check_connection",
    "is_unavailable",
    "map_errors",
    "open_listener",
    "open_pool",
    "to_backend_error",
]

logger = logging.getLogger("ojs_trio.storage.postgres")

_T = TypeVar("_T")

WAIT_R: Final = waiting.Wait.R
WAIT_W: Final = waiting.Wait.W
WAIT_RW: Final = waiting.Wait.RW
READY_R: Final = waiting.Ready.R
READY_W: Final = waiting.Ready.W

_ACTIVE: Final = pq.TransactionStatus.ACTIVE
_IDLE: Final = pq.TransactionStatus.IDLE
_CONN_OK: Final = pq.ConnStatus.OK
_PIPELINE_OFF: Final = pq.PipelineStatus.OFF

# How long a run of waits that never block may keep Trio's scheduler from running
# other tasks (a long executemany() or copy() is such a run); psycopg's asyncio path
# uses the same 5 ms budget.
MAX_BUSY_TIME: Final = 0.005
_last_yield = 0.0


# --------------------------------------------------------------------------------------
# Waiting on the libpq socket
# --------------------------------------------------------------------------------------


def _poll_ready(fileno: int, wait: int) -> int:
    """Return the ready state of ``fileno`` right now (zero-timeout ``poll()``)."""
    mask = (select.POLLIN if wait & WAIT_R else 0) | (select.POLLOUT if wait & WAIT_W else 0)
    poller = select.poll()
    poller.register(fileno, mask)
    ready = 0
    for _fd, ev in poller.poll(0):
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            ready |= READY_R
        if ev & select.POLLOUT:
            ready |= READY_W
    return ready


def _native_ready() -> Callable[[int, int], int]:
    """psycopg's own zero-timeout readiness check (C, via ``poll()``) when present."""
    fn = getattr(waiting, "_ready", None)
    return fn if callable(fn) else _poll_ready


_ready_now: Callable[[int, int], int] = _native_ready()


async def _maybe_yield() -> None:
    """Let other tasks run if this task has been busy for too long without blocking."""
    global _last_yield
    # time.monotonic(), not trio.current_time(): the budget is wall time, shared by
    # every trio.run() in the process (each run's clock has its own offset).
    if time.monotonic() - _last_yield >= MAX_BUSY_TIME:
        await trio.lowlevel.checkpoint()
        _last_yield = time.monotonic()


def _mark_yield() -> None:
    global _last_yield
    _last_yield = time.monotonic()


async def _wait_rw(fileno: int) -> int:
    """Block until ``fileno`` is readable or writable; return what is ready.

    Trio parks a task on one fd event at a time, so waiting on both needs two tasks.
    This only runs when a zero-timeout poll found neither ready (the kernel send
    buffer is full and the server has nothing for us yet), which is rare; the common
    RW waits (pipeline and flush rounds) are answered by the poll alone.
    """
    ready = 0
    failure: BaseException | None = None

    async def waiter(
        fn: Callable[[int], Awaitable[None]], flag: int, scope: trio.CancelScope
    ) -> None:
        nonlocal ready, failure
        try:
            await fn(fileno)
        except trio.Cancelled:
            raise
        except Exception as ex:
            failure = ex
        else:
            ready |= flag
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(waiter, trio.lowlevel.wait_readable, READY_R, scope)
            nursery.start_soon(waiter, trio.lowlevel.wait_writable, READY_W, scope)
    except BaseExceptionGroup as group:
        # Only Cancelled from an enclosing scope can get here: surface one plain
        # Cancelled rather than a group, so callers (and psycopg) see the usual type.
        raise _collapse_cancelled(group) from None
    if failure is not None:
        raise failure
    return ready


def _collapse_cancelled(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves = list(exception_leaves(group))
    if all(isinstance(leaf, trio.Cancelled) for leaf in leaves):
        return leaves[0]
    return group


async def _wait_fd(fileno: int, s: int, deadline: float | None) -> int:
    """Wait until ``fileno`` is ready for ``s``; return the ready state (0 on timeout)."""
    if s == WAIT_R:
        # A generator only asks to read when libpq has found nothing to read, so
        # polling first would be a wasted syscall.
        if deadline is None:
            await trio.lowlevel.wait_readable(fileno)
            _mark_yield()
            return READY_R
    elif ready := _ready_now(fileno, s):
        # A socket asked for writing is nearly always writable: answer without a trip
        # through the scheduler (but don't starve it).
        await _maybe_yield()
        return ready
    if s != WAIT_R and s != WAIT_W and s != WAIT_RW:
        raise pg_errors.InternalError(f"bad poll status: {s}")

    with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
        if s == WAIT_R:
            await trio.lowlevel.wait_readable(fileno)
            ready = READY_R
        elif s == WAIT_W:
            await trio.lowlevel.wait_writable(fileno)
            ready = READY_W
        else:
            ready = await _wait_rw(fileno)
    _mark_yield()
    if scope.cancelled_caught:
        # The deadline expired: report whatever is ready now (so a zero timeout
        # still polls once), else nothing.
        return _ready_now(fileno, s)
    return ready


async def _wait_gen(gen: PQGen[_T], fileno: int, deadline: float | None) -> _T:
    """Drive a psycopg query generator to completion on ``fileno``."""
    try:
        s = next(gen)
        while True:
            ready = await _wait_fd(fileno, s, deadline)
            if not ready:
                raise pg_errors._WaitTimeout("wait timeout expired")
            s = gen.send(ready)
    except StopIteration as ex:
        rv: _T = ex.value
        return rv


async def _wait_conn_gen(gen: PQGenConn[_T], deadline: float | None) -> _T:
    """Drive a psycopg connection generator (whose fd may change) to completion."""
    try:
        fileno, s = next(gen)
        while True:
            ready = await _wait_fd(fileno, s, deadline)
            if not ready:
                raise pg_errors._WaitTimeout("wait timeout expired")
            fileno, s = gen.send(ready)
    except StopIteration as ex:
        rv: _T = ex.value
        return rv
    finally:
        gen.close()


def _is_interrupt(exc: BaseException) -> bool:
    return all(
        isinstance(leaf, trio.Cancelled | KeyboardInterrupt) for leaf in exception_leaves(exc)
    )


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else trio.current_time() + max(0.0, timeout)


# --------------------------------------------------------------------------------------
# Host name resolution
# --------------------------------------------------------------------------------------


def _param(params: Mapping[str, Any], name: str, env: str) -> str:
    value = params.get(name)
    if value is None:
        value = os.environ.get(env)
    return "" if value is None else str(value)


def _needs_dns(params: Mapping[str, Any]) -> bool:
    """Whether splitting ``params`` into attempts would call ``getaddrinfo()``.

    psycopg resolves a ``host`` that is neither an IP address nor a socket directory
    unless ``hostaddr`` is given. Being wrong in the "yes" direction only costs a
    thread hop, so anything unusual counts as "yes".
    """
    if _param(params, "hostaddr", "PGHOSTADDR"):
        return False
    for host in _param(params, "host", "PGHOST").split(","):
        if not host or host.startswith("/") or host[1:2] == ":":
            continue
        try:
            ip_address(host)
        except ValueError:
            return True
    return False


async def _connection_attempts(params: dict[str, Any]) -> list[dict[str, Any]]:
    if _needs_dns(params):
        # psycopg's sync splitter resolves names with a blocking getaddrinfo() (as
        # trio.socket.getaddrinfo() would, in a thread too); keep it off the loop.
        return await trio.to_thread.run_sync(conninfo_attempts, params, abandon_on_cancel=True)
    return conninfo_attempts(params)


# --------------------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------------------


class ConnectionLock:
    """The connection's lock: a :class:`trio.Lock` with a cheaper uncontended path.

    psycopg takes ``conn.lock`` around every command. ``trio.Lock.acquire()`` always
    passes through the scheduler, even when the lock is free; here a free lock is
    taken after only a cancellation check, and the command's own socket wait
    provides the schedule point. A contended lock waits in the ``trio.Lock``, fairly.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        if self._lock.locked():
            await self._lock.acquire()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self) -> trio.LockStatistics:
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()


class TrioConnection(psycopg.AsyncConnection[Any]):
    """A :class:`psycopg.AsyncConnection` whose waits run on Trio.

    Use it like psycopg's async connection, under Trio::

        conn = await TrioConnection.connect("host=127.0.0.1 dbname=test", autocommit=True)
        async with conn:
            rows = await (await conn.execute("SELECT 1")).fetchall()

    Differences from asyncio psycopg: ``conn.lock`` is a :class:`ConnectionLock` (a
    :class:`trio.Lock` inside); host names are resolved in a Trio worker thread; a
    Trio cancellation that interrupts a command in flight cancels it on the server and
    then closes the connection (``conn.broken`` becomes true). The COPY queued writer
    (``psycopg.copy.AsyncQueuedLibpqWriter``) needs asyncio and is not supported; the
    default COPY writer works.
    """

    #: Seconds a cancelled query may spend (shielded) asking the server to stop it.
    cancel_timeout: float = 2.0

    def __init__(
        self,
        pgconn: PGconn,
        row_factory: AsyncRowFactory[Any] = tuple_row,
    ) -> None:
        super().__init__(pgconn, row_factory)
        self.lock = ConnectionLock()  # type: ignore[assignment]

    @classmethod
    async def connect(
        cls,
        conninfo: str = "",
        *,
        autocommit: bool = False,
        prepare_threshold: int | None = 5,
        context: AdaptContext | None = None,
        row_factory: AsyncRowFactory[Any] | None = None,
        cursor_factory: type[AsyncCursor[Any]] | None = None,
        **kwargs: ConnParam,
    ) -> Self:
        """Connect to a server and return a new connection (same API as psycopg)."""
        params = await cls._get_connection_params(conninfo, **kwargs)
        timeout = timeout_from_conninfo(params)
        attempts = await _connection_attempts(params)
        failures: list[tuple[psycopg.Error, str]] = []
        rv: Self | None = None
        for attempt in attempts:
            descr = "host: {!r}, port: {!r}, hostaddr: {!r}".format(
                attempt.get("host"), attempt.get("port"), attempt.get("hostaddr")
            )
            try:
                gen = cls._connect_gen(make_conninfo("", **attempt))
                rv = await _wait_conn_gen(gen, _deadline(timeout))
            except pg_errors._WaitTimeout:
                failures.append((pg_errors.ConnectionTimeout("connection timeout expired"), descr))
            except psycopg.Error as ex:
                failures.append((ex, descr))
            else:
                break
        if rv is None:
            last = failures[-1][0]
            if len(failures) == 1:
                raise last.with_traceback(None)
            lines = [str(last), "Multiple connection attempts failed. All failures were:"]
            lines.extend(f"- {descr}: {error}" for error, descr in failures)
            raise type(last)("\n".join(lines)).with_traceback(None)

        rv._autocommit = bool(autocommit)
        if row_factory:
            rv.row_factory = row_factory
        if cursor_factory:
            rv.cursor_factory = cursor_factory
        if context:
            rv._adapters = AdaptersMap(context.adapters)
        rv.prepare_threshold = prepare_threshold
        return rv

    async def wait(
        self,
        gen: PQGen[_T],
        interval: float = 0.1,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature)
    ) -> _T:
        """Consume a generator operating on the connection, waiting with Trio.

        ``interval`` is accepted for compatibility and ignored: Trio wakes the task
        when the socket is ready, on cancellation and on Ctrl-C. Raise
        ``psycopg.errors._WaitTimeout`` if ``gen`` doesn't complete within ``timeout``
        seconds (``notifies(timeout=...)`` relies on it).
        """
        deadline = _deadline(timeout)
        fileno = self.pgconn.socket
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            return await _wait_gen(gen, fileno, deadline)
        except (OSError, trio.ClosedResourceError) as ex:
            # The fd was closed under us (e.g. close() from another task).
            raise pg_errors.OperationalError(f"connection socket unusable: {ex}") from ex
        except BaseException as ex:
            if _is_interrupt(ex):
                await self._abort_in_flight()
            raise

    async def _abort_in_flight(self) -> None:
        """A wait was interrupted: if a command is in flight, stop it and drop the link.

        The generator can't be resumed after the interruption (Trio cancellation is
        level-triggered, so any further wait in this scope would be cancelled too),
        and the protocol state is then unknown; so the server is asked to cancel the
        command -- which otherwise keeps running and holding its locks -- and the
        connection is closed. With nothing in flight the connection stays usable.
        """
        pgconn = self.pgconn
        if pgconn.status != _CONN_OK:
            return
        if pgconn.transaction_status != _ACTIVE and pgconn.pipeline_status == _PIPELINE_OFF:
            return
        with trio.move_on_after(self.cancel_timeout, shield=True):
            await self._try_cancel(timeout=self.cancel_timeout)
        self._break()

    def _break(self) -> None:
        """Close the libpq connection now, leaving ``closed`` and ``broken`` true."""
        self._notify_closing()
        self.pgconn.finish()

    def _notify_closing(self) -> None:
        try:
            fileno = self.pgconn.socket
        except psycopg.Error:
            return
        trio.lowlevel.notify_closing(fileno)

    async def close(self) -> None:
        """Close the connection; a task waiting on it gets ``OperationalError``."""
        if self.closed:
            return
        self._notify_closing()
        await super().close()

    def _close_now(self) -> None:
        """What :meth:`close` does, synchronously (so it is safe in cancelled code)."""
        if self.closed:
            return
        self._notify_closing()
        self._closed = True
        self.pgconn.finish()

    async def cancel_safe(self, *, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Ask the server to cancel the current command, waiting with Trio.

        With libpq >= 17 the cancel request is sent without blocking; otherwise the
        blocking ``PQcancel`` runs in a worker thread. Raise
        ``psycopg.errors.CancellationTimeout`` after ``timeout`` seconds.
        """
        if not self._should_cancel():
            return
        if psycopg.capabilities.has_cancel_safe():
            try:
                await _wait_conn_gen(self._cancel_gen(), _deadline(timeout or None))
            except pg_errors._WaitTimeout:
                raise pg_errors.CancellationTimeout("cancellation timeout expired") from None
        else:
            with trio.move_on_after(timeout or math.inf) as scope:
                await trio.to_thread.run_sync(self.cancel, abandon_on_cancel=True)
            if scope.cancelled_caught:
                raise pg_errors.CancellationTimeout("cancellation timeout expired")

    async def _try_cancel(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        try:
            await self.cancel_safe(timeout=timeout)
        except Exception as ex:
            logger.warning("query cancellation failed: %s", ex)


# --------------------------------------------------------------------------------------
# Error mapping
# --------------------------------------------------------------------------------------

# SQLSTATEs after which the server is gone or refuses us: 08xxx is the connection
# exception class; 57P01-57P03 admin/crash shutdown and "cannot connect now" (a
# restart in progress); 57P05/25P03 idle timeouts close the session; 53300 is
# "too many connections".
_UNAVAILABLE_SQLSTATES: Final = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03", "53300"})


def is_unavailable(exc: psycopg.Error) -> bool:
    """Whether ``exc`` means "PostgreSQL can't be reached" rather than "this failed".

    Client-side failures (no SQLSTATE: refused or lost connections, timeouts, a closed
    connection) and the SQLSTATEs of shutdowns and restarts count. Other
    ``OperationalError``\\ s that carry a SQLSTATE (serialization failures,
    deadlocks, lock timeouts, statement timeouts, disk full) do not: the server
    answered, the statement failed.
    """
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return isinstance(exc, psycopg.OperationalError) or (
            exc.pgconn is not None and exc.pgconn.status != _CONN_OK
        )
    return sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES


def to_backend_error(exc: psycopg.Error) -> BackendError:
    """Translate a psycopg error into our :class:`BackendError` family.

    The message names the error class and SQLSTATE only: driver messages may quote
    row values or server addresses, and OJS errors reach clients. The original error
    stays available as ``__cause__`` when raised through :func:`map_errors`.
    """
    sqlstate = exc.sqlstate
    details: dict[str, Any] = {"sqlstate": sqlstate} if sqlstate else {}
    what = type(exc).__name__ + (f", SQLSTATE {sqlstate}" if sqlstate else "")
    if is_unavailable(exc):
        return BackendUnavailable(f"PostgreSQL is unavailable ({what})", details=details)
    return BackendError(f"PostgreSQL error ({what})", details=details)


def map_errors() -> ErrorMapper[psycopg.Error]:
    """Map psycopg errors raised in the block to our backend errors (sync or async).

    ::

        async with map_errors():
            await conn.execute(...)

        with map_errors():
            sync_conn.execute(...)

    ``psycopg.Error`` becomes :class:`BackendUnavailable` (see :func:`is_unavailable`)
    or :class:`BackendError`, chained from the original (``__cause__``). Our own
    ``OjsError``\\ s and everything else pass through unchanged, so blocks can nest.
    """
    return ErrorMapper(psycopg.Error, to_backend_error)


# --------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------


class PoolTimeout(BackendUnavailable):
    """No pooled connection became free within the acquire timeout."""

    hint = "All database connections are busy; retry later or raise the pool's max_size."


class PoolClosed(BackendUnavailable):
    """The pool has been closed."""


async def check_connection(conn: TrioConnection) -> None:
    """Default pool health check: one empty-query round trip."""
    await conn.execute("")


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a :class:`ConnectionPool` (see :meth:`ConnectionPool.statistics`)."""

    min_size: int
    max_size: int
    size: int
    """Open connections: ``idle + in_use``."""
    idle: int
    in_use: int
    """Connections checked out (including ones being opened or checked for a caller)."""
    waiting: int
    """Tasks waiting for a free slot."""
    created: int
    discarded: int
    """Connections closed by the pool because they were broken, dirty or too old."""
    connect_errors: int


@dataclass(slots=True)
class _Pooled:
    conn: TrioConnection
    expires_at: float
    last_used: float
    # Connection-level settings as configured, checked or restored on return.
    autocommit: bool
    row_factory: AsyncRowFactory[Any]


class ConnectionPool:
    """A bounded pool of :class:`TrioConnection`; build it with :func:`open_pool`."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int,
        max_size: int,
        max_lifetime: float,
        max_idle: float,
        check: Callable[[TrioConnection], Awaitable[None]] | None,
        check_idle_after: float,
        check_timeout: float,
        acquire_timeout: float | None,
        cancel_timeout: float,
        configure: Callable[[TrioConnection], Awaitable[None]] | None,
        connect_kwargs: Mapping[str, Any],
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(
                f"need 0 <= min_size <= max_size and max_size >= 1, got {min_size}, {max_size}"
            )
        self.conninfo = conninfo
        self.min_size = min_size
        self.max_size = max_size
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.check_idle_after = check_idle_after
        self.check_timeout = check_timeout
        self.acquire_timeout = acquire_timeout
        self.cancel_timeout = cancel_timeout
        self._check = check
        self._configure = configure
        self._connect_kwargs = dict(connect_kwargs)
        self._slots = trio.Semaphore(max_size)
        self._idle: deque[_Pooled] = deque()  # most recently used on the right
        self._in_use = 0
        self._waiting = 0
        self._created = 0
        self._discarded = 0
        self._connect_errors = 0
        self._closed = False

    # -- public API --------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[TrioConnection]:
        """Check out a connection for the duration of the block.

        The connection comes back to the pool afterwards if it is healthy and idle
        (``IDLE`` transaction status, no pipeline, autocommit as configured), with its
        ``row_factory`` reset; a closed or broken one, or one left inside a
        transaction, is closed and replaced on demand. Leave other session state
        (``SET``, temp tables) as you found it, or use ``SET LOCAL``. Raise
        :class:`PoolTimeout`, :class:`PoolClosed`, or :class:`BackendUnavailable`
        when no connection can be opened. Errors raised in the block pass through
        unchanged (wrap the block in :func:`map_errors`).
        """
        await self._acquire_slot()
        self._in_use += 1
        pooled: _Pooled | None = None
        try:
            pooled = await self._get()
            yield pooled.conn
        finally:
            self._in_use -= 1
            if pooled is not None:
                self._put_back(pooled)
            self._slots.release()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[TrioConnection]:
        """Check out a connection and run the block in a transaction on it.

        Commit when the block exits normally, roll back when it raises; a
        cancelled block leaves the transaction open and the connection is discarded.
        """
        async with self.connection() as conn, conn.transaction():
            yield conn

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            min_size=self.min_size,
            max_size=self.max_size,
            size=len(self._idle) + self._in_use,
            idle=len(self._idle),
            in_use=self._in_use,
            waiting=self._waiting,
            created=self._created,
            discarded=self._discarded,
            connect_errors=self._connect_errors,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Close idle connections now and checked-out ones when they come back."""
        self._closed = True
        while self._idle:
            self._idle.pop().conn._close_now()
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        s = self.statistics()
        state = "closed" if self._closed else f"size {s.size}/{s.max_size}"
        return f"<ConnectionPool [{state}: {s.idle} idle, {s.in_use} in use, {s.waiting} waiting]>"

    # -- internals ---------------------------------------------------------------------

    async def _open(self) -> None:
        for _ in range(self.min_size):
            self._idle.append(await self._new())

    async def _acquire_slot(self) -> None:
        if self._closed:
            raise PoolClosed("the connection pool is closed")
        if self._slots.value:
            # A free slot implies nobody is queued (Semaphore.release() hands its
            # token to a waiter directly): take it without a trip through the scheduler.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._slots.acquire_nowait()
            return
        self._waiting += 1
        try:
            limit = math.inf if self.acquire_timeout is None else self.acquire_timeout
            with trio.move_on_after(limit) as scope:
                await self._slots.acquire()
        finally:
            self._waiting -= 1
        if scope.cancelled_caught:
            raise PoolTimeout(
                f"no database connection free within {self.acquire_timeout:g} s",
                details={"max_size": self.max_size},
            )
        if self._closed:
            self._slots.release()
            raise PoolClosed("the connection pool is closed")

    async def _new(self) -> _Pooled:
        try:
            conn = await TrioConnection.connect(self.conninfo, **self._connect_kwargs)
        except psycopg.Error as ex:
            self._connect_errors += 1
            raise to_backend_error(ex) from ex
        conn.cancel_timeout = self.cancel_timeout
        try:
            if self._configure is not None:
                await self._configure(conn)
        except BaseException:
            self._discarded += 1
            await conn.close()
            raise
        self._created += 1
        now = trio.current_time()
        # Spread expiries over the last 10% of the lifetime so that connections opened
        # together don't all reconnect together.
        expires = now + self.max_lifetime * (1.0 - 0.1 * random.random())
        return _Pooled(
            conn,
            expires_at=expires,
            last_used=now,
            autocommit=conn.autocommit,
            row_factory=conn.row_factory,
        )

    async def _get(self) -> _Pooled:
        while self._idle:
            pooled = self._idle.pop()
            try:
                usable = await self._usable(pooled)
            except BaseException:
                self._discard(pooled.conn)
                raise
            if usable:
                return pooled
            self._discard(pooled.conn)
        return await self._new()

    async def _usable(self, pooled: _Pooled) -> bool:
        conn = pooled.conn
        now = trio.current_time()
        if now >= pooled.expires_at or not _idle_socket_ok(conn):
            return False
        if self._check is not None and now - pooled.last_used >= self.check_idle_after:
            failed: Exception | None = None
            with trio.move_on_after(self.check_timeout) as scope:
                try:
                    await self._check(conn)
                except Exception as ex:
                    failed = ex
            if failed is not None or scope.cancelled_caught or not _clean(conn):
                logger.info("discarding a pooled connection that failed its check: %r", failed)
                return False
        return True

    def _put_back(self, pooled: _Pooled) -> None:
        conn = pooled.conn
        now = trio.current_time()
        if (
            self._closed
            or not _clean(conn)
            or now >= pooled.expires_at
            or conn.autocommit != pooled.autocommit
        ):
            self._discard(conn)
            return
        conn.row_factory = pooled.row_factory
        pooled.last_used = now
        self._idle.append(pooled)
        # Trim connections idle for too long, oldest first, down to min_size.
        while len(self._idle) > self.min_size and now - self._idle[0].last_used > self.max_idle:
            self._discard(self._idle.popleft().conn)

    def _discard(self, conn: TrioConnection) -> None:
        self._discarded += 1
        conn._close_now()


def _clean(conn: TrioConnection) -> bool:
    """Whether a returned connection can be reused as is."""
    pgconn = conn.pgconn
    return (
        pgconn.status == _CONN_OK
        and pgconn.transaction_status == _IDLE
        and pgconn.pipeline_status == _PIPELINE_OFF
        and conn._pipeline is None
    )


def _idle_socket_ok(conn: TrioConnection) -> bool:
    """Cheap liveness test of an idle connection: a zero-timeout poll or two.

    An idle connection has nothing to read unless the server closed it (after a
    FATAL such as "terminating connection due to administrator command", or a
    restart) or sent something asynchronous (a notice, a parameter change). Read
    what is there: a closed link shows up as an error by the second read (the first
    one may only get the FATAL message).
    """
    if not _clean(conn):
        return False
    pgconn = conn.pgconn
    try:
        fileno = pgconn.socket
        for _ in range(3):
            if not _ready_now(fileno, WAIT_R):
                return pgconn.status == _CONN_OK and not pgconn.is_busy()
            pgconn.consume_input()
    except psycopg.Error:
        return False
    return False  # still more to read: something is wrong, don't trust it


@asynccontextmanager
async def open_pool(
    conninfo: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    max_lifetime: float = 3600.0,
    max_idle: float = 600.0,
    check: Callable[[TrioConnection], Awaitable[None]] | None = check_connection,
    check_idle_after: float = 30.0,
    check_timeout: float = 5.0,
    acquire_timeout: float | None = 30.0,
    cancel_timeout: float = 2.0,
    autocommit: bool = True,
    configure: Callable[[TrioConnection], Awaitable[None]] | None = None,
    connect_kwargs: Mapping[str, Any] | None = None,
) -> AsyncIterator[ConnectionPool]:
    """Open a pool of Trio connections to ``conninfo``.

    ``min_size`` connections are opened before the block starts (raising
    :class:`BackendUnavailable` if that fails); more are opened on demand, up to
    ``max_size``. A connection is replaced after ``max_lifetime`` seconds (minus up to
    10% jitter), and an idle one beyond ``min_size`` after ``max_idle`` seconds. On
    checkout, an idle connection gets a zero-cost liveness poll, and ``check`` (a
    round trip by default) runs when it has been idle for ``check_idle_after``
    seconds or more. ``configure`` runs once on each new connection. Connections are
    in autocommit mode unless ``autocommit=False``; ``connect_kwargs`` go to
    :meth:`TrioConnection.connect`.
    """
    kwargs = {"autocommit": autocommit, **(connect_kwargs or {})}
    pool = ConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        max_lifetime=max_lifetime,
        max_idle=max_idle,
        check=check,
        check_idle_after=check_idle_after,
        check_timeout=check_timeout,
        acquire_timeout=acquire_timeout,
        cancel_timeout=cancel_timeout,
        configure=configure,
        connect_kwargs=kwargs,
    )
    try:
        await pool._open()
        yield pool
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()


# --------------------------------------------------------------------------------------
# The listener
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    """A NOTIFY received on one of the listener's channels."""

    channel: str
    payload: str
    pid: int
    """Server process id of the notifying session."""


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The listener lost its connection and is LISTENing again on a new one.

    Notifications sent while it was disconnected are lost: re-poll whatever they
    would have announced. ``downtime`` is the time since the loss was noticed and
    ``attempts`` the number of connection attempts it took.
    """

    attempts: int
    downtime: float


ListenerEvent = Notification | Reconnected


@dataclass(frozen=True)
class ListenerStatistics:
    channels: tuple[str, ...]
    connected: bool
    received: int
    pending: int
    reconnects: int
    last_error: str | None


class Listener:
    """A dedicated LISTEN connection; build it with :func:`open_listener`.

    Iterate it (or call :meth:`receive`) to get :class:`Notification` and
    :class:`Reconnected` events in order. The connection is read only while a task
    waits in :meth:`receive`; meanwhile notifications queue up in the server and the
    socket, so none is lost between calls. Cancelling a :meth:`receive` (e.g. a
    ``move_on_after`` poll fallback) is safe. If the connection is lost, the next
    :meth:`receive` reconnects with exponential backoff (forever, until cancelled),
    LISTENs again and returns a :class:`Reconnected` event. An idle connection is
    pinged every ``ping_interval`` seconds so a silently dead link is noticed.
    """

    def __init__(
        self,
        conninfo: str,
        channels: Iterable[str],
        *,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.channels = tuple(dict.fromkeys(channels))
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._connect_kwargs = {**(connect_kwargs or {}), "autocommit": True}
        self._conn: TrioConnection | None = None
        self._events: deque[ListenerEvent] = deque()
        self._guard = trio.Lock()
        self._closed = False
        self._received = 0
        self._reconnects = 0
        self._lost_at: float | None = None
        self._last_error: str | None = None
        self._last_traffic = 0.0

    # -- public API --------------------------------------------------------------------

    async def receive(self) -> ListenerEvent:
        """Wait for the next event. Raise :class:`trio.ClosedResourceError` once closed."""
        if self._guard.locked():
            raise trio.BusyResourceError("another task is already receiving")
        async with self._guard:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the listener is closed")
                if self._events:
                    await trio.lowlevel.checkpoint()
                    return self._events.popleft()
                conn = self._conn
                if conn is None or conn.closed:
                    await self._reconnect()
                    continue
                await self._read(conn)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ListenerEvent:
        try:
            return await self.receive()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None

    def statistics(self) -> ListenerStatistics:
        conn = self._conn
        return ListenerStatistics(
            channels=self.channels,
            connected=conn is not None and not conn.closed,
            received=self._received,
            pending=len(self._events),
            reconnects=self._reconnects,
            last_error=self._last_error,
        )

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the current LISTEN connection, if connected."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn._close_now()
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        s = self.statistics()
        state = "closed" if self._closed else "connected" if s.connected else "disconnected"
        return f"<Listener [{state}, channels {list(s.channels)}, {s.pending} pending]>"

    # -- internals ---------------------------------------------------------------------

    def _on_notify(self, n: psycopg.Notify) -> None:
        self._received += 1
        self._events.append(Notification(n.channel, n.payload, n.pid))

    async def _connect(self) -> TrioConnection:
        conn = await TrioConnection.connect(self.conninfo, **self._connect_kwargs)
        conn.cancel_timeout = min(conn.cancel_timeout, self.ping_timeout)
        try:
            conn.add_notify_handler(self._on_notify)
            for channel in self.channels:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._last_traffic = trio.current_time()
        return conn

    async def _reconnect(self) -> None:
        lost_at = self._lost_at if self._lost_at is not None else trio.current_time()
        attempts = 0
        delay = self.backoff_initial
        while True:
            attempts += 1
            mark = len(self._events)
            try:
                await self._connect()
            except psycopg.Error as ex:
                self._last_error = f"{type(ex).__name__}: {ex}"
                logger.warning(
                    "LISTEN connection attempt %d failed (%s); retrying in %.2f s",
                    attempts,
                    type(ex).__name__,
                    delay,
                )
                await trio.sleep(delay * (0.5 + 0.5 * random.random()))
                delay = min(self.backoff_max, delay * 2)
                continue
            break
        self._reconnects += 1
        self._lost_at = None
        downtime = trio.current_time() - lost_at
        logger.info("LISTEN connection re-established after %.3f s", downtime)
        # Notifications that arrived on the old connection come first; ones that
        # arrived while re-LISTENing follow the Reconnected marker.
        self._events.insert(mark, Reconnected(attempts=attempts, downtime=downtime))

    def _lost(self, conn: TrioConnection, ex: BaseException) -> None:
        self._last_error = f"{type(ex).__name__}: {ex}"
        if self._lost_at is None:
            self._lost_at = trio.current_time()
        if self._closed:
            return
        logger.warning("LISTEN connection lost (%s); reconnecting", self._last_error)
        if not conn.closed:
            conn._break()

    async def _read(self, conn: TrioConnection) -> None:
        """Wait for traffic on the connection, or ping it when it has been quiet."""
        ping_at = self._last_traffic + self.ping_interval
        try:
            if trio.current_time() < ping_at:
                with trio.move_on_at(ping_at):
                    async with conn.lock:
                        await conn.wait(generators.notifies(conn.pgconn))
                    self._last_traffic = trio.current_time()
                return
            with trio.move_on_after(self.ping_timeout) as scope:
                await conn.execute("SELECT 1")
            if scope.cancelled_caught:
                raise pg_errors.OperationalError("ping timed out")
            self._last_traffic = trio.current_time()
        except psycopg.Error as ex:
            if self._closed:
                raise trio.ClosedResourceError("the listener is closed") from None
            self._lost(conn, ex)


@asynccontextmanager
async def open_listener(
    conninfo: str,
    channels: Iterable[str],
    *,
    backoff_initial: float = 0.1,
    backoff_max: float = 5.0,
    ping_interval: float = 30.0,
    ping_timeout: float = 10.0,
    connect_kwargs: Mapping[str, Any] | None = None,
) -> AsyncIterator[Listener]:
    """Open a dedicated connection LISTENing on ``channels``.

    The first connection is made before the block starts (raising
    :class:`BackendUnavailable` if that fails), so every NOTIFY committed after
    entering the block is delivered. Reconnections after that are automatic; see
    :class:`Listener`.
    """
    listener = Listener(
        conninfo,
        channels,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        connect_kwargs=connect_kwargs,
    )
    try:
        await listener._connect()
    except psycopg.Error as ex:
        raise to_backend_error(ex) from ex
    try:
        yield listener
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
