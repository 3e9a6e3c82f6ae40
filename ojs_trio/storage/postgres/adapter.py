"""PostgreSQL storage: one transaction per port verb, the engine's rules inside it.

Every verb locks the rows it changes (``FOR UPDATE``, ``SKIP LOCKED`` for
claims and timers), applies the engine's pure lifecycle/workflow/unique rules
to them in Python, and writes them back in the same transaction, so several
server processes can share one database: a claim is exclusive, a cron
occurrence fires once (compare-and-set on ``next_run_at``), and a reaper or
promoter pass run twice finds nothing the second time.

Jobs made available are announced with one ``NOTIFY ojs_jobs`` per
transaction (payload: the queue names), which wakes fetchers in every server.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import psycopg
import trio
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads

from ojs_trio import jsoncodec
from ojs_trio.engine import lifecycle, unique, workflows
from ojs_trio.engine.cron import CronFire, CronRecord, set_enabled
from ojs_trio.engine.errors import BackendError, DuplicateJob, NotFound, OjsError
from ojs_trio.engine.job import DEFAULT_VISIBILITY_MS, Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.queue_limits import queue_limits_from
from ojs_trio.engine.states import JobState
from ojs_trio.engine.workflows import Workflow
from ojs_trio.storage.port import (
    AckRequest,
    ClaimRequest,
    DeadLetterPage,
    EnqueueResult,
    QueueInfo,
    StorageListener,
)
from ojs_trio.storage.postgres.coalesce import Coalescer, CoalescerStatistics
from ojs_trio.storage.postgres.driver import (
    Notification,
    TrioConnection,
    map_errors,
    open_listener,
    open_pool,
)
from ojs_trio.storage.postgres.migrate import migrate
from ojs_trio.storage.postgres.sql import q

log = logging.getLogger("ojs_trio.postgres")

CHANNEL = "ojs_jobs"
MAX_SERIALIZATION_RETRIES = 5
VACUUM_CHECK_INTERVAL = 10.0  # seconds
VACUUM_MIN_DEAD_ROWS = 50_000
VACUUM_LOCK_KEY = 0x6F6A735F76616375  # "ojs_vacu"
NOTIFY_LIMIT = 7900
T = TypeVar("T")
# job id, transition, now, and for an ack its (worker, result, has_result)
Settle = tuple[str, Callable[[Job], None], float, tuple[str | None, Any, bool] | None]
Enqueue = tuple[Sequence[Job], float]  # one enqueue call: its jobs, now
Beat = tuple[str | None, tuple[str, ...], int | None, float]  # worker, jobs, visibility, now
TERMINAL = (JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED)


def _columns(job: Job) -> dict[str, Any]:
    """The job's column values as statement parameters (``record`` as Jsonb)."""
    row = _row(job)
    row["record"] = Jsonb(row["record"])
    return row


def _rows(jobs: Sequence[Job]) -> Jsonb:
    """Many jobs' column values as one JSON array parameter (for jsonb_to_recordset).

    One ``json.dumps`` of the whole batch: a ``jsonb[]`` parameter would be quoted
    and escaped element by element in Python, which costs more than the query.
    """
    return Jsonb([_row(job) for job in jobs])


def _row(job: Job) -> dict[str, Any]:
    """The job's column values, ``record`` as a plain dict."""
    lease = None
    if job.state is JobState.ACTIVE:
        lease = job.lease_expires_at
        deadline = job.execution_deadline()
        if deadline is not None:
            lease = deadline if lease is None else min(lease, deadline)
    run_at = job.scheduled_at if job.state in (JobState.SCHEDULED, JobState.RETRYABLE) else None
    finished = None
    if job.state in TERMINAL:
        finished = job.completed_at or job.discarded_at or job.cancelled_at
    return {
        "id": job.id,
        "finished": job.state in TERMINAL,
        "queue": job.queue,
        "state": job.state.value,
        "priority": job.priority,
        "run_at": run_at,
        "lease_until": lease,
        "expires_at": job.expires_at,
        "unique_key": job.unique_key,
        "workflow_id": job.workflow_id,
        "dead_letter": job.state is JobState.DISCARDED and job.dead_letter,
        "worker_id": job.worker_id if job.state is JobState.ACTIVE else None,
        "created_at": job.created_at,
        "finished_at": finished,
        "record": job.to_record(),
    }


UPDATE_COLUMNS = (
    "id",
    "finished",
    "state",
    "priority",
    "run_at",
    "lease_until",
    "expires_at",
    "dead_letter",
    "worker_id",
    "finished_at",
    "record",
)


def _update_rows(jobs: Iterable[Job]) -> Jsonb:
    """Parameter of ``update_jobs``: what ``update_job`` writes, for many (distinct) jobs."""
    out = []
    for job in jobs:
        row = _row(job)
        out.append({name: row[name] for name in UPDATE_COLUMNS})
    return Jsonb(out)


def _is_serialization_failure(exc: BaseException) -> bool:
    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected)


async def _configure_session(conn: TrioConnection) -> None:
    set_json_dumps(jsoncodec.dumps, conn)
    set_json_loads(jsoncodec.loads, conn)
    await conn.execute(q("configure_session"))


def _job(row: Sequence[Any]) -> Job:
    """A job from ``record, state, worker_id, attempt, started_at, lease_expires_at,
    finished_at, ack_result``.

    While ``attempt`` is set, a claim's changes live in those columns instead of
    the record (migration 0002), and so do a plain ack's (migration 0003): they
    are laid over it here, as lifecycle.claim and lifecycle.ack would apply them.
    """
    job = Job.from_record(row[0])
    if row[3] is not None:
        job.state = JobState(row[1])
        job.attempt = row[3]
        job.started_at = row[4]
        if job.state is JobState.ACTIVE:
            job.worker_id = row[2]
            job.lease_expires_at = row[5]
            job.scheduled_at = None
        elif job.state is JobState.COMPLETED:
            job.worker_id = row[2]
            job.lease_expires_at = None
            job.scheduled_at = None
            job.completed_at = row[6]
            job.error = None
            boxed = row[7]
            job.has_result = boxed is not None
            job.result = boxed[0] if boxed is not None else None
    return job


