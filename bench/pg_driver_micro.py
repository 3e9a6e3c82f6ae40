"""Micro-benchmark: psycopg on Trio (TrioConnection) vs sync psycopg in trio.to_thread.

Not a test: prints latency and throughput on this machine, to choose the PostgreSQL
driver strategy by measurement. Usage::

    .venv/bin/python bench/pg_driver_micro.py [--dsn DSN] [-n 5000] [--repeat 5]

The DSN defaults to $OJS_TEST_DATABASE_URL, else host=127.0.0.1 port=5432 (TCP
loopback, user postgres, database test). The variants of each group run in
interleaved rounds (A, B, C, A, B, C, ...), so a change in machine load hits them
alike; the median and best round are printed, with the load average. Groups:

* ``SELECT 1`` one at a time: TrioConnection; sync psycopg with one
  ``trio.to_thread.run_sync`` hop per query (the "thread per unit of work"
  alternative when the unit is one statement); for reference, bare sync psycopg
  and asyncio psycopg (in a worker thread's own event loop).
* a unit of work that is a transaction of three SELECTs: ``pool.transaction()`` on
  Trio vs the whole transaction in one ``to_thread`` hop on a sync connection.
* ``SELECT 1`` from 8 tasks on 8 connections (Trio) vs 8 tasks each hopping to a
  thread per query on 8 sync connections.
* writes that exercise Wait.RW (``executemany``, an explicit pipeline) and COPY:
  TrioConnection with the default RW strategy (zero-timeout poll first, a two-task
  wait only when blocked) vs a naive one (a nursery with two waiters on every RW
  wait), and sync psycopg for reference.
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

Round = Callable[[], Awaitable[None]]


async def compare(
    title: str, variants: list[tuple[str, Round]], n: int, repeat: int, unit: str
) -> None:
    """Run the variants in interleaved rounds of ``n`` units; print median and best."""
    print(f"{title}  (load average {os.getloadavg()[0]:.2f})")
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    for _, fn in variants:  # warm-up round
        await fn()
    for _ in range(repeat):
        for label, fn in variants:
            t0 = time.perf_counter()
            await fn()
            times[label].append(time.perf_counter() - t0)
    for label, seconds in times.items():
        med, best = statistics.median(seconds), min(seconds)
        print(
            f"  {label:<54} {med / n * 1e6:8.1f} µs/{unit} (best {best / n * 1e6:6.1f})"
            f"  {n / med:9,.0f} {unit}/s"
        )


# -- SELECT 1 -------------------------------------------------------------------------


async def select_one(dsn: str, n: int, repeat: int) -> None:
    tconn = await TrioConnection.connect(dsn, autocommit=True)
    sconn = psycopg.connect(dsn, autocommit=True)

    def sync_one() -> None:
        sconn.execute("SELECT 1").fetchone()

    async def trio_round() -> None:
        for _ in range(n):
            await (await tconn.execute("SELECT 1")).fetchone()

    async def hop_round() -> None:
        for _ in range(n):
            await trio.to_thread.run_sync(sync_one)

    async def sync_round() -> None:
        for _ in range(n):
            sync_one()

    async def asyncio_main() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn:
            for _ in range(n):
                await (await conn.execute("SELECT 1")).fetchone()

    async def asyncio_round() -> None:
        # Connecting is outside the timed part only approximately: ~1-2% of a round.
        await trio.to_thread.run_sync(asyncio.run, asyncio_main())

    await compare(
        f"SELECT 1, one at a time, {n} per round, {repeat} rounds:",
        [
            ("TrioConnection", trio_round),
            ("sync psycopg, one to_thread hop per query", hop_round),
            ("(ref) sync psycopg, no Trio, no thread", sync_round),
            ("(ref) asyncio psycopg.AsyncConnection", asyncio_round),
        ],
        n,
        repeat,
        "q",
    )
    await tconn.close()
    sconn.close()


async def units_of_work(dsn: str, n: int, repeat: int) -> None:
    """A unit of work = a transaction of 3 statements."""
    n = max(1, n // 4)
    stmts = ("SELECT 1", "SELECT 2", "SELECT 3")
    sconn = psycopg.connect(dsn, autocommit=True)

    def sync_unit() -> None:
        with sconn.transaction():
            for q in stmts:
                sconn.execute(q).fetchone()

    async with driver.open_pool(dsn, min_size=1, max_size=1) as pool:

        async def trio_round() -> None:
            for _ in range(n):
                async with pool.transaction() as conn:
                    for q in stmts:
                        await (await conn.execute(q)).fetchone()

        async def hop_round() -> None:
            for _ in range(n):
                await trio.to_thread.run_sync(sync_unit)

        await compare(
            f"Unit of work (BEGIN; 3 x SELECT; COMMIT), {n} per round:",
            [
                ("TrioConnection via pool.transaction()", trio_round),
                ("sync psycopg, whole transaction in one to_thread hop", hop_round),
            ],
            n,
            repeat,
            "tx",
        )
    sconn.close()


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

    async def trio_round() -> None:
        async with trio.open_nursery() as nursery:
            for c in tconns:
                nursery.start_soon(trio_worker, c)

    async def hop_round() -> None:
        async with trio.open_nursery() as nursery:
            for c in sconns:
                nursery.start_soon(hop_worker, c)

    await compare(
        f"SELECT 1 from {tasks} tasks on {tasks} connections (total throughput):",
        [
            (f"TrioConnection x{tasks}", trio_round),
            (f"sync psycopg + to_thread hop per query x{tasks}", hop_round),
        ],
        per * tasks,
        repeat,
        "q",
    )
    for tc in tconns:
        await tc.close()
    for sc in sconns:
        sc.close()


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
    """Count the blocking RW waits the default strategy takes."""

    def __init__(self) -> None:
        self.calls = 0
        self.orig = driver._wait_rw

    async def __call__(self, fileno: int) -> int:
        self.calls += 1
        return await self.orig(fileno)


async def writes(dsn: str, repeat: int, rows: int = 5000) -> None:
    conn = await TrioConnection.connect(dsn, autocommit=True)
    sconn = psycopg.connect(dsn, autocommit=True)
    conn_ddl = "CREATE TEMP TABLE bench_t (id int, body text)"
    await conn.execute(conn_ddl)
    sconn.execute(conn_ddl)
    data = [(i, f"payload {i:06d}") for i in range(rows)]
    orig_wait_fd = driver._wait_fd
    counter = Counting()

    def naive(fn: Round) -> Round:
        async def run() -> None:
            driver._wait_fd = _naive_wait_fd  # type: ignore[assignment]
            try:
                await fn()
            finally:
                driver._wait_fd = orig_wait_fd

        return run

    def counted(fn: Round) -> Round:
        async def run() -> None:
            driver._wait_rw = counter  # type: ignore[assignment]
            try:
                await fn()
            finally:
                driver._wait_rw = counter.orig

        return run

    async def executemany() -> None:
        await conn.execute("TRUNCATE bench_t")
        async with conn.transaction():
            await conn.cursor().executemany("INSERT INTO bench_t VALUES (%s, %s)", data)

    async def executemany_sync() -> None:
        sconn.execute("TRUNCATE bench_t")
        with sconn.transaction():
            sconn.cursor().executemany("INSERT INTO bench_t VALUES (%s, %s)", data)

    async def pipeline() -> None:
        await conn.execute("TRUNCATE bench_t")
        async with conn.pipeline():
            for row in data[:2000]:
                await conn.execute("INSERT INTO bench_t VALUES (%s, %s)", row)

    async def pipeline_sync() -> None:
        sconn.execute("TRUNCATE bench_t")
        with sconn.pipeline():
            for row in data[:2000]:
                sconn.execute("INSERT INTO bench_t VALUES (%s, %s)", row)

    async def copy() -> None:
        await conn.execute("TRUNCATE bench_t")
        async with conn.cursor().copy("COPY bench_t FROM STDIN") as cp:
            for _ in range(4):
                for row in data:
                    await cp.write_row(row)

    async def copy_sync() -> None:
        sconn.execute("TRUNCATE bench_t")
        with sconn.cursor().copy("COPY bench_t FROM STDIN") as cp:
            for _ in range(4):
                for row in data:
                    cp.write_row(row)

    for title, fn, sync_fn, n in (
        (f"executemany, {rows} rows in one transaction:", executemany, executemany_sync, rows),
        ("pipeline, 2000 autocommitted INSERTs:", pipeline, pipeline_sync, 2000),
        (f"COPY FROM STDIN, {rows * 4} rows:", copy, copy_sync, rows * 4),
    ):
        counter.calls = 0
        await compare(
            title,
            [
                ("TrioConnection, poll-first RW (default)", counted(fn)),
                ("TrioConnection, naive RW (nursery every wait)", naive(fn)),
                ("(ref) sync psycopg", sync_fn),
            ],
            n,
            repeat,
            "row",
        )
        print(f"  (blocking RW waits with poll-first, all rounds: {counter.calls})")
    await conn.close()
    sconn.close()


async def main_async(dsn: str, n: int, repeat: int) -> None:
    await select_one(dsn, n, repeat)
    await units_of_work(dsn, n, repeat)
    await parallel(dsn, n, repeat)
    await writes(dsn, max(2, repeat // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("OJS_TEST_DATABASE_URL", DEFAULT_DSN))
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(
        f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), trio {trio.__version__}, "
        f"{os.cpu_count()} CPUs"
    )
    trio.run(main_async, args.dsn, args.n, args.repeat)


if __name__ == "__main__":
    main()
