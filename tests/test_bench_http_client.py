"""The harness's HTTP client recovers when the server has closed its idle connections."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from bench.http_client import HttpClient

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Server:
    """Answers every request with 200 "ok"; ``hang_up`` closes the connections open
    at that moment, as a server's keep-alive timeout closes idle connections."""

    def __init__(self) -> None:
        self.hung_up = trio.Event()
        self.served = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        opened_before_hang_up = not self.hung_up.is_set()
        buffer = b""
        async with stream:
            async with trio.open_nursery() as nursery:

                async def hang_up() -> None:
                    await self.hung_up.wait()
                    nursery.cancel_scope.cancel()

                if opened_before_hang_up:
                    nursery.start_soon(hang_up)
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                    while b"\r\n\r\n" in buffer:
                        _, buffer = buffer.split(b"\r\n\r\n", 1)
                        self.served += 1
                        await stream.send_all(OK)


async def test_requests_go_on_after_every_idle_connection_was_closed() -> None:
    server = _Server()
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        client = HttpClient(f"http://127.0.0.1:{port}")
        async with trio.open_nursery() as requests:  # five pooled connections, then idle
            for _ in range(5):
                requests.start_soon(client.get, "/")
        assert server.served == 5
        server.hung_up.set()
        await trio.testing.wait_all_tasks_blocked()
        # Three attempts could each have taken a stale connection from the pool.
        response = await client.get("/")
        assert (response.status, response.body) == (200, b"ok")
        assert server.served == 6
        nursery.cancel_scope.cancel()
