"""Job routes: PUSH, INFO, CANCEL.

PUSH (single and batch) are hot routes: their logic lives in plain handlers in
``HOT_ROUTES``, served both by Quart and by the raw-ASGI fast path (fastpath.py).
"""

from __future__ import annotations

from typing import Any

from quart import Response
from quart_trio import QuartTrio

from ojs_trio.engine.errors import InvalidRequest
from ojs_trio.http.common import (
    ApiContext,
    Handler,
    Reply,
    ojs_response,
    register_hot_routes,
)


async def enqueue_job(ctx: ApiContext, body: Any) -> Reply:
    """POST /ojs/v1/jobs"""
    result = await ctx.engine.submit(body)
    if result is None:
        # Enqueue middleware chose to drop the job: accepted, but nothing stored.
        return Reply(200, {"job": None, "dropped": True})
    job = result.job
    status = 201 if result.created else 200
    return Reply(status, {"job": job.to_wire()}, {"Location": f"/ojs/v1/jobs/{job.id}"})


async def enqueue_batch(ctx: ApiContext, body: Any) -> Reply:
    """POST /ojs/v1/jobs/batch"""
    jobs = body.get("jobs") if isinstance(body, dict) else body
    if not isinstance(jobs, list) or not jobs:
        raise InvalidRequest(
            "'jobs' must be a non-empty array of job envelopes", details={"field": "jobs"}
        )
    if len(jobs) > ctx.settings.max_batch_jobs:
        raise InvalidRequest(
            f"a batch holds at most {ctx.settings.max_batch_jobs} jobs",
            details={"field": "jobs", "count": len(jobs)},
        )
    results = await ctx.engine.submit_many(jobs)
    wire = [r.job.to_wire() for r in results]
    return Reply(
        201, {"jobs": wire, "count": len(wire), "created": sum(1 for r in results if r.created)}
    )


HOT_ROUTES: dict[str, Handler] = {
    "/ojs/v1/jobs": enqueue_job,
    "/ojs/v1/jobs/batch": enqueue_batch,
}


def register(app: QuartTrio, ctx: ApiContext) -> None:
    engine = ctx.engine
    register_hot_routes(app, ctx, HOT_ROUTES)

    @app.get("/ojs/v1/jobs/<job_id>")
    async def get_job(job_id: str) -> Response:
        return ojs_response({"job": (await engine.get(job_id)).to_wire()})

    @app.delete("/ojs/v1/jobs/<job_id>")
    async def cancel_job(job_id: str) -> Response:
        return ojs_response({"job": (await engine.cancel(job_id)).to_wire()})
