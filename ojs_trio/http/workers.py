"""Worker routes: FETCH, ACK, FAIL (nack), BEAT (heartbeat).

All four are hot routes: plain handlers in ``HOT_ROUTES``, served both by Quart and
by the raw-ASGI fast path (fastpath.py).
"""

from __future__ import annotations

from typing import Any

from quart_trio import QuartTrio

from ojs_trio.engine.errors import InvalidRequest
from ojs_trio.engine.lifecycle import Failure
from ojs_trio.engine.states import JobState
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.http.common import (
    ApiContext,
    Handler,
    Reply,
    as_object,
    optional_int,
    optional_str,
    register_hot_routes,
    require_str,
)


def _queues(body: dict[str, Any]) -> list[str]:
    queues = body.get("queues")
    if queues is None and isinstance(body.get("queue"), str):
        queues = [body["queue"]]
    if not isinstance(queues, list) or not queues or not all(isinstance(q, str) for q in queues):
        raise InvalidRequest(
            "'queues' must be a non-empty array of queue names", details={"field": "queues"}
        )
    return queues


async def fetch(ctx: ApiContext, raw: Any) -> Reply:
    """POST /ojs/v1/workers/fetch"""
    body = as_object(raw)
    engine = ctx.engine
    queues = _queues(body)
    count = optional_int(body, "count", minimum=1)
    if count is None:
        count = optional_int(body, "max_jobs", minimum=1) or 1
    jobs = await engine.fetch(
        queues,
        count,
        worker_id=optional_str(body, "worker_id"),
        visibility_ms=optional_int(body, "visibility_timeout_ms", minimum=1),
        wait_ms=optional_int(body, "wait_ms") or 0,
    )
    wire = [j.to_wire() for j in jobs]
    payload: dict[str, Any] = {"jobs": wire}
    if wire:
        payload["job"] = wire[0]
    return Reply(200, payload)


async def ack(ctx: ApiContext, raw: Any) -> Reply:
    """POST /ojs/v1/workers/ack"""
    body = as_object(raw)
    engine = ctx.engine
    job = await engine.ack(
        require_str(body, "job_id"),
        body.get("result"),
        has_result="result" in body,
        worker_id=optional_str(body, "worker_id"),
    )
    return Reply(
        200,
        {
            "acknowledged": True,
            "id": job.id,
            "job_id": job.id,
            "state": job.state.value,
            "completed_at": format_ts(job.completed_at or engine.clock()),
            "job": job.to_wire(),
        },
    )


async def nack(ctx: ApiContext, raw: Any) -> Reply:
    """POST /ojs/v1/workers/nack"""
    body = as_object(raw)
    engine = ctx.engine
    requeue = body.get("requeue", False)
    if not isinstance(requeue, bool):
        raise InvalidRequest("'requeue' must be a boolean", details={"field": "requeue"})
    job = await engine.nack(
        require_str(body, "job_id"),
        Failure.from_wire(body.get("error")),
        worker_id=optional_str(body, "worker_id"),
        requeue=requeue,
    )
    payload: dict[str, Any] = {
        "id": job.id,
        "job_id": job.id,
        "state": job.state.value,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
    }
    if job.state is JobState.RETRYABLE and job.scheduled_at is not None:
        payload["next_attempt_at"] = format_ts(job.scheduled_at)
        payload["retry_delay_ms"] = job.retry_delay_ms
    if job.discarded_at is not None:
        payload["discarded_at"] = format_ts(job.discarded_at)
    if job.completed_at is not None:
        payload["completed_at"] = format_ts(job.completed_at)
    payload["job"] = job.to_wire()
    return Reply(200, payload)


async def heartbeat(ctx: ApiContext, raw: Any) -> Reply:
    """POST /ojs/v1/workers/heartbeat"""
    body = as_object(raw)
    engine = ctx.engine
    worker_id = require_str(body, "worker_id")
    active = body.get("active_jobs")
    if active is None:
        single = optional_str(body, "job_id")
        active = [single] if single else []
    if not isinstance(active, list) or not all(isinstance(j, str) for j in active):
        raise InvalidRequest(
            "'active_jobs' must be an array of job ids", details={"field": "active_jobs"}
        )
    reply = await engine.heartbeat(
        worker_id,
        active,
        visibility_ms=optional_int(body, "visibility_timeout_ms", minimum=1),
    )
    return Reply(
        200,
        {
            "state": reply.state,
            "directive": reply.state,
            "jobs_extended": reply.extended,
            "server_time": format_ts(reply.server_time),
        },
    )


HOT_ROUTES: dict[str, Handler] = {
    "/ojs/v1/workers/fetch": fetch,
    "/ojs/v1/workers/ack": ack,
    "/ojs/v1/workers/nack": nack,
    "/ojs/v1/workers/heartbeat": heartbeat,
}


def register(app: QuartTrio, ctx: ApiContext) -> None:
    register_hot_routes(app, ctx, HOT_ROUTES)
