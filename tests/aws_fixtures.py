"""Reusable fixtures for tests that need SQS and DynamoDB (a moto server).

Bind the fixtures in a test module (``tests/`` is on ``sys.path`` under pytest's
default import mode), or load this module as a plugin from ``conftest.py``::

    import aws_fixtures

    moto_endpoint = aws_fixtures.moto_endpoint
    aws_endpoint = aws_fixtures.aws_endpoint
    aws_settings = aws_fixtures.aws_settings

* ``moto_endpoint`` (session): moto's ``ThreadedMotoServer`` on ``127.0.0.1`` and a
  free port, in a thread of the test process (one per xdist worker); yields its URL
  (``http://127.0.0.1:PORT``). moto's in-process ``mock_aws`` patches botocore only
  and does not cover aiobotocore, hence a real HTTP server. Without moto installed
  the tests are skipped -- unless ``CI=true``, where that is a failure.
* ``aws_endpoint``: the same URL, after ``POST /moto-api/reset`` has wiped all moto
  state, so every test starts from an empty account.
* ``aws_settings``: :class:`~ojs_trio.storage.sqs.client.AwsSettings` pointing at that
  endpoint with dummy credentials and small timeouts.

pytest-trio runs every test in its own ``trio.run``, so the server and the reset are
sync code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from ojs_trio.testing.moto import open_moto_server, reset_moto

if TYPE_CHECKING:
    from ojs_trio.storage.sqs.client import AwsSettings

__all__ = ["TEST_REGION", "aws_endpoint", "aws_settings", "moto_endpoint", "reset_moto"]

TEST_REGION = "us-east-1"


def _require_moto() -> None:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip("moto[server] is not installed")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    _require_moto()
    with open_moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws_endpoint(moto_endpoint: str) -> str:
    reset_moto(moto_endpoint)
    return moto_endpoint


@pytest.fixture
def aws_settings(aws_endpoint: str) -> AwsSettings:
    # Imported here so that loading this plugin never requires aiobotocore.
    from ojs_trio.storage.sqs.client import AwsSettings

    return AwsSettings(
        region=TEST_REGION,
        endpoint_url=aws_endpoint,
        access_key_id="testing",
        secret_access_key="testing",
        connect_timeout=2.0,
        read_timeout=30.0,
        max_attempts=2,
    )
