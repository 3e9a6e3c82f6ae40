"""Workflow routes: chain, group and batch."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from ojs_trio.http.common import ApiContext, json_body, ojs_response


def register(app: QuartTrio, ctx: ApiContext) -> None:
    engine = ctx.engine

    @app.post("/ojs/v1/workflows")
    async def create_workflow() -> Response:
        workflow = await engine.create_workflow(await json_body())
        return ojs_response(
            {"workflow": workflow.to_wire()},
            201,
            headers={"Location": f"/ojs/v1/workflows/{workflow.id}"},
        )

    @app.get("/ojs/v1/workflows/<workflow_id>")
    async def get_workflow(workflow_id: str) -> Response:
        return ojs_response({"workflow": (await engine.get_workflow(workflow_id)).to_wire()})

    @app.delete("/ojs/v1/workflows/<workflow_id>")
    async def cancel_workflow(workflow_id: str) -> Response:
        return ojs_response({"workflow": (await engine.cancel_workflow(workflow_id)).to_wire()})
