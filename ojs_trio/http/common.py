"""Request parsing and response building shared by every route module."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from quart import Response, request

from ojs_trio.config import Settings
from ojs_trio.engine.engine import Engine
from ojs_trio.engine.errors import InvalidPayload, InvalidRequest, UnsupportedMediaType

CONTENT_TYPE = "application/openjobspec+json"
ACCEPTED_TYPES = frozenset({CONTENT_TYPE, "application/json"})
OJS_VERSION = "1.0"


@dataclass
class ApiContext:
    engine: Engine
    settings: Settings


def ojs_response(
    payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Response(body, status=status, content_type=CONTENT_TYPE, headers=headers)


async def json_body() -> Any:
    """The request body as JSON, or an OJS error (415 wrong type, 400 bad JSON)."""
    content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type and content_type not in ACCEPTED_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not supported",
            details={"accepted": sorted(ACCEPTED_TYPES)},
        )
    raw = await request.get_data(as_text=False)
    if not raw:
        raise InvalidPayload("The request body is empty; a JSON object is required")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"The request body is not valid JSON: {exc}") from None


async def json_object() -> dict[str, Any]:
    body = await json_body()
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return body


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
