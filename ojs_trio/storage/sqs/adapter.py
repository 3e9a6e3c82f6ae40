"""AWS storage: SQS carries the messages, DynamoDB holds the state.

The design in one paragraph
---------------------------

DynamoDB is the source of truth: one item per job (the job record, a ``version``
and the bookkeeping below), and every state change is a conditional write on that
version, computed by the same pure rules as every other adapter
(:mod:`ojs_trio.engine.lifecycle`). An SQS message is a *wake-up token*: its body
names a job id and a token; the job item records which token is current. A fetch
receives messages from the job queue's SQS tier queues (highest priority first),
reads their items and claims each job with a conditional write; a message whose job
is finished, cancelled, expired or missing, or whose token is no longer current, is
deleted and never delivered. Duplicate deliveries therefore never make two holders.

The port's clock is the engine's (``now``); SQS timers run on the wall clock. So
SQS timing is only ever an optimisation: a job scheduled 5 minutes out is sent with
``DelaySeconds``, a retry parks its message with ``ChangeMessageVisibility``, a
lease sets the message's visibility timeout -- and whenever the engine's clock says a
job is claimable (promotion, an expired lease) while its message would not yet be
visible, a fresh token is sent and the old message becomes stale.

Messages are sent *before* the items that name them are written: a crash in between
leaves an orphan message (deleted when received), never a job without a message.

See docs/aws.md for configuration, provisioning and IAM.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Final

import trio

from ojs_trio.engine import lifecycle, unique, workflows
from ojs_trio.engine.cron import CronFire, CronRecord, set_enabled
from ojs_trio.engine.errors import (
    BackendUnavailable,
    DuplicateJob,
    NotFound,
    OjsError,
    PayloadTooLarge,
)
from ojs_trio.engine.job import DEFAULT_VISIBILITY_MS, Job
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.queue_limits import RateWindow, queue_limits_from
from ojs_trio.engine.states import JobState
from ojs_trio.engine.workflows import Workflow
from ojs_trio.storage.errormap import exception_leaves
from ojs_trio.storage.port import (
    AckRequest,
    ClaimRequest,
    DeadLetterPage,
    EnqueueResult,
    QueueInfo,
    StorageListener,
)
from ojs_trio.storage.sqs import UNIQUE_GUARANTEE
from ojs_trio.storage.sqs.client import (
    AwsClients,
    AwsSettings,
    ConditionFailed,
    map_errors,
    open_aws_clients,
    retry_throttled,
)
from ojs_trio.storage.sqs.provision import (
    DLQ_INDEX,
    EXPIRY_INDEX,
    QUEUE_STATE_INDEX,
    TTL_ATTRIBUTE,
    provision_queue,
    provision_table,
)

__all__ = ["MAX_JOB_BYTES", "SqsStorage"]

#: SQS's message size limit, applied to the job envelope: a job must fit in one
#: message on any SQS-based system, and DynamoDB items stop at 400 KB.
MAX_JOB_BYTES: Final = 256 * 1024
#: A workflow item at creation: DynamoDB's 400 KB item, less what the running
#: workflow may add (the results it keeps for parent_results, up to 64 KiB) and a
#: margin for the attribute overhead: about 3,150 group or batch members, or 4,800
#: chain steps of minimal envelopes (each step's envelope counts until it starts).
MAX_WORKFLOW_BYTES: Final = 350_000 - workflows.PARENT_RESULTS_MAX_BYTES
MAX_DELAY_SECONDS: Final = 900  # SQS DelaySeconds limit
MAX_VISIBILITY_SECONDS: Final = 43_200  # SQS visibility timeout limit (12 h)
TRANSACT_MAX: Final = 100  # DynamoDB TransactWriteItems item limit
#: DynamoDB's 4 MB transaction limit, less headroom: 17 jobs of 256 KB exceed it.
TRANSACT_MAX_BYTES: Final = 3_500_000
#: A job item's size beyond its body (keys, index and bookkeeping attributes), high.
ITEM_OVERHEAD_BYTES: Final = 1_024
#: The largest job body stored (DynamoDB's item limit is 400 KB; ``_encode`` refuses more).
MAX_ITEM_BODY_BYTES: Final = 350_000
CAS_ATTEMPTS: Final = 25
MAX_WASTED_RECEIVES: Final = 3  # receives in a row that brought no job, per tier
#: Job ids kept per unique key (newest); older holders are long finished in practice.
UNIQUE_IDS_KEPT: Final = 200
#: An item-less message younger than this may belong to an enqueue still writing its
#: items (messages go first); older ones are orphans of a failed enqueue.
ORPHAN_GRACE_SECONDS: Final = 30.0
#: How long a write too large for one transaction reserves its unique keys, plus
#: STEP_ALLOWANCE_SECONDS per step it takes (a 10,000-key batch: ~300 steps): until
#: then, the ids the key item lists as pending are jobs still being written (or
#: undone), which a concurrent enqueue of that key waits for (PENDING_SECONDS at most,
#: then 503).  Past it, a crashed writer's pending ids are ordinary ones.
PENDING_SECONDS: Final = 30.0
STEP_ALLOWANCE_SECONDS: Final = 2.0
#: Such a write starts a step only while this much of its window is left, and gives
#: up a write that takes longer (STEP_SECONDS): every write lands within the window,
#: and within ORPHAN_GRACE_SECONDS of the messages sent for it.
PENDING_MARGIN_SECONDS: Final = 10.0
STEP_SECONDS: Final = PENDING_MARGIN_SECONDS
#: How often an enqueue waiting for a pending key reads it again.
PENDING_POLL_SECONDS: Final = 0.1
#: Finished jobs (dead letters excepted) get a DynamoDB TTL this far out: a retention
#: backstop behind pruning.
FINISHED_TTL_SECONDS: Final = 30 * 86400

_TERMINAL_STATES: Final = (JobState.COMPLETED, JobState.CANCELLED, JobState.DISCARDED)
_NOT_STARTED: Final = frozenset(
    {JobState.AVAILABLE, JobState.SCHEDULED, JobState.RETRYABLE, JobState.PENDING}
)


def _ts(t: float) -> str:
    """A sortable string for an epoch time (GSI sort keys are strings)."""
    return f"{max(t, 0.0):020.6f}"


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: float | int) -> dict[str, str]:
    return {"N": repr(value) if isinstance(value, float) else str(value)}


@dataclass
class _Row:
    """A job item: the job plus the adapter's bookkeeping."""

    job: Job
    version: int = 0  # 0: not stored yet
    token: str | None = None  # the current wake-up message, if any
    token_url: str | None = None  # the SQS queue holding it
    visible_at: float | None = None  # wall time the token message becomes visible
    receipt: str | None = None  # receipt handle of the holder's receive
    receives: int = 0  # SQS receive count at the last claim
    expires_ttl: float | None = None  # DynamoDB TTL (wall time)
    # The large write that created the job (``wby``): its undo deletes only its own
    # jobs, never those another call wrote at the same ids meanwhile.
    writer: str | None = None

    def copy(self) -> _Row:
        return replace(self, job=self.job.clone())

    def drop_token(self) -> None:
        self.token = self.token_url = self.visible_at = self.receipt = None


@dataclass
class _QueueMeta:
    name: str
    version: int
    created_at: float
    paused: bool
    tiers: set[int]
    rate_limit: dict[str, Any] | None
    concurrency: int | None
    starts: list[float]


@dataclass
class _Message:
    url: str
    receipt: str
    job_id: str | None
    token: str | None
    sent_at: float  # wall time
    receives: int


@dataclass
class _UniqueKey:
    """A unique key's item: the ids of the jobs that hold it, newest last.

    ``pending`` holds ids that a write too large for one transaction registered
    before writing their jobs (:meth:`SqsStorage._write_in_chunks`): until
    ``pending_until`` (wall time) such an id without a job is a job still being
    written, not a job that is gone, and an enqueue that reads the key waits for it.
    ``mark`` (``pend_by``) names that write: its job chunks commit only while the
    item still bears it.
    """

    key: str
    version: int  # 0: no item yet
    stored: list[str]
    ids: list[str]
    stored_pending: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    pending_until: float = 0.0
    stored_mark: str | None = None
    mark: str | None = None

    @property
    def changed(self) -> bool:
        return (
            self.ids != self.stored
            or self.pending != self.stored_pending
            or self.mark != self.stored_mark
        )


class _StillWriting(BackendUnavailable):
    """A unique key lists pending ids of a call still writing their jobs.

    The enqueue that meets it waits (:meth:`SqsStorage._wait_for_writer`); it
    reaches the client (503, naming the key) only when the wait runs out.
    """

    def __init__(self, key: str, job_ids: list[str], until: float) -> None:
        super().__init__(
            f"Unique key {key} is reserved by a call still writing its jobs; try again",
            details={"unique_key": key, "job_ids": job_ids[:10], "pending_until": until},
        )
        self.key = key
        self.job_ids = job_ids
        self.until = until


#: A workflow item as read: the workflow, its version and its ``wby`` (the large
#: write that created it, if one did).
_Flow = tuple[Workflow, int, str | None]


@dataclass
class _Send:
    """A token message to send before the items naming it are written."""

    row: _Row
    delay: int = 0