def _plain_calls(calls: Sequence[Enqueue]) -> list[list[Job]] | None:
    """The calls' jobs if none needs the general path, else None.

    The general path is needed for unique policies, queue limits, and ids that
    repeat within the batch (their DuplicateJob must name the right call).  The
    jobs are not copied: what is stored is their serialized form, so the caller
    keeps its objects (as the results).
    """
    staged: list[list[Job]] = []
    seen: set[str] = set()
    for jobs, _ in calls:
        kept = []
        for job in jobs:
            if job.unique is not None or job.id in seen:
                return None
            if job.options_extra and (
                "rate_limit" in job.options_extra or "concurrency" in job.options_extra
            ):
                return None
            seen.add(job.id)
            if job.unique_key is not None:  # meaningless without a unique policy
                job = job.clone()
                job.unique_key = None
            kept.append(job)
        staged.append(kept)
    return staged


_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _is_uuid(value: str) -> bool:
    """Ids that cannot be UUIDs are unknown here, not a database error."""
    return bool(_UUID.match(value))


def _ack_item(ack: AckRequest, now: float) -> Settle:
    """An ack as a settle item: the engine's rule, and its arguments for ack_plain."""
    apply = partial(
        lifecycle.ack,
        worker_id=ack.worker_id,
        result=ack.result,
        has_result=ack.has_result,
        now=now,
    )
    return (ack.job_id, apply, now, (ack.worker_id, ack.result, ack.has_result))


