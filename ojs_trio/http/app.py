"""The Quart-Trio application factory.

The app holds a handle on an engine that runs in the caller's nurseries; it
never starts engine tasks in ``app.nursery``.  Cross-cutting concerns live in
hooks here: auth, body limits, the OJS headers on every response, and mapping
every error (ours, routing's, or an unexpected crash) to the OJS error body.

``serve`` puts the raw-ASGI fast path (fastpath.py) in front of this app: it
serves the hot routes itself and repeats what these hooks do for them, so a
change to a hook here must be mirrored there (tests/test_http_fastpath.py
compares the two byte for byte).
"""

from __future__ import annotations

import logging

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine
from ojs_trio.engine.errors import (
    BackendError,
    MethodNotAllowed,
    NotFound,
    OjsError,
    PayloadTooLarge,
    Unauthenticated,
)
from ojs_trio.engine.ids import uuid7
from ojs_trio.http import cron, jobs, queues, streams, system, workers, workflows
from ojs_trio.http.common import (
    OJS_VERSION,
    ApiContext,
    api_key_ok,
    error_reply,
    reply_response,
)

log = logging.getLogger("ojs_trio.http")

UNAUTHENTICATED_PATHS = frozenset({"/ojs/v1/health"})


def create_app(engine: Engine, settings: Settings | None = None) -> QuartTrio:
    settings = settings or Settings()
    app = QuartTrio("ojs_trio")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    ctx = ApiContext(engine, settings)
    app.extensions["ojs"] = ctx
    api_key = settings.api_key.encode() if settings.api_key else None

    def error_response(exc: OjsError) -> Response:
        return reply_response(error_reply(exc, getattr(g, "request_id", None)))

    @app.before_request
    async def authenticate() -> Response | None:
        g.request_id = request.headers.get("X-Request-Id") or f"req_{uuid7()}"
        if api_key is None or request.path in UNAUTHENTICATED_PATHS:
            return None
        if not api_key_ok(request.headers.get("Authorization", ""), api_key):
            return error_response(Unauthenticated("Missing or invalid API key"))
        # The body limit must hold before we read anything (Content-Length known).
        return None

    @app.before_request
    async def limit_body() -> Response | None:
        length = request.content_length
        if length is not None and length > settings.max_body_bytes:
            return error_response(
                PayloadTooLarge(
                    f"Request body of {length} bytes exceeds the limit of "
                    f"{settings.max_body_bytes} bytes",
                    details={"limit_bytes": settings.max_body_bytes},
                )
            )
        # Read the body now (Quart caches it for the handler): a route that ignores
        # its body must not leave bytes on a keep-alive connection, or the next
        # request on it stalls.
        if request.method in ("POST", "PUT", "PATCH") and (
            length or "chunked" in (request.headers.get("Transfer-Encoding") or "")
        ):
            await request.get_data()
        return None

    @app.after_request
    async def ojs_headers(response: Response) -> Response:
        response.headers["OJS-Version"] = OJS_VERSION
        response.headers["X-Request-Id"] = getattr(g, "request_id", "")
        return response

    @app.errorhandler(OjsError)
    async def on_ojs_error(exc: OjsError) -> Response:
        if isinstance(exc, BackendError):
            log.warning("backend error on %s %s: %s", request.method, request.path, exc.message)
        return error_response(exc)

    @app.errorhandler(RequestEntityTooLarge)
    async def on_too_large(exc: RequestEntityTooLarge) -> Response:
        return error_response(
            PayloadTooLarge(
                f"Request body exceeds the limit of {settings.max_body_bytes} bytes",
                details={"limit_bytes": settings.max_body_bytes},
            )
        )

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        if exc.code == 405:
            return error_response(MethodNotAllowed(f"{request.method} is not allowed here"))
        if exc.code == 404:
            return error_response(NotFound(f"No such route: {request.method} {request.path}"))
        error = OjsError(exc.description or "HTTP error")
        response = error_response(error)
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    async def on_crash(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(BackendError("Internal server error; see the server log"))

    for module in (system, jobs, workers, queues, workflows, cron, streams):
        module.register(app, ctx)
    return app
