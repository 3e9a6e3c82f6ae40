"""pgqueuer: enqueue N no-op jobs in batches, then drain them with one QueueManager.

    python -m bench.peers.pgqueuer_run --dsn URL --driver asyncpg|psycopg --jobs N

The queue manager runs with pgqueuer's own defaults (``batch_size=10``, no cap on
concurrent tasks): the best point in peers-measured-2026-11-22.md.  The drain ends
when the ``pgqueuer`` table is empty (completed jobs are deleted from it once their
completion log is flushed), probed on a separate connection; the queue manager's
own shutdown is not counted.  ``--concurrency`` is recorded but not applied.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from bench.peers.common import parse_args, report, version_of, wait_until_drained


async def main() -> None:
    args = parse_args(__doc__ or "")
    from pgqueuer import AsyncpgDriver, PsycopgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    driver_name = args.driver
    conn: Any
    if driver_name == "asyncpg":
        import asyncpg  # type: ignore[import-untyped,unused-ignore]

        conn = await asyncpg.connect(args.dsn)
        driver: Any = AsyncpgDriver(conn)
    else:
        conn = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
        driver = PsycopgDriver(conn)
    queries = Queries(driver)
    await queries.install()

    jobs = args.jobs
    t0 = time.perf_counter()
    for start in range(0, jobs, args.batch):
        n = min(args.batch, jobs - start)
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    enqueue_s = time.perf_counter() - t0

    qm = QueueManager(queries)
    handled = 0

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        nonlocal handled
        handled += 1

    probe = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)

    async def remaining() -> int:
        cur = await probe.execute("SELECT count(*) FROM pgqueuer")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    t1 = time.perf_counter()
    runner = asyncio.create_task(qm.run(mode=QueueExecutionMode.drain))
    done_at = await wait_until_drained(remaining, timeout_s=max(60.0, jobs / 50))
    drain_s = None if done_at is None else done_at - t1
    qm.shutdown.set()
    try:
        await asyncio.wait_for(runner, timeout=15)
    except TimeoutError:
        runner.cancel()
    await probe.close()
    await conn.close()
    report(
        f"pgqueuer ({driver_name})",
        version_of("pgqueuer"),
        jobs,
        enqueue_s,
        drain_s,
        {"batch_size": 10, "max_concurrent_tasks": None, "enqueue_batch": args.batch},
        handled,
    )


if __name__ == "__main__":
    asyncio.run(main())
