"""A minimal keep-alive HTTP/1.1 client on Trio sockets, for the load generator.

The load generator shares the benchmark machine's two cores with the server and
PostgreSQL, so every microsecond it spends per request is taken from the system
under test.  httpx (on AnyIO) spent ~5x the CPU of this client per small JSON
request (bench/README.md, "HTTP client"); this one writes the request head by hand,
reads the response head with one search for the blank line, and reads the body by
Content-Length or chunked encoding.  It speaks only what the harness needs: JSON
bodies, keep-alive, one request at a time per connection, a bounded pool.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import trio

MAX_HEAD = 64 * 1024


class ConnectionLost(Exception):
    """The server closed the connection before a complete response arrived."""

    def __init__(self, message: str, *, got_response_bytes: bool) -> None:
        super().__init__(message)
        self.got_response_bytes = got_response_bytes


class Response:
    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.reusable = True

    async def _fill(self, got_response_bytes: bool) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionLost("connection closed", got_response_bytes=got_response_bytes)
        self.buffer += data

    async def request(self, head: bytes, body: bytes, sent: Callable[[], None]) -> Response:
        await self.stream.send_all(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            await self.stream.send_all(body)
        sent()
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEAD:
                raise ConnectionLost("response head too large", got_response_bytes=True)
            await self._fill(bool(buffer))
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        status = int(lines[0].split(b" ", 2)[1])
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection" and b"close" in value.lower():
                self.reusable = False
        if chunked:
            return Response(status, await self._read_chunked())
        if length is None:  # body runs to the end of the connection
            self.reusable = False
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                buffer += data
            length = len(buffer)
        while len(buffer) < length:
            await self._fill(True)
        body = bytes(buffer[:length])
        del buffer[:length]
        return Response(status, body)

    async def _read_chunked(self) -> bytes:
        buffer = self.buffer
        out = bytearray()
        while True:
            while (end := buffer.find(b"\r\n")) < 0:
                await self._fill(True)
            size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
            del buffer[: end + 2]
            while len(buffer) < size + 2:
                await self._fill(True)
            out += buffer[:size]
            del buffer[: size + 2]
            if size == 0:  # no trailers are sent by our server
                return bytes(out)

    async def aclose(self) -> None:
        await self.stream.aclose()


class HttpClient:
    """``await client.post_json(path, body)`` over at most ``max_connections`` sockets."""

    def __init__(self, base_url: str, *, max_connections: int = 512) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http://host:port URLs are supported, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._host_header = parts.netloc.encode()
        self._idle: list[_Connection] = []
        self._slots = trio.Semaphore(max_connections)
        self.awaiting = 0  # requests sent in full and not yet answered

    async def request(self, method: str, path: str, body: Any = None) -> Response:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (
            method.encode(),
            path.encode(),
            self._host_header,
        )
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(payload)
        head += b"\r\n"
        async with self._slots:
            for attempt in range(3):
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                sent = False

                def on_sent() -> None:
                    nonlocal sent
                    sent = True
                    self.awaiting += 1

                try:
                    response = await conn.request(head, payload, on_sent)
                except (ConnectionLost, trio.BrokenResourceError, OSError) as exc:
                    await conn.aclose()
                    # A kept-alive connection the server closed as the request went
                    # out (perf-anchors.md §4c): nothing reached the app, so trying
                    # again on a fresh connection is safe.
                    got_bytes = isinstance(exc, ConnectionLost) and exc.got_response_bytes
                    if not reused or got_bytes or attempt == 2:
                        raise
                    # The other idle connections have likely outlived the server's
                    # keep-alive timeout too (e.g. after minutes of churn through
                    # another client): drop them all and go on with a fresh one.
                    stale, self._idle = self._idle, []
                    for idle in stale:
                        await idle.aclose()
                    continue
                finally:
                    if sent:
                        self.awaiting -= 1
                if conn.reusable:
                    self._idle.append(conn)
                else:
                    await conn.aclose()
                return response
        raise AssertionError("unreachable")

    async def post(self, path: str, body: Any) -> Response:
        return await self.request("POST", path, body)

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    async def _connect(self) -> _Connection:
        stream = await trio.open_tcp_stream(self.host, self.port)
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        return _Connection(stream)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()
