"""Job routes: PUSH, INFO, CANCEL."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from ojs_trio.http.common import ApiContext, json_body, ojs_response


def register(app: QuartTrio, ctx: ApiContext) -> None:
    engine = ctx.engine

    @app.post("/ojs/v1/jobs")
    async def enqueue_job() -> Response:
        result = await engine.submit(await json_body())
        job = result.job
        status = 201 if result.created else 200
        return ojs_response(
            {"job": job.to_wire()}, status, headers={"Location": f"/ojs/v1/jobs/{job.id}"}
        )

    @app.get("/ojs/v1/jobs/<job_id>")
    async def get_job(job_id: str) -> Response:
        return ojs_response({"job": (await engine.get(job_id)).to_wire()})

    @app.delete("/ojs/v1/jobs/<job_id>")
    async def cancel_job(job_id: str) -> Response:
        return ojs_response({"job": (await engine.cancel(job_id)).to_wire()})
