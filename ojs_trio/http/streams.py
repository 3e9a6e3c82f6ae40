"""Server-Sent Event streams of lifecycle events (ojs-events.md, ojs-realtime.md).

Each stream is a subscription on the engine's event bus with a small buffer.
A consumer that cannot keep up loses events rather than slowing the engine;
it is told how many with an ``event: dropped`` message, so it can resync by
reading the job or queue.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Response
from quart_trio import QuartTrio

from ojs_trio.engine.events import EventBus, Subscription
from ojs_trio.http.common import ApiContext, query_list

KEEPALIVE_SECONDS = 15.0


def _frame(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


async def event_stream(bus: EventBus, sub: Subscription) -> AsyncIterator[bytes]:
    reported_drops = 0
    try:
        yield b": ojs-trio event stream\nretry: 2000\n\n"
        while True:
            with trio.move_on_after(KEEPALIVE_SECONDS) as scope:
                event = await sub.receive.receive()
            if sub.dropped != reported_drops:
                lost = sub.dropped - reported_drops
                reported_drops = sub.dropped
                yield f"event: dropped\ndata: {json.dumps({'dropped': lost})}\n\n".encode()
            if scope.cancelled_caught:
                yield b": keepalive\n\n"
                continue
            yield _frame(event)
    finally:
        bus.unsubscribe(sub)


def sse_response(bus: EventBus, sub: Subscription) -> Response:
    response = Response(
        event_stream(bus, sub),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None  # a stream lives as long as its client
    return response


def register(app: QuartTrio, ctx: ApiContext) -> None:
    engine = ctx.engine

    @app.get("/ojs/v1/jobs/<job_id>/events")
    async def job_events(job_id: str) -> Response:
        await engine.get(job_id)  # 404 for an unknown job, before the stream starts
        sub = engine.events.subscribe(types=query_list("types"), job_id=job_id)
        return sse_response(engine.events, sub)

    @app.get("/ojs/v1/queues/<name>/events")
    async def queue_events(name: str) -> Response:
        sub = engine.events.subscribe(types=query_list("types"), queues=[name])
        return sse_response(engine.events, sub)

    @app.get("/ojs/v1/events/stream")
    async def all_events() -> Response:
        sub = engine.events.subscribe(types=query_list("types"), queues=query_list("queues"))
        return sse_response(engine.events, sub)
