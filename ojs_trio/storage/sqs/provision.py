"""Idempotent provisioning of the DynamoDB table and the SQS queues.

DynamoDB key design (one table, default ``ojs-jobs``, pay-per-request)
----------------------------------------------------------------------

Generic keys so that several item types share the table (single-table design). All
key attributes are strings.

============================  =====================  ==================================
item                          ``pk``                 ``sk``
============================  =====================  ==================================
job                           ``JOB#{job_id}``       ``JOB``
unique-key claim              ``UNIQUE#{key}``       ``UNIQUE``
workflow                      ``WF#{workflow_id}``   ``WF``
queue (pause, limits, tiers)  ``QUEUES``             ``{queue}``
cron registration             ``CRONS``              ``{name}``
============================  =====================  ==================================

Queues and crons share one partition each so that listing them is one ``Query``;
both are small, administrative sets.

Global secondary indexes (projection ``ALL``; they are eventually consistent on AWS):

* ``by-queue-state`` -- ``gsi1pk = "Q#{queue}#{state}"``,
  ``gsi1sk = "{time}#{job_id}"`` where time is the moment that matters in that state
  (due time when scheduled/retryable, lease or execution deadline when active, finish
  time when terminal, enqueue time otherwise): the promoter and reaper read due jobs
  as a range, counts are ``Select=COUNT`` queries. Every job item carries it.
* ``dead-letter`` -- sparse: only dead-lettered jobs carry ``gsi2pk = "DLQ#{queue}"``
  and ``gsi2sk = "{failed_at}#{job_id}"``; listing dead letters reads nothing else.
  A cross-queue listing queries per queue and merges (one partition for all dead
  letters would be a hot key).
* ``by-expiry`` -- sparse: jobs not yet started that have an ``expires_at`` carry
  ``gsi3pk = "EXP#{queue}"`` and ``gsi3sk = "{expires_at}#{job_id}"``, so the reaper
  finds TTL-expired jobs without reading the backlog.

TTL: the attribute ``expires_at_ttl`` (epoch seconds) is set on finished jobs as a
retention backstop. DynamoDB deletes expired items late (typically within days) and
moto never does, so every read still filters on ``expires_at_ttl``; never rely on
deletion.

SQS queues
----------

For each OJS queue ``q`` and priority tier ``p``: ``{prefix}-{q}`` for priority 0,
``{prefix}-{q}-p{p}`` / ``{prefix}-{q}-n{-p}`` for positive / negative priorities,
all redriving to one dead-letter queue ``{prefix}-{q}-dlq`` after
``max_receive_count`` receives (``.fifo`` appended to every name when ``use_fifo``).
The adapter creates tier queues when a job first needs one. OJS queue names may
contain ``.``, which SQS forbids, so dots become ``_`` (which OJS names cannot
contain: the mapping stays injective). Names that would exceed SQS's 80 characters
are shortened with a hash suffix (see :func:`sqs_queue_name`).

Everything here is safe to run twice and concurrently from several processes: an
existing table is checked against the key design (not altered), TTL is only enabled
when it is not yet, and an existing queue gets its attributes (the redrive policy)
reconciled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import trio

from ojs_trio.engine.errors import BackendError, BackendUnavailable
from ojs_trio.storage.sqs.client import AwsClients, AwsSettings, aws_error_code, map_errors

__all__ = [
    "DLQ_INDEX",
    "EXPIRY_INDEX",
    "QUEUE_STATE_INDEX",
    "TTL_ATTRIBUTE",
    "ProvisionResult",
    "QueueUrls",
    "provision",
    "provision_queue",
    "provision_table",
    "sqs_queue_name",
]

QUEUE_STATE_INDEX: Final = "by-queue-state"
DLQ_INDEX: Final = "dead-letter"
EXPIRY_INDEX: Final = "by-expiry"
TTL_ATTRIBUTE: Final = "expires_at_ttl"

#: SQS keeps messages at most 14 days.
MAX_RETENTION_SECONDS: Final = 14 * 86400
SQS_NAME_MAX: Final = 80
_SQS_NAME_OK: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_QUEUE_EXISTS_CODES: Final = frozenset(
    {"QueueAlreadyExists", "QueueNameExists", "AWS.SimpleQueueService.QueueNameExists"}
)

_KEY_SCHEMA: Final = [
    {"AttributeName": "pk", "KeyType": "HASH"},
    {"AttributeName": "sk", "KeyType": "RANGE"},
]
_GSIS: Final = {
    QUEUE_STATE_INDEX: ("gsi1pk", "gsi1sk"),
    DLQ_INDEX: ("gsi2pk", "gsi2sk"),
    EXPIRY_INDEX: ("gsi3pk", "gsi3sk"),
}


@dataclass(frozen=True)
class QueueUrls:
    queue: str  # the OJS queue name
    url: str
    arn: str
    dlq_url: str
    dlq_arn: str


@dataclass(frozen=True)
class ProvisionResult:
    table_name: str
    table_arn: str
    queues: dict[str, QueueUrls]


def sqs_queue_name(settings: AwsSettings, queue: str, *, dlq: bool = False, tier: int = 0) -> str:
    """The SQS queue name for OJS queue ``queue`` at priority ``tier`` (or its DLQ).

    ``{prefix}-{queue}[-p{tier}|-n{-tier}|-dlq][.fifo]``, with ``.`` mapped to ``_``.
    A name over 80 characters keeps a prefix of the queue name and appends the first
    10 hex digits of the SHA-256 of the OJS queue name.
    """
    if not queue:
        raise ValueError("queue name must not be empty")
    if dlq:
        marker = "-dlq"
    elif tier:
        marker = f"-p{tier}" if tier > 0 else f"-n{-tier}"
    else:
        marker = ""
    suffix = marker + (".fifo" if settings.use_fifo else "")
    middle = queue.replace(".", "_")
    name = f"{settings.queue_prefix}-{middle}"
    if len(name) + len(suffix) > SQS_NAME_MAX:
        digest = hashlib.sha256(queue.encode()).hexdigest()[:10]
        keep = SQS_NAME_MAX - len(suffix) - len(digest) - 1
        if keep < len(settings.queue_prefix) + 2:
            raise ValueError(f"SQS queue prefix {settings.queue_prefix!r} is too long")
        name = f"{name[:keep]}-{digest}"
    if not _SQS_NAME_OK.match(name):
        raise ValueError(f"cannot map queue {queue!r} to a valid SQS queue name ({name!r})")
    return name + suffix


# --------------------------------------------------------------------------------------
# DynamoDB
# --------------------------------------------------------------------------------------


def _table_spec(table: str) -> dict[str, Any]:
    attributes = ["pk", "sk"] + [a for pair in _GSIS.values() for a in pair]
    return {
        "TableName": table,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [{"AttributeName": a, "AttributeType": "S"} for a in attributes],
        "KeySchema": _KEY_SCHEMA,
        "GlobalSecondaryIndexes": [
            {
                "IndexName": name,
                "KeySchema": [
                    {"AttributeName": hash_key, "KeyType": "HASH"},
                    {"AttributeName": range_key, "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
            for name, (hash_key, range_key) in _GSIS.items()
        ],
    }


def _check_design(table: dict[str, Any]) -> None:
    """Raise if an existing table does not follow our key design."""
    name = table.get("TableName", "?")
    problems: list[str] = []
    if table.get("KeySchema") != _KEY_SCHEMA:
        problems.append("primary key is not (pk HASH, sk RANGE)")
    indexes = {i["IndexName"]: i for i in table.get("GlobalSecondaryIndexes") or []}
    for index, (hash_key, range_key) in _GSIS.items():
        found = indexes.get(index)
        expected = [
            {"AttributeName": hash_key, "KeyType": "HASH"},
            {"AttributeName": range_key, "KeyType": "RANGE"},
        ]
        if found is None:
            problems.append(f"global secondary index {index!r} is missing")
        elif found.get("KeySchema") != expected:
            problems.append(f"global secondary index {index!r} has a different key schema")
    if problems:
        raise BackendError(
            f"DynamoDB table {name!r} exists with a different key design: " + "; ".join(problems),
            details={"table": name, "problems": problems},
        )


def _is_active(table: dict[str, Any]) -> bool:
    if table.get("TableStatus") != "ACTIVE":
        return False
    return all(
        i.get("IndexStatus", "ACTIVE") == "ACTIVE"
        for i in table.get("GlobalSecondaryIndexes") or []
    )


async def provision_table(clients: AwsClients, *, active_within: float = 120.0) -> str:
    """Create the job table (if missing), wait until it is ACTIVE, enable TTL.

    Returns the table ARN. Raises :class:`BackendError` if a table of that name exists
    with another key design, :class:`BackendUnavailable` if it does not become active
    within ``active_within`` seconds.
    """
    ddb = clients.dynamodb
    table_name = clients.settings.dynamodb_table
    async with map_errors():
        # Describe first: a server whose IAM role may not create tables (the
        # deploy/terraform policy) must still start against an existing table.
        try:
            await ddb.describe_table(TableName=table_name)
        except Exception as exc:
            if aws_error_code(exc) != "ResourceNotFoundException":
                raise
            try:
                await ddb.create_table(**_table_spec(table_name))
            except Exception as exc:
                if aws_error_code(exc) != "ResourceInUseException":
                    raise
        delay = 0.1
        table: dict[str, Any] = {}
        with trio.move_on_after(active_within):
            while True:
                table = (await ddb.describe_table(TableName=table_name))["Table"]
                if _is_active(table):
                    break
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if not _is_active(table):
            raise BackendUnavailable(
                f"DynamoDB table {table_name!r} did not become ACTIVE within {active_within} s",
                details={"table": table_name, "status": table.get("TableStatus")},
            )
        _check_design(table)

        ttl = (await ddb.describe_time_to_live(TableName=table_name)).get(
            "TimeToLiveDescription", {}
        )
        status = ttl.get("TimeToLiveStatus", "DISABLED")
        if status in ("ENABLED", "ENABLING"):
            if ttl.get("AttributeName") != TTL_ATTRIBUTE:
                raise BackendError(
                    f"DynamoDB table {table_name!r} has TTL on another attribute",
                    details={"table": table_name, "ttl_attribute": ttl.get("AttributeName")},
                )
        else:
            await ddb.update_time_to_live(
                TableName=table_name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
            )
    return str(table["TableArn"])


# --------------------------------------------------------------------------------------
# SQS
# --------------------------------------------------------------------------------------


async def _ensure_queue(sqs: Any, name: str, attributes: dict[str, str]) -> tuple[str, str]:
    """Create queue ``name`` or reconcile its attributes; return (url, arn)."""
    try:
        url = str((await sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"])
    except Exception as exc:
        if aws_error_code(exc) not in _QUEUE_EXISTS_CODES:
            raise
        url = str((await sqs.get_queue_url(QueueName=name))["QueueUrl"])
        mutable = {k: v for k, v in attributes.items() if k != "FifoQueue"}
        if mutable:
            await sqs.set_queue_attributes(QueueUrl=url, Attributes=mutable)
    attrs = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return url, str(attrs["Attributes"]["QueueArn"])


async def provision_queue(clients: AwsClients, queue: str, tier: int = 0) -> QueueUrls:
    """Create (or reconcile) the SQS queue of OJS ``queue`` at priority ``tier``, and
    the queue's dead-letter queue."""
    settings = clients.settings
    base: dict[str, str] = {"MessageRetentionPeriod": str(MAX_RETENTION_SECONDS)}
    if settings.use_fifo:
        base["FifoQueue"] = "true"
        base["ContentBasedDeduplication"] = "false"  # the adapter sends job ids
    async with map_errors():
        dlq_url, dlq_arn = await _ensure_queue(
            clients.sqs, sqs_queue_name(settings, queue, dlq=True), dict(base)
        )
        redrive = json.dumps(
            {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(settings.max_receive_count)}
        )
        url, arn = await _ensure_queue(
            clients.sqs,
            sqs_queue_name(settings, queue, tier=tier),
            {**base, "RedrivePolicy": redrive},
        )
    return QueueUrls(queue=queue, url=url, arn=arn, dlq_url=dlq_url, dlq_arn=dlq_arn)


async def provision(
    clients: AwsClients,
    settings: AwsSettings | None = None,
    queues: Iterable[str] = (),
    *,
    table_timeout: float = 120.0,
) -> ProvisionResult:
    """Create the DynamoDB table and the SQS queues for ``queues``; idempotent.

    ``settings`` defaults to the clients' settings (pass them to provision with a
    different table or prefix over the same clients).
    """
    if settings is not None and settings is not clients.settings:
        clients = AwsClients(settings=settings, sqs=clients.sqs, dynamodb=clients.dynamodb)
    table_arn = await provision_table(clients, active_within=table_timeout)
    result: dict[str, QueueUrls] = {}
    for queue in dict.fromkeys(queues):  # de-duplicated, order kept
        result[queue] = await provision_queue(clients, queue)
    return ProvisionResult(
        table_name=clients.settings.dynamodb_table, table_arn=table_arn, queues=result
    )
