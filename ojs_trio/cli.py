"""The ``ojs-trio`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from ojs_trio.config import Settings
from ojs_trio.logs import configure_logging


def _serve(args: argparse.Namespace) -> int:
    from ojs_trio.server import run_server

    settings = Settings.from_env()
    if args.host is not None:
        settings.host = args.host
    if args.port is not None:
        settings.port = args.port
    if args.storage is not None:
        settings.storage_url = args.storage
    configure_logging(settings.log_level, settings.log_format)
    trio.run(run_server, settings)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    url = args.storage or settings.storage_url
    configure_logging(settings.log_level, settings.log_format)
    if not url.startswith(("postgres://", "postgresql://")):
        print(f"nothing to migrate for {url!r}: only PostgreSQL storage has a schema")
        return 0

    async def run() -> list[int]:
        from ojs_trio.storage.postgres.driver import open_pool
        from ojs_trio.storage.postgres.migrate import migrate

        async with open_pool(url, min_size=1, max_size=1) as pool, pool.connection() as conn:
            return await migrate(conn)

    applied = trio.run(run)
    print(f"applied migrations: {applied}" if applied else "schema is up to date")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "conformance":
        from ojs_trio.conformance.cli import main as conformance_main

        return conformance_main(argv[1:])
    parser = argparse.ArgumentParser(prog="ojs-trio", description="Open Job Spec server on Trio")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OJS HTTP server")
    serve.add_argument("--host", help="bind address (env OJS_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env OJS_PORT, default 8080)")
    serve.add_argument(
        "--storage", help="memory:// or postgresql://… (env OJS_STORAGE/DATABASE_URL; memory://)"
    )
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="apply PostgreSQL schema migrations")
    migrate.add_argument("--storage", help="postgresql://… (env OJS_STORAGE or DATABASE_URL)")
    migrate.set_defaults(func=_migrate)
    sub.add_parser("conformance", help="run the OJS conformance suites against a server")
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
