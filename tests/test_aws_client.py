"""aiobotocore on Trio against a moto server: clients, error mapping, provisioning."""

from __future__ import annotations

import json
import random
import socket
from dataclasses import replace
from typing import Any

import pytest
import trio

pytest.importorskip("aiobotocore")
pytest.importorskip("moto.server")

import aws_fixtures
from botocore.exceptions import (  # type: ignore[import-untyped]
    ClientError,
    EndpointConnectionError,
    ParamValidationError,
    ReadTimeoutError,
)

from ojs_trio.engine.errors import (
    BackendError,
    BackendUnavailable,
    Conflict,
    NotFound,
)
from ojs_trio.storage.sqs.client import (
    THROTTLING_CODES,
    AwsSettings,
    ConditionFailed,
    Throttled,
    map_errors,
    open_aws_clients,
    retry_throttled,
    to_backend_error,
)
from ojs_trio.storage.sqs.provision import (
    DLQ_INDEX,
    EXPIRY_INDEX,
    QUEUE_STATE_INDEX,
    TTL_ATTRIBUTE,
    provision,
    sqs_queue_name,
)

moto_endpoint = aws_fixtures.moto_endpoint
aws_endpoint = aws_fixtures.aws_endpoint
aws_settings = aws_fixtures.aws_settings

pytestmark = pytest.mark.filterwarnings(
    # aiobotocore prefers the httpx2 fork and warns once when it falls back to httpx.
    "ignore:aiobotocore's httpx backend:DeprecationWarning"
)

# Bound on every test that talks to moto: nothing here should take seconds.
IO_DEADLINE = 20.0


def client_error(code: str, operation: str = "PutItem", status: int = 400, **extra: Any) -> Any:
    response: dict[str, Any] = {
        "Error": {"Code": code, "Message": "secret value 42"},
        "ResponseMetadata": {"HTTPStatusCode": status},
        **extra,
    }
    return ClientError(response, operation)


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def test_settings_defaults_from_empty_env() -> None:
    s = AwsSettings.from_env({})
    assert s.region == "us-east-1"
    assert s.endpoint_url is None
    assert s.dynamodb_table == "ojs-jobs"
    assert s.queue_prefix == "ojs"
    assert s.use_fifo is False


def test_settings_from_env() -> None:
    s = AwsSettings.from_env(
        {
            "AWS_REGION": "eu-west-1",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:4566",
            "DYNAMODB_TABLE": "jobs",
            "SQS_QUEUE_PREFIX": "p",
            "SQS_USE_FIFO": "true",
        }
    )
    assert (s.region, s.endpoint_url, s.dynamodb_table, s.queue_prefix, s.use_fifo) == (
        "eu-west-1",
        "http://127.0.0.1:4566",
        "jobs",
        "p",
        True,
    )
    assert AwsSettings.from_env({"AWS_DEFAULT_REGION": "ap-south-1"}).region == "ap-south-1"
    with pytest.raises(ValueError, match="SQS_USE_FIFO"):
        AwsSettings.from_env({"SQS_USE_FIFO": "maybe"})


def test_settings_from_url() -> None:
    env = {"AWS_REGION": "eu-west-1", "DYNAMODB_TABLE": "env-table", "SQS_USE_FIFO": "1"}
    assert AwsSettings.from_url("sqs://", env) == AwsSettings.from_env(env)
    s = AwsSettings.from_url("sqs://us-west-2/my-table", env)
    assert (s.region, s.dynamodb_table, s.use_fifo) == ("us-west-2", "my-table", True)
    s = AwsSettings.from_url(
        "sqs://us-west-2/my-table?region=eu-central-1&table=t2&prefix=x&fifo=false"
        "&endpoint=http://127.0.0.1:4566&max_receive_count=3&connect_timeout=1.5",
        env,
    )
    assert s.region == "eu-central-1"
    assert s.dynamodb_table == "t2"
    assert s.queue_prefix == "x"
    assert s.use_fifo is False
    assert s.endpoint_url == "http://127.0.0.1:4566"
    assert s.max_receive_count == 3
    assert s.connect_timeout == 1.5
    with pytest.raises(ValueError, match="not an sqs"):
        AwsSettings.from_url("postgresql://x", env)
    with pytest.raises(ValueError, match="unknown"):
        AwsSettings.from_url("sqs://?bogus=1", env)
    with pytest.raises(ValueError, match="max_receive_count"):
        AwsSettings.from_url("sqs://?max_receive_count=0", env)


def test_settings_repr_hides_secrets() -> None:
    s = AwsSettings(access_key_id="AKIDSECRET", secret_access_key="shh")
    assert "AKIDSECRET" not in repr(s) and "shh" not in repr(s)


