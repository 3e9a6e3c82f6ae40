"""Request parsing and response building shared by every route module."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from quart import Response, request
from quart_trio import QuartTrio

from ojs_trio import jsoncodec
from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine
from ojs_trio.engine.errors import (
    InvalidPayload,
    InvalidRequest,
    OjsError,
    Unauthenticated,
    UnsupportedMediaType,
)

CONTENT_TYPE = "application/openjobspec+json"
ACCEPTED_TYPES = (CONTENT_TYPE, "application/json")  # preferred first
OJS_VERSION = "1.0"


@dataclass
class ApiContext:
    engine: Engine
    settings: Settings


class Reply(NamedTuple):
    """What a route answers, independent of the web framework that sends it."""

    status: int
    payload: dict[str, Any]
    headers: dict[str, str] | None = None


# A hot route's logic: parsed JSON body in, reply out.  Both the Quart route and the
# raw-ASGI fast path (fastpath.py) call the same function.
Handler = Callable[[ApiContext, Any], Awaitable[Reply]]


def encode_json(payload: dict[str, Any]) -> bytes:
    return jsoncodec.dumps(payload)


def ojs_response(
    payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(encode_json(payload), status=status, content_type=CONTENT_TYPE, headers=headers)


def reply_response(reply: Reply) -> Response:
    return ojs_response(reply.payload, reply.status, reply.headers)


def error_reply(exc: OjsError, request_id: str | None) -> Reply:
    """The OJS error body for ``exc``, with the headers its status calls for."""
    headers = {}
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="ojs"'
    if exc.http_status in (429, 503):
        headers["Retry-After"] = "1"
    return Reply(exc.http_status, {"error": exc.to_wire(request_id)}, headers)


def api_key_ok(authorization: str, api_key: bytes) -> bool:
    """Whether an ``Authorization`` header value carries the bearer ``api_key``."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key)


def parse_json(content_type: str | None, raw: bytes) -> Any:
    """A request body as JSON, or a 400 OJS error (wrong content type, bad JSON).

    No Content-Type at all is taken as JSON.
    """
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type and media_type not in ACCEPTED_TYPES:
        received = (content_type or "").strip()
        raise UnsupportedMediaType(
            f"Content-Type {received!r} is not supported; send " + " or ".join(ACCEPTED_TYPES),
            details={"content_type": received, "accepted": list(ACCEPTED_TYPES)},
        )
    if not raw:
        raise InvalidPayload("The request body is empty; a JSON object is required")
    try:
        return jsoncodec.loads_request(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"The request body is not valid JSON: {exc}") from None


def as_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return body


async def json_body() -> Any:
    """The current Quart request's body as JSON (see parse_json)."""
    content_type = request.headers.get("Content-Type")
    # The limit_body hook has read (and cached) the body already.
    return parse_json(content_type, cast(bytes, await request.get_data(as_text=False)))


async def json_object() -> dict[str, Any]:
    return as_object(await json_body())


def register_hot_routes(app: QuartTrio, ctx: ApiContext, routes: dict[str, Handler]) -> None:
    """Register each ``POST path -> handler`` as a Quart route (fastpath.py serves the
    same table without Quart)."""
    for path, handler in routes.items():

        def make_view(handler: Handler) -> Callable[[], Awaitable[Response]]:
            async def view() -> Response:
                return reply_response(await handler(ctx, await json_body()))

            return view

        app.add_url_rule(path, handler.__name__, make_view(handler), methods=["POST"])


def require_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{name}' is required and must be a string", details={"field": name})
    return value


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", details={"field": name})
    return value


def optional_int(
    body: dict[str, Any], name: str, *, minimum: int = 0, maximum: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(
            f"'{name}' must be an integer >= {minimum}", details={"field": name, "value": value}
        )
    if maximum is not None and value > maximum:
        raise InvalidRequest(
            f"'{name}' must be at most {maximum}", details={"field": name, "value": value}
        )
    return value


def query_int(name: str, default: int, *, minimum: int = 0, maximum: int = 1000) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter '{name}' must be an integer") from None
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"query parameter '{name}' must be in [{minimum}, {maximum}]")
    return value


def query_list(name: str) -> list[str] | None:
    values = [v for raw in request.args.getlist(name) for v in raw.split(",") if v]
    return values or None
