"""``ojs-trio aws provision`` against a moto server (the CLI's ``main`` run in-process)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("aiobotocore")
pytest.importorskip("moto.server")

import aws_fixtures
import boto3  # type: ignore[import-untyped]

from ojs_trio.cli import main
from ojs_trio.storage.sqs.provision import DLQ_INDEX, EXPIRY_INDEX, QUEUE_STATE_INDEX, TTL_ATTRIBUTE

moto_endpoint = aws_fixtures.moto_endpoint
aws_endpoint = aws_fixtures.aws_endpoint

pytestmark = pytest.mark.filterwarnings(
    # aiobotocore prefers the httpx2 fork and warns once when it falls back to httpx.
    "ignore:aiobotocore's httpx backend:DeprecationWarning"
)

_AWS_VARS = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "DYNAMODB_TABLE",
    "SQS_QUEUE_PREFIX",
    "SQS_USE_FIFO",
    "SQS_MAX_RECEIVE_COUNT",
    "OJS_STORAGE",
    "DATABASE_URL",
)


@pytest.fixture
def aws_env(aws_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A clean AWS environment pointing at the (freshly reset) moto server."""
    for name in _AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", aws_fixtures.TEST_REGION)
    return aws_endpoint


def _client(service: str, endpoint: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=aws_fixtures.TEST_REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _queue_names(endpoint: str) -> list[str]:
    urls = _client("sqs", endpoint).list_queues().get("QueueUrls", [])
    return sorted(u.rsplit("/", 1)[1] for u in urls)


def test_provision_creates_table_and_queues_idempotently(
    aws_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["aws", "provision", "--queue", "default", "--queue", "email.send"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.err == ""
    lines = first.out.splitlines()
    assert lines[0].startswith("DynamoDB table ojs-jobs: arn:aws:dynamodb:us-east-1:")
    assert lines[0].endswith(":table/ojs-jobs")
    assert lines[1] == f"SQS queue 'default' (standard): {aws_env}/123456789012/ojs-default"
    assert lines[2] == f"  dead-letter queue: {aws_env}/123456789012/ojs-default-dlq"
    assert lines[3].endswith("/ojs-email_send")
    assert lines[4].endswith("/ojs-email_send-dlq")
    assert len(lines) == 5

    ddb = _client("dynamodb", aws_env)
    table = ddb.describe_table(TableName="ojs-jobs")["Table"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert table["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    indexes = {i["IndexName"]: i for i in table["GlobalSecondaryIndexes"]}
    assert set(indexes) == {QUEUE_STATE_INDEX, DLQ_INDEX, EXPIRY_INDEX}
    for name, (hash_key, range_key) in {
        QUEUE_STATE_INDEX: ("gsi1pk", "gsi1sk"),
        DLQ_INDEX: ("gsi2pk", "gsi2sk"),
        EXPIRY_INDEX: ("gsi3pk", "gsi3sk"),
    }.items():
        assert indexes[name]["KeySchema"] == [
            {"AttributeName": hash_key, "KeyType": "HASH"},
            {"AttributeName": range_key, "KeyType": "RANGE"},
        ]
        assert indexes[name]["Projection"] == {"ProjectionType": "ALL"}
    assert {a["AttributeType"] for a in table["AttributeDefinitions"]} == {"S"}
    ttl = ddb.describe_time_to_live(TableName="ojs-jobs")["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": TTL_ATTRIBUTE}

    assert _queue_names(aws_env) == [
        "ojs-default",
        "ojs-default-dlq",
        "ojs-email_send",
        "ojs-email_send-dlq",
    ]
    sqs = _client("sqs", aws_env)
    url = sqs.get_queue_url(QueueName="ojs-email_send")["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["MessageRetentionPeriod"] == str(14 * 86400)
    redrive = json.loads(attrs["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(":ojs-email_send-dlq")
    assert int(redrive["maxReceiveCount"]) == 5

    # A second run changes nothing and says the same.
    assert main(argv) == 0
    second = capsys.readouterr()
    assert second.out == first.out
    assert second.err == ""
    assert [t for t in ddb.list_tables()["TableNames"]] == ["ojs-jobs"]
    assert len(_queue_names(aws_env)) == 4


def test_provision_default_queue_and_overrides(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # --endpoint-url wins over the environment, per-service endpoints included.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:9")
    argv = [
        "aws",
        "provision",
        "--endpoint-url",
        aws_env,
        "--table",
        "jobs-x",
        "--prefix",
        "x",
        "--fifo",
        "--max-receive-count",
        "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("DynamoDB table jobs-x: arn:")
    assert out[1].startswith("SQS queue 'default' (FIFO): ")
    assert out[1].endswith("/x-default.fifo")
    assert out[2].endswith("/x-default-dlq.fifo")
    assert _client("dynamodb", aws_env).list_tables()["TableNames"] == ["jobs-x"]
    assert _queue_names(aws_env) == ["x-default-dlq.fifo", "x-default.fifo"]
    sqs = _client("sqs", aws_env)
    url = sqs.get_queue_url(QueueName="x-default.fifo")["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["FifoQueue"] == "true"
    assert int(json.loads(attrs["RedrivePolicy"])["maxReceiveCount"]) == 3


def test_provision_from_storage_url(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("SQS_QUEUE_PREFIX", "ignored")
    url = f"sqs://{aws_fixtures.TEST_REGION}/url-jobs?prefix=u&endpoint={aws_env}"
    assert main(["aws", "provision", "--storage", url, "--queue", "a", "--queue", "a"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("DynamoDB table url-jobs: arn:")
    assert len(out) == 3  # one queue: duplicates are provisioned once
    assert _queue_names(aws_env) == ["u-a", "u-a-dlq"]

    # OJS_STORAGE is used when it is an sqs:// URL; --prefix overrides the URL.
    monkeypatch.setenv("OJS_STORAGE", url)
    assert main(["aws", "provision", "--prefix", "v"]) == 0
    assert "/v-default" in capsys.readouterr().out
    assert _queue_names(aws_env) == ["u-a", "u-a-dlq", "v-default", "v-default-dlq"]


def test_provision_rejects_foreign_table(aws_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    _client("dynamodb", aws_env).create_table(
        TableName="ojs-jobs",
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    assert main(["aws", "provision"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "different key design" in captured.err
    assert "Traceback" not in captured.err
    assert _queue_names(aws_env) == []


def test_provision_bad_settings(aws_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["aws", "provision", "--storage", "postgresql://localhost/x"]) == 2
    assert "not an sqs:// URL" in capsys.readouterr().err
    assert main(["aws", "provision", "--storage", "sqs://?bogus=1"]) == 2
    assert "unknown sqs:// URL parameter" in capsys.readouterr().err
    assert main(["aws", "provision", "--max-receive-count", "0"]) == 2
    assert "max_receive_count" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["aws"])
    assert info.value.code == 2


def test_cli_import_does_not_need_aiobotocore() -> None:
    code = "import sys, ojs_trio.cli; assert 'aiobotocore' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