def test_sqs_queue_names() -> None:
    s = AwsSettings()
    assert sqs_queue_name(s, "default") == "ojs-default"
    assert sqs_queue_name(s, "email.send", dlq=True) == "ojs-email_send-dlq"
    fifo = replace(s, use_fifo=True)
    assert sqs_queue_name(fifo, "default") == "ojs-default.fifo"
    assert sqs_queue_name(fifo, "default", dlq=True) == "ojs-default-dlq.fifo"
    assert sqs_queue_name(s, "default", tier=3) == "ojs-default-p3"
    assert sqs_queue_name(s, "default", tier=-100) == "ojs-default-n100"
    assert sqs_queue_name(fifo, "a.b", tier=7) == "ojs-a_b-p7.fifo"
    long = "q" * 200
    for settings in (s, fifo):
        for dlq in (False, True):
            name = sqs_queue_name(settings, long, dlq=dlq)
            assert len(name) <= 80
    assert sqs_queue_name(s, long) != sqs_queue_name(s, long + "x")
    assert sqs_queue_name(fifo, long, dlq=True).endswith("-dlq.fifo")


# --------------------------------------------------------------------------------------
# Error mapping (no I/O)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(THROTTLING_CODES))
def test_throttling_codes_map_to_throttled(code: str) -> None:
    err = to_backend_error(client_error(code))
    assert isinstance(err, Throttled) and isinstance(err, BackendUnavailable)
    assert err.details["aws_error_code"] == code
    assert "secret" not in err.message


def test_error_mapping_classes() -> None:
    assert type(to_backend_error(client_error("ValidationException"))) is BackendError
    assert type(to_backend_error(client_error("InternalServerError", status=500))) is (
        BackendUnavailable
    )
    assert type(to_backend_error(client_error("Weird", status=503))) is BackendUnavailable
    cond = to_backend_error(
        client_error("ConditionalCheckFailedException", Item={"pk": {"S": "a"}})
    )
    assert isinstance(cond, ConditionFailed) and isinstance(cond, Conflict)
    assert not isinstance(cond, BackendError)
    assert cond.item == {"pk": {"S": "a"}}
    txn = to_backend_error(
        client_error(
            "TransactionCanceledException",
            operation="TransactWriteItems",
            CancellationReasons=[{"Code": "None"}, {"Code": "ConditionalCheckFailed"}],
        )
    )
    assert isinstance(txn, ConditionFailed)
    assert txn.reasons == [None, "ConditionalCheckFailed"]
    conflict = to_backend_error(
        client_error(
            "TransactionCanceledException",
            CancellationReasons=[{"Code": "TransactionConflict"}, {"Code": "None"}],
        )
    )
    assert type(conflict) is BackendUnavailable
    throttled = to_backend_error(
        client_error(
            "TransactionCanceledException", CancellationReasons=[{"Code": "ThrottlingError"}]
        )
    )
    assert isinstance(throttled, Throttled)
    unreachable = to_backend_error(EndpointConnectionError(endpoint_url="http://x"))
    assert type(unreachable) is BackendUnavailable
    assert type(to_backend_error(ReadTimeoutError(endpoint_url="http://x"))) is (BackendUnavailable)
    assert type(to_backend_error(ParamValidationError(report="bad"))) is BackendError


async def test_map_errors_chains_and_passes_through() -> None:
    original = client_error("ThrottlingException")
    with pytest.raises(Throttled) as info:
        async with map_errors():
            raise original
    assert info.value.__cause__ is original
    with pytest.raises(NotFound), map_errors():
        raise NotFound("ours")
    with pytest.raises(KeyError), map_errors():
        raise KeyError("x")


async def test_retry_throttled_backs_off_then_succeeds(autojump_clock: trio.abc.Clock) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise client_error("ProvisionedThroughputExceededException")
        return "ok"

    start = trio.current_time()
    assert await retry_throttled(flaky, base_delay=1.0, rng=random.Random(1)) == "ok"
    assert calls == 3
    assert 0 < trio.current_time() - start <= 1.0 + 2.0  # two full-jitter sleeps


async def test_retry_throttled_gives_up_and_skips_other_errors(
    autojump_clock: trio.abc.Clock,
) -> None:
    calls = 0

    async def always_throttled() -> None:
        nonlocal calls
        calls += 1
        raise client_error("RequestThrottled", operation="SendMessage")

    start = trio.current_time()
    with pytest.raises(Throttled):
        await retry_throttled(always_throttled, attempts=4, base_delay=10.0, max_delay=0.5)
    assert calls == 4
    assert trio.current_time() - start <= 3 * 0.5  # capped by max_delay

    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise client_error("ValidationException")

    with pytest.raises(BackendError):
        await retry_throttled(broken)
    assert calls == 1


