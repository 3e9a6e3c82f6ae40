"""aiobotocore SQS and DynamoDB clients on Trio, settings, and the error boundary.

aiobotocore >= 3.9 runs natively on Trio when its httpx backend is selected
(``AioConfig(http_session_cls=HttpxSession)``): endpoint, retry, paginator, waiter and
credential code then goes through anyio. The aiohttp backend is asyncio-only and must
never be used here. aiobotocore prefers the ``httpx2`` fork when it is installed and
otherwise falls back to ``httpx`` (with a one-time ``DeprecationWarning``).

* :class:`AwsSettings` -- from the environment (``AWS_REGION``, ``AWS_ENDPOINT_URL``,
  ``DYNAMODB_TABLE``, ``SQS_QUEUE_PREFIX``, ``SQS_USE_FIFO``, ...) and from an
  ``sqs://`` storage URL.
* :func:`open_aws_clients` -- ``async with open_aws_clients(settings) as clients:``
  gives ``clients.sqs`` and ``clients.dynamodb``.
* :func:`map_errors` -- the boundary that turns botocore errors into
  :class:`~ojs_trio.engine.errors.BackendError` /
  :class:`~ojs_trio.engine.errors.BackendUnavailable` (and :class:`Throttled`,
  :class:`ConditionFailed`).
* :func:`retry_throttled` -- retry an operation with capped, jittered exponential
  backoff while AWS throttles it.

Messages of mapped errors name the AWS error code and operation only: AWS messages
may quote item values, ARNs or account ids, and OJS errors reach clients. The
original error stays available as ``__cause__``.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import trio
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.httpxsession import HttpxSession  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore import exceptions as boto_exc  # type: ignore[import-untyped]

from ojs_trio.engine.errors import BackendError, BackendUnavailable, Conflict, OjsError
from ojs_trio.storage.errormap import ErrorMapper

__all__ = [
    "THROTTLING_CODES",
    "UNAVAILABLE_CODES",
    "AwsClients",
    "AwsSettings",
    "ConditionFailed",
    "Throttled",
    "aws_error_code",
    "map_errors",
    "open_aws_clients",
    "retry_throttled",
    "to_backend_error",
]

_T = TypeVar("_T")

DEFAULT_REGION: Final = "us-east-1"

#: AWS error codes that mean "slow down" (DynamoDB, SQS JSON and query protocols, and
#: the generic codes botocore's own retry handler treats as throttling).
THROTTLING_CODES: Final = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "RequestThrottled",
        "RequestThrottledException",
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "AWS.SimpleQueueService.RequestThrottled",
    }
)

#: Server-side codes that mean "AWS is unavailable right now, try again".
UNAVAILABLE_CODES: Final = frozenset(
    {
        "InternalServerError",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "TransactionInProgressException",
    }
)

#: Cancellation reason codes inside TransactionCanceledException that mean throttling.
_THROTTLED_TXN_REASONS: Final = frozenset({"ThrottlingError", "ProvisionedThroughputExceeded"})

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class Throttled(BackendUnavailable):
    """AWS throttled the request (capacity or request-rate limits); retry with backoff."""

    code = "backend_unavailable"
    hint = "The storage backend is throttling requests; retry later."


class ConditionFailed(Conflict):
    """A DynamoDB ``ConditionExpression`` did not hold (``ConditionalCheckFailed``).

    Not a backend failure: the adapter turns it into the OJS error that fits (duplicate
    job, illegal state transition, lost a race ...). ``item`` is the item as it was, when
    the request asked for ``ReturnValuesOnConditionCheckFailure="ALL_OLD"``. For a
    failed ``TransactWriteItems`` ``reasons`` holds one cancellation code (or ``None``)
    per transaction item, in request order, and ``item`` is the first returned item.
    """

    code = "conflict"
    catalog_code = "INVALID_STATE_TRANSITION"

    def __init__(
        self,
        message: str,
        *,
        item: dict[str, Any] | None = None,
        reasons: list[str | None] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.item = item
        self.reasons = reasons or []


def aws_error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ``ClientError`` (``None`` for anything else)."""
    if not isinstance(exc, boto_exc.ClientError):
        return None
    error = exc.response.get("Error") or {}
    code = error.get("Code")
    return str(code) if code else None


def _query_error_code(exc: Any) -> str | None:
    error = exc.response.get("Error") or {}
    code = error.get("QueryErrorCode")
    return str(code) if code else None


def _status(exc: Any) -> int:
    meta = exc.response.get("ResponseMetadata") or {}
    try:
        return int(meta.get("HTTPStatusCode") or 0)
    except (TypeError, ValueError):
        return 0