class SqsStorage:
    """The storage port on SQS + DynamoDB (see the module docstring)."""

    name = "sqs"
    unique_guarantee = UNIQUE_GUARANTEE

    def __init__(
        self,
        settings: AwsSettings | None = None,
        *,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
        provision_table_on_open: bool = True,
    ) -> None:
        self.settings = settings or AwsSettings.from_env()
        self._rng = rng or random.Random()
        self._wall = wall  # SQS timers and DynamoDB TTL run on the wall clock
        self._provision = provision_table_on_open
        self._stack: AsyncExitStack | None = None
        self._clients: AwsClients | None = None
        self._listener: StorageListener | None = None
        self._urls: dict[tuple[str, int], str] = {}  # (queue, tier) -> SQS queue URL
        self._url_locks: dict[tuple[str, int], trio.Lock] = {}
        self._known_tiers: dict[str, set[int]] = {}  # tiers registered in QUEUES
        self._expired_unreported: list[Job] = []
        self._table = self.settings.dynamodb_table
        # At most one request per pooled connection and client: a wide fan-out (the
        # messages of a 3,000-job enqueue) otherwise waits on the HTTP pool and times out.
        self._ddb_slots = trio.CapacityLimiter(self.settings.max_pool_connections)
        self._sqs_slots = trio.CapacityLimiter(self.settings.max_pool_connections)

    # -- adapter lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        stack = AsyncExitStack()
        try:
            self._clients = await stack.enter_async_context(open_aws_clients(self.settings))
            if self._provision:
                await provision_table(self._clients)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def aclose(self) -> None:
        stack, self._stack, self._clients = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def clients(self) -> AwsClients:
        if self._clients is None:
            raise BackendUnavailable("SQS storage is not open")
        return self._clients

    async def _ddb(self, operation: str, **kwargs: Any) -> Any:
        return await self._request(self.clients.dynamodb, self._ddb_slots, operation, kwargs)

    async def _sqs(self, operation: str, **kwargs: Any) -> Any:
        return await self._request(self.clients.sqs, self._sqs_slots, operation, kwargs)

    @staticmethod
    async def _request(
        client: Any, slots: trio.CapacityLimiter, operation: str, kwargs: dict[str, Any]
    ) -> Any:
        method = getattr(client, operation)

        async def once() -> Any:
            async with slots:  # held for the request only, not across retry back-offs
                return await method(**kwargs)

        return await retry_throttled(once)

    async def ping(self) -> dict[str, Any]:
        await self._ddb("get_item", TableName=self._table, Key=self._key("PING", "PING"))
        return {"type": self.name, "status": "connected", "table": self._table}

    def set_listener(self, listener: StorageListener | None) -> None:
        self._listener = listener

    async def listen(self) -> None:
        # Nothing to subscribe to: parked fetches re-check storage every second and
        # the timer actors re-read due times, which covers other servers' work.
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        start: dict[str, Any] | None = None
        while True:
            kwargs: dict[str, Any] = {"TableName": self._table, "ProjectionExpression": "pk, sk"}
            if start:
                kwargs["ExclusiveStartKey"] = start
            page = await self._ddb("scan", **kwargs)
            keys = [{"pk": i["pk"], "sk": i["sk"]} for i in page.get("Items", [])]
            for chunk in _chunks(keys, 25):
                await self._batch_delete(chunk)
            start = page.get("LastEvaluatedKey")
            if not start:
                break
        prefix = self.settings.queue_prefix + "-"
        listed = await self._sqs("list_queues", QueueNamePrefix=prefix)
        for url in listed.get("QueueUrls", []):
            try:
                async with map_errors():
                    await self.clients.sqs.purge_queue(QueueUrl=url)
            except OjsError:
                # A purge is allowed once a minute per queue (on AWS as on moto):
                # delete what can be received now; messages in flight stay
                # invisible until their timeout and are deleted on receipt then.
                await self._delete_visible_messages(url)
        self._known_tiers.clear()
        self._expired_unreported.clear()

    async def _delete_visible_messages(self, url: str) -> None:
        while True:
            out = await self._sqs(
                "receive_message", QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            )
            messages = out.get("Messages", [])
            if not messages:
                return
            entries = [
                {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(messages)
            ]
            await self._sqs("delete_message_batch", QueueUrl=url, Entries=entries)

    async def _batch_delete(self, keys: list[dict[str, Any]]) -> None:
        requests = [{"DeleteRequest": {"Key": k}} for k in keys]
        while requests:
            out = await self._ddb("batch_write_item", RequestItems={self._table: requests})
            requests = out.get("UnprocessedItems", {}).get(self._table, [])
            if requests:
                await trio.sleep(0.05)

    # -- item encoding ---------------------------------------------------------------

    @staticmethod
    def _key(pk: str, sk: str) -> dict[str, Any]:
        return {"pk": _s(pk), "sk": _s(sk)}

    @staticmethod
    def _job_key(job_id: str) -> dict[str, Any]:
        return {"pk": _s(f"JOB#{job_id}"), "sk": _s("JOB")}

    def _encode(self, row: _Row, version: int) -> dict[str, Any]:
        job = row.job
        body = json.dumps(job.to_record(), separators=(",", ":"))
        if len(body) > MAX_ITEM_BODY_BYTES:
            raise PayloadTooLarge(
                f"Job {job.id} is too large to store ({len(body)} bytes)",
                details={"job_id": job.id, "max_bytes": MAX_JOB_BYTES},
            )
        state = job.state
        item: dict[str, Any] = {
            **self._job_key(job.id),
            "v": _n(version),
            "st": _s(state.value),
            "q": _s(job.queue),
            "body": _s(body),
            "rc": _n(row.receives),
            "gsi1pk": _s(f"Q#{job.queue}#{state.value}"),
            "gsi1sk": _s(f"{_ts(_sort_time(job))}#{job.id}"),
        }
        if row.token is not None:
            item["tok"] = _s(row.token)
            item["turl"] = _s(row.token_url or "")
            item["vis"] = _n(row.visible_at if row.visible_at is not None else 0.0)
        if row.receipt is not None:
            item["rcpt"] = _s(row.receipt)
        if row.writer is not None:
            item["wby"] = _s(row.writer)
        if state is JobState.DISCARDED and job.dead_letter:
            item["gsi2pk"] = _s(f"DLQ#{job.queue}")
            item["gsi2sk"] = _s(f"{_ts(job.discarded_at or 0.0)}#{job.id}")
        if job.expires_at is not None and state in _NOT_STARTED:
            item["gsi3pk"] = _s(f"EXP#{job.queue}")
            item["gsi3sk"] = _s(f"{_ts(job.expires_at)}#{job.id}")
        if state.is_terminal and not job.dead_letter:
            if row.expires_ttl is None:
                row.expires_ttl = self._wall() + FINISHED_TTL_SECONDS
            item[TTL_ATTRIBUTE] = _n(int(row.expires_ttl))
        else:
            # Dead letters stay until retried or deleted, or until the pruner's
            # dead-letter retention (when set) removes them: no backstop TTL.
            row.expires_ttl = None
        return item

    def _decode(self, item: dict[str, Any]) -> _Row | None:
        ttl = item.get(TTL_ATTRIBUTE)
        if ttl is not None and float(ttl["N"]) < self._wall():
            return None  # expired; DynamoDB deletes it whenever it gets to it
        job = Job.from_record(json.loads(item["body"]["S"]))
        return _Row(
            job=job,
            version=int(item["v"]["N"]),
            token=item["tok"]["S"] if "tok" in item else None,
            token_url=(item["turl"]["S"] or None) if "turl" in item else None,
            visible_at=float(item["vis"]["N"]) if "vis" in item else None,
            receipt=item["rcpt"]["S"] if "rcpt" in item else None,
            receives=int(item.get("rc", {"N": "0"})["N"]),
            expires_ttl=float(ttl["N"]) if ttl is not None else None,
            writer=item["wby"]["S"] if "wby" in item else None,
        )

    def _versioned_put(self, item: dict[str, Any], version: int) -> dict[str, Any]:
        """A Put of ``item`` as version ``version + 1``, conditional on the stored
        version still being ``version`` (0: on the item not existing yet)."""
        put: dict[str, Any] = {"TableName": self._table, "Item": {**item, "v": _n(version + 1)}}
        if version == 0:
            put["ConditionExpression"] = "attribute_not_exists(pk)"
        else:
            put["ConditionExpression"] = "v = :v"
            put["ExpressionAttributeValues"] = {":v": _n(version)}
        return put

    def _put(self, row: _Row) -> dict[str, Any]:
        """A conditional Put of ``row`` as the next version (transaction item body)."""
        return self._versioned_put(self._encode(row, row.version + 1), row.version)

    async def _load(self, job_id: str) -> _Row:
        row = await self._load_or_none(job_id)
        if row is None:
            raise NotFound(f"Job {job_id} not found", details={"job_id": job_id})
        return row

    async def _get_item(self, pk: str, sk: str) -> dict[str, Any] | None:
        """One item by key, strongly consistent (None if absent)."""
        out = await self._ddb(
            "get_item", TableName=self._table, Key=self._key(pk, sk), ConsistentRead=True
        )
        item: dict[str, Any] | None = out.get("Item")
        return item or None

    async def _load_or_none(self, job_id: str) -> _Row | None:
        item = await self._get_item(f"JOB#{job_id}", "JOB")
        return self._decode(item) if item else None

    async def _load_many(self, job_ids: Iterable[str]) -> dict[str, _Row]:
        rows: dict[str, _Row] = {}
        for chunk in _chunks(list(dict.fromkeys(job_ids)), 100):
            keys = [self._job_key(i) for i in chunk]
            while keys:
                out = await self._ddb(
                    "batch_get_item",
                    RequestItems={self._table: {"Keys": keys, "ConsistentRead": True}},
                )
                for item in out.get("Responses", {}).get(self._table, []):
                    row = self._decode(item)
                    if row is not None:
                        rows[row.job.id] = row
                keys = out.get("UnprocessedKeys", {}).get(self._table, {}).get("Keys", [])
                if keys:
                    await trio.sleep(0.05)
        return rows

    # -- writing ----------------------------------------------------------------------

    async def _write(self, items: list[dict[str, Any]]) -> None:
        """Write transaction items (``{"Put": ...}`` etc.) atomically."""
        if len(items) == 1 and "Put" in items[0]:
            await self._ddb("put_item", **items[0]["Put"])
        elif len(items) == 1 and "Delete" in items[0]:
            await self._ddb("delete_item", **items[0]["Delete"])
        elif len(items) == 1 and "Update" in items[0]:
            await self._ddb("update_item", **items[0]["Update"])
        elif items:
            await self._ddb("transact_write_items", TransactItems=items)

    async def _commit(
        self,
        rows: Sequence[_Row],
        now: float,
        *,
        extra: Sequence[dict[str, Any]] = (),
        loaded: dict[str, _Flow] | None = None,
        keys: dict[str, _UniqueKey] | None = None,
    ) -> list[_Row]:
        """Write changed job rows in one step, advancing their workflows with them.

        Each row is written conditionally on the version it was read at (or on not
        existing yet). A row of a workflow member also updates the workflow and
        inserts the jobs the workflow rules spawn, in the same transaction: a crash
        can neither lose nor duplicate a step. Raises :class:`ConditionFailed` when
        anything changed since it was read; callers re-read and retry.  ``keys``:
        unique key items the caller read and changed, written here with the
        created jobs' registrations (one write per item).
        """
        flows: dict[str, _Flow] = dict(loaded or {})
        spawned: list[_Row] = []
        touched: set[str] = set(loaded or {})
        for row in rows:
            workflow_id = row.job.workflow_id
            # A member starting changes nothing the workflow rules act on, so claims
            # leave the workflow item alone (no contention between members' claims);
            # get_workflow reads live member states.
            if workflow_id is None or row.job.state is JobState.ACTIVE:
                continue
            if workflow_id not in flows:
                found = await self._load_workflow(workflow_id)
                if found is None:
                    continue
                flows[workflow_id] = found
            workflow = flows[workflow_id][0]
            touched.add(workflow_id)
            # The earliest start of a settled member: once every member has
            # settled, the workflow's start, without reading any member.
            started = row.job.started_at
            if started is not None and (
                workflow.started_at is None or started < workflow.started_at
            ):
                workflow.started_at = started
            for job in workflows.on_job_finished(workflow, row.job, now):
                job.unique_key = unique.fingerprint(job)
                spawned.append(_Row(job=job))
        await self._send_tokens([_Send(r) for r in spawned if r.job.state is JobState.AVAILABLE])
        items = [{"Put": self._put(r)} for r in [*rows, *spawned]]
        for workflow_id, (workflow, version, writer) in flows.items():
            if workflow_id in touched:
                items.append(self._workflow_put(workflow, version, writer=writer))
        # Jobs created here (chain steps, callbacks, a cron run) hold their unique
        # keys like enqueued ones; they take the key without looking for a holder.
        created = [r for r in [*rows, *spawned] if r.version == 0]
        items += await self._key_registrations(created, now, keys)
        items.extend(extra)
        if len(items) > TRANSACT_MAX:
            raise OjsError(f"one step would write {len(items)} items (limit {TRANSACT_MAX})")
        await self._write(items)
        for row in [*rows, *spawned]:
            row.version += 1
        if spawned:
            for row in spawned:
                await self._register_tier(row.job.queue, row.job.priority, now)
            if self._listener is not None:
                self._listener.jobs_created([r.job.clone() for r in spawned])
        return spawned

    async def _mutate(
        self,
        job_id: str,
        now: float,
        change: Callable[[_Row], None],
    ) -> _Row:
        """Read the job, apply ``change`` to a copy, write it back conditionally; retry
        on a concurrent change. ``change`` raises to refuse (e.g. an illegal transition)."""
        for attempt in range(CAS_ATTEMPTS):
            row = await self._load(job_id)
            new = row.copy()
            change(new)
            try:
                await self._commit([new], now)
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            return new
        raise BackendUnavailable(
            f"Job {job_id} kept changing concurrently; try again", details={"job_id": job_id}
        )

    async def _backoff(self, attempt: int) -> None:
        await trio.sleep(self._rng.uniform(0, min(0.2, 0.005 * 2**attempt)))

    # -- SQS ----------------------------------------------------------------------------

    async def _queue_url(self, queue: str, tier: int) -> str:
        key = (queue, tier)
        url = self._urls.get(key)
        if url is not None:
            return url
        lock = self._url_locks.setdefault(key, trio.Lock())
        async with lock:
            url = self._urls.get(key)
            if url is None:
                url = (await provision_queue(self.clients, queue, tier)).url
                self._urls[key] = url
        return url

    async def _register_tier(self, queue: str, tier: int, now: float) -> None:
        """Record in the queue item that ``queue`` has messages at priority ``tier``."""
        if tier in self._known_tiers.get(queue, ()):
            return
        await self._ddb(
            "update_item",
            TableName=self._table,
            Key=self._key("QUEUES", queue),
            UpdateExpression="SET created_at = if_not_exists(created_at, :now), "
            "v = if_not_exists(v, :zero) ADD tiers :t",
            ExpressionAttributeValues={
                ":now": _n(now),
                ":zero": _n(0),
                ":t": {"NS": [str(tier)]},
            },
        )
        self._known_tiers.setdefault(queue, set()).add(tier)

    async def _send_tokens(self, sends: Sequence[_Send]) -> None:
        """Give each row a fresh token and send its message (before the row is written)."""
        by_url: dict[str, list[_Send]] = {}
        for send in sends:
            row = send.row
            url = await self._queue_url(row.job.queue, row.job.priority)
            row.token = uuid.uuid4().hex
            row.token_url = url
            row.visible_at = None  # set once SQS has the message
            row.receipt = None
            by_url.setdefault(url, []).append(send)
        async with _open_nursery() as nursery:
            for url, group in by_url.items():
                for chunk in _chunks(group, 10):
                    nursery.start_soon(self._send_batch, url, chunk)

    async def _send_batch(self, url: str, sends: list[_Send]) -> None:
        entries = []
        for i, send in enumerate(sends):
            entry: dict[str, Any] = {
                "Id": str(i),
                "MessageBody": json.dumps({"id": send.row.job.id, "t": send.row.token}),
            }
            if self.settings.use_fifo:
                # One group per job: FIFO queues deliver a group one message at a time.
                entry["MessageGroupId"] = send.row.job.id
                entry["MessageDeduplicationId"] = send.row.token
            elif send.delay:
                entry["DelaySeconds"] = send.delay
            entries.append(entry)
        out = await self._sqs("send_message_batch", QueueUrl=url, Entries=entries)
        failed = out.get("Failed") or []
        if failed:
            raise BackendUnavailable(
                "SQS refused to send messages",
                details={"codes": sorted({str(f.get("Code")) for f in failed})},
            )
        sent = self._wall()  # not earlier than SQS's own clock started the delay
        for send in sends:
            send.row.visible_at = sent + send.delay

    async def _delete_message(self, url: str | None, receipt: str | None) -> None:
        if url is None or receipt is None:
            return
        try:
            async with map_errors(), self._sqs_slots:
                await self.clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=receipt)
        except OjsError:
            pass  # the message then comes back stale and is deleted on receipt

    async def _set_visibility(self, url: str | None, receipt: str | None, seconds: int) -> None:
        if url is None or receipt is None:
            return
        seconds = max(0, min(MAX_VISIBILITY_SECONDS, seconds))
        try:
            async with map_errors(), self._sqs_slots:
                await self.clients.sqs.change_message_visibility(
                    QueueUrl=url, ReceiptHandle=receipt, VisibilityTimeout=seconds
                )
        except OjsError:
            pass  # an expired receipt: the message is visible again and re-decided

    async def _receive(self, url: str, count: int, visibility: int) -> list[_Message]:
        out = await self._sqs(
            "receive_message",
            QueueUrl=url,
            MaxNumberOfMessages=max(1, min(10, count)),
            VisibilityTimeout=max(1, min(MAX_VISIBILITY_SECONDS, visibility)),
            WaitTimeSeconds=0,
            MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
        )
        messages = []
        for raw in out.get("Messages", []):
            attrs = raw.get("Attributes", {})
            job_id: str | None
            token: str | None
            try:
                body = json.loads(raw["Body"])
                job_id, token = str(body["id"]), str(body["t"])
            except (ValueError, KeyError, TypeError):
                job_id = token = None
            messages.append(
                _Message(
                    url=url,
                    receipt=raw["ReceiptHandle"],
                    job_id=job_id,
                    token=token,
                    sent_at=int(attrs.get("SentTimestamp", "0")) / 1000.0,
                    receives=int(attrs.get("ApproximateReceiveCount", "1")),
                )
            )
        return messages

    async def _ensure_token(self, row: _Row) -> None:
        """Make sure an available row has a message that is (or soon is) visible."""
        if row.token is not None and row.visible_at is not None and row.visible_at <= self._wall():
            row.receipt = None
            return
        await self._send_tokens([_Send(row)])

    # -- enqueue ----------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        for job in jobs:
            size = len(json.dumps(job.to_wire(), separators=(",", ":")))
            if size > MAX_JOB_BYTES:
                raise PayloadTooLarge(
                    f"Job is {size} bytes; SQS-backed storage takes at most {MAX_JOB_BYTES}",
                    details={"job_id": job.id, "size": size, "max_bytes": MAX_JOB_BYTES},
                )
        lost = 0
        waiting_until: float | None = None
        while True:
            try:
                return await self._enqueue_once(jobs, now)
            except _StillWriting as exc:
                waiting_until = await self._wait_for_writer(exc, waiting_until)
            except ConditionFailed as exc:
                duplicate = await self._first_existing([j.id for j in jobs])
                if duplicate is not None:
                    raise DuplicateJob(
                        f"A job with id {duplicate} already exists",
                        details={"existing_job_id": duplicate},
                    ) from exc
                lost += 1
                if lost >= CAS_ATTEMPTS:
                    raise BackendUnavailable(
                        "Unique keys kept changing concurrently; try again"
                    ) from exc
                await self._backoff(lost - 1)  # lost a race on a unique key: decide again

    async def _wait_for_writer(self, exc: _StillWriting, deadline: float | None) -> float:
        """Wait a moment for a call still writing the jobs a unique key lists as pending.

        Waits by time, up to the end of the first reservation seen but at most
        PENDING_SECONDS (``deadline``, returned for the next round): past its end a
        reservation is no longer waited for.  A key still reserved at the deadline
        (by a large write still going, or anew by another call) is not waited for
        longer: ``exc`` (503, naming the key and the pending jobs) is raised.
        """
        if deadline is None:
            # A large write's window grows with its size: a waiter gives up sooner.
            deadline = min(exc.until, self._wall() + PENDING_SECONDS)
        if exc.until > deadline and self._wall() >= deadline:
            raise exc
        await trio.sleep(max(0.0, min(PENDING_POLL_SECONDS, exc.until - self._wall())))
        return deadline

    async def _first_existing(self, job_ids: list[str]) -> str | None:
        found = await self._load_many(job_ids)
        return next((i for i in job_ids if i in found), None)

    async def _enqueue_once(self, jobs: Sequence[Job], now: float) -> list[EnqueueResult]:
        seen: set[str] = set()
        batch: dict[str, _Row] = {}  # rows this call creates, by id
        keys: dict[str, _UniqueKey] = {}  # unique keys this call claims
        replaced: dict[str, _Row] = {}  # existing jobs this call cancels
        # ("new", id, replaced job) | ("twin", id of a job of this batch) | ("old", job)
        plan: list[tuple[str, str, Job | None]] = []
        own = {job.id for job in jobs}
        for job in jobs:
            if job.id in seen:
                raise DuplicateJob(
                    f"A job with id {job.id} already exists", details={"existing_job_id": job.id}
                )
            seen.add(job.id)
            row = _Row(job=job.clone())
            key = unique.fingerprint(row.job)
            row.job.unique_key = key
            replaced_job: Job | None = None
            if key is not None:
                if key not in keys:
                    keys[key] = await self._unique_key(key)
                    # Ids of this very call left by an attempt that failed part way.
                    keys[key].ids = [i for i in keys[key].ids if i not in own]
                    keys[key].pending = [i for i in keys[key].pending if i not in own]
                existing = await self._find_duplicate(row.job, keys[key], batch, now)
                if existing is not None:
                    policy = unique.on_conflict(row.job)
                    if policy == "reject":
                        raise DuplicateJob(
                            "A job with the same unique key already exists",
                            details={"existing_job_id": existing.job.id, "unique_key": key},
                        )
                    if policy == "ignore":
                        if existing.job.id in batch:
                            plan.append(("twin", existing.job.id, None))
                        else:
                            plan.append(("old", existing.job.id, existing.job.clone()))
                        continue
                    if not existing.job.state.is_terminal:
                        unique.inherit_schedule(row.job, existing.job)
                        lifecycle.cancel(existing.job, now)
                        existing.drop_token()
                        if existing.job.id not in batch:
                            replaced[existing.job.id] = existing
                        replaced_job = existing.job
                keys[key].ids.append(row.job.id)
            batch[row.job.id] = row
            plan.append(("new", row.job.id, replaced_job))

        limits = [r.job for r in batch.values() if queue_limits_from(r.job.options_extra)]
        sends = []
        for row in batch.values():
            if row.job.state is JobState.AVAILABLE:
                sends.append(_Send(row))
            elif (
                row.job.state is JobState.SCHEDULED
                and row.job.scheduled_at is not None
                and not self.settings.use_fifo
            ):
                # Rounded down so the message is visible when the promoter runs.
                delay = math.floor(row.job.scheduled_at - now)
                if delay <= MAX_DELAY_SECONDS:
                    sends.append(_Send(row, max(0, delay)))

        rows = list(batch.values())
        changed_keys = [k for k in keys.values() if k.changed]
        cancels = list(replaced.values())
        flows = {r.job.workflow_id for r in cancels if r.job.workflow_id is not None}
        # One transaction when it fits.  A replaced workflow member's workflow
        # advances in it too (_commit), which may spawn up to three batch callbacks,
        # each with a unique key item: room is kept for that.
        needed = len(rows) + len(changed_keys) + len(cancels) + 7 * len(flows)
        if needed > TRANSACT_MAX or _over_transact_bytes([*rows, *cancels]):
            cancelled = await self._write_in_chunks(rows, changed_keys, sends, now, cancels=cancels)
        else:
            await self._send_tokens(sends)
            jobs_items: list[dict[str, Any]] = [{"Put": self._put(r)} for r in rows]
            if flows:
                # The call's key items go through _commit, merged with those of the
                # callbacks it spawns: one write per item, even when both hold a key.
                await self._commit(cancels, now, extra=jobs_items, keys=keys)
            else:
                cancel_items = [{"Put": self._put(r)} for r in cancels]
                key_items = [self._unique_put(k, now) for k in changed_keys]
                await self._write(jobs_items + cancel_items + key_items)
            cancelled = {r.job.id: r.job for r in cancels}
        for row in rows:
            row.version += 1
            await self._register_tier(row.job.queue, row.job.priority, now)
        for job in limits:
            await self._apply_queue_limits(job, now)
        out: list[EnqueueResult] = []
        for kind, job_id, other in plan:
            if kind == "old":
                assert other is not None
                out.append(EnqueueResult(other, False))
            elif kind == "twin":
                out.append(EnqueueResult(batch[job_id].job.clone(), False))
            else:
                if other is not None and other.id not in batch:
                    # Only a job actually cancelled was replaced (it may have ended
                    # before a large call got to it).
                    other = cancelled.get(other.id)
                out.append(
                    EnqueueResult(batch[job_id].job.clone(), True, other.clone() if other else None)
                )
        return out

    # -- writes too large for one transaction --------------------------------------------

    async def _write_in_chunks(
        self,
        rows: list[_Row],
        keys: list[_UniqueKey],
        sends: Sequence[_Send],
        now: float,
        *,
        workflow: Workflow | None = None,
        cancels: Sequence[_Row] = (),
    ) -> dict[str, Job]:
        """Write new jobs (an enqueue's, or a workflow's first members) in several
        transactions of at most TRANSACT_MAX items; returns the ``cancels`` cancelled.

        1. The unique key items (``keys``, each conditional on the version read), with
           this call's job ids *pending* for a window of PENDING_SECONDS plus
           STEP_ALLOWANCE_SECONDS per step, and the call's mark (``pend_by``).  A
           call that loses a race for a key fails here, before any of its jobs
           exists, and may decide again.
        2. The jobs a ``replace`` displaces are cancelled (with their workflows), so
           the old and the new holder of a key never coexist.
        3. The jobs, each chunk's messages sent right before its write (a message is
           never older than ORPHAN_GRACE_SECONDS while its job is still to come), the
           workflow item with the first chunk.  Each chunk also bumps the version of
           its jobs' key items, conditional on the mark still being this call's: a job
           commits only while its key waits for it, and a concurrent enqueue that read
           the key before cannot write it after.
        4. The pending ids become ordinary holders and the mark goes.

        Each step starts only while PENDING_MARGIN_SECONDS of the pending window are
        left and is abandoned after STEP_SECONDS, so every write lands within the
        window.  If anything fails, the call is undone (:meth:`_undo_chunks`) and the
        error raised; once a job chunk was sent it is never retried.  Cancels stay.
        """
        job_ids = [r.job.id for r in rows]
        duplicate = await self._first_existing(job_ids)
        if duplicate is not None:
            raise DuplicateJob(
                f"A job with id {duplicate} already exists", details={"existing_job_id": duplicate}
            )
        own = set(job_ids)
        token = uuid.uuid4().hex
        for row in rows:
            row.writer = token  # the undo deletes what bears it, nothing else
        marked: dict[str, _UniqueKey] = {}  # key items that will list this call's ids pending
        for key in keys:
            await self._settle_pending(key, own)
            mine = [i for i in key.ids if i in own]
            if mine:
                key.ids = [i for i in key.ids if i not in own]
                key.pending, key.mark = mine, token
                marked[key.key] = key
        key_of = {r.job.id: r.job.unique_key for r in rows if r.job.unique_key in marked}
        room = 1 if workflow is not None else 0
        room_bytes = len(json.dumps(workflow.to_record())) if workflow is not None else 0
        job_chunks = self._job_chunks(rows, key_of, room, room_bytes)
        # The window grows with the steps: one fixed window, never renewed, would fail
        # every retry of a batch of thousands of keys; still bounded (a crash frees).
        steps = len(_chunks(keys, TRANSACT_MAX)) + len(_commit_chunks(cancels)) + len(job_chunks)
        window = PENDING_SECONDS + STEP_ALLOWANCE_SECONDS * steps
        until = self._wall() + window if marked else math.inf
        for key in marked.values():
            key.pending_until = until
        send_of = {s.row.job.id: s for s in sends}
        written_keys: list[_UniqueKey] = []
        attempted: set[str] = set()  # ids of jobs whose chunk was sent (it may have committed)
        try:
            for key_chunk in _chunks(keys, TRANSACT_MAX):
                self._check_window(until, window)
                written_keys.extend(key_chunk)  # counted before: it may commit, then raise
                await self._write_step([self._unique_put(k, now) for k in key_chunk])
            versions = {name: key.version + 1 for name, key in marked.items()}
            cancelled = await self._cancel_replaced(cancels, now, until, window) if cancels else {}
            for chunk in job_chunks:
                self._check_window(until, window)
                await self._send_tokens([send_of[r.job.id] for r in chunk if r.job.id in send_of])
                names = list(dict.fromkeys(key_of[r.job.id] for r in chunk if r.job.id in key_of))
                items: list[dict[str, Any]] = []
                if workflow is not None and not attempted:
                    items.append(self._workflow_put(workflow, 0, writer=token))
                items += [{"Put": self._put(r)} for r in chunk]
                items += [self._still_marked(name, token) for name in names]
                attempted.update(r.job.id for r in chunk)  # before: it may commit, then raise
                await self._write_step(items)
                for name in names:
                    versions[name] += 1
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                kept = await self._undo_chunks(
                    token,
                    written_keys,
                    attempted,
                    workflow.id if workflow is not None and attempted else None,
                    now,
                )
            if kept and isinstance(exc, OjsError):
                exc.details["kept_job_ids"] = kept[:100]
            if attempted and isinstance(exc, ConditionFailed):
                # Not a lost race to decide again: jobs of this call were out.
                raise BackendUnavailable(
                    "A step of a large write failed after some of its jobs were written; "
                    "it was undone (jobs a worker had claimed already were kept)",
                    details={"kept_job_ids": kept[:100]},
                ) from exc
            raise
        await self._fold_pending(list(marked.values()), versions, token, own, now)
        return cancelled

    def _check_window(self, until: float, window: float) -> None:
        """Refuse to start a step too late to finish within the pending window."""
        if self._wall() > until - PENDING_MARGIN_SECONDS:
            raise BackendUnavailable(
                f"Writing the jobs took longer than the {window:.0f} s their unique keys "
                "are reserved for; nothing was kept but jobs a worker had claimed "
                "already; try again",
                details={"reserved_seconds": window},
            )

    async def _write_step(self, items: list[dict[str, Any]]) -> None:
        """One write of a chunked call, abandoned (counted as possibly committed by the
        caller) when it takes longer than STEP_SECONDS."""
        with trio.move_on_after(STEP_SECONDS) as scope:
            await self._write(items)
        if scope.cancelled_caught:
            raise BackendUnavailable(
                f"A DynamoDB write took longer than {STEP_SECONDS:.0f} s",
                details={"items": len(items)},
            )

    @staticmethod
    def _job_chunks(
        rows: list[_Row], key_of: dict[str, str], room: int, room_bytes: int = 0
    ) -> list[list[_Row]]:
        """Rows in transactions of at most TRANSACT_MAX items and TRANSACT_MAX_BYTES:
        a row, plus its key item's version bump once per chunk, plus ``room`` items
        (``room_bytes``) in the first."""
        chunks: list[list[_Row]] = []
        current: list[_Row] = []
        names: set[str] = set()
        used, size = room, room_bytes
        for row in rows:
            name = key_of.get(row.job.id)
            need = 1 + (1 if name is not None and name not in names else 0)
            weight = _row_bytes(row)
            if current and (used + need > TRANSACT_MAX or size + weight > TRANSACT_MAX_BYTES):
                chunks.append(current)
                current, names, used, size = [], set(), 0, 0
            current.append(row)
            used += need
            size += weight
            if name is not None:
                names.add(name)
        if current:
            chunks.append(current)
        return chunks

    def _still_marked(self, key: str, token: str) -> dict[str, Any]:
        """A transaction item: bump the key item's version if it still bears ``token``."""
        return {
            "Update": {
                "TableName": self._table,
                "Key": self._key(f"UNIQUE#{key}", "UNIQUE"),
                "UpdateExpression": "SET v = v + :one",
                "ConditionExpression": "pend_by = :mark",
                "ExpressionAttributeValues": {":one": _n(1), ":mark": _s(token)},
            }
        }

    async def _settle_pending(self, key: _UniqueKey, own: set[str]) -> None:
        """Ready ``key`` for this call's pending ids.  Another call's pending ids become
        ordinary holders once its mark has gone or its window has passed (an id
        without a job holds nothing); while that call may still write or undo them,
        raises :class:`_StillWriting`."""
        foreign = [i for i in key.pending if i not in own]
        if foreign and key.pending_until > self._wall():
            if key.mark is not None:  # that call may still undo jobs that exist already
                raise _StillWriting(key.key, foreign, key.pending_until)
            found = await self._load_many(foreign)
            missing = [i for i in foreign if i not in found]
            if missing:
                raise _StillWriting(key.key, missing, key.pending_until)
        key.ids += [i for i in foreign if i not in key.ids]
        key.pending, key.mark = [], None

    async def _undo_chunks(
        self,
        token: str,
        keys: list[_UniqueKey],
        attempted: set[str],
        workflow_id: str | None,
        now: float,
    ) -> list[str]:
        """Undo a failed :meth:`_write_in_chunks`; returns the ids of the jobs kept.

        1. Each key item bearing this call's mark gets the call's *undoing* mark
           instead (its window renewed), after which no job chunk of the call can
           commit, while concurrent enqueues of the key still wait: a job that exists
           now may be deleted next.  A key none of whose jobs was sent is released
           at once.
        2. Each job still as written (version 1: no worker claimed it) is deleted,
           and the workflow item; only what bears this call's token.
        3. The kept jobs' ids become ordinary holders, the other pending ids and the
           undoing mark go.

        A job a worker claimed stays, holding its key, and runs as usual.  If the
        undo stops part way (a crash), the marks lapse at their window's end: pending
        ids whose jobs exist then hold their keys, the others nothing.
        """
        undoing = f"{token}:undo"
        names = list(dict.fromkeys(k.key for k in keys if k.mark == token))
        swapped: list[str] = []

        async def swap(name: str) -> None:
            if await self._swap_mark(name, token, undoing, attempted, now):
                swapped.append(name)

        async with _open_nursery() as nursery:
            for name in names:
                nursery.start_soon(swap, name)
        async with _open_nursery() as nursery:
            for job_id in attempted:
                nursery.start_soon(self._delete_unclaimed, job_id, token)
        if workflow_id is not None:
            await self._delete_workflow_item(workflow_id, token)
        try:
            found = await self._load_many(attempted)
        except OjsError:
            return []  # the marks lapse at their window's end (see above)
        # Another call's jobs at the same ids (a client's retry) are not ours to report.
        kept = sorted(i for i, row in found.items() if row.writer == token)
        async with _open_nursery() as nursery:
            for name in swapped:
                nursery.start_soon(self._release_pending, name, (token, undoing), kept, now)
        return kept

    async def _swap_mark(
        self, name: str, token: str, undoing: str, attempted: Collection[str], now: float
    ) -> bool:
        """Undo step 1 for one key item; False when it needs no step 3 (released
        already, or none of its pending jobs was sent)."""
        for attempt in range(CAS_ATTEMPTS):
            try:
                key = await self._unique_key(name)
                if key.mark != token:
                    return False  # taken over once the window had passed
                if not any(i in attempted for i in key.pending):
                    await self._release_pending(name, (token,), (), now, key=key)
                    return False
                key.mark = undoing
                key.pending_until = self._wall() + PENDING_SECONDS
                await self._write([self._unique_put(key, now)])
                return True
            except ConditionFailed:
                await self._backoff(attempt)
            except OjsError:
                return True  # the call's own mark may stay: released in step 3 if possible
        return True

    async def _release_pending(
        self,
        name: str,
        marks: Collection[str],
        holders: Collection[str],
        now: float,
        *,
        key: _UniqueKey | None = None,
    ) -> None:
        """Take this call's mark (any of ``marks``) off a key item: its pending ids in
        ``holders`` become ordinary holders, the others go (read, unless ``key`` is
        the item just read, then written conditionally; retried)."""
        for attempt in range(CAS_ATTEMPTS):
            try:
                if key is None:
                    key = await self._unique_key(name)
                if key.mark not in marks:
                    return  # released already, or taken over once the window had passed
                key.ids += [i for i in key.pending if i in holders and i not in key.ids]
                key.pending, key.mark = [], None
                if key.ids:
                    await self._write([self._unique_put(key, now)])
                else:
                    await self._ddb(
                        "delete_item",
                        TableName=self._table,
                        Key=self._key(f"UNIQUE#{name}", "UNIQUE"),
                        ConditionExpression="v = :v",
                        ExpressionAttributeValues={":v": _n(key.version)},
                    )
                return
            except ConditionFailed:
                key = None
                await self._backoff(attempt)
            except OjsError:
                return  # the mark stays: its pending ids lapse at pending_until

    async def _delete_unclaimed(self, job_id: str, token: str) -> None:
        """Delete a job the failed call ``token`` wrote, unless it changed since (a
        worker claimed it).  The id alone is not enough: a chunk refused because
        another call wrote the same ids first (a client's retry) must not delete that
        call's jobs, and a refusal's reason does not tell (a botocore retry of a
        committed write is refused too)."""
        try:
            await self._ddb(
                "delete_item",
                TableName=self._table,
                Key=self._job_key(job_id),
                ConditionExpression="v = :v AND wby = :token",
                ExpressionAttributeValues={":v": _n(1), ":token": _s(token)},
            )
        except OjsError:
            pass  # claimed (kept), another call's, or never written

    async def _delete_workflow_item(self, workflow_id: str, token: str) -> None:
        """Delete the item of a workflow whose creation (``token``) failed, whatever
        members that a worker had claimed wrote to it since (they finish as plain
        jobs), but never another call's item at the same id."""
        try:
            await self._ddb(
                "delete_item",
                TableName=self._table,
                Key=self._key(f"WF#{workflow_id}", "WF"),
                ConditionExpression="wby = :token",
                ExpressionAttributeValues={":token": _s(token)},
            )
        except OjsError:
            pass  # another call's (or never written)

    async def _fold_pending(
        self,
        keys: list[_UniqueKey],
        versions: dict[str, int],
        token: str,
        own: set[str],
        now: float,
    ) -> None:
        """After the last job chunk: this call's pending ids become ordinary holders
        and its mark goes.  Each key item is written at the version the call left it
        at; one changed since (a chain step taking the key) is read again.  A failure
        changes nothing that matters: pending ids whose jobs exist hold the key."""
        for key in keys:
            key.version = versions[key.key]
            key.ids += [i for i in key.pending if i not in key.ids]
            key.pending, key.mark = [], None
        for chunk in _chunks(keys, TRANSACT_MAX):
            try:
                await self._write([self._unique_put(k, now) for k in chunk])
            except ConditionFailed:
                async with _open_nursery() as nursery:
                    for key in chunk:
                        nursery.start_soon(self._release_pending, key.key, (token,), own, now)
            except OjsError:
                pass

    async def _cancel_replaced(
        self, rows: Sequence[_Row], now: float, until: float, window: float
    ) -> dict[str, Job]:
        """Cancel the jobs a large ``replace`` displaces, with their workflows, in as few
        transactions as fit; returns the jobs cancelled, by id.  A job that ended
        meanwhile is left alone (and not reported replaced)."""
        cancelled: dict[str, Job] = {}
        remaining = [r.job.id for r in rows]
        for attempt in range(CAS_ATTEMPTS):
            fresh = await self._load_many(remaining)
            todo: list[_Row] = []
            for job_id in remaining:
                row = fresh.get(job_id)
                if row is None or row.job.state.is_terminal:
                    continue
                lifecycle.cancel(row.job, now)
                row.drop_token()  # its message is deleted as stale when received
                todo.append(row)
            remaining = []
            for chunk in _commit_chunks(todo):
                self._check_window(until, window)
                try:
                    await self._commit(chunk, now)
                except ConditionFailed:
                    remaining += [r.job.id for r in chunk]  # changed meanwhile: read again
                else:
                    cancelled.update((r.job.id, r.job.clone()) for r in chunk)
            if not remaining:
                return cancelled
            await self._backoff(attempt)
        raise BackendUnavailable(
            "Jobs to replace kept changing concurrently; try again",
            details={"job_ids": remaining[:10]},
        )

    # -- unique keys ------------------------------------------------------------------------

    async def _key_registrations(
        self, rows: Sequence[_Row], now: float, keys: dict[str, _UniqueKey] | None = None
    ) -> list[dict[str, Any]]:
        """Writes that add new ``rows`` to the items of the unique keys they hold
        (conditional on each item's version: a concurrent change fails the step).

        ``keys`` (filled in here) may hold key items read and changed already, by an
        enqueue: the result then writes those too, one write per item."""
        keys = {} if keys is None else keys
        for row in rows:
            key = row.job.unique_key
            if key is None:
                continue
            if key not in keys:
                keys[key] = await self._unique_key(key)
            if row.job.id not in keys[key].ids:
                keys[key].ids.append(row.job.id)
        return [self._unique_put(k, now) for k in keys.values() if k.changed]

    async def _unique_key(self, key: str) -> _UniqueKey:
        item = await self._get_item(f"UNIQUE#{key}", "UNIQUE")
        if not item:
            return _UniqueKey(key, 0, [], [])
        stored = json.loads(item["ids"]["S"])
        pending = json.loads(item["pend"]["S"]) if "pend" in item else []
        until = float(item["pend_until"]["N"]) if "pend_until" in item else 0.0
        mark = item["pend_by"]["S"] if "pend_by" in item else None
        version = int(item["v"]["N"])
        return _UniqueKey(
            key,
            version,
            stored,
            list(stored),
            stored_pending=pending,
            pending=list(pending),
            pending_until=until,
            stored_mark=mark,
            mark=mark,
        )

    def _unique_put(self, key: _UniqueKey, now: float) -> dict[str, Any]:
        """Write the key's job ids (newest last), conditional on the version read."""
        item = {
            **self._key(f"UNIQUE#{key.key}", "UNIQUE"),
            "ids": _s(json.dumps(key.ids[-UNIQUE_IDS_KEPT:])),
            "at": _n(now),
        }
        if key.pending:
            item["pend"] = _s(json.dumps(key.pending))
            item["pend_until"] = _n(key.pending_until)
            if key.mark is not None:
                item["pend_by"] = _s(key.mark)
        return {"Put": self._versioned_put(item, key.version)}

    async def _find_duplicate(
        self, job: Job, key: _UniqueKey, batch: dict[str, _Row], now: float
    ) -> _Row | None:
        """The newest job holding ``key`` that blocks ``job`` under its policy.

        Raises :class:`_StillWriting` (the caller waits, then decides again) while the
        key bears the live mark of a call still writing (or undoing) its pending jobs.
        """
        if key.mark is not None and key.pending_until > self._wall():
            # A call is still writing (or undoing) its pending jobs: even those that
            # exist are not holders yet, its undo may delete them.
            raise _StillWriting(key.key, key.stored_pending, key.pending_until)
        pending = [i for i in key.pending if i not in key.ids]
        rows = await self._load_many(i for i in [*key.ids, *pending] if i not in batch)
        if key.pending:
            writing = [i for i in pending if i not in rows and i not in batch]
            if writing and key.pending_until > self._wall():
                raise _StillWriting(key.key, writing, key.pending_until)
            # Pending jobs that exist hold the key like any; the others never will.
            key.ids.extend(pending)
            key.pending, key.mark = [], None
        # Ids of jobs that are gone (pruned) can no longer block anyone.
        alive = [i for i in key.ids if i in rows or i in batch]
        if alive != key.ids:
            key.ids[:] = alive
        for job_id in reversed(key.ids):
            row = batch.get(job_id) or rows[job_id]
            if unique.conflicts(job, row.job, now):
                return row
        return None

    # -- queues -------------------------------------------------------------------------

    def _decode_queue(self, item: dict[str, Any]) -> _QueueMeta:
        return _QueueMeta(
            name=item["sk"]["S"],
            version=int(item.get("v", {"N": "0"})["N"]),
            created_at=float(item.get("created_at", {"N": "0"})["N"]),
            paused=bool(item.get("paused", {"BOOL": False})["BOOL"]),
            tiers={int(t) for t in item.get("tiers", {"NS": []})["NS"]},
            rate_limit=json.loads(item["rate"]["S"]) if "rate" in item else None,
            concurrency=int(item["conc"]["N"]) if "conc" in item else None,
            starts=json.loads(item["starts"]["S"]) if "starts" in item else [],
        )

    async def _queue_metas(self, names: Iterable[str] | None = None) -> dict[str, _QueueMeta]:
        if names is None:
            items = await self._query(
                KeyConditionExpression="pk = :pk",
                ExpressionAttributeValues={":pk": _s("QUEUES")},
                ConsistentRead=True,
            )
        else:
            wanted = list(dict.fromkeys(names))
            items = []
            for chunk in _chunks(wanted, 100):
                out = await self._ddb(
                    "batch_get_item",
                    RequestItems={
                        self._table: {
                            "Keys": [self._key("QUEUES", n) for n in chunk],
                            "ConsistentRead": True,
                        }
                    },
                )
                items += out.get("Responses", {}).get(self._table, [])
        metas = {m.name: m for m in map(self._decode_queue, items)}
        for meta in metas.values():
            self._known_tiers.setdefault(meta.name, set()).update(meta.tiers)
        return metas

    async def _query(self, *, index: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        query: dict[str, Any] = {"TableName": self._table, **kwargs}
        if index is not None:
            query["IndexName"] = index
        limit = kwargs.get("Limit")
        while True:
            out = await self._ddb("query", **query)
            items += out.get("Items", [])
            start = out.get("LastEvaluatedKey")
            if not start or (limit is not None and len(items) >= limit):
                return items
            query["ExclusiveStartKey"] = start

    async def _count(self, pk: str, low: str | None = None) -> int:
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "gsi1pk = :pk",
            # Items past their DynamoDB TTL linger until deleted: not counted.
            "FilterExpression": "attribute_not_exists(#ttl) OR #ttl >= :wall",
            "ExpressionAttributeNames": {"#ttl": TTL_ATTRIBUTE},
            "ExpressionAttributeValues": {":pk": _s(pk), ":wall": _n(int(self._wall()))},
            "Select": "COUNT",
        }
        if low is not None:
            kwargs["KeyConditionExpression"] += " AND gsi1sk >= :low"
            kwargs["ExpressionAttributeValues"][":low"] = _s(low)
        query: dict[str, Any] = {"TableName": self._table, "IndexName": QUEUE_STATE_INDEX}
        total = 0
        while True:
            out = await self._ddb("query", **query, **kwargs)
            total += int(out.get("Count", 0))
            start = out.get("LastEvaluatedKey")
            if not start:
                return total
            query["ExclusiveStartKey"] = start

    async def _update_queue(
        self, queue: str, now: float, sets: dict[str, dict[str, Any]], removes: Sequence[str] = ()
    ) -> None:
        values: dict[str, Any] = {":now": _n(now), ":zero": _n(0), ":one": _n(1)}
        names: dict[str, str] = {}
        parts = [
            "created_at = if_not_exists(created_at, :now)",
            "v = if_not_exists(v, :zero) + :one",
        ]
        for i, (attr, value) in enumerate(sets.items()):
            names[f"#a{i}"] = attr
            values[f":a{i}"] = value
            parts.append(f"#a{i} = :a{i}")
        expression = "SET " + ", ".join(parts)
        if removes:
            for i, attr in enumerate(removes):
                names[f"#r{i}"] = attr
            expression += " REMOVE " + ", ".join(f"#r{i}" for i in range(len(removes)))
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "Key": self._key("QUEUES", queue),
            "UpdateExpression": expression,
            "ExpressionAttributeValues": values,
        }
        if names:
            kwargs["ExpressionAttributeNames"] = names
        await self._ddb("update_item", **kwargs)

    async def _apply_queue_limits(self, job: Job, now: float) -> None:
        limits = queue_limits_from(job.options_extra)
        if limits is None:
            return
        rate, concurrency = limits
        metas = await self._queue_metas([job.queue])
        meta = metas.get(job.queue)
        sets: dict[str, dict[str, Any]] = {}
        removes: list[str] = []
        if rate is not None:
            sets["rate"] = _s(json.dumps(rate, sort_keys=True))
            if meta is None or meta.rate_limit != rate:
                removes.append("starts")  # a new limit starts a new window
        if concurrency is not None:
            sets["conc"] = _n(concurrency)
        await self._update_queue(job.queue, now, sets, removes)

    async def list_queues(self) -> list[QueueInfo]:
        metas = await self._queue_metas()
        out = []
        for name in sorted(metas):
            counts = {}
            for state in JobState:
                n = await self._count(f"Q#{name}#{state.value}")
                if n:
                    counts[state.value] = n
            meta = metas[name]
            out.append(
                QueueInfo(name=name, paused=meta.paused, created_at=meta.created_at, counts=counts)
            )
        return out

    async def queue_info(self, queue: str, now: float) -> QueueInfo:
        meta = (await self._queue_metas([queue])).get(queue)
        if meta is None:
            raise NotFound(f"Queue {queue} not found", details={"queue": queue})
        counts = {s.value: await self._count(f"Q#{queue}#{s.value}") for s in JobState}
        since = _ts(now - 60)
        return QueueInfo(
            name=queue,
            paused=meta.paused,
            created_at=meta.created_at,
            counts=counts,
            rate_limit=meta.rate_limit,
            concurrency=meta.concurrency,
            completed_last_minute=await self._count(f"Q#{queue}#completed", since),
            failed_last_minute=await self._count(f"Q#{queue}#discarded", since),
        )

    async def set_queue_paused(self, queue: str, paused: bool, now: float) -> QueueInfo:
        await self._update_queue(queue, now, {"paused": {"BOOL": paused}})
        meta = (await self._queue_metas([queue]))[queue]
        if not paused and self._listener is not None:
            self._listener.queues_ready([queue])
        return QueueInfo(name=queue, paused=meta.paused, created_at=meta.created_at)

    # -- claim --------------------------------------------------------------------------

    async def claim(self, requests: Sequence[ClaimRequest], now: float) -> list[list[Job]]:
        metas = await self._queue_metas(q for r in requests for q in r.queues)
        out: list[list[Job]] = []
        for request in requests:
            got: list[Job] = []
            for queue in request.queues:
                meta = metas.get(queue)
                if meta is None or meta.paused:
                    continue
                budget = await self._budget(meta, now)
                taken = 0
                for tier in sorted(meta.tiers, reverse=True):
                    # Receives that bring no job (stale copies, not-yet-due jobs) are
                    # bounded: SQS may keep handing out copies of held messages.
                    wasted = 0
                    while len(got) < request.count and (budget is None or taken < budget):
                        want = request.count - len(got)
                        if budget is not None:
                            want = min(want, budget - taken)
                        jobs, received = await self._claim_round(queue, tier, request, want, now)
                        got += jobs
                        taken += len(jobs)
                        # A short receive of only claimable jobs means the tier looks
                        # drained; stale messages took slots, so look again then.
                        if received == 0 or (len(jobs) == received and received < min(10, want)):
                            break
                        wasted = wasted + 1 if not jobs else 0
                        if wasted >= MAX_WASTED_RECEIVES:
                            break
                    if len(got) >= request.count:
                        break
                if taken and meta.rate_limit is not None:
                    await self._record_starts(meta, taken, now)
                if len(got) >= request.count:
                    break
            out.append(got)
        return out

    async def _budget(self, meta: _QueueMeta, now: float) -> int | None:
        """How many more jobs this queue may start now (None: unlimited)."""
        budget: int | None = None
        if meta.rate_limit is not None:
            window = RateWindow.from_config(meta.rate_limit)
            window.starts.extend(sorted(meta.starts))
            budget = window.remaining(now)
        if meta.concurrency is not None:
            room = max(0, meta.concurrency - await self._count(f"Q#{meta.name}#active"))
            budget = room if budget is None else min(budget, room)
        return budget

    async def _record_starts(self, meta: _QueueMeta, taken: int, now: float) -> None:
        """Append claim times to the queue's rate window (compare-and-set, retried)."""
        for attempt in range(CAS_ATTEMPTS):
            assert meta.rate_limit is not None
            window = int(meta.rate_limit["window_ms"]) / 1000.0
            starts = [t for t in meta.starts if t > now - window] + [now] * taken
            try:
                async with map_errors():
                    await self.clients.dynamodb.update_item(
                        TableName=self._table,
                        Key=self._key("QUEUES", meta.name),
                        UpdateExpression="SET starts = :s, v = :next",
                        ConditionExpression="v = :v",
                        ExpressionAttributeValues={
                            ":s": _s(json.dumps(starts)),
                            ":v": _n(meta.version),
                            ":next": _n(meta.version + 1),
                        },
                    )
                meta.starts, meta.version = starts, meta.version + 1
                return
            except ConditionFailed:
                await self._backoff(attempt)
                fresh = (await self._queue_metas([meta.name])).get(meta.name)
                if fresh is None or fresh.rate_limit is None:
                    return
                meta.starts, meta.version, meta.rate_limit = (
                    fresh.starts,
                    fresh.version,
                    fresh.rate_limit,
                )

    async def _claim_round(
        self, queue: str, tier: int, request: ClaimRequest, want: int, now: float
    ) -> tuple[list[Job], int]:
        """Receive up to ``want`` (≤ 10) messages from one tier queue and claim their
        jobs. Returns the claimed jobs (message order) and how many messages came."""
        url = await self._queue_url(queue, tier)
        visibility = math.ceil((request.visibility_ms or DEFAULT_VISIBILITY_MS) / 1000)
        messages = await self._receive(url, want, visibility)
        if not messages:
            return [], 0
        rows = await self._load_many(m.job_id for m in messages if m.job_id)
        claimed: list[Job | None] = [None] * len(messages)
        # One message per job: the current token's if it came, else any (stale) one.
        chosen: dict[str, int] = {}
        for index, message in enumerate(messages):
            row = rows.get(message.job_id or "")
            if message.job_id is None or row is None:
                continue
            first = chosen.setdefault(message.job_id, index)
            if first != index and message.token == row.token:
                chosen[message.job_id] = index

        async def settle(index: int, message: _Message) -> None:
            claimed[index] = await self._take(message, rows.get(message.job_id or ""), request, now)

        async with _open_nursery() as nursery:
            for index, message in enumerate(messages):
                row = rows.get(message.job_id or "")
                if row is None or chosen[row.job.id] == index:
                    nursery.start_soon(settle, index, message)
                elif message.token != row.token:
                    nursery.start_soon(self._delete_message, message.url, message.receipt)
                # else: SQS delivered the current message twice; leave the copy alone
        return [j for j in claimed if j is not None], len(messages)

    async def _take(
        self, message: _Message, row: _Row | None, request: ClaimRequest, now: float
    ) -> Job | None:
        """Decide what a received message means; claim its job if it is claimable."""
        url, receipt = message.url, message.receipt
        if row is None:
            if message.job_id is None or self._wall() - message.sent_at > ORPHAN_GRACE_SECONDS:
                await self._delete_message(url, receipt)
            else:  # its enqueue may still be writing the item
                await self._set_visibility(url, receipt, 2)
            return None
        job = row.job
        if row.token != message.token or job.state.is_terminal or job.state is JobState.PENDING:
            await self._delete_message(url, receipt)  # stale: never delivered
            return None
        if job.state is JobState.ACTIVE:
            # A duplicate delivery, or a lease the reaper has not expired yet.
            remaining = (job.lease_expires_at or now) - now
            await self._set_visibility(url, receipt, max(1, math.ceil(remaining)))
            return None
        if job.state in (JobState.SCHEDULED, JobState.RETRYABLE):
            if job.scheduled_at is not None and job.scheduled_at > now:
                await self._set_visibility(url, receipt, math.ceil(job.scheduled_at - now))
                return None
        new = row.copy()
        if new.job.state in (JobState.SCHEDULED, JobState.RETRYABLE):
            lifecycle.promote(new.job, now)
        if lifecycle.is_expired(new.job, now):
            lifecycle.expire_ttl(new.job, now)
            new.drop_token()
            try:
                await self._commit([new], now)
            except ConditionFailed:
                await self._set_visibility(url, receipt, 0)
                return None
            self._expired_unreported.append(new.job.clone())
            await self._delete_message(url, receipt)
            return None
        lifecycle.claim(new.job, request.worker_id, request.visibility_ms, now)
        lease = math.ceil(((new.job.lease_expires_at or now) - now) - 1e-9)
        requested = math.ceil((request.visibility_ms or DEFAULT_VISIBILITY_MS) / 1000)
        new.receipt = receipt
        new.token_url = url
        new.receives = message.receives
        # A visibility change after the commit lands later: allow for the round trip.
        new.visible_at = self._wall() + max(1, lease) + (1.0 if lease != requested else 0.0)
        try:
            await self._commit([new], now)
        except ConditionFailed:
            await self._set_visibility(url, receipt, 0)  # changed under us: decide again
            return None
        if lease != requested:
            await self._set_visibility(url, receipt, max(1, lease))
        return new.job.clone()

    # -- settling -------------------------------------------------------------------------

    async def ack(
        self, job_id: str, worker_id: str | None, result: Any, has_result: bool, now: float
    ) -> Job:
        held: dict[str, str | None] = {}

        def change(row: _Row) -> None:
            lifecycle.ack(row.job, worker_id, result, has_result, now)
            held.update(url=row.token_url, receipt=row.receipt)
            row.drop_token()

        row = await self._mutate(job_id, now, change)
        await self._delete_message(held.get("url"), held.get("receipt"))
        return row.job.clone()

    async def ack_many(self, acks: Sequence[AckRequest], now: float) -> list[Job | OjsError]:
        # Each ack is a conditional DynamoDB write plus an SQS delete: run them side
        # by side rather than one after the other.  An id repeated in the call is
        # acked again afterwards, in order, so the first ack is the one that wins.
        outcomes: dict[int, Job | OjsError] = {}

        async def one(k: int, ack: AckRequest) -> None:
            try:
                outcomes[k] = await self.ack(
                    ack.job_id, ack.worker_id, ack.result, ack.has_result, now
                )
            except OjsError as exc:
                outcomes[k] = exc

        seen: set[str] = set()
        repeats: list[int] = []
        async with _open_nursery() as nursery:
            for k, ack in enumerate(acks):
                if ack.job_id in seen:
                    repeats.append(k)
                else:
                    seen.add(ack.job_id)
                    nursery.start_soon(one, k, ack)
        for k in repeats:
            await one(k, acks[k])
        return [outcomes[k] for k in range(len(acks))]

    async def nack(
        self, job_id: str, worker_id: str | None, failure: Failure, requeue: bool, now: float
    ) -> Job:
        actions: list[tuple[str, str | None, str | None, int]] = []

        def change(row: _Row) -> None:
            actions.clear()
            url, receipt, receives = row.token_url, row.receipt, row.receives
            lifecycle.nack(row.job, worker_id, failure, requeue, now, self._rng)
            state = row.job.state
            if state is JobState.AVAILABLE:
                actions.append(("show", url, receipt, 0))
                row.visible_at, row.receipt = self._wall() + 1.0, None
                return
            if state is JobState.RETRYABLE and row.job.scheduled_at is not None:
                delay = max(0, math.floor(row.job.scheduled_at - now))
                # Re-using the message counts a receive; stay clear of the SQS redrive.
                if (
                    delay <= MAX_VISIBILITY_SECONDS
                    and receives + 1 < self.settings.max_receive_count
                ):
                    actions.append(("show", url, receipt, delay))
                    # The visibility changes after this commit: allow for the round trip.
                    row.visible_at, row.receipt = self._wall() + delay + 1.0, None
                    return
            actions.append(("delete", url, receipt, 0))
            row.drop_token()

        row = await self._mutate(job_id, now, change)
        for action, url, receipt, seconds in actions:
            if action == "delete":
                await self._delete_message(url, receipt)
            else:
                await self._set_visibility(url, receipt, seconds)
        return row.job.clone()

    async def heartbeat(
        self, worker_id: str | None, job_ids: Sequence[str], visibility_ms: int | None, now: float
    ) -> list[Job]:
        extended: dict[str, Job] = {}

        async def extend(job_id: str) -> None:
            for attempt in range(CAS_ATTEMPTS):
                row = await self._load_or_none(job_id)
                if row is None or row.job.state is not JobState.ACTIVE:
                    return
                if worker_id is not None and row.job.worker_id not in (None, worker_id):
                    return
                ms = visibility_ms or row.job.visibility_timeout_ms or DEFAULT_VISIBILITY_MS
                new = row.copy()
                new.job.lease_expires_at = now + ms / 1000.0
                seconds = max(1, math.ceil(ms / 1000))
                new.visible_at = self._wall() + seconds + 1.0  # changed after the commit
                try:
                    await self._commit([new], now)
                except ConditionFailed:
                    await self._backoff(attempt)
                    continue
                if new.token_url is not None and new.receipt is not None:
                    visibility.setdefault(new.token_url, []).append((new.receipt, seconds))
                extended[job_id] = new.job.clone()
                return

        visibility: dict[str, list[tuple[str, int]]] = {}  # queue URL -> (receipt, s)
        async with _open_nursery() as nursery:
            for job_id in dict.fromkeys(job_ids):
                nursery.start_soon(extend, job_id)
        async with _open_nursery() as nursery:
            for url, changes in visibility.items():
                for chunk in _chunks(changes, 10):
                    nursery.start_soon(self._set_visibility_batch, url, chunk)
        return [extended[i] for i in dict.fromkeys(job_ids) if i in extended]

    async def _set_visibility_batch(self, url: str, changes: list[tuple[str, int]]) -> None:
        """Extend up to 10 messages' visibility in one call (heartbeats)."""
        entries = [
            {
                "Id": str(i),
                "ReceiptHandle": receipt,
                "VisibilityTimeout": min(seconds, MAX_VISIBILITY_SECONDS),
            }
            for i, (receipt, seconds) in enumerate(changes)
        ]
        try:
            async with map_errors(), self._sqs_slots:
                await self.clients.sqs.change_message_visibility_batch(
                    QueueUrl=url, Entries=entries
                )
        except OjsError:
            pass  # a failed extension shows as a redelivery, handled like a duplicate

    async def cancel(self, job_id: str, now: float) -> Job:
        held: dict[str, str | None] = {}

        def change(row: _Row) -> None:
            lifecycle.cancel(row.job, now)
            held.update(url=row.token_url, receipt=row.receipt)
            row.drop_token()

        row = await self._mutate(job_id, now, change)
        await self._delete_message(held.get("url"), held.get("receipt"))
        return row.job.clone()

    async def get(self, job_id: str) -> Job:
        return (await self._load(job_id)).job.clone()

    # -- timers ----------------------------------------------------------------------------

    async def _due_rows(
        self, pk: str, until: float, limit: int, index: str = QUEUE_STATE_INDEX
    ) -> list[_Row]:
        hash_key, range_key = (
            ("gsi3pk", "gsi3sk") if index == EXPIRY_INDEX else ("gsi1pk", "gsi1sk")
        )
        items = await self._query(
            index=index,
            KeyConditionExpression=f"{hash_key} = :pk AND {range_key} <= :until",
            ExpressionAttributeValues={":pk": _s(pk), ":until": _s(_ts(until) + "~")},
            Limit=limit,
        )
        rows = [self._decode(i) for i in items[:limit]]
        return [r for r in rows if r is not None]

    async def _queue_names(self) -> list[str]:
        return sorted(await self._queue_metas())

    async def promote_due(self, now: float, limit: int) -> list[Job]:
        promoted: list[Job] = []
        for queue in await self._queue_names():
            for state in (JobState.SCHEDULED, JobState.RETRYABLE):
                if len(promoted) >= limit:
                    return promoted
                for candidate in await self._due_rows(
                    f"Q#{queue}#{state.value}", now, limit - len(promoted)
                ):
                    job = await self._promote_one(candidate.job.id, now)
                    if job is not None:
                        promoted.append(job)
        return promoted

    async def _promote_one(self, job_id: str, now: float) -> Job | None:
        for attempt in range(CAS_ATTEMPTS):
            row = await self._load_or_none(job_id)
            if row is None or row.job.state not in (JobState.SCHEDULED, JobState.RETRYABLE):
                return None
            job = row.job
            if job.scheduled_at is None or job.scheduled_at > now or lifecycle.is_expired(job, now):
                return None  # not due (a stale index entry), or the reaper's to discard
            new = row.copy()
            lifecycle.promote(new.job, now)
            await self._ensure_token(new)
            try:
                await self._commit([new], now)
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            return new.job.clone()
        return None

    async def reap(self, now: float, limit: int) -> list[Job]:
        reaped, self._expired_unreported = self._expired_unreported, []
        for queue in await self._queue_names():
            if len(reaped) >= limit:
                break
            for candidate in await self._due_rows(f"Q#{queue}#active", now, limit - len(reaped)):
                job = await self._reap_lease(candidate.job.id, now)
                if job is not None:
                    reaped.append(job)
            if len(reaped) >= limit:
                break
            for candidate in await self._due_rows(
                f"EXP#{queue}", now, limit - len(reaped), EXPIRY_INDEX
            ):
                job = await self._reap_ttl(candidate.job.id, now)
                if job is not None:
                    reaped.append(job)
        return reaped

    async def _reap_lease(self, job_id: str, now: float) -> Job | None:
        for attempt in range(CAS_ATTEMPTS):
            row = await self._load_or_none(job_id)
            if row is None or row.job.state is not JobState.ACTIVE:
                return None
            deadline = _sort_time(row.job)
            if deadline > now:
                return None  # extended since the index was read
            new = row.copy()
            exec_deadline = new.job.execution_deadline()
            if exec_deadline is not None and exec_deadline <= now:
                lifecycle.execution_timeout(new.job, now, self._rng)
            else:
                lifecycle.expire_lease(new.job, now)
            stale: tuple[str | None, str | None] = (None, None)
            if new.job.state is JobState.AVAILABLE:
                await self._ensure_token(new)
            elif new.job.state.is_terminal:
                stale = (new.token_url, new.receipt)
                new.drop_token()
            else:
                new.receipt = None  # retryable: the promoter decides about the message
            try:
                await self._commit([new], now)
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            await self._delete_message(*stale)
            return new.job.clone()
        return None

    async def _reap_ttl(self, job_id: str, now: float) -> Job | None:
        for attempt in range(CAS_ATTEMPTS):
            row = await self._load_or_none(job_id)
            if row is None or row.job.state not in _NOT_STARTED:
                return None
            if not lifecycle.is_expired(row.job, now):
                return None
            new = row.copy()
            lifecycle.expire_ttl(new.job, now)
            new.drop_token()  # an unreceived message is deleted as stale when it comes
            try:
                await self._commit([new], now)
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            return new.job.clone()
        return None

    async def _head(self, pk: str, index: str = QUEUE_STATE_INDEX) -> float | None:
        hash_key = "gsi3pk" if index == EXPIRY_INDEX else "gsi1pk"
        out = await self._ddb(
            "query",
            TableName=self._table,
            IndexName=index,
            KeyConditionExpression=f"{hash_key} = :pk",
            ExpressionAttributeValues={":pk": _s(pk)},
            Limit=1,
        )
        items = out.get("Items", [])
        if not items:
            return None
        sort_key = items[0]["gsi3sk" if index == EXPIRY_INDEX else "gsi1sk"]["S"]
        return float(sort_key.split("#", 1)[0])

    async def _earliest(self, pks: list[tuple[str, str]]) -> float | None:
        times = [t for pk, index in pks if (t := await self._head(pk, index)) is not None]
        return min(times) if times else None

    @staticmethod
    def _due_heads(queues: list[str]) -> list[tuple[str, str]]:
        """Index partitions whose first entry is when promote_due has work."""
        return [
            (f"Q#{q}#{s}", QUEUE_STATE_INDEX) for q in queues for s in ("scheduled", "retryable")
        ]

    @staticmethod
    def _reap_heads(queues: list[str]) -> list[tuple[str, str]]:
        """Index partitions whose first entry is when reap has work."""
        return [(f"Q#{q}#active", QUEUE_STATE_INDEX) for q in queues] + [
            (f"EXP#{q}", EXPIRY_INDEX) for q in queues
        ]

    async def next_due_at(self) -> float | None:
        return await self._earliest(self._due_heads(await self._queue_names()))

    async def next_reap_at(self) -> float | None:
        if self._expired_unreported:
            return float("-inf")
        return await self._earliest(self._reap_heads(await self._queue_names()))

    async def next_wakeup(self) -> float | None:
        if self._expired_unreported:
            return float("-inf")
        queues = await self._queue_names()  # listed once for both
        return await self._earliest(self._due_heads(queues) + self._reap_heads(queues))

    async def prune(
        self, finished_before: float | None, dead_letter_before: float | None, limit: int
    ) -> int:
        cutoffs = [c for c in (finished_before, dead_letter_before) if c is not None]
        if not cutoffs:
            return 0
        doomed: list[_Row] = []
        for queue in await self._queue_names():
            for state in _TERMINAL_STATES:
                for row in await self._due_rows(f"Q#{queue}#{state.value}", max(cutoffs), 10_000):
                    job = row.job
                    finished = (
                        job.completed_at or job.discarded_at or job.cancelled_at or job.created_at
                    )
                    cutoff = dead_letter_before if job.dead_letter else finished_before
                    if cutoff is not None and finished < cutoff:
                        doomed.append(row)
                    if len(doomed) >= limit:
                        break
        doomed = doomed[:limit]
        deleted = 0
        for row in doomed:
            try:
                async with map_errors():
                    await self.clients.dynamodb.delete_item(
                        TableName=self._table,
                        Key=self._job_key(row.job.id),
                        ConditionExpression="v = :v",
                        ExpressionAttributeValues={":v": _n(row.version)},
                    )
                deleted += 1
            except ConditionFailed:
                continue  # changed meanwhile (e.g. a dead letter retried)
        return deleted

    # -- dead letter --------------------------------------------------------------------------

    async def list_dead_letter(self, queue: str | None, limit: int, offset: int) -> DeadLetterPage:
        queues = [queue] if queue is not None else await self._queue_names()
        items: list[dict[str, Any]] = []
        for name in queues:
            items += await self._query(
                index=DLQ_INDEX,
                KeyConditionExpression="gsi2pk = :pk",
                ExpressionAttributeValues={":pk": _s(f"DLQ#{name}")},
            )
        items.sort(key=lambda i: i["gsi2sk"]["S"])
        rows = [r for r in map(self._decode, items) if r is not None]
        rows = [r for r in rows if r.job.state is JobState.DISCARDED and r.job.dead_letter]
        page = [r.job.clone() for r in rows[offset : offset + limit]]
        return DeadLetterPage(jobs=page, total=len(rows))

    async def _dead_letter_row(self, job_id: str) -> _Row:
        row = await self._load_or_none(job_id)
        if row is None or row.job.state is not JobState.DISCARDED or not row.job.dead_letter:
            raise NotFound(
                f"Job {job_id} is not in the dead letter queue", details={"job_id": job_id}
            )
        return row

    async def retry_dead_letter(self, job_id: str, now: float) -> Job:
        for attempt in range(CAS_ATTEMPTS):
            new = (await self._dead_letter_row(job_id)).copy()
            lifecycle.retry_dead_letter(new.job, now)
            new.expires_ttl = None
            await self._send_tokens([_Send(new)])
            try:
                await self._commit([new], now)
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            await self._register_tier(new.job.queue, new.job.priority, now)
            return new.job.clone()
        raise BackendUnavailable(f"Job {job_id} kept changing concurrently; try again")

    async def delete_dead_letter(self, job_id: str) -> Job:
        row = await self._dead_letter_row(job_id)
        try:
            async with map_errors():
                await self.clients.dynamodb.delete_item(
                    TableName=self._table,
                    Key=self._job_key(job_id),
                    ConditionExpression="v = :v",
                    ExpressionAttributeValues={":v": _n(row.version)},
                )
        except ConditionFailed as exc:
            raise NotFound(
                f"Job {job_id} is not in the dead letter queue", details={"job_id": job_id}
            ) from exc
        return row.job.clone()

    # -- workflows ------------------------------------------------------------------------------

    def _workflow_put(
        self, workflow: Workflow, version: int, *, writer: str | None = None
    ) -> dict[str, Any]:
        """A transaction item writing the workflow as version ``version + 1``,
        conditional on the stored version (0: on the item not existing yet).

        ``writer``: the large write that created the item (``wby``), kept by every
        later version: its undo deletes the item by it, whatever members claimed
        meanwhile wrote to it, and never another call's item at the same id.  (An
        Update of the body alone would keep it, but moto counts the old body
        against the 400 KB limit too.)"""
        body = json.dumps(workflow.to_record(), separators=(",", ":"))
        item = {**self._key(f"WF#{workflow.id}", "WF"), "body": _s(body)}
        if writer is not None:
            item["wby"] = _s(writer)
        return {"Put": self._versioned_put(item, version)}

    async def _load_workflow(self, workflow_id: str) -> _Flow | None:
        item = await self._get_item(f"WF#{workflow_id}", "WF")
        if not item:
            return None
        workflow = Workflow.from_record(json.loads(item["body"]["S"]))
        return workflow, int(item["v"]["N"]), item["wby"]["S"] if "wby" in item else None

    async def _workflow(self, workflow_id: str) -> _Flow:
        found = await self._load_workflow(workflow_id)
        if found is None:
            raise NotFound(
                f"Workflow {workflow_id} not found", details={"workflow_id": workflow_id}
            )
        return found

    async def create_workflow(
        self, workflow: Workflow, jobs: Sequence[Job], now: float
    ) -> Workflow:
        size = len(json.dumps(workflow.to_record(), separators=(",", ":")))
        if size > MAX_WORKFLOW_BYTES:
            # One DynamoDB item holds the workflow's member list: refused up front
            # rather than failing mid-write (or later, as results come in).
            raise PayloadTooLarge(
                f"Workflow of {workflow.total} jobs needs a {size}-byte record; "
                f"SQS-backed storage stores at most {MAX_WORKFLOW_BYTES}",
                details={
                    "job_count": workflow.total,
                    "size": size,
                    "max_bytes": MAX_WORKFLOW_BYTES,
                },
            )
        if await self._load_workflow(workflow.id) is not None:
            raise DuplicateJob(
                f"A workflow with id {workflow.id} already exists",
                details={"existing_workflow_id": workflow.id},
            )
        rows = [_Row(job=job.clone()) for job in jobs]
        for row in rows:
            row.job.unique_key = unique.fingerprint(row.job)
        sends = [_Send(r) for r in rows if r.job.state is JobState.AVAILABLE]
        # The workflow, its members and one item per unique key they hold.
        key_count = len({r.job.unique_key for r in rows if r.job.unique_key is not None})
        in_one = 1 + len(rows) + key_count <= TRANSACT_MAX and not _over_transact_bytes(rows, size)
        if in_one:
            await self._send_tokens(sends)
        lost = 0
        waiting_until: float | None = None
        while True:
            # Members hold their unique keys like enqueued jobs (without looking for
            # a holder first, as on every adapter).
            keys: dict[str, _UniqueKey] = {}
            registrations = await self._key_registrations(rows, now, keys)
            try:
                if in_one:
                    items = [self._workflow_put(workflow, 0)]
                    items += [{"Put": self._put(r)} for r in rows]
                    await self._write(items + registrations)
                else:
                    # Keys first, then the members (the workflow item with the
                    # first ones): a lost key race fails before any member exists,
                    # and nothing is retried once a member may have been claimed.
                    changed = [k for k in keys.values() if k.changed]
                    await self._write_in_chunks(rows, changed, sends, now, workflow=workflow)
                break
            except _StillWriting as exc:
                waiting_until = await self._wait_for_writer(exc, waiting_until)
            except ConditionFailed as exc:
                duplicate = await self._first_existing([r.job.id for r in rows])
                if duplicate is not None or await self._load_workflow(workflow.id) is not None:
                    raise DuplicateJob(
                        "A job or workflow with the same id already exists",
                        details={"existing_job_id": duplicate, "workflow_id": workflow.id},
                    ) from exc
                lost += 1
                if lost >= CAS_ATTEMPTS:
                    raise BackendUnavailable(
                        "Unique keys kept changing concurrently; try again"
                    ) from exc
                await self._backoff(lost - 1)  # a unique key changed meanwhile: again
        for row in rows:
            await self._register_tier(row.job.queue, row.job.priority, now)
        return workflow.clone()

    async def get_workflow(self, workflow_id: str) -> Workflow:
        """The workflow with its members' current states.

        The workflow item holds every member's state as of its last settle-type
        change (written in the same transaction), but not claims: a member whose
        recorded state is not terminal may be active now, so those members, and
        only those, are read.  A finished workflow costs one read (and one per
        member retried from the dead letter queue since).
        """
        workflow = (await self._workflow(workflow_id))[0]
        unfinished = [
            job_id
            for job_id, state in workflow.job_states.items()
            if not JobState(state).is_terminal
        ]
        rows = await self._load_many(unfinished)
        for job_id, row in rows.items():
            workflow.job_states[job_id] = row.job.state.value
            started = row.job.started_at
            if started is not None and (
                workflow.started_at is None or started < workflow.started_at
            ):
                workflow.started_at = started
        return workflow

    async def get_workflow_record(self, workflow_id: str) -> Workflow:
        """The workflow as its item holds it: one read, whatever its size.

        Exact for a finished workflow (state, ``finished_by``, ``completed_at``,
        member states and counts, ``started_at``: everything a terminal workflow
        event carries).  For a running one, members claimed since their last
        settle-type change show their earlier state (claims leave the item
        alone) and ``started_at`` is the earliest start of a settled member:
        :meth:`get_workflow` reads those members for the live view.
        """
        return (await self._workflow(workflow_id))[0]

    async def cancel_workflow(self, workflow_id: str, now: float) -> tuple[Workflow, list[Job]]:
        for attempt in range(CAS_ATTEMPTS):
            workflow, version, writer = await self._workflow(workflow_id)
            to_cancel = workflows.cancel(workflow, now)
            rows = list((await self._load_many(to_cancel)).values())
            stale: list[tuple[str | None, str | None]] = []
            for row in rows:
                lifecycle.cancel(row.job, now)
                stale.append((row.token_url, row.receipt))
                row.drop_token()
            try:
                for chunk in _chunks(rows, TRANSACT_MAX - 1):
                    await self._commit(
                        chunk, now, loaded={workflow_id: (workflow, version, writer)}
                    )
                    version += 1
                if not rows:
                    await self._write([self._workflow_put(workflow, version, writer=writer)])
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            for url, receipt in stale:
                await self._delete_message(url, receipt)
            return workflow.clone(), [r.job.clone() for r in rows]
        raise BackendUnavailable(f"Workflow {workflow_id} kept changing concurrently; try again")

    # -- cron ---------------------------------------------------------------------------------

    def _cron_put(self, record: CronRecord, version: int) -> dict[str, Any]:
        body = json.dumps(record.to_record(), separators=(",", ":"))
        return self._versioned_put({**self._key("CRONS", record.name), "body": _s(body)}, version)

    @staticmethod
    def _decode_cron(item: dict[str, Any]) -> tuple[CronRecord, int]:
        return CronRecord.from_record(json.loads(item["body"]["S"])), int(item["v"]["N"])

    async def _load_cron(self, name: str) -> tuple[CronRecord, int] | None:
        item = await self._get_item("CRONS", name)
        return self._decode_cron(item) if item else None

    async def _cron(self, name: str) -> tuple[CronRecord, int]:
        found = await self._load_cron(name)
        if found is None:
            raise NotFound(f"Cron schedule {name!r} not found", details={"name": name})
        return found

    async def put_cron(self, record: CronRecord) -> CronRecord:
        for attempt in range(CAS_ATTEMPTS):
            found = await self._load_cron(record.name)
            stored = CronRecord.from_record(json.loads(json.dumps(record.to_record())))
            version = 0
            if found is not None:
                existing, version = found
                stored.created_at = existing.created_at
                stored.last_run_at = existing.last_run_at
                stored.last_job_id = existing.last_job_id
                stored.runs = existing.runs
                stored.skipped = existing.skipped
            try:
                await self._write([{"Put": self._cron_put(stored, version)}])
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            return stored
        raise BackendUnavailable(f"Cron schedule {record.name!r} kept changing; try again")

    async def set_cron_enabled(
        self, name: str, enabled: bool, now: float
    ) -> tuple[CronRecord, CronRecord]:
        for attempt in range(CAS_ATTEMPTS):
            before, version = await self._cron(name)  # NotFound: never recreated
            after = CronRecord.from_record(before.to_record())
            if not set_enabled(after, enabled, now):
                return before, after
            try:
                await self._write([{"Put": self._cron_put(after, version)}])
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            return before, after
        raise BackendUnavailable(f"Cron schedule {name!r} kept changing; try again")

    async def list_crons(self) -> list[CronRecord]:
        items = await self._query(
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": _s("CRONS")},
            ConsistentRead=True,
        )
        return sorted((self._decode_cron(i)[0] for i in items), key=lambda c: c.name)

    async def get_cron(self, name: str) -> CronRecord:
        return (await self._cron(name))[0]

    async def delete_cron(self, name: str) -> CronRecord:
        record, version = await self._cron(name)
        try:
            async with map_errors():
                await self.clients.dynamodb.delete_item(
                    TableName=self._table,
                    Key=self._key("CRONS", name),
                    ConditionExpression="v = :v",
                    ExpressionAttributeValues={":v": _n(version)},
                )
        except ConditionFailed:
            return await self.delete_cron(name)  # changed meanwhile: delete what is there
        return record

    async def fire_cron(
        self, name: str, occurrence: float, next_run_at: float | None, job: Job, now: float
    ) -> CronFire:
        for attempt in range(CAS_ATTEMPTS):
            found = await self._load_cron(name)
            if found is None:
                return CronFire(False, reason="missing")
            record, version = found
            if not record.enabled:  # disabled since the ticker read it: nothing to advance
                return CronFire(False, reason="disabled", record=record)
            if record.next_run_at != occurrence:
                return CronFire(False, reason="already_fired", record=record)
            record.next_run_at = next_run_at
            try:
                fire = await self._fire_once(record, version, occurrence, job, now)
            except ConditionFailed:
                await self._backoff(attempt)
                continue
            return fire
        raise BackendUnavailable(f"Cron schedule {name!r} kept changing; try again")

    async def _fire_once(
        self, record: CronRecord, version: int, occurrence: float, job: Job, now: float
    ) -> CronFire:
        rows: list[_Row] = []
        previous = await self._load_or_none(record.last_job_id) if record.last_job_id else None
        stale: tuple[str | None, str | None] = (None, None)
        if previous is not None and not previous.job.state.is_terminal:
            if record.overlap_policy == "skip":
                record.skipped += 1
                await self._write([{"Put": self._cron_put(record, version)}])
                return CronFire(False, reason="overlap", record=record)
            if record.overlap_policy == "cancel_previous":
                lifecycle.cancel(previous.job, now)
                stale = (previous.token_url, previous.receipt)
                previous.drop_token()
                rows.append(previous)
        new = _Row(job=job.clone())
        new.job.unique_key = unique.fingerprint(new.job)
        if new.job.state is JobState.AVAILABLE:
            await self._send_tokens([_Send(new)])
        record.last_run_at = occurrence
        record.last_job_id = new.job.id
        record.runs += 1
        rows.append(new)
        await self._commit(rows, now, extra=[{"Put": self._cron_put(record, version)}])
        await self._delete_message(*stale)
        await self._register_tier(new.job.queue, new.job.priority, now)
        if self._listener is not None:
            self._listener.jobs_created([new.job.clone()])
        return CronFire(True, job=new.job.clone(), record=record)

    # -- helpers ---------------------------------------------------------------------------------


