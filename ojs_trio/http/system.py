"""System routes: manifest, health, events, and the admin controls."""

from __future__ import annotations

from typing import Any

from quart import Response
from quart_trio import QuartTrio

import ojs_trio
from ojs_trio.engine.errors import BackendUnavailable, NotFound, OjsError
from ojs_trio.engine.timeutil import format_ts
from ojs_trio.http.common import ApiContext, ojs_response, query_int, query_list
from ojs_trio.storage.port import Storage

CONFORMANCE_LEVEL = 4
CAPABILITIES: dict[str, bool] = {
    "batch_enqueue": True,
    "cron_jobs": True,
    "dead_letter": True,
    "delayed_jobs": True,
    "job_ttl": True,
    "priority_queues": True,
    "rate_limiting": True,
    "schema_validation": False,
    "workflows": True,
    "pause_resume": True,
    "events": True,
    "server_sent_events": True,
    "long_poll_fetch": True,
}

# ojs-unique-jobs.md 8: each adapter declares its guarantee (Storage.unique_guarantee:
# strength and mechanism; docs/unique-jobs.md explains each).  One that declares
# nothing is not assumed to be strong.
UNDECLARED_UNIQUE_GUARANTEE = ("best-effort", "not declared by the storage adapter")
# ojs-conformance.md 4.2 spells the top-level value "best_effort" where
# ojs-unique-jobs.md 8.3 spells it "best-effort".
_CONFORMANCE_STRENGTH = {"strong": "strong", "best-effort": "best_effort"}


def unique_guarantee(storage: Storage) -> tuple[str, str]:
    """(strength, mechanism) of ``storage``'s unique jobs."""
    declared: tuple[str, str] | None = getattr(storage, "unique_guarantee", None)
    return UNDECLARED_UNIQUE_GUARANTEE if declared is None else declared


def manifest(ctx: ApiContext) -> dict[str, Any]:
    backend = ctx.engine.storage.name
    strength, mechanism = unique_guarantee(ctx.engine.storage)
    return {
        "specversion": "1.0",
        "ojs_version": "1.0",
        "implementation": {
            "name": "ojs-trio",
            "version": ojs_trio.__version__,
            "language": "python",
        },
        "conformance_level": CONFORMANCE_LEVEL,
        "conformance_tier": "runtime",
        "protocols": ["http"],
        "backend": backend,
        "capabilities": {
            **CAPABILITIES,
            "unique_jobs": {"strength": strength, "mechanism": mechanism},
        },
        "schema_validation": CAPABILITIES["schema_validation"],
        # ojs-conformance.md 4.2: required from conformance level 4 on.
        "unique_job_strength": _CONFORMANCE_STRENGTH.get(strength, strength),
        "extensions": {
            "official": [
                {"name": "dead-letter", "uri": "urn:ojs:ext:dead-letter", "version": "1.0.0"}
            ],
        },
    }


def register(app: QuartTrio, ctx: ApiContext) -> None:
    engine = ctx.engine

    @app.get("/ojs/manifest")
    async def get_manifest() -> Response:
        return ojs_response(manifest(ctx))

    @app.get("/ojs/v1/health")
    async def health() -> Response:
        base: dict[str, Any] = {"version": "1.0", "server_time": format_ts(engine.clock())}
        try:
            info = await engine.health()
        except OjsError as exc:
            status = 503 if isinstance(exc, BackendUnavailable) else 500
            return ojs_response(
                {
                    **base,
                    "status": "degraded",
                    "backend": {
                        "type": engine.storage.name,
                        "status": "disconnected",
                        "error": exc.message,
                    },
                },
                status,
            )
        state = "draining" if engine.draining else "ok"
        return ojs_response({**base, "status": state, **info})

    @app.get("/ojs/v1/events")
    async def list_events() -> Response:
        events = engine.events.query(
            types=query_list("types"),
            queues=query_list("queues"),
            limit=query_int("limit", 100, minimum=1, maximum=10_000),
        )
        return ojs_response({"events": events})

    @app.post("/ojs/v1/admin/reset")
    async def admin_reset() -> Response:
        # Test-only: refuse unless explicitly enabled, as if the route did not exist.
        if not ctx.settings.enable_reset:
            raise NotFound("No such route: POST /ojs/v1/admin/reset")
        await engine.reset()
        return ojs_response({"reset": True})

    @app.get("/ojs/v1/admin/workers")
    async def list_workers() -> Response:
        return ojs_response(
            {
                "workers": [
                    {
                        "id": w.worker_id,
                        "directive": w.directive,
                        "last_seen": format_ts(w.last_seen),
                        "active_jobs": w.active_jobs,
                    }
                    for w in engine.workers()
                ]
            }
        )

    @app.post("/ojs/v1/admin/workers/<worker_id>/<directive>")
    async def set_directive(worker_id: str, directive: str) -> Response:
        if directive == "resume":
            directive = "running"
        info = engine.set_worker_directive(worker_id, directive)
        return ojs_response({"worker": {"id": info.worker_id, "directive": info.directive}})