class PostgresStorage:
    name = "postgresql"
    # ojs-unique-jobs.md 8 (docs/unique-jobs.md): why a lock and not a constraint.
    unique_guarantee = (
        "strong",
        "transaction-scoped advisory lock (pg_advisory_xact_lock) on the unique key's "
        "hash, taken inside the inserting transaction before the duplicate check",
    )

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        rng: random.Random | None = None,
        apply_migrations: bool = True,
        vacuum_check_interval: float = VACUUM_CHECK_INTERVAL,
        vacuum_min_dead_rows: int = VACUUM_MIN_DEAD_ROWS,
        group_commit: bool = True,
    ) -> None:
        """``group_commit=False`` turns group commit off (a benchmark baseline,
        bench/scenarios/groupcommit.py): each enqueue, ack, nack, cancel and
        heartbeat call then runs as a batch of one on a pooled connection of its
        own, concurrently with the others.  ``ack_many`` is one call either way.
        """
        self.conninfo = conninfo
        self.group_commit = group_commit
        self.vacuum_check_interval = vacuum_check_interval
        self.vacuum_min_dead_rows = vacuum_min_dead_rows
        self.vacuums = 0
        self._min_size = min_size
        self._max_size = max_size
        self._rng = rng or random.Random()
        self._apply_migrations = apply_migrations
        self._listener: StorageListener | None = None
        self._stack: AsyncExitStack | None = None
        self._pool: Any = None
        self._enqueues: Coalescer[Enqueue, list[EnqueueResult]] = Coalescer(
            lambda calls: self._retry(lambda: self._enqueue_batch(calls)),
            coalesce=group_commit,
            # A producer waits for its enqueue: the leader hands the next batch
            # over as soon as its own has committed.  Running on for 5 ms held
            # one caller every few milliseconds 5 ms longer, and that set the
            # embedded enqueue p99 (docs/performance.md, 2026-12-07 evening).
            handover_after=0.0,
        )
        self._beats: Coalescer[Beat, list[Job]] = Coalescer(
            lambda beats: self._retry(lambda: self._heartbeat_batch(beats)),
            coalesce=group_commit,
        )
        self._settles: Coalescer[Settle, Job] = Coalescer(self._settle_batch, coalesce=group_commit)

    def group_commit_statistics(self) -> dict[str, CoalescerStatistics]:
        """Calls and batches so far of each coalesced verb (batch size = calls / batches)."""
        return {
            "enqueue": self._enqueues.statistics(),
            "settle": self._settles.statistics(),
            "heartbeat": self._beats.statistics(),
        }

    # -- lifecycle ---------------------------------------------------------------------

    def set_listener(self, listener: StorageListener | None) -> None:
        self._listener = listener

    async def open(self) -> None:
        stack = AsyncExitStack()
        self._pool = await stack.enter_async_context(
            open_pool(
                self.conninfo,
                min_size=self._min_size,
                max_size=self._max_size,
                configure=_configure_session,
            )
        )
        self._stack = stack
        if self._apply_migrations:
            async with self._pool.connection() as conn:
                await migrate(conn)

    async def aclose(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def listen(self) -> None:
        """Run until cancelled: turn NOTIFYs from any server into fetcher wake-ups,
        and keep the live partition vacuumed (:meth:`vacuum_if_needed`)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_vacuumed)
            await self._listen_for_notifications()

    async def _keep_vacuumed(self) -> None:
        while True:
            await trio.sleep(self.vacuum_check_interval)
            try:
                await self.vacuum_if_needed()
            except BackendError as exc:
                log.warning("vacuum check failed: %s", exc.message)

    async def vacuum_if_needed(self) -> bool:
        """Vacuum ojs_jobs_live if dead row versions outnumber the live rows.

        Every transition rewrites a row, and a claim steps over the index entries
        of dead versions until a vacuum removes them: with autovacuum off or behind
        (its default naptime is a minute; a busy server leaves thousands of dead
        versions a second), claims after a million jobs were 5-10x slower.  The
        threshold (dead > max(live, ``vacuum_min_dead_rows``)) keeps this quiet
        where autovacuum keeps up.  One server at a time (advisory lock).
        """
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("live_partition_dead_rows"))
                row = await cur.fetchone()
                dead, live = (int(row[0]), int(row[1])) if row else (0, 0)
                if dead < max(live, self.vacuum_min_dead_rows):
                    return False
                cur = await conn.execute(q("try_vacuum_lock"), (VACUUM_LOCK_KEY,))
                locked = await cur.fetchone()
                if not (locked and locked[0]):
                    return False  # another server is vacuuming
                try:
                    started = trio.current_time()
                    # A utility statement: never prepared (psycopg would after 5 runs).
                    await conn.execute(q("vacuum_live_partition"), prepare=False)
                    self.vacuums += 1
                    log.info(
                        "vacuumed ojs_jobs_live (%d dead row versions) in %.2f s",
                        dead,
                        trio.current_time() - started,
                    )
                finally:
                    with trio.CancelScope(shield=True):
                        await conn.execute(q("vacuum_unlock"), (VACUUM_LOCK_KEY,))
        return True

    async def _listen_for_notifications(self) -> None:
        async with open_listener(self.conninfo, [CHANNEL]) as events:
            async for event in events:
                if self._listener is None:
                    continue
                if isinstance(event, Notification):
                    # An empty payload (too many queues to list) wakes every fetch.
                    self._listener.queues_ready([n for n in event.payload.split(",") if n])
                else:
                    # Reconnected: notifications may have been missed meanwhile.
                    self._listener.queues_ready([])

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[TrioConnection]:
        with map_errors():
            async with self._pool.transaction() as conn:
                yield conn

    async def _retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run a transaction again when it lost a race with a row moving partitions.

        A job moves from ojs_jobs_live to ojs_jobs_done when it finishes; a
        transaction that waited on its lock meanwhile gets a serialization
        failure instead of the new row version.  Re-running it sees the row
        where it is now.
        """
        for tries in range(1, MAX_SERIALIZATION_RETRIES + 1):
            try:
                return await attempt()
            except BackendError as exc:
                if tries == MAX_SERIALIZATION_RETRIES or not _is_serialization_failure(exc):
                    raise
                await trio.sleep(0.001 * tries * self._rng.random())
        raise AssertionError("unreachable")

    async def ping(self) -> dict[str, Any]:
        start = trio.current_time()
        with map_errors():
            async with self._pool.connection() as conn:
                await conn.execute("SELECT 1")
        return {
            "type": self.name,
            "status": "connected",
            "latency_ms": round((trio.current_time() - start) * 1000, 2),
            "pool": vars(self._pool.statistics()) if hasattr(self._pool, "statistics") else {},
            "group_commit": {k: vars(v) for k, v in self.group_commit_statistics().items()},
        }

    async def reset(self) -> None:
        async with self._tx() as conn:
            await conn.execute(q("reset"))

    # -- helpers -------------------------------------------------------------------

    async def _lock(self, conn: TrioConnection, job_id: str) -> Job:
        cur = await conn.execute(q("lock_job"), (job_id,))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"Job {job_id} not found", details={"job_id": job_id})
        return _job(row)

    async def _write(self, conn: TrioConnection, job: Job, now: float) -> list[Job]:
        """Persist ``job``; apply workflow rules if it belongs to one.  Returns spawned jobs."""
        await conn.execute(q("update_job"), _columns(job))
        if job.workflow_id is None:
            return []
        cur = await conn.execute(q("lock_workflow"), (job.workflow_id,))
        row = await cur.fetchone()
        if row is None:
            return []
        workflow = Workflow.from_record(row[0])
        if job.state is JobState.ACTIVE:
            workflows.on_job_started(workflow, job, now)
            spawned: list[Job] = []
        else:
            spawned = workflows.on_job_finished(workflow, job, now)
        for new in spawned:
            await self._insert(conn, new, now)
        await conn.execute(
            q("update_workflow"), (workflow.state, Jsonb(workflow.to_record()), workflow.id)
        )
        return spawned

    async def _insert(self, conn: TrioConnection, job: Job, now: float) -> None:
        job.unique_key = unique.fingerprint(job)
        await conn.execute(q("ensure_queue"), (job.queue, now))
        cur = await conn.execute(q("job_exists"), ([job.id],))
        if await cur.fetchone() is not None:
            raise DuplicateJob(
                f"A job with id {job.id} already exists", details={"existing_job_id": job.id}
            )
        try:
            await conn.execute(q("insert_job"), _columns(job))
        except psycopg.errors.UniqueViolation:
            raise DuplicateJob(
                f"A job with id {job.id} already exists", details={"existing_job_id": job.id}
            ) from None

    async def _notify(self, conn: TrioConnection, jobs: Sequence[Job]) -> None:
        queues = sorted({j.queue for j in jobs if j.state is JobState.AVAILABLE})
        if queues:
            payload = ",".join(queues)
            # NOTIFY payloads stop at 8000 bytes; an empty one means "look everywhere".
            await conn.execute(q("notify"), (payload if len(payload) < NOTIFY_LIMIT else "",))

    def _created(self, jobs: list[Job]) -> None:
        if jobs and self._listener is not None:
            self._listener.jobs_created(jobs)

    # -- verbs ---------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        """Coalesced with concurrent enqueues: one transaction, a savepoint per call."""
        return await self._enqueues.submit((jobs, now))

    async def _enqueue_batch(
        self, calls: Sequence[Enqueue]
    ) -> list[list[EnqueueResult] | BaseException]:
        staged = _plain_calls(calls)
        if staged is not None:
            try:
                return await self._enqueue_plain(calls, staged)
            except BackendError as exc:
                if not isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                    raise
                # A concurrent enqueue took one of these ids meanwhile: nothing was
                # written; sort it out call by call below.
        return await self._enqueue_each(calls)

    async def _enqueue_plain(
        self, calls: Sequence[Enqueue], staged: list[list[Job]]
    ) -> list[list[EnqueueResult] | BaseException]:
        """Calls without unique policies or queue limits: one autocommitted statement."""
        rows = []
        for index, jobs in enumerate(staged):
            for job in jobs:
                row = _row(job)
                row["call"] = index
                rows.append(row)
        params = {
            "rows": Jsonb(rows),
            "now": min(now for _, now in calls),
            "limit": NOTIFY_LIMIT,
        }
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("enqueue_plain"), params)
                clashes = {call: job_id for call, job_id in await cur.fetchall() if call >= 0}
        outcomes: list[list[EnqueueResult] | BaseException] = []
        for index, jobs in enumerate(staged):
            taken = clashes.get(index)
            if taken is not None:
                outcomes.append(
                    DuplicateJob(
                        f"A job with id {taken} already exists",
                        details={"existing_job_id": taken},
                    )
                )
            else:
                outcomes.append([EnqueueResult(job, created=True) for job in jobs])
        return outcomes

    async def _enqueue_each(
        self, calls: Sequence[Enqueue]
    ) -> list[list[EnqueueResult] | BaseException]:
        outcomes: list[list[EnqueueResult] | BaseException] = []
        inserted: list[Job] = []
        async with self._tx() as conn:
            for jobs, now in calls:
                try:
                    # A savepoint: one call's failure leaves the others' jobs in place.
                    async with conn.transaction():
                        results = await self._enqueue_in(conn, jobs, now)
                except OjsError as exc:
                    outcomes.append(exc)
                    continue
                outcomes.append(results)
                inserted += [r.job for r in results if r.created]
            await self._notify(conn, inserted)
        return outcomes

    async def _enqueue_in(
        self, conn: TrioConnection, jobs: Sequence[Job], now: float
    ) -> list[EnqueueResult]:
        """One enqueue call, all or nothing (the caller holds a savepoint)."""
        staged = [job.clone() for job in jobs]
        ids = [job.id for job in staged]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DuplicateJob(
                f"A job with id {dup} already exists", details={"existing_job_id": dup}
            )
        cur = await conn.execute(q("job_exists"), (ids,))
        clash = await cur.fetchone()
        if clash is not None:
            raise DuplicateJob(
                f"A job with id {clash[0]} already exists",
                details={"existing_job_id": str(clash[0])},
            )
        results: list[EnqueueResult] = []
        plain: list[Job] = []  # no unique policy: inserted together at the end
        batch_keys: dict[str, Job] = {}
        for job in staged:
            key = unique.fingerprint(job)
            job.unique_key = key
            if key is None:
                plain.append(job)
                results.append(EnqueueResult(job, created=True))
                continue
            existing = await self._unique_holder(conn, job, key, batch_keys.get(key), now)
            policy = unique.on_conflict(job)
            if existing is not None and policy == "reject":
                raise DuplicateJob(
                    "A job with the same unique key already exists",
                    details={"existing_job_id": existing.id, "unique_key": key},
                )
            if existing is not None and policy == "ignore":
                results.append(EnqueueResult(existing.clone(), created=False))
                continue
            replaced = None
            if existing is not None and not existing.state.is_terminal:
                if existing.id in ids:
                    raise DuplicateJob(
                        "Two jobs in one batch replace each other", details={"unique_key": key}
                    )
                unique.inherit_schedule(job, existing)
                lifecycle.cancel(existing, now)
                await self._write(conn, existing, now)
                replaced = existing
            batch_keys[key] = job
            await self._insert(conn, job, now)
            results.append(EnqueueResult(job, created=True, replaced=replaced))
        if plain:
            await conn.execute(q("ensure_queues"), (sorted({j.queue for j in plain}), now))
            try:
                await conn.execute(q("insert_jobs"), (_rows(plain),))
            except psycopg.errors.UniqueViolation:
                # A concurrent enqueue with the same client-provided id won the race.
                raise DuplicateJob(
                    "A job with one of these ids already exists",
                    details={"job_ids": [j.id for j in plain]},
                ) from None
        for job in staged:
            limits = queue_limits_from(job.options_extra)
            if limits is not None:
                rate, concurrency = limits
                await conn.execute(
                    q("set_queue_limits"),
                    {
                        "name": job.queue,
                        "rate_limit": Jsonb(rate) if rate is not None else None,
                        "concurrency": concurrency,
                    },
                )
        return [
            EnqueueResult(r.job.clone(), r.created, r.replaced.clone() if r.replaced else None)
            for r in results
        ]

    async def _unique_holder(
        self, conn: TrioConnection, job: Job, key: str, twin: Job | None, now: float
    ) -> Job | None:
        """The job that blocks ``job`` under its unique policy, if any."""
        # Serialise writers of one fingerprint, for this transaction only.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
        if twin is not None:
            return twin if unique.conflicts(job, twin, now) else None
        cur = await conn.execute(q("lock_unique"), (key,))
        for row in reversed(await cur.fetchall()):
            candidate = _job(row)
            if unique.conflicts(job, candidate, now):
                return candidate
        return None

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[list[Job]]:
        """Serve the requests queue by queue, first come first served.

        Requests that list the same queues (all the fetches of one fetcher pool)
        are served together: for each queue in their order, the rows for all of
        them are claimed by one statement (``claim_plain``), which commits on its
        own; a queue with a rate or concurrency limit takes the transactional path.
        A failure never leaves a job claimed but not returned (short of the
        connection dying after a commit, which the reaper recovers at lease
        expiry): when a later queue's claim fails, the jobs committed for the
        earlier ones are returned and the error is logged (it is raised only if
        nothing was claimed).  If marking claimed workflow members started fails,
        they are returned all the same: their workflow's record then shows them
        waiting until they settle (and lacks ``started_at`` if they were its
        first), which is cosmetic, where a lost delivery costs a lease.
        """
        out: list[list[Job]] = [[] for _ in requests]
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(tuple(request.queues), []).append(index)
        in_workflows: list[Job] = []
        claimed = 0
        try:
            for queue_order, members in groups.items():
                for name in queue_order:
                    slots = [i for i in members for _ in range(requests[i].count - len(out[i]))]
                    if not slots:
                        break
                    jobs = await self._retry(partial(self._claim_queue, name, slots, requests, now))
                    claimed += len(jobs)
                    for job, index in zip(jobs, slots, strict=False):
                        out[index].append(job)
                        if job.workflow_id is not None:
                            in_workflows.append(job)
        except OjsError as exc:
            if not claimed:
                raise
            log.warning("claim stopped after %d jobs: %s", claimed, exc.message)
        if in_workflows:
            try:
                await self._retry(lambda: self._mark_started(in_workflows, now))
            except OjsError as exc:
                log.warning(
                    "claimed workflow members not marked started (%d): %s",
                    len(in_workflows),
                    exc.message,
                )
        return out

    async def _claim_queue(
        self, name: str, slots: list[int], requests: Sequence[ClaimRequest], now: float
    ) -> list[Job]:
        """Claim for ``slots`` (request indexes, one per job wanted) from one queue."""
        params = {
            "queue": name,
            "now": now,
            "default_ms": DEFAULT_VISIBILITY_MS,
            "slots": Jsonb(
                [
                    {
                        "n": n,
                        "worker_id": requests[index].worker_id,
                        "visibility_ms": requests[index].visibility_ms,
                    }
                    for n, index in enumerate(slots, start=1)
                ]
            ),
        }
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("claim_plain"), params)
                rows = await cur.fetchall()
        if rows and rows[0][0] is None:
            return await self._claim_limited(name, slots, requests, now)
        rows.sort(key=lambda row: row[0])
        return [_job(row[1:]) for row in rows]

    async def _claim_limited(
        self, name: str, slots: list[int], requests: Sequence[ClaimRequest], now: float
    ) -> list[Job]:
        """The claim for a queue with a rate or concurrency limit, budget counted first."""
        claimed: list[Job] = []
        async with self._tx() as conn:
            cur = await conn.execute(q("queues_for_claim"), ([name],))
            row = await cur.fetchone()
            if row is None:
                return []
            _, paused, rate, concurrency = row
            budget = await self._budget(conn, name, paused, rate, concurrency, now)
            need = len(slots) if budget is None else min(len(slots), budget)
            if need <= 0:
                return []
            cur = await conn.execute(q("claim_available"), (name, now, need))
            rows = await cur.fetchall()
            if rate is not None and rows:
                await conn.execute(q("record_starts"), (name, now, len(rows)))
            for record, index in zip(rows, slots, strict=False):
                job = _job(record)
                request = requests[index]
                lifecycle.claim(job, request.worker_id, request.visibility_ms, now)
                claimed.append(job)
            if claimed:
                await conn.execute(q("update_jobs"), (_update_rows(claimed),))
        return claimed

    async def _mark_started(self, jobs: Sequence[Job], now: float) -> None:
        """Record claimed workflow members as started in their workflows.

        A separate transaction after the claim: if a member changed meanwhile
        (its workflow was cancelled), the workflow has seen that change already.
        """
        async with self._tx() as conn:
            # Members first, then workflows, each in id order: the order settles lock in.
            cur = await conn.execute(q("lock_jobs"), (sorted(j.id for j in jobs),))
            current = {found.id: found for found in map(_job, await cur.fetchall())}
            still = [
                job
                for job in jobs
                if (found := current.get(job.id)) is not None
                and found.state is JobState.ACTIVE
                and found.attempt == job.attempt
            ]
            for workflow_id in sorted({str(job.workflow_id) for job in still}):
                cur = await conn.execute(q("lock_workflow"), (workflow_id,))
                found = await cur.fetchone()
                if found is None:
                    continue
                workflow = Workflow.from_record(found[0])
                for job in still:
                    if str(job.workflow_id) == workflow_id:
                        workflows.on_job_started(workflow, job, now)
                await conn.execute(
                    q("update_workflow"),
                    (workflow.state, Jsonb(workflow.to_record()), workflow.id),
                )

    async def _budget(
        self,
        conn: TrioConnection,
        name: str,
        paused: bool,
        rate: dict[str, Any] | None,
        concurrency: int | None,
        now: float,
    ) -> int | None:
        if paused:
            return 0
        budget: int | None = None
        if rate is not None:
            window = int(rate["window_ms"]) / 1000.0
            cur = await conn.execute(q("recent_starts"), (name, now - window))
            row = await cur.fetchone()
            budget = max(0, int(rate["limit"]) - int(row[0] if row else 0))
        if concurrency is not None:
            cur = await conn.execute(q("count_active"), (name,))
            row = await cur.fetchone()
            room = max(0, concurrency - int(row[0] if row else 0))
            budget = room if budget is None else min(budget, room)
        return budget

    async def _settle(
        self,
        job_id: str,
        apply: Callable[[Job], None],
        now: float,
        ack: tuple[str | None, Any, bool] | None = None,
    ) -> Job:
        """ack/nack/cancel: coalesced with concurrent settles into one transaction."""
        if not _is_uuid(job_id):
            raise NotFound(f"Job {job_id} not found", details={"job_id": job_id})
        return await self._settles.submit((job_id, apply, now, ack))

    async def _settle_batch(self, items: Sequence[Settle]) -> list[Job | BaseException]:
        """Plain acks in one statement; everything else (and acks it left) in one transaction.

        A plain-ack statement that lost a race (serialization failure or deadlock)
        committed nothing: its acks go down the general path too.

        Each item's outcome is that of the statement or transaction that held it:
        when the general transaction fails, the plain acks committed before it
        still report their jobs, and only the general path's items get its error.
        """
        outcomes: list[Job | BaseException | None] = [None] * len(items)
        seen = Counter(item[0] for item in items)
        # An id settled twice in the batch goes down the general path, in order.
        fast = [k for k, item in enumerate(items) if item[3] is not None and seen[item[0]] == 1]
        plain = set(fast)
        general = [k for k in range(len(items)) if k not in plain]
        if fast:
            try:
                done = await self._ack_plain([items[k] for k in fast])
            except Exception as exc:  # nothing of it committed (or unknown): its acks only
                if _is_serialization_failure(exc):
                    # Lost a race (nothing committed): the general path retries them
                    # and reports what the race left, e.g. a conflict.
                    general += fast
                else:
                    for k in fast:
                        outcomes[k] = exc
            else:
                for k in fast:
                    if (job := done.get(items[k][0])) is not None:
                        outcomes[k] = job
                    else:  # not active, or held by another worker: the rules say why
                        general.append(k)
        if general:
            general.sort()  # the batch's order, for two settles of one job
            try:
                # Retried alone: the plain acks above have committed already.
                settled = await self._retry(
                    partial(self._settle_general, [items[k] for k in general])
                )
            except Exception as exc:
                settled = [exc] * len(general)
            for k, outcome in zip(general, settled, strict=True):
                outcomes[k] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    async def _ack_plain(self, items: Sequence[Settle]) -> dict[str, Job]:
        rows = []
        ids = []
        for job_id, _, now, ack in items:
            assert ack is not None
            ids.append(job_id)
            worker_id, result, has_result = ack
            rows.append(
                {
                    "id": job_id,
                    "worker_id": worker_id,
                    "now": now,
                    "has_result": has_result,
                    "result": result if has_result else None,
                }
            )
        with map_errors():
            async with self._pool.connection() as conn:
                # An array literal: the ids were checked to be UUIDs, and a list
                # parameter is dumped element by element.
                params = {"acks": Jsonb(rows), "ids": "{" + ",".join(ids) + "}"}
                cur = await conn.execute(q("ack_plain"), params)
                return {job.id: job for job in map(_job, await cur.fetchall())}

    async def _settle_general(self, items: Sequence[Settle]) -> list[Job | BaseException]:
        outcomes: list[Job | BaseException] = []
        spawned: list[Job] = []
        changed: list[Job] = []
        plain: dict[str, Job] = {}  # latest state of each job outside workflows
        async with self._tx() as conn:
            ids = sorted({item[0] for item in items})
            # Lock in id order so concurrent batches from other servers cannot deadlock.
            cur = await conn.execute(q("lock_jobs"), (ids,))
            current = {job.id: job for job in map(_job, await cur.fetchall())}
            for job_id, apply, now, _ in items:
                job = current.get(job_id)
                if job is None:
                    outcomes.append(NotFound(f"Job {job_id} not found", details={"job_id": job_id}))
                    continue
                candidate = job.clone()
                try:
                    apply(candidate)
                except OjsError as exc:
                    outcomes.append(exc)
                    continue
                if candidate.workflow_id is not None:
                    spawned += await self._write(conn, candidate, now)
                else:
                    plain[job_id] = candidate  # written below, all in one statement
                current[job_id] = candidate  # a later item for the same job sees this state
                changed.append(candidate)
                outcomes.append(candidate)
            if plain:
                await conn.execute(q("update_jobs"), (_update_rows(plain.values()),))
            await self._notify(conn, changed + spawned)
        self._created(spawned)
        return outcomes

    async def ack(
        self, job_id: str, worker_id: str | None, result: Any, has_result: bool, now: float
    ) -> Job:
        return await self._settle(
            *_ack_item(AckRequest(job_id, worker_id, result, has_result), now)
        )

    async def ack_many(self, acks: Sequence[AckRequest], now: float) -> list[Job | OjsError]:
        """One settle batch of its own: the pool's acks need no coalescing to form one."""
        outcomes: list[Job | OjsError | None] = [None] * len(acks)
        items: list[Settle] = []
        where: list[int] = []
        for k, ack in enumerate(acks):
            if _is_uuid(ack.job_id):
                items.append(_ack_item(ack, now))
                where.append(k)
            else:
                outcomes[k] = NotFound(
                    f"Job {ack.job_id} not found", details={"job_id": ack.job_id}
                )
        if items:
            for k, outcome in zip(where, await self._settle_batch(items), strict=True):
                if isinstance(outcome, BaseException) and not isinstance(outcome, OjsError):
                    raise outcome
                outcomes[k] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    async def nack(
        self, job_id: str, worker_id: str | None, failure: Failure, requeue: bool, now: float
    ) -> Job:
        return await self._settle(
            job_id,
            lambda j: lifecycle.nack(j, worker_id, failure, requeue, now, self._rng),
            now,
        )

    async def cancel(self, job_id: str, now: float) -> Job:
        return await self._settle(job_id, lambda j: lifecycle.cancel(j, now), now)

    async def heartbeat(
        self, worker_id: str | None, job_ids: Sequence[str], visibility_ms: int | None, now: float
    ) -> list[Job]:
        """Coalesced with concurrent heartbeats into one transaction."""
        return await self._beats.submit((worker_id, tuple(job_ids), visibility_ms, now))

    async def _heartbeat_batch(self, beats: Sequence[Beat]) -> list[list[Job] | BaseException]:
        ids = sorted({job_id for beat in beats for job_id in beat[1] if _is_uuid(job_id)})
        outcomes: list[list[Job] | BaseException] = []
        async with self._tx() as conn:
            cur = await conn.execute(q("lock_jobs"), (ids,))
            current = {job.id: job for job in map(_job, await cur.fetchall())}
            touched: dict[str, Job] = {}
            for worker_id, job_ids, visibility_ms, now in beats:
                extended = []
                for job_id in job_ids:
                    job = current.get(job_id)
                    if job is None or job.state is not JobState.ACTIVE:
                        continue
                    if worker_id is not None and job.worker_id not in (None, worker_id):
                        continue
                    ms = visibility_ms or job.visibility_timeout_ms or DEFAULT_VISIBILITY_MS
                    job.lease_expires_at = now + ms / 1000.0
                    touched[job.id] = job
                    extended.append(job.clone())
                outcomes.append(extended)
            if touched:
                await conn.execute(q("update_jobs"), (_update_rows(touched.values()),))
        return outcomes

    async def get(self, job_id: str) -> Job:
        if not _is_uuid(job_id):
            raise NotFound(f"Job {job_id} not found", details={"job_id": job_id})
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("get_job"), (job_id,))
                row = await cur.fetchone()
        if row is None:
            raise NotFound(f"Job {job_id} not found", details={"job_id": job_id})
        return _job(row)

    async def promote_due(self, now: float, limit: int) -> list[Job]:
        return await self._retry(lambda: self._promote_due_once(now, limit))

    async def _promote_due_once(self, now: float, limit: int) -> list[Job]:
        async with self._tx() as conn:
            cur = await conn.execute(q("due_jobs"), (now, limit))
            promoted = []
            for row in await cur.fetchall():
                job = _job(row)
                if lifecycle.is_expired(job, now):
                    continue  # the reaper discards it
                lifecycle.promote(job, now)
                await self._write(conn, job, now)
                promoted.append(job)
            await self._notify(conn, promoted)
        return promoted

    async def reap(self, now: float, limit: int) -> list[Job]:
        return await self._retry(lambda: self._reap_once(now, limit))

    async def _reap_once(self, now: float, limit: int) -> list[Job]:
        reaped: list[Job] = []
        spawned: list[Job] = []
        async with self._tx() as conn:
            cur = await conn.execute(q("expired_leases"), (now, limit))
            for row in await cur.fetchall():
                job = _job(row)
                deadline = job.execution_deadline()
                if deadline is not None and deadline <= now:
                    lifecycle.execution_timeout(job, now, self._rng)
                elif job.lease_expires_at is not None and job.lease_expires_at <= now:
                    lifecycle.expire_lease(job, now)
                else:
                    continue
                spawned += await self._write(conn, job, now)
                reaped.append(job)
            cur = await conn.execute(q("expired_ttl"), (now, max(0, limit - len(reaped))))
            for row in await cur.fetchall():
                job = _job(row)
                lifecycle.expire_ttl(job, now)
                spawned += await self._write(conn, job, now)
                reaped.append(job)
            await self._notify(conn, reaped + spawned)
        self._created(spawned)
        return reaped

    async def prune(
        self, finished_before: float | None, dead_letter_before: float | None, limit: int
    ) -> int:
        async with self._tx() as conn:
            cur = await conn.execute(
                q("prune"),
                {"before": finished_before, "dead_before": dead_letter_before, "limit": limit},
            )
            deleted = cur.rowcount
            # Rate-limit windows are at most a minute; older claim times are dead weight.
            horizon = finished_before if finished_before is not None else dead_letter_before
            if horizon is not None:
                await conn.execute(q("prune_starts"), (horizon,))
            return deleted

    async def _scalar(self, name: str, params: Sequence[Any] = ()) -> Any:
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q(name), params)
                row = await cur.fetchone()
        return row[0] if row else None

    async def next_due_at(self) -> float | None:
        value = await self._scalar("next_due")
        return float(value) if value is not None else None

    async def next_reap_at(self) -> float | None:
        value = await self._scalar("next_reap")
        return float(value) if value is not None else None

    async def next_wakeup(self) -> float | None:
        values = [v for v in (await self.next_due_at(), await self.next_reap_at()) if v]
        return min(values) if values else None

    async def list_dead_letter(self, queue: str | None, limit: int, offset: int) -> DeadLetterPage:
        params = {"queue": queue, "limit": limit, "offset": offset}
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("list_dead_letter"), params)
                rows = await cur.fetchall()
                total = int(rows[0][8]) if rows else 0
                if not rows:
                    cur = await conn.execute(q("count_dead_letter"), params)
                    row = await cur.fetchone()
                    total = int(row[0]) if row else 0
        return DeadLetterPage(jobs=[_job(r) for r in rows], total=total)

    async def _lock_dead(self, conn: TrioConnection, job_id: str) -> Job:
        if not _is_uuid(job_id):
            raise NotFound(
                f"Job {job_id} is not in the dead letter queue", details={"job_id": job_id}
            )
        cur = await conn.execute(q("lock_dead_letter"), (job_id,))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"Job {job_id} is not in the dead letter queue", details={"job_id": job_id}
            )
        return _job(row)

    async def retry_dead_letter(self, job_id: str, now: float) -> Job:
        return await self._retry(lambda: self._retry_dead_letter_once(job_id, now))

    async def _retry_dead_letter_once(self, job_id: str, now: float) -> Job:
        async with self._tx() as conn:
            job = await self._lock_dead(conn, job_id)
            lifecycle.retry_dead_letter(job, now)
            await self._write(conn, job, now)
            await self._notify(conn, [job])
        return job

    async def delete_dead_letter(self, job_id: str) -> Job:
        return await self._retry(lambda: self._delete_dead_letter_once(job_id))

    async def _delete_dead_letter_once(self, job_id: str) -> Job:
        async with self._tx() as conn:
            job = await self._lock_dead(conn, job_id)
            await conn.execute(q("delete_job"), (job_id,))
        return job

    async def list_queues(self) -> list[QueueInfo]:
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("list_queues"))
                rows = await cur.fetchall()
        return [
            QueueInfo(
                name=r[0],
                paused=r[1],
                created_at=r[2],
                rate_limit=r[3],
                concurrency=r[4],
                counts={k: int(v) for k, v in r[5].items()},
            )
            for r in rows
        ]

    async def queue_info(self, queue: str, now: float) -> QueueInfo:
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("queue_row"), (queue,))
                row = await cur.fetchone()
                if row is None:
                    raise NotFound(f"Queue {queue} not found", details={"queue": queue})
                cur = await conn.execute(q("queue_counts"), (queue,))
                counts = {state.value: 0 for state in JobState}
                counts.update({s: int(n) for s, n in await cur.fetchall()})
                cur = await conn.execute(q("queue_throughput"), (queue, now - 60))
                done = await cur.fetchone()
        return QueueInfo(
            name=row[0],
            paused=row[1],
            created_at=row[2],
            rate_limit=row[3],
            concurrency=row[4],
            counts=counts,
            completed_last_minute=int(done[0]) if done else 0,
            failed_last_minute=int(done[1]) if done else 0,
        )

    async def set_queue_paused(self, queue: str, paused: bool, now: float) -> QueueInfo:
        async with self._tx() as conn:
            cur = await conn.execute(q("upsert_queue_paused"), (queue, paused, now))
            row = await cur.fetchone()
            if not paused:
                await conn.execute(q("notify"), (queue,))
        assert row is not None
        return QueueInfo(name=row[0], paused=row[1], created_at=row[2])

    # -- workflows -------------------------------------------------------------------

    async def create_workflow(
        self, workflow: Workflow, jobs: Sequence[Job], now: float
    ) -> Workflow:
        async with self._tx() as conn:
            try:
                await conn.execute(
                    q("insert_workflow"),
                    (workflow.id, workflow.state, Jsonb(workflow.to_record())),
                )
            except psycopg.errors.UniqueViolation:
                raise DuplicateJob(
                    f"A workflow with id {workflow.id} already exists",
                    details={"existing_workflow_id": workflow.id},
                ) from None
            stored = [j.clone() for j in jobs]
            for job in stored:
                await self._insert(conn, job, now)
            await self._notify(conn, stored)
        return workflow.clone()

    async def get_workflow_record(self, workflow_id: str) -> Workflow:
        return await self.get_workflow(workflow_id)  # one row either way

    async def get_workflow(self, workflow_id: str) -> Workflow:
        if not _is_uuid(workflow_id):
            raise NotFound(
                f"Workflow {workflow_id} not found", details={"workflow_id": workflow_id}
            )
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("get_workflow"), (workflow_id,))
                row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"Workflow {workflow_id} not found", details={"workflow_id": workflow_id}
            )
        return Workflow.from_record(row[0])

    async def cancel_workflow(self, workflow_id: str, now: float) -> tuple[Workflow, list[Job]]:
        return await self._retry(lambda: self._cancel_workflow_once(workflow_id, now))

    async def _cancel_workflow_once(
        self, workflow_id: str, now: float
    ) -> tuple[Workflow, list[Job]]:
        if not _is_uuid(workflow_id):
            raise NotFound(
                f"Workflow {workflow_id} not found", details={"workflow_id": workflow_id}
            )
        async with self._tx() as conn:
            cur = await conn.execute(q("lock_workflow"), (workflow_id,))
            row = await cur.fetchone()
            if row is None:
                raise NotFound(
                    f"Workflow {workflow_id} not found", details={"workflow_id": workflow_id}
                )
            workflow = Workflow.from_record(row[0])
            to_cancel = workflows.cancel(workflow, now)
            cancelled = []
            for job_id in to_cancel:
                job = await self._lock(conn, job_id)
                lifecycle.cancel(job, now)
                await conn.execute(q("update_job"), _columns(job))
                cancelled.append(job)
            await conn.execute(
                q("update_workflow"), (workflow.state, Jsonb(workflow.to_record()), workflow.id)
            )
        return workflow, cancelled

    # -- cron ------------------------------------------------------------------------

    async def put_cron(self, record: CronRecord) -> CronRecord:
        return await self._retry(lambda: self._put_cron_once(record))

    async def _put_cron_once(self, record: CronRecord) -> CronRecord:
        async with self._tx() as conn:
            cur = await conn.execute(q("lock_cron"), (record.name,))
            row = await cur.fetchone()
            stored = CronRecord.from_record(record.to_record())
            if row is not None:
                existing = CronRecord.from_record(row[0])
                stored.created_at = existing.created_at
                stored.last_run_at = existing.last_run_at
                stored.last_job_id = existing.last_job_id
                stored.runs = existing.runs
                stored.skipped = existing.skipped
            await conn.execute(
                q("upsert_cron"), (stored.name, stored.next_run_at, Jsonb(stored.to_record()))
            )
        return stored

    async def list_crons(self) -> list[CronRecord]:
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("list_crons"))
                rows = await cur.fetchall()
        return [CronRecord.from_record(r[0]) for r in rows]

    async def get_cron(self, name: str) -> CronRecord:
        with map_errors():
            async with self._pool.connection() as conn:
                cur = await conn.execute(q("get_cron"), (name,))
                row = await cur.fetchone()
        if row is None:
            raise NotFound(f"Cron schedule {name!r} not found", details={"name": name})
        return CronRecord.from_record(row[0])

    async def set_cron_enabled(
        self, name: str, enabled: bool, now: float
    ) -> tuple[CronRecord, CronRecord]:
        return await self._retry(lambda: self._set_cron_enabled_once(name, enabled, now))

    async def _set_cron_enabled_once(
        self, name: str, enabled: bool, now: float
    ) -> tuple[CronRecord, CronRecord]:
        async with self._tx() as conn:
            cur = await conn.execute(q("lock_cron"), (name,))
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"Cron schedule {name!r} not found", details={"name": name})
            before = CronRecord.from_record(row[0])
            after = CronRecord.from_record(row[0])
            if set_enabled(after, enabled, now):
                await conn.execute(
                    q("upsert_cron"), (after.name, after.next_run_at, Jsonb(after.to_record()))
                )
        return before, after

    async def delete_cron(self, name: str) -> CronRecord:
        async with self._tx() as conn:
            cur = await conn.execute(q("delete_cron"), (name,))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"Cron schedule {name!r} not found", details={"name": name})
        return CronRecord.from_record(row[0])

    async def fire_cron(
        self, name: str, occurrence: float, next_run_at: float | None, job: Job, now: float
    ) -> CronFire:
        return await self._retry(
            lambda: self._fire_cron_once(name, occurrence, next_run_at, job, now)
        )

    async def _fire_cron_once(
        self, name: str, occurrence: float, next_run_at: float | None, job: Job, now: float
    ) -> CronFire:
        async with self._tx() as conn:
            cur = await conn.execute(q("lock_cron"), (name,))
            row = await cur.fetchone()
            if row is None:
                return CronFire(False, reason="missing")
            record = CronRecord.from_record(row[0])
            if not record.enabled:  # disabled since the ticker read it: nothing to advance
                return CronFire(False, reason="disabled", record=record)
            if record.next_run_at != occurrence:
                return CronFire(False, reason="already_fired", record=record)
            record.next_run_at = next_run_at
            fired = False
            reason: str | None = None
            new = job.clone()
            previous = None
            if record.last_job_id:
                cur = await conn.execute(q("lock_job"), (record.last_job_id,))
                prow = await cur.fetchone()
                previous = _job(prow) if prow else None
            if previous is not None and not previous.state.is_terminal:
                if record.overlap_policy == "skip":
                    record.skipped += 1
                    reason = "overlap"
                elif record.overlap_policy == "cancel_previous":
                    lifecycle.cancel(previous, now)
                    await self._write(conn, previous, now)
            if reason is None:
                await self._insert(conn, new, now)
                record.last_run_at = occurrence
                record.last_job_id = new.id
                record.runs += 1
                fired = True
                await self._notify(conn, [new])
            await conn.execute(
                q("advance_cron"),
                {
                    "name": name,
                    "occurrence": occurrence,
                    "next_run_at": next_run_at,
                    "record": Jsonb(record.to_record()),
                },
            )
        if fired:
            self._created([new])
            return CronFire(True, job=new, record=record)
        return CronFire(False, reason=reason, record=record)