def to_backend_error(exc: Exception) -> OjsError:
    """Translate a botocore error into our error family (see module docstring)."""
    if isinstance(exc, boto_exc.ClientError):
        code = aws_error_code(exc) or "Unknown"
        operation = str(getattr(exc, "operation_name", "") or "")
        details: dict[str, Any] = {"aws_error_code": code}
        if operation:
            details["operation"] = operation
        what = f"{code}" + (f" in {operation}" if operation else "")
        codes = {code, _query_error_code(exc)}
        if code == "ConditionalCheckFailedException":
            return ConditionFailed(
                f"DynamoDB condition failed ({what})",
                item=exc.response.get("Item"),
                details=details,
            )
        if code == "TransactionCanceledException":
            reasons_raw = exc.response.get("CancellationReasons") or []
            reasons: list[str | None] = [
                (r.get("Code") if r.get("Code") not in (None, "None") else None)
                for r in reasons_raw
            ]
            details["cancellation_reasons"] = reasons
            if "ConditionalCheckFailed" in reasons:
                item = next((r["Item"] for r in reasons_raw if r.get("Item")), None)
                return ConditionFailed(
                    f"DynamoDB transaction condition failed ({what})",
                    item=item,
                    reasons=reasons,
                    details=details,
                )
            if "TransactionConflict" in reasons:
                return BackendUnavailable(
                    f"DynamoDB transaction conflicted ({what})", details=details
                )
            if any(r in _THROTTLED_TXN_REASONS for r in reasons):
                return Throttled(f"AWS throttled the request ({what})", details=details)
            return BackendError(f"AWS error ({what})", details=details)
        if codes & THROTTLING_CODES:
            return Throttled(f"AWS throttled the request ({what})", details=details)
        if codes & UNAVAILABLE_CODES or _status(exc) >= 500:
            return BackendUnavailable(f"AWS is unavailable ({what})", details=details)
        return BackendError(f"AWS error ({what})", details=details)
    name = type(exc).__name__
    if isinstance(
        exc,
        boto_exc.ConnectionError  # EndpointConnectionError, ConnectTimeoutError, ...
        | boto_exc.HTTPClientError  # ReadTimeoutError, ConnectionClosedError, ...
        | OSError,
    ):
        return BackendUnavailable(f"AWS is unreachable ({name})", details={"error": name})
    return BackendError(f"AWS client error ({name})", details={"error": name})


def map_errors() -> ErrorMapper[Exception]:
    """Map botocore errors raised in the block to our backend errors (sync or async).

    ::

        async with map_errors():
            await clients.dynamodb.put_item(...)

    ``ClientError`` and ``BotoCoreError`` become :class:`ConditionFailed`,
    :class:`Throttled`, :class:`BackendUnavailable` or :class:`BackendError`, chained
    from the original. Our own ``OjsError``\\ s and everything else (Trio cancellation
    included) pass through unchanged, so blocks can nest.
    """
    return ErrorMapper((boto_exc.ClientError, boto_exc.BotoCoreError), to_backend_error)