def _sort_time(job: Job) -> float:
    """The time that orders a job within its state (see the key design)."""
    state = job.state
    if state in (JobState.SCHEDULED, JobState.RETRYABLE):
        return job.scheduled_at or job.created_at
    if state is JobState.ACTIVE:
        deadline = job.lease_expires_at or job.started_at or job.created_at
        exec_deadline = job.execution_deadline()
        return min(deadline, exec_deadline) if exec_deadline is not None else deadline
    if state is JobState.COMPLETED:
        return job.completed_at or job.created_at
    if state is JobState.CANCELLED:
        return job.cancelled_at or job.created_at
    if state is JobState.DISCARDED:
        return job.discarded_at or job.created_at
    return job.enqueued_at or job.created_at


@asynccontextmanager
async def _open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failure of only storage errors surfaces as the first of them.

    Trio wraps a nursery's errors in an ExceptionGroup, which callers catching
    OjsError (undo bookkeeping, the HTTP error mapping: 503, not 500) would miss.
    Anything else (a bug, a Cancelled) is left in its group.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves = list(exception_leaves(group))
        if all(isinstance(leaf, OjsError) for leaf in leaves):
            raise leaves[0] from None
        raise


def _row_bytes(row: _Row) -> int:
    """About what a job's item weighs in a transaction (DynamoDB's 4 MB limit)."""
    return len(json.dumps(row.job.to_record(), separators=(",", ":"))) + ITEM_OVERHEAD_BYTES


