"""Cron routes (ojs-cron.md section 8)."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from ojs_trio.engine.errors import InvalidRequest
from ojs_trio.http.common import ApiContext, json_body, ojs_response


def register(app: QuartTrio, ctx: ApiContext) -> None:
    engine = ctx.engine

    @app.post("/ojs/v1/cron")
    async def register_cron() -> Response:
        record = await engine.put_cron(await json_body())
        return ojs_response(
            {"cron": record.to_wire()}, 201, headers={"Location": f"/ojs/v1/cron/{record.name}"}
        )

    @app.get("/ojs/v1/cron")
    async def list_crons() -> Response:
        records = await engine.list_crons()
        return ojs_response(
            {"crons": [r.to_wire() for r in records], "pagination": {"total": len(records)}}
        )

    @app.get("/ojs/v1/cron/<name>")
    async def get_cron(name: str) -> Response:
        return ojs_response({"cron": (await engine.get_cron(name)).to_wire()})

    @app.patch("/ojs/v1/cron/<name>")
    async def toggle_cron(name: str) -> Response:
        body = await json_body()
        if not isinstance(body, dict) or "enabled" not in body:
            raise InvalidRequest(
                'a toggle body is {"enabled": true|false}', details={"field": "enabled"}
            )
        return ojs_response(
            {"cron": (await engine.set_cron_enabled(name, body["enabled"])).to_wire()}
        )

    @app.delete("/ojs/v1/cron/<name>")
    async def delete_cron(name: str) -> Response:
        return ojs_response({"cron": (await engine.delete_cron(name)).to_wire(), "deleted": True})
