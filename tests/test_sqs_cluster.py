"""Acceptance test of the SQS + DynamoDB backend with two real server processes.

Two ``python -m ojs_trio.cli serve`` subprocesses share one moto endpoint (the same
DynamoDB table and SQS queue prefix). Trio worker tasks (httpx) fetch from both
servers alternately and record every delivery and every ack:

* claims are exclusive: with a visibility timeout far longer than the test, every
  job is delivered exactly once and acked (200) exactly once, by its holder, and
  both servers then report it completed;
* a per-minute cron registered once (on one server) while both servers tick fires
  exactly one job per occurrence (counted in DynamoDB).

The job load runs while the servers wait for two minute boundaries to pass, so the
test takes about two minutes. moto runs in a thread of this process and handles one
request at a time (see ``aws_fixtures``), so the load is modest. The helpers come
from ``test_pg_cluster`` (importing it needs psycopg, not a running PostgreSQL).
Measured numbers are printed (shown by pytest on failure, or with ``-s``).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aws_fixtures
import httpx
import pytest
import trio
from test_pg_cluster import (
    REQUEST_TIMEOUT,
    Ledger,
    Server,
    Target,
    enqueue_batch,
    epoch,
    load_job,
    log_tail,
    ojs_server,
    run_worker,
)

from ojs_trio.storage.sqs.client import AwsSettings, open_aws_clients

moto_endpoint = aws_fixtures.moto_endpoint
aws_endpoint = aws_fixtures.aws_endpoint
aws_settings = aws_fixtures.aws_settings

TABLE = "ojs-cluster"
PREFIX = "ojscl"
N_JOBS = 300
CHUNK = 25
WORKERS = 6
VISIBILITY_MS = 60_000  # longer than the load phase: any redelivery is a double claim
LOAD_BOUND = 150.0  # seconds for the 300 jobs: a hang detector, not a benchmark
CRON_GRACE = 8.0  # an occurrence this long past must have fired


class AlternatingTarget(Target):
    """A worker target that names the next server each time it is read.

    ``run_worker`` reads ``url`` once per fetch (and acks on that same server), so a
    worker's fetches go to the servers in turn.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.generation = 0
        self._urls = itertools.cycle(urls)
        self.reads: Counter[str] = Counter()

    @property  # type: ignore[override]
    def url(self) -> str:
        url = next(self._urls)
        self.reads[url] += 1
        return url


def sqs_storage_url(settings: AwsSettings) -> str:
    query = urlencode({"endpoint": settings.endpoint_url, "prefix": settings.queue_prefix})
    return f"sqs://{settings.region}/{settings.dynamodb_table}?{query}"


async def cron_jobs(settings: AwsSettings, cron_name: str) -> list[dict[str, Any]]:
    """Every job record in the table that the cron ``cron_name`` created."""
    records: list[dict[str, Any]] = []
    async with open_aws_clients(settings) as clients:
        start: dict[str, Any] | None = None
        while True:
            page = await clients.dynamodb.scan(
                TableName=settings.dynamodb_table,
                FilterExpression="begins_with(pk, :job)",
                ExpressionAttributeValues={":job": {"S": "JOB#"}},
                **({"ExclusiveStartKey": start} if start else {}),
            )
            for item in page.get("Items", []):
                record = json.loads(item["body"]["S"])
                if (record.get("meta") or {}).get("cron_name") == cron_name:
                    records.append(record)
            start = page.get("LastEvaluatedKey")
            if not start:
                return records


