"""Queue and dead-letter routes."""

from __future__ import annotations

from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from ojs_trio.engine.timeutil import format_ts
from ojs_trio.http.common import ApiContext, ojs_response, query_int
from ojs_trio.storage.port import QueueInfo


def register(app: QuartTrio, ctx: ApiContext) -> None:
    engine = ctx.engine

    @app.get("/ojs/v1/queues")
    async def list_queues() -> Response:
        queues = await engine.list_queues()
        limit = query_int("limit", 50, minimum=1, maximum=1000)
        offset = query_int("offset", 0, maximum=10**9)
        page = queues[offset : offset + limit]
        return ojs_response(
            {
                "queues": [
                    {
                        "name": q.name,
                        "status": "paused" if q.paused else "active",
                        "paused": q.paused,
                        "created_at": format_ts(q.created_at),
                        "counts": q.counts,
                    }
                    for q in page
                ],
                "pagination": {
                    "total": len(queues),
                    "limit": limit,
                    "offset": offset,
                    "has_more": offset + len(page) < len(queues),
                },
            }
        )

    def queue_wire(q: QueueInfo) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "name": q.name,
            "status": "paused" if q.paused else "active",
            "paused": q.paused,
            "created_at": format_ts(q.created_at),
        }
        if q.counts:
            wire.update(q.counts)
            wire["counts"] = q.counts
            wire["total"] = sum(q.counts.values())
            wire["throughput"] = {
                "completed_last_minute": q.completed_last_minute,
                "failed_last_minute": q.failed_last_minute,
                "per_second": round(q.completed_last_minute / 60.0, 3),
            }
        if q.rate_limit is not None:
            wire["rate_limit"] = q.rate_limit
        if q.concurrency is not None:
            wire["concurrency"] = q.concurrency
        return wire

    @app.get("/ojs/v1/queues/<name>/stats")
    async def queue_stats(name: str) -> Response:
        return ojs_response({"queue": queue_wire(await engine.queue_info(name))})

    @app.post("/ojs/v1/queues/<name>/pause")
    async def pause_queue(name: str) -> Response:
        return ojs_response({"queue": queue_wire(await engine.pause_queue(name))})

    @app.post("/ojs/v1/queues/<name>/resume")
    async def resume_queue(name: str) -> Response:
        return ojs_response({"queue": queue_wire(await engine.resume_queue(name))})

    @app.get("/ojs/v1/dead-letter")
    async def list_dead_letter() -> Response:
        limit = query_int("limit", 50, minimum=1, maximum=1000)
        offset = query_int("offset", 0, maximum=10**9)
        page = await engine.list_dead_letter(request.args.get("queue") or None, limit, offset)
        return ojs_response(
            {
                "jobs": [j.to_wire() for j in page.jobs],
                "pagination": {
                    "total": page.total,
                    "limit": limit,
                    "offset": offset,
                    "has_more": offset + len(page.jobs) < page.total,
                },
            }
        )

    @app.post("/ojs/v1/dead-letter/<job_id>/retry")
    async def retry_dead_letter(job_id: str) -> Response:
        return ojs_response({"job": (await engine.retry_dead_letter(job_id)).to_wire()})

    @app.delete("/ojs/v1/dead-letter/<job_id>")
    async def delete_dead_letter(job_id: str) -> Response:
        job = await engine.delete_dead_letter(job_id)
        return ojs_response({"deleted": True, "job_id": job.id})
