"""Command line of the benchmark harness.

    python -m bench              # full run (long: 1M resident jobs, 10,000 long-polls)
    python -m bench --quick      # about 2 minutes, small sizes
    python -m bench --smoke      # seconds; what `make test` runs so the harness never rots

Options: ``--storage memory,postgres`` (add ``sqs`` for a smoke run of the SQS
adapter on a local moto server, at smoke sizes in every mode), ``--transport
embedded,http``, ``--scenarios enqueue,dequeue,throughput,cost,longpoll,peers,
groupcommit``, ``--out bench/results``, ``--pg-url``,
``--server-processes N`` (HTTP server processes on shared storage; default one
per CPU, as ``ojs-trio serve --processes N``).
Results go to ``<out>/bench-<timestamp>-<mode>.{json,md}`` plus ``latest.json`` and
``latest.md`` (and PNG plots when matplotlib is installed).  A smoke run without
``--out`` writes to a temporary directory, checks the files, and removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import trio

from bench import report
from bench.load import Progress
from bench.modes import MODES, SMOKE_ONLY_SIZES, Sizes
from bench.scenarios import ALL, SCENARIOS, groupcommit, peers
from bench.scenarios.common import Context
from bench.targets import drop_database, open_target, postgres_version, recreate_database
from ojs_trio.runtime import freeze_startup_heap, raise_gc_threshold

T = TypeVar("T")

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/ojs_bench"
STORAGES = ("memory", "postgres", "sqs")
TRANSPORTS = ("embedded", "http")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, about 2 minutes")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, code paths only")
    parser.add_argument("--storage", default="memory,postgres", help="memory,postgres,sqs")
    parser.add_argument("--transport", default="embedded,http", help="embedded,http")
    parser.add_argument("--scenarios", default=",".join(ALL), help=",".join(ALL))
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("OJS_BENCH_DATABASE_URL", DEFAULT_PG_URL),
        help="database to drop and create for each PostgreSQL session "
        "(its name gets a _peer suffix for the peer runs, _gc for the group commit runs)",
    )
    parser.add_argument(
        "--server-processes",
        type=int,
        default=None,
        help="HTTP server processes for shared storage (ojs-trio serve --processes; "
        "default: one per CPU); memory always runs one",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name, allowed in (
        ("storage", STORAGES),
        ("transport", TRANSPORTS),
        ("scenarios", tuple(ALL)),
    ):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"--{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
        setattr(args, name, values)
    return args


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(pg_url: str, pg_version: str | None) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": pg_version,
        "postgres_url": pg_url,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "packages": {
            p: _version(p) for p in ("ojs-trio", "trio", "hypercorn", "quart-trio", "psycopg")
        },
    }


def start_moto(stack: contextlib.ExitStack) -> tuple[str | None, str | None]:
    """An sqs:// URL on a moto server that ``stack`` stops, or None and why not.

    moto stands in for AWS here as it does in the tests: a smoke run of the code
    paths, never a performance figure (the report leaves it out of the targets).
    """
    try:
        import aiobotocore  # noqa: F401  (the sqs extra)

        from ojs_trio.testing.moto import open_moto_server

        endpoint = stack.enter_context(open_moto_server())
    except ImportError as exc:
        return None, f"needs the sqs and dev extras ({exc})"
    # Dummy credentials: without any, botocore would look for instance metadata.
    # Set in the environment so that HTTP server processes inherit them.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    return f"sqs://us-east-1/ojs-bench?endpoint={endpoint}&prefix=ojs-bench&max_attempts=2", None


async def run_all(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    # The engine runs in this process for the embedded sessions and the peers
    # scenario: tuned as ojs-trio serve tunes itself (docs/embedding.md).
    raise_gc_threshold()
    with contextlib.ExitStack() as services:  # moto, when SQS is asked for
        return await _run_all(args, sizes, services)


async def _run_all(
    args: argparse.Namespace, sizes: Sizes, services: contextlib.ExitStack
) -> dict[str, Any]:
    notes: list[str] = []
    errors: list[str] = []
    records: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    pg_version = postgres_version(args.pg_url) if "postgres" in args.storage else None
    storages: list[tuple[str, str]] = []
    for storage in args.storage:
        if storage == "memory":
            storages.append((storage, "memory://"))
        elif storage == "postgres":
            if pg_version is None:
                notes.append(f"PostgreSQL not reachable at {args.pg_url}: skipped")
            else:
                storages.append((storage, args.pg_url))
        elif storage == "sqs":
            sqs_url, why = start_moto(services)
            if sqs_url is None:
                notes.append(f"SQS skipped: {why}")
            else:
                storages.append((storage, sqs_url))
                notes.append(
                    "SQS ran on moto (a local stand-in for AWS) at smoke sizes in every"
                    " mode: a check of the code paths, not a performance figure; its rows"
                    " are in the tables but not in the targets"
                )
    session_scenarios = [s for s in args.scenarios if s in SCENARIOS]
    run_peers = "peers" in args.scenarios and any(s == "postgres" for s, _ in storages)
    if "peers" in args.scenarios and not run_peers:
        notes.append("peers skipped: they need PostgreSQL")
    run_gc = "groupcommit" in args.scenarios and any(s == "postgres" for s, _ in storages)
    if "groupcommit" in args.scenarios and not run_gc:
        notes.append("groupcommit skipped: it needs PostgreSQL")
    shared = args.server_processes or os.cpu_count() or 1
    server_processes = {s: shared if s == "postgres" else 1 for s, _ in storages}
    total = (
        len(storages) * len(args.transport) * len(session_scenarios) + int(run_peers) + int(run_gc)
    )
    progress = Progress(total, enabled=not args.no_progress)
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)

    # Only once-per-run scenarios (peers, groupcommit) asked for: no sessions to open.
    sessions = storages if session_scenarios else []
    for storage, url in sessions:
        for transport in args.transport:
            if storage == "postgres":
                await trio.to_thread.run_sync(recreate_database, url)
            try:
                async with open_target(
                    transport, storage, url, server_processes[storage]
                ) as target:
                    session_sizes = SMOKE_ONLY_SIZES if storage in report.SMOKE_ONLY else sizes
                    ctx = Context(target, session_sizes, progress, records)
                    for name in session_scenarios:
                        progress.show(ctx.label(name))
                        # No collection of the last scenario's garbage mid-run, and the
                        # heap so far frozen as ojs-trio serve freezes its start-up heap
                        # (docs/embedding.md advises embedders the same).
                        freeze_startup_heap()
                        t0 = time.monotonic()
                        try:
                            await SCENARIOS[name](ctx)
                        except Exception as exc:
                            message = f"{storage}/{transport} {name}: {type(exc).__name__}: {exc}"
                            errors.append(message)
                            progress.log("ERROR " + message)
                            traceback.print_exc()
                        timings[f"{storage}/{transport}/{name}"] = round(time.monotonic() - t0, 1)
                        progress.step(ctx.label(f"{name} done"))
            except Exception as exc:
                message = f"{storage}/{transport}: could not run: {type(exc).__name__}: {exc}"
                errors.append(message)
                progress.log("ERROR " + message)
                traceback.print_exc()
            if storage == "postgres":
                await trio.to_thread.run_sync(drop_database, url)

    async def once_per_run(name: str, url: str, scenario: Callable[[], Awaitable[T]]) -> T | None:
        """A scenario run once per harness run on a database of its own (dropped after)."""
        t0 = time.monotonic()
        try:
            return await scenario()
        except Exception as exc:
            message = f"{name}: {type(exc).__name__}: {exc}"
            errors.append(message)
            progress.log("ERROR " + message)
            traceback.print_exc()
            return None
        finally:
            await trio.to_thread.run_sync(drop_database, url)
            timings[name] = round(time.monotonic() - t0, 1)
            progress.step(f"{name} done")

    peer_results: list[dict[str, Any]] = []
    if run_peers:
        peer_url = args.pg_url + "_peer"
        peer_results = (
            await once_per_run("peers", peer_url, partial(peers.run, peer_url, sizes, progress))
            or []
        )

    async def run_groupcommit(url: str) -> dict[str, Any]:
        freeze_startup_heap()
        return await groupcommit.run(url, sizes, progress)

    group_commit: dict[str, Any] | None = None
    if run_gc:
        gc_url = args.pg_url + "_gc"
        group_commit = await once_per_run("groupcommit", gc_url, partial(run_groupcommit, gc_url))
    progress.close()
    meta = machine(args.pg_url, pg_version)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "mode": sizes.name,
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "storages": [s for s, _ in storages],
        "transports": args.transport,
        "server_processes": server_processes if "http" in args.transport else {},
        "scenarios": args.scenarios,
        "sizes": vars(sizes),
        "machine": meta,
        "records": records,
        "peers": peer_results,
        "group_commit": group_commit,
        "notes": notes,
        "errors": errors,
        "timings_s": timings,
    }


def write_outputs(results: dict[str, Any], out: Path, plots: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"bench-{stamp}-{results['mode']}"
    images: list[str] = []
    if plots:
        try:
            from bench import plots as plotting
        except ImportError as exc:  # matplotlib is in the bench extra only
            results["notes"].append(f"plots skipped: {exc}")
        else:
            images = plotting.render(results, out, stem)
    json_path = out / f"{stem}.json"
    md_path = out / f"{stem}.md"
    results["plots"] = images
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(report.render(results))
    # latest.* (and latest-*.png, which latest.md shows) are the same run's copies.
    latest_images = ["latest" + name[len(stem) :] for name in images]
    for name, latest in zip(images, latest_images, strict=True):
        shutil.copyfile(out / name, out / latest)
    shutil.copyfile(json_path, out / "latest.json")
    (out / "latest.md").write_text(report.render({**results, "plots": latest_images}))
    return [json_path, md_path, *(out / name for name in images)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Cancelled fetches whose claimed jobs a reset already removed log a warning on
    # release; expected between scenarios, so only errors are shown.
    logging.getLogger("ojs_trio.engine").setLevel(logging.ERROR)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = MODES[mode]
    scratch: str | None = None
    if args.out is None:
        if mode == "smoke":
            scratch = tempfile.mkdtemp(prefix="ojs-bench-smoke-")
            out = Path(scratch)
        else:
            out = Path(__file__).resolve().parent / "results"
    else:
        out = Path(args.out)
    results = trio.run(run_all, args, sizes)
    written = write_outputs(results, out, plots=not args.no_plots)
    for path in written:
        if not path.exists() or path.stat().st_size == 0:
            results["errors"].append(f"output missing: {path}")
    json.loads((out / "latest.json").read_text())  # must parse
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"smoke run: {len(results['records'])} records, report rendered", file=sys.stderr)
    else:
        print(f"wrote {out / 'latest.md'} and {out / 'latest.json'}", file=sys.stderr)
    for error in results["errors"]:
        print("ERROR", error, file=sys.stderr)
    return 1 if results["errors"] else 0