# --------------------------------------------------------------------------------------
# Against moto
# --------------------------------------------------------------------------------------


async def test_sqs_send_receive_visibility_delete(aws_settings: AwsSettings) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with open_aws_clients(aws_settings) as clients:
            result = await provision(clients, queues=["default"])
            url = result.queues["default"].url
            sqs = clients.sqs
            await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"id": "job-1"}))

            got = await sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=300,
                WaitTimeSeconds=0,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            (message,) = got["Messages"]
            assert json.loads(message["Body"]) == {"id": "job-1"}
            assert message["Attributes"]["ApproximateReceiveCount"] == "1"

            # In flight: invisible.
            again = await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)
            assert again.get("Messages", []) == []

            # Visibility 0 makes it receivable again at once.
            await sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
            )
            got = await sqs.receive_message(
                QueueUrl=url,
                VisibilityTimeout=300,
                WaitTimeSeconds=0,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            (message,) = got["Messages"]
            assert message["Attributes"]["ApproximateReceiveCount"] == "2"

            await sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            attrs = await sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )
            assert attrs["Attributes"] == {
                "ApproximateNumberOfMessages": "0",
                "ApproximateNumberOfMessagesNotVisible": "0",
            }


async def test_sqs_missing_queue_maps_to_backend_error(aws_settings: AwsSettings) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with open_aws_clients(aws_settings) as clients:
            with pytest.raises(BackendError) as info:
                async with map_errors():
                    await clients.sqs.get_queue_url(QueueName="nope")
            assert not isinstance(info.value, BackendUnavailable)
            assert info.value.details["operation"] == "GetQueueUrl"


async def test_dynamodb_conditional_put(aws_settings: AwsSettings) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with open_aws_clients(aws_settings) as clients:
            await provision(clients)
            ddb = clients.dynamodb
            table = aws_settings.dynamodb_table
            item = {
                "pk": {"S": "JOB#1"},
                "sk": {"S": "JOB"},
                "state": {"S": "available"},
                "gsi1pk": {"S": "Q#default#available"},
                "gsi1sk": {"S": "0001#1"},
            }
            async with map_errors():
                await ddb.put_item(
                    TableName=table, Item=item, ConditionExpression="attribute_not_exists(pk)"
                )
            with pytest.raises(ConditionFailed) as info:
                async with map_errors():
                    await ddb.put_item(
                        TableName=table,
                        Item={**item, "state": {"S": "active"}},
                        ConditionExpression="attribute_not_exists(pk)",
                        ReturnValuesOnConditionCheckFailure="ALL_OLD",
                    )
            assert info.value.details["aws_error_code"] == "ConditionalCheckFailedException"
            assert info.value.item is not None
            assert info.value.item["state"] == {"S": "available"}

            # The state-by-queue index answers.
            found = await ddb.query(
                TableName=table,
                IndexName=QUEUE_STATE_INDEX,
                KeyConditionExpression="gsi1pk = :p",
                ExpressionAttributeValues={":p": {"S": "Q#default#available"}},
            )
            assert [i["pk"]["S"] for i in found["Items"]] == ["JOB#1"]


async def test_transact_write_items(aws_settings: AwsSettings) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with open_aws_clients(aws_settings) as clients:
            await provision(clients)
            ddb = clients.dynamodb
            table = aws_settings.dynamodb_table

            def put(pk: str, sk: str) -> dict[str, Any]:
                return {
                    "Put": {
                        "TableName": table,
                        "Item": {"pk": {"S": pk}, "sk": {"S": sk}},
                        "ConditionExpression": "attribute_not_exists(pk)",
                    }
                }

            async with map_errors():
                await ddb.transact_write_items(
                    TransactItems=[put("JOB#7", "JOB"), put("UNIQUE#k", "UNIQUE")]
                )
            both = await ddb.batch_get_item(
                RequestItems={
                    table: {
                        "Keys": [
                            {"pk": {"S": "JOB#7"}, "sk": {"S": "JOB"}},
                            {"pk": {"S": "UNIQUE#k"}, "sk": {"S": "UNIQUE"}},
                        ]
                    }
                }
            )
            assert len(both["Responses"][table]) == 2

            # Second claim of the unique key cancels the whole transaction.
            with pytest.raises(ConditionFailed) as info:
                async with map_errors():
                    await ddb.transact_write_items(
                        TransactItems=[put("JOB#8", "JOB"), put("UNIQUE#k", "UNIQUE")]
                    )
            assert info.value.reasons == [None, "ConditionalCheckFailed"]
            missing = await ddb.get_item(
                TableName=table, Key={"pk": {"S": "JOB#8"}, "sk": {"S": "JOB"}}
            )
            assert "Item" not in missing