async def retry_throttled(
    operation: Callable[[], Awaitable[_T]],
    *,
    attempts: int = 6,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    retry_on: tuple[type[BaseException], ...] = (Throttled,),
    rng: random.Random | None = None,
) -> _T:
    """Run ``operation()`` inside :func:`map_errors`, retrying while AWS throttles it.

    Between attempts it sleeps "full jitter" backoff: a uniform draw from
    ``[0, min(max_delay, base_delay * 2**n)]``. After ``attempts`` tries the last
    mapped error is raised. Only :class:`Throttled` is retried by default; pass
    ``retry_on=(BackendUnavailable,)`` to also retry connection errors (only for
    idempotent operations). botocore's own retries (``AwsSettings.max_attempts``) run
    inside each attempt.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    draw = (rng or random).uniform
    for attempt in range(attempts):
        try:
            async with map_errors():
                return await operation()
        except retry_on:
            if attempt == attempts - 1:
                raise
        await trio.sleep(draw(0.0, min(max_delay, base_delay * (2**attempt))))
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def _parse_bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}: expected a boolean, got {value!r}")


@dataclass(frozen=True)
class AwsSettings:
    """Where and how to reach SQS and DynamoDB.

    Credentials left as ``None`` come from botocore's usual chain (environment,
    shared config files, container/instance roles).
    """

    region: str = DEFAULT_REGION
    endpoint_url: str | None = None  # e.g. a moto server or LocalStack
    sqs_endpoint_url: str | None = None  # per-service overrides of endpoint_url
    dynamodb_endpoint_url: str | None = None
    dynamodb_table: str = "ojs-jobs"
    queue_prefix: str = "ojs"
    use_fifo: bool = False
    max_receive_count: int = 5  # SQS redrive to the -dlq queue after this many receives
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    read_timeout: float = 60.0  # must exceed SQS long polling (WaitTimeSeconds <= 20)
    max_attempts: int = 3  # botocore "standard" retries, first attempt included
    max_pool_connections: int = 50

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AwsSettings:
        """``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), ``AWS_ENDPOINT_URL``,
        ``AWS_ENDPOINT_URL_SQS``, ``AWS_ENDPOINT_URL_DYNAMODB``, ``DYNAMODB_TABLE``,
        ``SQS_QUEUE_PREFIX``, ``SQS_USE_FIFO``, ``SQS_MAX_RECEIVE_COUNT``."""
        env = os.environ if env is None else env
        return cls(
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            sqs_endpoint_url=env.get("AWS_ENDPOINT_URL_SQS") or None,
            dynamodb_endpoint_url=env.get("AWS_ENDPOINT_URL_DYNAMODB") or None,
            dynamodb_table=env.get("DYNAMODB_TABLE") or cls.dynamodb_table,
            queue_prefix=env.get("SQS_QUEUE_PREFIX") or cls.queue_prefix,
            use_fifo=_parse_bool(env.get("SQS_USE_FIFO", ""), "SQS_USE_FIFO"),
            max_receive_count=int(env.get("SQS_MAX_RECEIVE_COUNT") or cls.max_receive_count),
        )

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None) -> AwsSettings:
        """Settings from an ``sqs://`` storage URL on top of :meth:`from_env`.

        ``sqs://[REGION][/TABLE][?param=value&...]`` -- all parts optional (``sqs://``
        alone uses the environment). Query parameters override the host and path:
        ``region``, ``endpoint`` (or ``endpoint_url``), ``table``, ``prefix``,
        ``fifo``, ``max_receive_count``, ``connect_timeout``, ``read_timeout``,
        ``max_attempts``. Example:
        ``sqs://us-east-1/ojs-jobs?prefix=ojs&fifo=true&endpoint=http://127.0.0.1:4566``.
        """
        parts = urlsplit(url)
        if parts.scheme != "sqs":
            raise ValueError(f"not an sqs:// URL: {parts.scheme or url!r}")
        settings = cls.from_env(env)
        updates: dict[str, Any] = {}
        if parts.hostname:
            updates["region"] = parts.hostname
        table = unquote(parts.path.strip("/"))
        if table:
            updates["dynamodb_table"] = table
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            match key:
                case "region":
                    updates["region"] = value
                case "endpoint" | "endpoint_url":
                    updates["endpoint_url"] = value or None
                case "table":
                    updates["dynamodb_table"] = value
                case "prefix":
                    updates["queue_prefix"] = value
                case "fifo":
                    updates["use_fifo"] = _parse_bool(value, "fifo")
                case "max_receive_count" | "max_attempts":
                    updates[key] = int(value)
                case "connect_timeout" | "read_timeout":
                    updates[key] = float(value)
                case _:
                    raise ValueError(f"unknown sqs:// URL parameter {key!r}")
        settings = replace(settings, **updates)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.region:
            raise ValueError("AWS region must not be empty")
        if not self.dynamodb_table:
            raise ValueError("DynamoDB table name must not be empty")
        if not self.queue_prefix:
            raise ValueError("SQS queue prefix must not be empty")
        if not 1 <= self.max_receive_count <= 1000:
            raise ValueError("max_receive_count must be between 1 and 1000")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def aio_config(self) -> Any:
        """The ``AioConfig`` for both clients: httpx backend (Trio), timeouts, retries."""
        return AioConfig(
            http_session_cls=HttpxSession,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            max_pool_connections=self.max_pool_connections,
        )


# --------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsClients:
    """Open aiobotocore clients (typed ``Any``: aiobotocore ships no type hints)."""

    settings: AwsSettings
    sqs: Any
    dynamodb: Any


@asynccontextmanager
async def open_aws_clients(settings: AwsSettings | None = None) -> AsyncIterator[AwsClients]:
    """Open SQS and DynamoDB clients that run on Trio; close them on exit.

    Creating the clients does no network I/O, so an unreachable endpoint only shows
    on the first call (as :class:`BackendUnavailable` through :func:`map_errors`).
    """
    settings = settings or AwsSettings.from_env()
    settings.validate()
    session = get_session()
    config = settings.aio_config()
    common: dict[str, Any] = {"region_name": settings.region, "config": config}
    if settings.access_key_id is not None:
        common["aws_access_key_id"] = settings.access_key_id
        common["aws_secret_access_key"] = settings.secret_access_key
        common["aws_session_token"] = settings.session_token
    async with AsyncExitStack() as stack:
        async with map_errors():
            sqs = await stack.enter_async_context(
                session.create_client(
                    "sqs",
                    endpoint_url=settings.sqs_endpoint_url or settings.endpoint_url,
                    **common,
                )
            )
            dynamodb = await stack.enter_async_context(
                session.create_client(
                    "dynamodb",
                    endpoint_url=settings.dynamodb_endpoint_url or settings.endpoint_url,
                    **common,
                )
            )
        yield AwsClients(settings=settings, sqs=sqs, dynamodb=dynamodb)
