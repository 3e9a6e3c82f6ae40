"""The ``ojs-trio`` command."""

from __future__ import annotations

import argparse
import logging
import os
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
    if args.processes is not None:
        settings.processes = args.processes
    configure_logging(settings.log_level, settings.log_format)
    if settings.processes > 1:
        from ojs_trio.processes import run_processes

        trio.run(run_processes, settings)
    else:
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


def _aws_provision(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ojs_trio.engine.errors import OjsError

    try:
        # Imported lazily: aiobotocore is only needed with the [sqs] extra.
        from ojs_trio.storage.sqs.client import AwsSettings, open_aws_clients
        from ojs_trio.storage.sqs.provision import ProvisionResult, provision
    except ImportError as exc:
        print(
            f"ojs-trio aws provision needs the sqs extra (pip install 'ojs-trio[sqs]'): {exc}",
            file=sys.stderr,
        )
        return 1

    server = Settings.from_env()
    configure_logging(server.log_level, server.log_format)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # One INFO line per HTTP request (httpx) and "Found credentials" (aiobotocore).
        for noisy in ("httpx", "httpcore", "botocore", "aiobotocore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    url = args.storage
    if url is None and os.environ.get("OJS_STORAGE", "").startswith("sqs:"):
        url = os.environ["OJS_STORAGE"]
    overrides = {
        "region": args.region,
        "endpoint_url": args.endpoint_url,
        "dynamodb_table": args.table,
        "queue_prefix": args.prefix,
        "use_fifo": args.fifo,
        "max_receive_count": args.max_receive_count,
    }
    try:
        settings = AwsSettings.from_url(url) if url else AwsSettings.from_env()
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        if args.endpoint_url is not None:  # also wins over AWS_ENDPOINT_URL_SQS/_DYNAMODB
            settings = replace(settings, sqs_endpoint_url=None, dynamodb_endpoint_url=None)
        settings.validate()
    except ValueError as exc:
        print(f"ojs-trio aws provision: {exc}", file=sys.stderr)
        return 2
    queues = args.queue or ["default"]

    async def run() -> ProvisionResult:
        async with open_aws_clients(settings) as clients:
            return await provision(clients, queues=queues)

    try:
        result = trio.run(run)
    except OjsError as exc:
        print(f"ojs-trio aws provision: {exc.message}", file=sys.stderr)
        return 1
    kind = "FIFO" if settings.use_fifo else "standard"
    print(f"DynamoDB table {result.table_name}: {result.table_arn}")
    for name, urls in result.queues.items():
        print(f"SQS queue {name!r} ({kind}): {urls.url}")
        print(f"  dead-letter queue: {urls.dlq_url}")
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
    serve.add_argument(
        "--processes",
        type=int,
        help="server processes sharing the port; needs PostgreSQL or SQS storage "
        "(env OJS_PROCESSES, default 1)",
    )
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="apply PostgreSQL schema migrations")
    migrate.add_argument("--storage", help="postgresql://… (env OJS_STORAGE or DATABASE_URL)")
    migrate.set_defaults(func=_migrate)
    sub.add_parser("conformance", help="run the OJS conformance suites against a server")
    aws = sub.add_parser("aws", help="AWS SQS + DynamoDB storage tools")
    aws_sub = aws.add_subparsers(dest="aws_command", required=True)
    provision = aws_sub.add_parser(
        "provision",
        help="create the DynamoDB table and the SQS queues (idempotent)",
        description="Create (or check and reconcile) the DynamoDB job table and, for each "
        "--queue, its SQS queue and dead-letter queue. Safe to run again.",
    )
    provision.add_argument(
        "--storage", help="sqs://[REGION][/TABLE][?...] (env OJS_STORAGE if sqs://, else AWS_*)"
    )
    provision.add_argument(
        "--queue",
        action="append",
        metavar="NAME",
        help="OJS queue to create SQS queues for; repeatable (default: default)",
    )
    provision.add_argument("--table", help="DynamoDB table (env DYNAMODB_TABLE, default ojs-jobs)")
    provision.add_argument("--prefix", help="SQS queue name prefix (env SQS_QUEUE_PREFIX, ojs)")
    provision.add_argument("--region", help="AWS region (env AWS_REGION, default us-east-1)")
    provision.add_argument("--endpoint-url", help="AWS endpoint, e.g. LocalStack or moto")
    provision.add_argument(
        "--fifo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FIFO queues (env SQS_USE_FIFO, default off)",
    )
    provision.add_argument(
        "--max-receive-count",
        type=int,
        help="receives before SQS moves a message to the -dlq (env SQS_MAX_RECEIVE_COUNT, 5)",
    )
    provision.set_defaults(func=_aws_provision)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