async def test_provision_twice_is_idempotent(aws_settings: AwsSettings) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with open_aws_clients(aws_settings) as clients:
            first = await provision(clients, queues=["default", "email.send"])
            second = await provision(clients, queues=["default", "email.send", "default"])
            assert first == second
            assert list(second.queues) == ["default", "email.send"]

            tables = (await clients.dynamodb.list_tables())["TableNames"]
            assert tables == ["ojs-jobs"]
            described = (await clients.dynamodb.describe_table(TableName="ojs-jobs"))["Table"]
            assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
            assert {i["IndexName"] for i in described["GlobalSecondaryIndexes"]} == {
                QUEUE_STATE_INDEX,
                DLQ_INDEX,
                EXPIRY_INDEX,
            }
            ttl = await clients.dynamodb.describe_time_to_live(TableName="ojs-jobs")
            assert ttl["TimeToLiveDescription"] == {
                "TimeToLiveStatus": "ENABLED",
                "AttributeName": TTL_ATTRIBUTE,
            }

            urls = sorted((await clients.sqs.list_queues())["QueueUrls"])
            assert [u.rsplit("/", 1)[1] for u in urls] == [
                "ojs-default",
                "ojs-default-dlq",
                "ojs-email_send",
                "ojs-email_send-dlq",
            ]
            q = second.queues["email.send"]
            attrs = await clients.sqs.get_queue_attributes(
                QueueUrl=q.url, AttributeNames=["RedrivePolicy"]
            )
            redrive = json.loads(attrs["Attributes"]["RedrivePolicy"])
            assert redrive["deadLetterTargetArn"] == q.dlq_arn
            assert int(redrive["maxReceiveCount"]) == aws_settings.max_receive_count

            # A changed redrive setting is reconciled onto the existing queue.
            changed = replace(aws_settings, max_receive_count=2)
            await provision(clients, changed, queues=["email.send"])
            attrs = await clients.sqs.get_queue_attributes(
                QueueUrl=q.url, AttributeNames=["RedrivePolicy"]
            )
            assert int(json.loads(attrs["Attributes"]["RedrivePolicy"])["maxReceiveCount"]) == 2


async def test_provision_fifo(aws_settings: AwsSettings) -> None:
    settings = replace(aws_settings, use_fifo=True, queue_prefix="f")
    with trio.fail_after(IO_DEADLINE):
        async with open_aws_clients(settings) as clients:
            first = await provision(clients, queues=["default"])
            assert first == await provision(clients, queues=["default"])
            q = first.queues["default"]
            assert q.url.endswith("/f-default.fifo")
            assert q.dlq_url.endswith("/f-default-dlq.fifo")
            attrs = await clients.sqs.get_queue_attributes(
                QueueUrl=q.url, AttributeNames=["FifoQueue", "RedrivePolicy"]
            )
            assert attrs["Attributes"]["FifoQueue"] == "true"
            assert json.loads(attrs["Attributes"]["RedrivePolicy"])["deadLetterTargetArn"] == (
                q.dlq_arn
            )
            await clients.sqs.send_message(
                QueueUrl=q.url,
                MessageBody="x",
                MessageGroupId="g",
                MessageDeduplicationId="job-1",
            )
            got = await clients.sqs.receive_message(QueueUrl=q.url, WaitTimeSeconds=0)
            assert [m["Body"] for m in got["Messages"]] == ["x"]


async def test_provision_rejects_foreign_table(aws_settings: AwsSettings) -> None:
    with trio.fail_after(IO_DEADLINE):
        async with open_aws_clients(aws_settings) as clients:
            await clients.dynamodb.create_table(
                TableName=aws_settings.dynamodb_table,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            )
            with pytest.raises(BackendError, match="different key design"):
                await provision(clients)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_endpoint_is_backend_unavailable() -> None:
    settings = AwsSettings(
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        access_key_id="testing",
        secret_access_key="testing",
        connect_timeout=1.0,
        read_timeout=2.0,
        max_attempts=1,
    )
    with trio.fail_after(10):
        async with open_aws_clients(settings) as clients:
            with pytest.raises(BackendUnavailable) as info:
                async with map_errors():
                    await clients.dynamodb.list_tables()
            assert not isinstance(info.value, Throttled)
            with pytest.raises(BackendUnavailable):
                await retry_throttled(lambda: clients.sqs.list_queues())
