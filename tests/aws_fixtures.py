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

import logging
import os
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ojs_trio.storage.sqs.client import AwsSettings

RESET_PATH = "/moto-api/reset"
TEST_REGION = "us-east-1"


def _require_moto() -> Any:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip("moto[server] is not installed")
    return ThreadedMotoServer


def reset_moto(endpoint: str, *, timeout: float = 10.0) -> None:
    """Wipe every moto backend (all services, all regions)."""
    request = urllib.request.Request(endpoint + RESET_PATH, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status != 200:
            raise RuntimeError(f"moto reset failed: HTTP {response.status}")


_SERIALIZED = False


def _serialize_moto_requests() -> None:
    """Handle one moto request at a time.

    The threaded server runs requests concurrently, but moto's backends are not
    thread-safe: a DynamoDB transaction deep-copies the table while another thread
    writes to it (``RuntimeError: dictionary changed size``), and two conditional
    writes can both pass. AWS serializes conditional writes per item; one lock gives
    the same guarantee here.
    """
    global _SERIALIZED
    if _SERIALIZED:
        return
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    lock = threading.Lock()
    handle = DomainDispatcherApplication.__call__

    def serialized(self: Any, environ: Any, start_response: Any) -> Any:
        with lock:
            return handle(self, environ, start_response)

    DomainDispatcherApplication.__call__ = serialized  # type: ignore[method-assign]
    _SERIALIZED = True


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server_cls = _require_moto()
    _serialize_moto_requests()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = server_cls(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


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
