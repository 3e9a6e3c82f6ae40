"""The OJS error catalog and the exceptions that carry it.

Every failure the engine reports to a caller is an :class:`OjsError`.  The HTTP
layer turns one into the OJS error body without knowing any specifics, and
adapters map their driver errors into :class:`BackendError` /
:class:`BackendUnavailable` at their boundary.

Wire codes follow the HTTP binding and the conformance suites (lowercase:
``invalid_request``, ``not_found``, ``conflict``, ``duplicate``, ...); the
error catalog's SCREAMING_SNAKE_CASE name rides along as ``catalog_code``.
"""

from __future__ import annotations

from typing import Any, ClassVar

DOCS_BASE = "https://openjobspec.org/errors/"


class OjsError(Exception):
    """Base class: a structured, client-visible OJS error."""

    code: ClassVar[str] = "internal_error"
    catalog_code: ClassVar[str] = "BACKEND_ERROR"
    category: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    hint: ClassVar[str] = "This is a server-side problem; retry later or check the server logs."

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_wire(self, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.code,
            "type": self.category,
            "catalog_code": self.catalog_code,
            "message": self.message,
            "retryable": self.retryable,
            "hint": self.hint,
            "docs_url": DOCS_BASE + self.catalog_code,
        }
        if self.details:
            body["details"] = self.details
        if request_id is not None:
            body["request_id"] = request_id
        return body


class InvalidRequest(OjsError):
    """The request is structurally invalid (bad field, wrong type, bad pattern)."""

    code = "invalid_request"
    catalog_code = "INVALID_PAYLOAD"
    category = "validation_error"
    http_status = 400
    hint = "Fix the request as described in 'details' and send it again."


class InvalidPayload(InvalidRequest):
    """The body is not parseable JSON, or not a JSON object."""

    code = "invalid_payload"


class InvalidRetryPolicy(OjsError):
    """The retry policy is well-formed JSON but semantically invalid."""

    code = "invalid_retry_policy"
    catalog_code = "INVALID_RETRY_POLICY"
    category = "validation_error"
    http_status = 422
    hint = "See ojs-retry.md section 11 for the retry policy validation rules."


class InvalidCronExpression(InvalidRequest):
    code = "invalid_cron_expression"
    catalog_code = "INVALID_CRON_EXPRESSION"
    hint = "Use a 5-field cron expression or a shorthand such as @daily."


class UnsupportedMediaType(InvalidRequest):
    """The request body has a Content-Type the binding does not accept.

    ojs-http-binding.md 4.1 makes this a 400 Bad Request (not HTTP's 415), so it is
    an ``invalid_request`` like any other malformed request.
    """

    hint = "Send 'Content-Type: application/openjobspec+json' or 'application/json'."


class PayloadTooLarge(OjsError):
    code = "payload_too_large"
    catalog_code = "PAYLOAD_TOO_LARGE"
    category = "validation_error"
    http_status = 413
    hint = "Keep request bodies under the server's limit; store large payloads externally."


class NotFound(OjsError):
    code = "not_found"
    catalog_code = "NOT_FOUND"
    category = "not_found_error"
    http_status = 404
    hint = "Check the identifier; finished jobs may have been pruned by retention."


class Conflict(OjsError):
    """The operation is not allowed in the resource's current state."""

    code = "conflict"
    catalog_code = "INVALID_STATE_TRANSITION"
    category = "conflict_error"
    http_status = 409
    hint = "Fetch the resource to see its current state before retrying."


class InvalidStateTransition(Conflict):
    def __init__(self, job_id: str, current: str, action: str, target: str | None) -> None:
        attempted = f"{current} -> {target}" if target else f"{action} from {current}"
        super().__init__(
            f"Cannot {action} job {job_id}: it is in state '{current}' ({attempted} is not "
            "a legal transition).",
            details={
                "job_id": job_id,
                "current_state": current,
                "attempted_transition": attempted,
                "action": action,
            },
        )
        self.current = current
        self.target = target


class DuplicateJob(Conflict):
    code = "duplicate"
    catalog_code = "DUPLICATE_JOB"
    hint = "A job with this id or unique key already exists; see details.existing_job_id."


class QueuePaused(OjsError):
    code = "queue_paused"
    catalog_code = "QUEUE_PAUSED"
    category = "resource_error"
    http_status = 422
    retryable = True


class Unauthenticated(OjsError):
    code = "unauthenticated"
    catalog_code = "UNAUTHENTICATED"
    category = "authentication_error"
    http_status = 401
    hint = "Send 'Authorization: Bearer <key>' with the server's API key."


class MethodNotAllowed(OjsError):
    code = "method_not_allowed"
    catalog_code = "INVALID_PAYLOAD"
    category = "validation_error"
    http_status = 405
    hint = "See openapi.yaml for the methods each route accepts."


class BackendError(OjsError):
    code = "backend_error"
    catalog_code = "BACKEND_ERROR"
    category = "backend_error"
    http_status = 500
    retryable = True


class BackendUnavailable(BackendError):
    code = "backend_unavailable"
    catalog_code = "BACKEND_UNAVAILABLE"
    http_status = 503
    hint = "The storage backend is unreachable; the server reconnects by itself. Retry later."


class ShuttingDown(BackendUnavailable):
    code = "shutting_down"
    hint = "The server is draining for shutdown; retry against another instance."