def _over_transact_bytes(rows: Sequence[_Row], extra: int = 0) -> bool:
    """Whether ``rows`` (plus ``extra`` bytes) may weigh more than TRANSACT_MAX_BYTES.
    So few rows that even the largest items would fit are not encoded to find out:
    single enqueues, the common case, pay nothing for the check."""
    largest = len(rows) * (MAX_ITEM_BODY_BYTES + ITEM_OVERHEAD_BYTES)
    if extra + largest <= TRANSACT_MAX_BYTES:
        return False
    return extra + sum(_row_bytes(r) for r in rows) > TRANSACT_MAX_BYTES


def _chunks(items: Sequence[Any], size: int) -> list[Any]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _commit_chunks(rows: Sequence[_Row]) -> list[list[_Row]]:
    """Rows in groups that :meth:`SqsStorage._commit` writes in one transaction each:
    a row, plus for each workflow its item, up to three callbacks and their keys."""
    chunks: list[list[_Row]] = []
    current: list[_Row] = []
    flows: set[str] = set()
    used = size = 0
    for row in rows:
        workflow_id = row.job.workflow_id
        need = 1 + (7 if workflow_id is not None and workflow_id not in flows else 0)
        # A workflow item (up to ~350 KB) and its callbacks count with the first member.
        weight = _row_bytes(row) + (
            350_000 + 3 * workflows.PARENT_RESULTS_MAX_BYTES
            if workflow_id is not None and workflow_id not in flows
            else 0
        )
        if current and (used + need > TRANSACT_MAX or size + weight > TRANSACT_MAX_BYTES):
            chunks.append(current)
            current, flows, used, size = [], set(), 0, 0
        current.append(row)
        used += need
        size += weight
        if workflow_id is not None:
            flows.add(workflow_id)
    if current:
        chunks.append(current)
    return chunks
