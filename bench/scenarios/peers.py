"""ojs-trio embedded on PostgreSQL against pgqueuer and procrastinate, same protocol.

Each system gets a freshly created database and does the same thing with the same
job count (``sizes.peer_jobs``): enqueue all jobs in batches of 100, then drain them
with no-op handlers (``sizes.peer_concurrency`` concurrent handlers; pgqueuer uses
its own defaults, see bench/peers/pgqueuer_run.py).  ojs-trio's pool prefetches as
many jobs as it has slots (``prefetch``, docs/embedding.md); the report lists each
system's settings.  Enqueue time and drain time are
measured separately; "full cycle" is jobs / (enqueue time + drain time).

ojs-trio runs here (Trio); every peer runs in its own ``python -m bench.peers.<x>``
subprocess (asyncio), so the two event loops never share a process.  A peer whose
library is missing or whose run fails is reported as such; the run goes on.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import subprocess
import sys
from functools import partial
from typing import Any

import trio

from bench.load import Progress
from bench.modes import Sizes
from bench.targets import JOB_TYPE, REPO_ROOT, job_body, noop, recreate_database
from ojs_trio.engine.engine import EngineConfig, open_engine
from ojs_trio.storage import open_storage

ENQUEUE_BATCH = 100
QUEUE = "bench"

PEERS: list[tuple[str, str, list[str], list[str]]] = [
    # (label, module, extra args, libraries it needs)
    (
        "pgqueuer (asyncpg)",
        "bench.peers.pgqueuer_run",
        ["--driver", "asyncpg"],
        ["pgqueuer", "asyncpg"],
    ),
    ("pgqueuer (psycopg)", "bench.peers.pgqueuer_run", ["--driver", "psycopg"], ["pgqueuer"]),
    ("procrastinate", "bench.peers.procrastinate_run", [], ["procrastinate"]),
]


async def run_ours(url: str, jobs: int, concurrency: int) -> dict[str, Any]:
    async with open_engine(open_storage(url), EngineConfig()) as engine:
        engine.register(JOB_TYPE, noop)
        t0 = trio.current_time()
        for start in range(0, jobs, ENQUEUE_BATCH):
            n = min(ENQUEUE_BATCH, jobs - start)
            await engine.submit_many([job_body(QUEUE, start + k) for k in range(n)])
        enqueue_s = trio.current_time() - t0
        base = engine.statistics().acked
        t1 = trio.current_time()
        drain_s: float | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(engine.run_workers, [QUEUE], concurrency, prefetch=concurrency)
            )
            with trio.move_on_after(max(60.0, jobs / 50)):
                while engine.statistics().acked - base < jobs:  # noqa: ASYNC110 (a counter)
                    await trio.sleep(0.002)
                drain_s = trio.current_time() - t1
            nursery.cancel_scope.cancel()
        handled = engine.statistics().acked - base
    return {
        "system": "ojs-trio (embedded, PostgreSQL)",
        "jobs": jobs,
        "handled": handled,
        "enqueue_s": round(enqueue_s, 4),
        "enqueue_jobs_per_s": round(jobs / enqueue_s, 1),
        "drain_s": None if drain_s is None else round(drain_s, 4),
        "drain_jobs_per_s": round(jobs / drain_s, 1) if drain_s else None,
        "full_cycle_jobs_per_s": round(jobs / (enqueue_s + drain_s), 1) if drain_s else None,
        "settings": {
            "workers": concurrency,
            "prefetch": concurrency,
            "enqueue_batch": ENQUEUE_BATCH,
            # ojs_trio.runtime.raise_gc_threshold, as ojs-trio serve runs (bench/run.py)
            "gc_young_threshold": gc.get_threshold()[0],
        },
        "ok": drain_s is not None,
    }


async def run_peer(
    module: str, extra: list[str], url: str, jobs: int, concurrency: int
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", module, "--dsn", url, "--jobs", str(jobs),
        "--concurrency", str(concurrency), "--batch", str(ENQUEUE_BATCH), *extra,
    ]  # fmt: skip
    with trio.move_on_after(max(120.0, jobs / 20)) as scope:
        proc = await trio.run_process(
            cmd, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO_ROOT
        )
    if scope.cancelled_caught:
        return {"ok": False, "error": "timed out"}
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.decode().strip().splitlines()[-3:]
        return {"ok": False, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def run(url: str, sizes: Sizes, progress: Progress) -> list[dict[str, Any]]:
    """One record per system; ``url`` names the database to (re)create for each."""
    jobs, concurrency = sizes.peer_jobs, sizes.peer_concurrency
    out: list[dict[str, Any]] = []
    progress.show(f"peers: ojs-trio embedded, {jobs:,} jobs")
    await trio.to_thread.run_sync(recreate_database, url)
    out.append(await run_ours(url, jobs, concurrency))
    for label, module, extra, needs in PEERS:
        missing = [lib for lib in needs if importlib.util.find_spec(lib) is None]
        if missing:
            out.append(
                {"system": label, "ok": False, "error": f"not installed: {', '.join(missing)}"}
            )
            continue
        progress.show(f"peers: {label}, {jobs:,} jobs")
        await trio.to_thread.run_sync(recreate_database, url)
        try:
            result = await run_peer(module, extra, url, jobs, concurrency)
        except (OSError, subprocess.SubprocessError) as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["system"] = label
        out.append(result)
    return out
