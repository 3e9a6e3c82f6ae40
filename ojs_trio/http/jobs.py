"""Job routes: PUSH, INFO, CANCEL."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from ojs_trio.engine.errors import InvalidRequest
from ojs_trio.http.common import ApiContext, json_body, ojs_response


def register(app: QuartTrio, ctx: ApiContext) -> None:
    engine = ctx.engine

    @app.post("/ojs/v1/jobs")
    async def enqueue_job() -> Response:
        result = await engine.submit(await json_body())
        if result is None:
            # Enqueue middleware chose to drop the job: accepted, but nothing stored.
            return ojs_response({"job": None, "dropped": True}, 200)
        job = result.job
        status = 201 if result.created else 200
        return ojs_response(
            {"job": job.to_wire()}, status, headers={"Location": f"/ojs/v1/jobs/{job.id}"}
        )

    @app.post("/ojs/v1/jobs/batch")
    async def enqueue_batch() -> Response:
        body = await json_body()
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
        results = await engine.submit_many(jobs)
        wire = [r.job.to_wire() for r in results]
        return ojs_response(
            {"jobs": wire, "count": len(wire), "created": sum(1 for r in results if r.created)},
            201,
        )

    @app.get("/ojs/v1/jobs/<job_id>")
    async def get_job(job_id: str) -> Response:
        return ojs_response({"job": (await engine.get(job_id)).to_wire()})

    @app.delete("/ojs/v1/jobs/<job_id>")
    async def cancel_job(job_id: str) -> Response:
        return ojs_response({"job": (await engine.cancel(job_id)).to_wire()})
