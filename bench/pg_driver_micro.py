"""Micro-benchmark: psycopg on Trio (TrioConnection) vs sync psycopg in trio.to_thread.

Not a test: prints latency and throughput on this machine, to choose the PostgreSQL
driver strategy by measurement. Usage::

    .venv/bin/python bench/pg_driver_micro.py [--dsn DSN] [-n 5000] [--repeat 3]

The DSN defaults to $OJS_TEST_DATABASE_URL, else host=127.0.0.1 port=5432 (TCP
loopback, user postgres, database test). Rows:

* ``SELECT 1`` one at a time: TrioConnection; sync psycopg with one
  ``trio.to_thread.run_sync`` hop per query (the "thread per unit of work"
  alternative); and for reference, bare sync psycopg and asyncio psycopg.
* a unit of work (a transaction of three SELECTs): ``pool.transaction()`` on Trio
  vs the whole transaction in one ``to_thread`` hop on a sync connection.
* ``SELECT 1`` from 8 tasks on 8 connections (Trio) vs 8 tasks each hopping to a
  thread per query on 8 sync connections.
* Writes that exercise Wait.RW (``executemany``, an explicit pipeline) and COPY:
  TrioConnection with the default RW strategy (zero-timeout poll, two-task wait only
  when blocked) vs a naive strategy (a nursery with two waiters on every RW wait).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import trio

from ojs_trio.storage.postgres import driver
from ojs_trio.storage.postgres.driver import TrioConnection

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def fmt(label: str, seconds: list[float], n: int, unit: str = "q") -> None:
    best = min(seconds)
    med = statistics.median(seconds)
    print(
        f"  {label:<52} {med / n * 1e6:8.1f} µs/{unit} (best {best / n * 1e6:6.1f})"
        f"   {n / med:9,.0f} {unit}/s"
    )


async def timed(fn: Callable[[], Awaitable[None]], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


# -- SELECT 1 -------------------------------------------------------------------------


async def trio_select(dsn: str, n: int, repeat: int) -> None:
    conn = await TrioConnection.connect(dsn, autocommit=True)
    async with conn:
        for _ in range(200):
            await conn.execute("SELECT 1")

        async def run() -> None:
            for _ in range(n):
                cur = await conn.execute("SELECT 1")
                await cur.fetchone()

        fmt("TrioConnection", await timed(run, repeat), n)


async def thread_hop_select(dsn: str, n: int, repeat: int) -> None:
    conn = psycopg.connect(dsn, autocommit=True)
    with conn:

        def one() -> None:
            conn.execute("SELECT 1").fetchone()

        for _ in range(200):
            await trio.to_thread.run_sync(one)

        async def run() -> None:
            for _ in range(n):
                await trio.to_thread.run_sync(one)

        fmt("sync psycopg, one to_thread hop per query", await timed(run, repeat), n)


def sync_select(dsn: str, n: int, repeat: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        out = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(n):
                conn.execute("SELECT 1").fetchone()
            out.append(time.perf_counter() - t0)
        fmt("(ref) sync psycopg, no Trio", out, n)


def asyncio_select(dsn: str, n: int, repeat: int) -> None:
    async def main() -> list[float]:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn:
            out = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in range(n):
                    cur = await conn.execute("SELECT 1")
                    await cur.fetchone()
                out.append(time.perf_counter() - t0)
            return out

    fmt("(ref) asyncio psycopg.AsyncConnection", asyncio.run(main()), n)


async def parallel(dsn: str, n: int, repeat: int, tasks: int = 8) -> None:
    per = n // tasks
    tconns = [await TrioConnection.connect(dsn, autocommit=True) for _ in range(tasks)]
    sconns = [psycopg.connect(dsn, autocommit=True) for _ in range(tasks)]
    limiter = trio.CapacityLimiter(tasks)

    async def trio_worker(conn: TrioConnection) -> None:
        for _ in range(per):
            await (await conn.execute("SELECT 1")).fetchone()

    async def hop_worker(conn: psycopg.Connection[Any]) -> None:
        def one() -> None:
            conn.execute("SELECT 1").fetchone()

        for _ in range(per):
            await trio.to_thread.run_sync(one, limiter=limiter)

    async def run_trio() -> None:
        async with trio.open_nursery() as nursery:
            for c in tconns:
                nursery.start_soon(trio_worker, c)

    async def run_hop() -> None:
        async with trio.open_nursery() as nursery:
            for c in sconns:
                nursery.start_soon(hop_worker, c)

    fmt(f"TrioConnection x{tasks} tasks (total)", await timed(run_trio, repeat), per * tasks)
    fmt(f"sync + to_thread hop x{tasks} tasks (total)", await timed(run_hop, repeat), per * tasks)
    for tc in tconns:
        await tc.close()
    for sc in sconns:
        sc.close()


async def units_of_work(dsn: str, n: int, repeat: int) -> None:
    """A unit of work = a transaction of 3 statements, through a pool checkout."""
    n = n // 4
    stmts = ("SELECT 1", "SELECT 2", "SELECT 3")
    async with driver.open_pool(dsn, min_size=1, max_size=1) as pool:

        async def trio_unit() -> None:
            async with pool.transaction() as conn:
                for q in stmts:
                    await (await conn.execute(q)).fetchone()

        async def run_trio() -> None:
            for _ in range(n):
                await trio_unit()

        await run_trio()
        fmt("TrioConnection: pool.transaction(), 3 SELECTs", await timed(run_trio, repeat), n, "tx")

    conn = psycopg.connect(dsn, autocommit=True)
    with conn:

        def unit() -> None:
            with conn.transaction():
                for q in stmts:
                    conn.execute(q).fetchone()

        async def run_hop() -> None:
            for _ in range(n):
                await trio.to_thread.run_sync(unit)

        await run_hop()
        fmt(
            "sync psycopg: whole transaction in one to_thread hop",
            await timed(run_hop, repeat),
            n,
            "tx",
        )


# -- RW waits ----------------------------------------------------------------------------


async def _naive_wait_fd(fileno: int, s: int, deadline: float | None) -> int:
    """The naive strategy: block on every wait; RW always through a two-task nursery."""
    if s == driver.WAIT_R:
        await trio.lowlevel.wait_readable(fileno)
        return int(driver.READY_R)
    if s == driver.WAIT_W:
        await trio.lowlevel.wait_writable(fileno)
        return int(driver.READY_W)
    return await driver._wait_rw(fileno)


class Counting:
    """Count blocking RW waits taken by the default strategy."""

    def __init__(self) -> None:
        self.rw_blocked = 0
        self.orig = driver._wait_rw

    async def __call__(self, fileno: int) -> int:
        self.rw_blocked += 1
        return await self.orig(fileno)


async def writes(dsn: str, repeat: int, rows: int = 5000) -> None:
    conn = await TrioConnection.connect(dsn, autocommit=True)
    async with conn:
        await conn.execute("CREATE TEMP TABLE bench_t (id int, body text)")
        data = [(i, f"payload {i:06d}") for i in range(rows)]

        async def executemany() -> None:
            await conn.execute("TRUNCATE bench_t")
            async with conn.transaction():
                cur = conn.cursor()
                await cur.executemany("INSERT INTO bench_t VALUES (%s, %s)", data)

        async def pipeline() -> None:
            await conn.execute("TRUNCATE bench_t")
            async with conn.pipeline():
                for row in data[:2000]:
                    await conn.execute("INSERT INTO bench_t VALUES (%s, %s)", row)

        async def copy() -> None:
            await conn.execute("TRUNCATE bench_t")
            cur = conn.cursor()
            async with cur.copy("COPY bench_t FROM STDIN") as cp:
                for _ in range(4):
                    for row in data:
                        await cp.write_row(row)

        for label, fn, n in (
            (f"executemany {rows} rows, one transaction", executemany, rows),
            ("pipeline, 2000 autocommitted INSERTs", pipeline, 2000),
            (f"COPY {rows * 4} rows", copy, rows * 4),
        ):
            counter = Counting()
            driver._wait_rw = counter  # type: ignore[assignment]
            try:
                default = await timed(fn, repeat)
            finally:
                driver._wait_rw = counter.orig  # type: ignore[assignment]
            orig_wait_fd = driver._wait_fd
            driver._wait_fd = _naive_wait_fd  # type: ignore[assignment]
            try:
                naive = await timed(fn, repeat)
            finally:
                driver._wait_fd = orig_wait_fd  # type: ignore[assignment]
            per_round = counter.rw_blocked / repeat
            fmt(f"{label}: poll-first RW", default, n, "row")
            fmt(f"{label}: naive RW (nursery)", naive, n, "row")
            print(f"    (blocking RW waits per round with poll-first: {per_round:.0f})")


def sync_writes(dsn: str, repeat: int, rows: int = 5000) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE bench_t (id int, body text)")
        data = [(i, f"payload {i:06d}") for i in range(rows)]
        out = []
        for _ in range(repeat):
            conn.execute("TRUNCATE bench_t")
            t0 = time.perf_counter()
            with conn.transaction():
                conn.cursor().executemany("INSERT INTO bench_t VALUES (%s, %s)", data)
            out.append(time.perf_counter() - t0)
        fmt(f"(ref) sync executemany {rows} rows", out, rows, "row")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("OJS_TEST_DATABASE_URL", DEFAULT_DSN))
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), trio {trio.__version__}")
    print(f"SELECT 1, one at a time, n={args.n}, median of {args.repeat}:")
    trio.run(trio_select, args.dsn, args.n, args.repeat)
    trio.run(thread_hop_select, args.dsn, args.n, args.repeat)
    sync_select(args.dsn, args.n, args.repeat)
    asyncio_select(args.dsn, args.n, args.repeat)
    print("Unit of work (BEGIN; 3 x SELECT; COMMIT), one at a time:")
    trio.run(units_of_work, args.dsn, args.n, args.repeat)
    print("SELECT 1, 8 concurrent tasks:")
    trio.run(parallel, args.dsn, args.n, args.repeat)
    print("Writes (Wait.RW strategy):")
    trio.run(writes, args.dsn, args.repeat)
    sync_writes(args.dsn, args.repeat)


if __name__ == "__main__":
    main()
