"""A raw-ASGI fast path in front of the Quart app for the hot routes.

Quart costs about a third of a millisecond of CPU per request on top of Hypercorn
(perf-anchors.md §4c).  The hot routes -- ``POST /ojs/v1/jobs``, ``/jobs/batch``
and ``/workers/{fetch,ack,nack,heartbeat}`` -- are served here directly from the
ASGI scope, by the same handlers the Quart routes call (``HOT_ROUTES`` in jobs.py
and workers.py).  Every other request, and the lifespan scope, goes to Quart
unchanged.

What the app's hooks do for a request is repeated here, in the same order and
with the same answers, byte for byte (tests/test_http_fastpath.py compares them):

1. ``X-Request-Id`` taken from the request or generated;
2. the API key (401), unless the server runs without one;
3. the body limit: ``Content-Length`` over it (413, body not parsed), then
   while reading a chunked body (413).  A body answered early (401, 413) is
   still drained first, within bounds, so the connection stays usable, as with
   Quart-Trio's reader task (see ``_discard_body``);
4. content type, empty or malformed JSON (400 each), then the handler;
5. ``OjsError`` mapped to the OJS error body, anything else to a logged 500;
6. ``Location``/``WWW-Authenticate``/``Retry-After`` from the reply, then
   ``content-type``, ``content-length``, ``ojs-version`` and ``x-request-id``.

As in Quart-Trio, a client that disconnects while a fetch is waiting for jobs
cancels the fetch.  The other hot routes finish in milliseconds and are not
watched: a watcher task per request cost about 5 % of the server's CPU per job.

Hypercorn does not close a connection whose request asked for
``Connection: close`` if the app still has a ``receive()`` pending when it
sends the end of its reply, and a client reading the reply to the end of the
stream then waits until the keep-alive timeout.  Quart-Trio always has one
pending (its disconnect watcher), so requests passed to Quart get a ``receive``
that gives up its pending call as the last part of the reply goes out
(``_ReplyEnds``); the fetch watcher here is stopped before the reply is sent.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)
from quart_trio import QuartTrio

from ojs_trio.engine.errors import BackendError, OjsError, PayloadTooLarge, Unauthenticated
from ojs_trio.engine.ids import uuid7
from ojs_trio.http import jobs, workers
from ojs_trio.http.common import (
    CONTENT_TYPE,
    OJS_VERSION,
    ApiContext,
    Handler,
    Reply,
    api_key_ok,
    encode_json,
    error_reply,
    parse_json,
)

log = logging.getLogger("ojs_trio.http")

HOT_ROUTES: dict[str, Handler] = {**jobs.HOT_ROUTES, **workers.HOT_ROUTES}
# Routes that can wait (a long-poll fetch): a client that disconnects cancels them.
# The others finish in milliseconds and are not watched; an ack the server has
# read in full is applied even if its client is gone by then.
WAITING_ROUTES = frozenset({"/ojs/v1/workers/fetch"})

DISCARD_TIMEOUT = 1.0  # seconds spent draining the rest of a body answered early

_CONTENT_TYPE = CONTENT_TYPE.encode()
_OJS_VERSION = OJS_VERSION.encode()


class FastPath:
    """ASGI app: the hot routes served directly, everything else by ``app``."""

    def __init__(self, app: QuartTrio) -> None:
        self.app = app
        ctx: ApiContext = app.extensions["ojs"]
        self.ctx = ctx
        self.routes = HOT_ROUTES
        self.max_body = ctx.settings.max_body_bytes
        self.api_key = ctx.settings.api_key.encode() if ctx.settings.api_key else None
        self.discard_limit = max(4 * self.max_body, 1 << 20)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            handler = self.routes.get(scope["path"])
            if handler is not None:
                await self._serve(handler, scope, receive, send)
                return
        if scope["type"] == "http":
            ends = _ReplyEnds(receive, send)
            await self.app(scope, ends.receive, ends.send)
            return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        handler: Handler,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        request_id = authorization = content_type = content_length = None
        chunked = False
        for name, value in scope["headers"]:
            # Like werkzeug's Headers.get: the first occurrence wins.
            if name == b"x-request-id":
                if request_id is None:
                    request_id = value.decode("latin-1")
            elif name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"content-type":
                if content_type is None:
                    content_type = value.decode("latin-1")
            elif name == b"content-length":
                if content_length is None:
                    content_length = value
            elif name == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
        request_id = request_id or f"req_{uuid7()}"

        if self.api_key is not None and not api_key_ok(authorization or "", self.api_key):
            unauthenticated = Unauthenticated("Missing or invalid API key")
            await _discard_body(receive, self.discard_limit)
            await _send_reply(send, error_reply(unauthenticated, request_id), request_id)
            return
        if content_length is not None and not chunked:
            try:
                length = int(content_length)  # h11 has validated it already
            except ValueError:
                length = 0  # as werkzeug: an unreadable length is no length
            if length > self.max_body:
                error = PayloadTooLarge(
                    f"Request body of {length} bytes exceeds the limit of {self.max_body} bytes",
                    details={"limit_bytes": self.max_body},
                )
                await _discard_body(receive, self.discard_limit)
                await _send_reply(send, error_reply(error, request_id), request_id)
                return

        raw = b""
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                return  # http.disconnect: nobody left to answer
            raw += message.get("body", b"")
            if len(raw) > self.max_body:
                too_large = PayloadTooLarge(
                    f"Request body exceeds the limit of {self.max_body} bytes",
                    details={"limit_bytes": self.max_body},
                )
                if message.get("more_body", False):
                    await _discard_body(receive, self.discard_limit)
                await _send_reply(send, error_reply(too_large, request_id), request_id)
                return
            more_body = message.get("more_body", False)

        if scope["path"] not in WAITING_ROUTES:
            reply = await self._reply(handler, scope, content_type, raw, request_id)
            await _send_reply(send, reply, request_id)
            return
        waited: Reply | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            waited = await self._reply(handler, scope, content_type, raw, request_id)
            nursery.cancel_scope.cancel()
        if waited is None:
            return  # the client went away while the fetch waited
        # Sent once the watcher is gone: with a receive() still pending, Hypercorn
        # keeps a connection open after a reply to a request that asked for
        # ``Connection: close`` (a client reading to the end would wait forever).
        await _send_reply(send, waited, request_id)

    async def _reply(
        self,
        handler: Handler,
        scope: HTTPScope,
        content_type: str | None,
        raw: bytes,
        request_id: str,
    ) -> Reply:
        try:
            return await handler(self.ctx, parse_json(content_type, raw))
        except OjsError as exc:
            if isinstance(exc, BackendError):
                log.warning(
                    "backend error on %s %s: %s", scope["method"], scope["path"], exc.message
                )
            return error_reply(exc, request_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            crash = BackendError("Internal server error; see the server log")
            return error_reply(crash, request_id)


async def _discard_body(receive: ASGIReceiveCallable, budget: int) -> None:
    """Read and drop what is left of a request body answered early (401, 413).

    Hypercorn closes a keep-alive connection if the request body has not been
    received in full when the reply is complete.  Quart-Trio's reader task drains
    the body while the answer is being built; this has the same effect, before
    the reply is sent: up to ``budget`` more bytes (at least 1 MiB), for at most
    a second.  A larger or slower body still gets its answer, then the connection
    is closed.
    """
    with trio.move_on_after(DISCARD_TIMEOUT):
        while budget >= 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def _cancel_on_disconnect(
    receive: ASGIReceiveCallable, cancel_scope: trio.CancelScope
) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel_scope.cancel()


class _ReplyEnds:
    """``receive``/``send`` for Quart: a pending ``receive()`` ends as the reply does.

    Until the last body message, ``receive`` is Hypercorn's, so a disconnect still
    reaches Quart-Trio (which cancels the handler, e.g. an event stream).  When
    the last body message is sent, a pending ``receive`` is cancelled first and
    waits from then on; Quart-Trio cancels it once the reply is out.
    """

    def __init__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        self._receive = receive
        self._send = send
        self._pending: trio.CancelScope | None = None
        self._ended = False

    async def receive(self) -> ASGIReceiveEvent:
        if not self._ended:
            with trio.CancelScope() as self._pending:
                return await self._receive()
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._ended = True
            if self._pending is not None:
                self._pending.cancel()
        await self._send(message)


async def _send_reply(send: ASGISendCallable, reply: Reply, request_id: str) -> None:
    body = encode_json(reply.payload)
    # Header names lower-cased and values UTF-8-encoded, as Quart sends them.
    headers = [(k.lower().encode(), v.encode()) for k, v in (reply.headers or {}).items()]
    headers += [
        (b"content-type", _CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
        (b"ojs-version", _OJS_VERSION),
        (b"x-request-id", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
