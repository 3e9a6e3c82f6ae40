"""AWS SQS + DynamoDB storage adapter (groundwork).

SQS carries the job messages (one standard or FIFO queue per OJS queue, each with a
dead-letter queue); DynamoDB tracks job state. The pieces so far:

* :mod:`ojs_trio.storage.sqs.client` -- :class:`~ojs_trio.storage.sqs.client.AwsSettings`
  (environment and ``sqs://`` URL), :func:`~ojs_trio.storage.sqs.client.open_aws_clients`
  (aiobotocore clients running natively on Trio through the httpx backend), the error
  boundary :func:`~ojs_trio.storage.sqs.client.map_errors` and the throttling retry
  helper :func:`~ojs_trio.storage.sqs.client.retry_throttled`;
* :mod:`ojs_trio.storage.sqs.provision` -- idempotent creation of the DynamoDB table
  and the SQS queues, and the documented key design.

Import the submodules directly: importing this package never pulls in aiobotocore
(an optional dependency, the ``sqs`` extra).
"""

from __future__ import annotations

__all__ = ["UNIQUE_GUARANTEE"]

#: ojs-unique-jobs.md 8 for this adapter (``SqsStorage.unique_guarantee``); kept here so
#: the manifest can name it without importing aiobotocore.  docs/unique-jobs.md explains.
UNIQUE_GUARANTEE: tuple[str, str] = (
    "strong",
    "conditional DynamoDB TransactWriteItems: the new job is written together with a "
    "per-unique-key item, conditional on that item's version being unchanged; an enqueue "
    "too large for one transaction writes its unique-key items first, its jobs marked "
    "pending there, and concurrent enqueues of those keys wait for them",
)
