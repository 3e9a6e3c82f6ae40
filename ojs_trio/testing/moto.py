"""A moto server for SQS and DynamoDB on 127.0.0.1 (tests and the benchmark's smoke run).

moto's in-process ``mock_aws`` patches botocore only and does not cover
aiobotocore, so the SQS adapter needs moto's real HTTP server.  Requires the
``moto[server]`` package (the ``dev`` extra).
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["open_moto_server", "reset_moto"]

RESET_PATH = "/moto-api/reset"

_serialized = False
_serialize_lock = threading.Lock()


def _serialize_moto_requests() -> None:
    """Handle one moto request at a time.

    The threaded server runs requests concurrently, but moto's backends are not
    thread-safe: a DynamoDB transaction deep-copies the table while another thread
    writes to it (``RuntimeError: dictionary changed size``), and two conditional
    writes can both pass. AWS serializes conditional writes per item; one lock gives
    the same guarantee here.
    """
    global _serialized
    with _serialize_lock:
        if _serialized:
            return
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication

        lock = threading.Lock()
        handle = DomainDispatcherApplication.__call__

        def serialized(self: Any, environ: Any, start_response: Any) -> Any:
            with lock:
                return handle(self, environ, start_response)

        DomainDispatcherApplication.__call__ = serialized  # type: ignore[method-assign]
        _serialized = True


@contextmanager
def open_moto_server() -> Iterator[str]:
    """Run moto's ``ThreadedMotoServer`` on a free port; yields ``http://127.0.0.1:PORT``.

    Raises ImportError when ``moto[server]`` is not installed.
    """
    from moto.server import ThreadedMotoServer

    _serialize_moto_requests()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def reset_moto(endpoint: str, *, timeout: float = 10.0) -> None:
    """Wipe every moto backend (all services, all regions)."""
    request = urllib.request.Request(endpoint + RESET_PATH, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status != 200:
            raise RuntimeError(f"moto reset failed: HTTP {response.status}")
