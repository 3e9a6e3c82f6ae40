"""Shared by the peer runners: arguments, the drain probe and the JSON report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dsn", required=True, help="libpq URL of an empty database")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100, help="jobs per enqueue call")
    parser.add_argument("--driver", default="asyncpg", choices=["asyncpg", "psycopg"])
    return parser.parse_args()


async def wait_until_drained(
    remaining: Callable[[], Awaitable[int]], timeout_s: float, poll_s: float = 0.005
) -> float | None:
    """Poll ``remaining()`` until it is 0; returns that moment (perf_counter) or None."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if await remaining() == 0:
            return time.perf_counter()
        await _sleep(poll_s)
    return None


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def report(
    system: str,
    version: str,
    jobs: int,
    enqueue_s: float,
    drain_s: float | None,
    settings: dict[str, Any],
    handled: int,
) -> None:
    out: dict[str, Any] = {
        "system": system,
        "version": version,
        "jobs": jobs,
        "handled": handled,
        "enqueue_s": round(enqueue_s, 4),
        "enqueue_jobs_per_s": round(jobs / enqueue_s, 1) if enqueue_s > 0 else None,
        "drain_s": None if drain_s is None else round(drain_s, 4),
        "drain_jobs_per_s": round(jobs / drain_s, 1) if drain_s else None,
        "full_cycle_jobs_per_s": round(jobs / (enqueue_s + drain_s), 1) if drain_s else None,
        "settings": settings,
        "ok": drain_s is not None and handled >= jobs,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
