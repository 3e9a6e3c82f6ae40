"""procrastinate: defer N no-op jobs in batches, then drain them with one worker.

    python -m bench.peers.procrastinate_run --dsn URL --jobs N --concurrency C

Enqueue uses ``Task.batch_defer_async``; the worker is
``App.run_worker_async(concurrency=C, wait=False)`` (burst mode) with the connector's
default pool.  The drain ends when no job is ``todo`` or ``doing``, probed on a
separate connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg

from bench.peers.common import parse_args, report, version_of, wait_until_drained


async def main() -> None:
    args = parse_args(__doc__ or "")
    import procrastinate  # type: ignore[import-untyped,unused-ignore]

    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=args.dsn))
    handled = 0

    @app.task(name="noop")
    async def noop(**kwargs: Any) -> None:
        nonlocal handled
        handled += 1

    jobs = args.jobs
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        t0 = time.perf_counter()
        for start in range(0, jobs, args.batch):
            n = min(args.batch, jobs - start)
            await noop.batch_defer_async(*({} for _ in range(n)))
        enqueue_s = time.perf_counter() - t0

        probe = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)

        async def remaining() -> int:
            cur = await probe.execute(
                "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        t1 = time.perf_counter()
        worker = asyncio.create_task(app.run_worker_async(concurrency=args.concurrency, wait=False))
        done_at = await wait_until_drained(remaining, timeout_s=max(60.0, jobs / 20))
        drain_s = None if done_at is None else done_at - t1
        try:
            await asyncio.wait_for(worker, timeout=15)
        except TimeoutError:
            worker.cancel()
        await probe.close()
    report(
        "procrastinate",
        version_of("procrastinate"),
        jobs,
        enqueue_s,
        drain_s,
        {"concurrency": args.concurrency, "enqueue_batch": args.batch},
        handled,
    )


if __name__ == "__main__":
    asyncio.run(main())