async def test_two_servers_on_one_moto_claim_exclusively_and_cron_fires_once(
    aws_settings: AwsSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = replace(aws_settings, dynamodb_table=TABLE, queue_prefix=PREFIX)
    # The servers inherit the environment (``ojs_server`` drops only OJS_*).
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = sqs_storage_url(settings)
    queue = "sqsload"
    cron_name = "sqs-cluster-minutely"

    # One after the other: the first creates the table, the second finds it.
    async with (
        ojs_server(tmp_path, "a", url) as a,
        ojs_server(tmp_path, "b", url) as b,
        httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client,
    ):
        servers = (a, b)

        # The cron schedule is registered once, on one server; both servers tick.
        registered_from = time.time()
        response = await client.post(
            f"{a.url}/ojs/v1/cron",
            json={
                "name": cron_name,
                "expression": "* * * * *",
                # Nobody consumes the cron queue; "skip" would skip every later run.
                "overlap_policy": "allow",
                "job_template": {"type": "cron.tick", "args": [], "options": {"queue": "cron"}},
            },
        )
        assert response.status_code == 201, response.text
        registered_at = time.time()
        second_boundary = (math.floor(registered_at / 60) + 2) * 60

        ledger = Ledger()
        enqueued: list[str] = []
        all_acked = trio.Event()
        batches_done = [0.0]
        targets = [AlternatingTarget([s.url for s in servers[i % 2 :] + servers[: i % 2]])
                   for i in range(WORKERS)]  # fmt: skip

        def on_ack() -> None:
            if ledger.ok_acks >= N_JOBS:
                all_acked.set()

        async def producer(server: Server, chunks: range) -> None:
            for chunk in chunks:
                jobs = [load_job(queue, n) for n in range(chunk * CHUNK, (chunk + 1) * CHUNK)]
                enqueued.extend(await enqueue_batch(client, server.url, jobs))
            batches_done[0] = trio.current_time()

        started = trio.current_time()
        with trio.move_on_after(LOAD_BOUND) as bound:
            async with trio.open_nursery() as nursery:
                chunks = N_JOBS // CHUNK
                nursery.start_soon(producer, a, range(0, chunks, 2))
                nursery.start_soon(producer, b, range(1, chunks, 2))
                for i, target in enumerate(targets):
                    nursery.start_soon(
                        partial(run_worker, target, f"w{i}", ledger, queue=queue, count=5,
                                visibility_ms=VISIBILITY_MS, wait_ms=1000, on_ack=on_ack)
                    )  # fmt: skip
                await all_acked.wait()
                nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - started
        assert not bound.cancelled_caught, (
            f"only {ledger.ok_acks} of {N_JOBS} jobs acked, {len(enqueued)} enqueued, "
            f"within {LOAD_BOUND:.0f} s\n[a]\n{log_tail(a.log)}\n[b]\n{log_tail(b.log)}"
        )
        assert a.alive() and b.alive()
        fetches = [r for r in ledger.requests if r.kind == "fetch"]
        acks = [r for r in ledger.requests if r.kind == "ack"]
        print(
            f"\n[sqs two servers] {N_JOBS} jobs in {elapsed:.1f} s "
            f"(enqueue done after {batches_done[0] - started:.1f} s; {len(fetches)} fetches, "
            f"{len(acks)} acks, ack p50 "
            f"{sorted(r.duration for r in acks)[len(acks) // 2] * 1000:.1f} ms)"
        )
        per_worker = Counter(d.worker for d in ledger.deliveries)
        per_server = sum((t.reads for t in targets), Counter[str]())
        print(f"[sqs two servers] deliveries per worker: {dict(sorted(per_worker.items()))}")
        print(f"[sqs two servers] fetch rounds per server: {dict(per_server)}")
        assert set(per_server) == {a.url, b.url}

        # Each job: enqueued once, delivered once, acked once (200), by its holder.
        assert len(enqueued) == len(set(enqueued)) == N_JOBS
        delivered = Counter(d.job_id for d in ledger.deliveries)
        twice = [job_id for job_id, n in delivered.items() if n > 1]
        assert not twice, f"{len(twice)} jobs delivered more than once, e.g. {twice[:5]}"
        assert set(delivered) == set(enqueued)
        statuses = Counter(a.status for a in ledger.acks)
        assert statuses == {200: N_JOBS}, statuses
        acked = Counter(a.job_id for a in ledger.acks)
        assert set(acked) == set(enqueued) and max(acked.values()) == 1
        holder = {d.job_id: (d.worker, d.at) for d in ledger.deliveries}
        for ack in ledger.acks:
            assert holder[ack.job_id][0] == ack.worker and holder[ack.job_id][1] <= ack.at

        # ... and both servers say completed, on the first attempt.
        seen: dict[tuple[str, str], tuple[str, int]] = {}

        async def check_jobs(server: Server, ids: list[str]) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as own:
                for job_id in ids:
                    response = await own.get(f"/ojs/v1/jobs/{job_id}")
                    assert response.status_code == 200, response.text
                    job = response.json()["job"]
                    seen[server.name, job_id] = (job["state"], job["attempt"])

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for server in servers:
                    for part in range(2):
                        nursery.start_soon(check_jobs, server, enqueued[part::2])
        states = Counter(seen.values())
        assert states == {("completed", 1): 2 * N_JOBS}, states

        # The cron: stay up (both servers) until two minute boundaries have passed.
        wait = max(0.0, second_boundary + CRON_GRACE - time.time())
        print(f"[sqs two servers] waiting {wait:.0f} s more for the cron")
        await trio.sleep(wait)
        assert a.alive(), f"server a died:\n{log_tail(a.log)}"
        assert b.alive(), f"server b died:\n{log_tail(b.log)}"
        checked_at = time.time()
        with trio.fail_after(60):
            records = await cron_jobs(settings, cron_name)
        per_text = Counter(r["meta"]["cron_occurrence"] for r in records)
        per_occurrence = {epoch(text): n for text, n in per_text.items()}
        print(f"[sqs two servers] cron jobs per occurrence: {dict(per_text)}")
        assert all(n == 1 for n in per_occurrence.values()), per_occurrence
        assert all(r["queue"] == "cron" and r["state"] == "available" for r in records), records
        boundaries = range(math.ceil(registered_from / 60) * 60, int(checked_at) + 1, 60)
        must = {float(t) for t in boundaries if registered_at < t <= checked_at - CRON_GRACE}
        may = {float(t) for t in boundaries if registered_from < t}
        assert len(must) >= 2
        assert must <= set(per_occurrence) <= may, (sorted(must), sorted(per_occurrence))
        # Both servers see the same cron jobs through the API.
        for server in servers:
            response = await client.get(f"{server.url}/ojs/v1/queues/cron/stats")
            assert response.status_code == 200, response.text
            assert response.json()["queue"].get("available") == len(records), response.text
    assert a.process.returncode is not None and b.process.returncode is not None
