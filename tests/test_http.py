"""The OJS HTTP API over a real Hypercorn server started in-process on port 0.

Every bad request must come back as the OJS error body with the right status,
never a 500, and must leave the server serving.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
from http_fixtures import http_server

import ojs_trio
from ojs_trio.config import Settings
from ojs_trio.http import create_app
from ojs_trio.storage.memory import MemoryStorage

OJS_JSON = "application/openjobspec+json"
MISSING = "01890000-0000-7000-8000-000000000000"  # a well-formed id no job has


def assert_ojs_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(OJS_JSON)
    assert response.headers["OJS-Version"] == "1.0"
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == response.headers["X-Request-Id"]
    return error


async def enqueue(client: httpx.AsyncClient, job_type: str = "email.send", **body: Any) -> str:
    response = await client.post("/ojs/v1/jobs", json={"type": job_type, "args": [], **body})
    assert response.status_code == 201, response.text
    return str(response.json()["job"]["id"])


# -- the happy path ----------------------------------------------------------------------


async def test_cron_toggle_route() -> None:
    """PATCH /ojs/v1/cron/{name} (ojs-cron 8.5): disabled has next_run_at null."""
    async with http_server() as (_engine, client):
        body = {
            "name": "nightly",
            "expression": "0 3 * * *",
            "job_template": {"type": "report.build", "args": [], "options": {"queue": "cron"}},
        }
        response = await client.post("/ojs/v1/cron", json=body)
        assert response.status_code == 201, response.text
        assert response.json()["cron"]["next_run_at"] is not None

        response = await client.patch("/ojs/v1/cron/nightly", json={"enabled": False})
        assert response.status_code == 200, response.text
        cron = response.json()["cron"]
        assert (cron["name"], cron["enabled"], cron["next_run_at"]) == ("nightly", False, None)
        cron = (await client.get("/ojs/v1/cron/nightly")).json()["cron"]
        assert (cron["enabled"], cron["next_run_at"]) == (False, None)

        response = await client.patch("/ojs/v1/cron/nightly", json={"enabled": True})
        assert response.status_code == 200, response.text
        assert response.json()["cron"]["next_run_at"] is not None

        for bad in ({}, {"enabled": "yes"}, [True]):
            response = await client.patch("/ojs/v1/cron/nightly", json=bad)
            assert response.status_code == 400, (bad, response.text)
            assert response.json()["error"]["code"] == "invalid_request"
        response = await client.patch("/ojs/v1/cron/missing", json={"enabled": False})
        assert response.status_code == 404, response.text


async def test_quick_start() -> None:
    async with http_server() as (engine, client):
        response = await client.post(
            "/ojs/v1/jobs",
            json={"type": "email.send", "args": ["ada@example.com"], "options": {"queue": "mail"}},
            headers={"Content-Type": OJS_JSON, "X-Request-Id": "req-quick-start"},
        )
        assert response.status_code == 201, response.text
        assert response.headers["OJS-Version"] == "1.0"
        assert response.headers["X-Request-Id"] == "req-quick-start"
        assert response.headers["content-type"].startswith(OJS_JSON)
        job = response.json()["job"]
        assert response.headers["Location"] == f"/ojs/v1/jobs/{job['id']}"
        assert job["state"] == "available"
        assert job["queue"] == "mail"
        assert job["args"] == ["ada@example.com"]

        response = await client.post(
            "/ojs/v1/workers/fetch", json={"queues": ["mail"], "worker_id": "w1"}
        )
        assert response.status_code == 200, response.text
        (fetched,) = response.json()["jobs"]
        assert fetched["id"] == job["id"]
        assert fetched["state"] == "active"
        assert fetched["attempt"] == 1

        response = await client.post(
            "/ojs/v1/workers/ack",
            json={"job_id": job["id"], "worker_id": "w1", "result": {"delivered": True}},
        )
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "completed"

        response = await client.get(f"/ojs/v1/jobs/{job['id']}")
        assert response.status_code == 200
        stored = response.json()["job"]
        assert stored["state"] == "completed"
        assert stored["result"] == {"delivered": True}
        assert engine.statistics().acked == 1

        assert (await client.get("/ojs/v1/health")).json()["status"] == "ok"
        manifest = (await client.get("/ojs/manifest")).json()
        assert manifest["specversion"] == "1.0"


async def test_nack_cancel_and_dead_letter_roundtrip() -> None:
    async with http_server() as (_, client):
        retry = {"max_attempts": 1, "on_exhaustion": "dead_letter"}
        job_id = await enqueue(client, "report.build", options={"retry": retry})
        await client.post("/ojs/v1/workers/fetch", json={"queues": ["default"]})
        response = await client.post(
            "/ojs/v1/workers/nack",
            json={"job_id": job_id, "error": {"code": "boom", "message": "it broke"}},
        )
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "discarded"

        listed = (await client.get("/ojs/v1/dead-letter")).json()
        assert [j["id"] for j in listed["jobs"]] == [job_id]
        response = await client.post(f"/ojs/v1/dead-letter/{job_id}/retry")
        assert response.status_code == 200
        assert response.json()["job"]["state"] == "available"

        response = await client.delete(f"/ojs/v1/jobs/{job_id}")
        assert response.status_code == 200
        assert response.json()["job"]["state"] == "cancelled"
        # Cancelling a cancelled job is a conflict, not a crash.
        assert_ojs_error(await client.delete(f"/ojs/v1/jobs/{job_id}"), 409, "conflict")


async def test_ack_of_a_job_that_is_not_active_is_a_conflict() -> None:
    async with http_server() as (_, client):
        job_id = await enqueue(client)
        response = await client.post("/ojs/v1/workers/ack", json={"job_id": job_id})
        assert_ojs_error(response, 409, "conflict")


async def test_long_poll_fetch_returns_when_a_job_is_enqueued() -> None:
    async with http_server() as (engine, client):
        result: list[httpx.Response] = []

        async def long_poll() -> None:
            result.append(
                await client.post(
                    "/ojs/v1/workers/fetch", json={"queues": ["default"], "wait_ms": 20_000}
                )
            )

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                while True:  # until the fetch is parked in the engine
                    if engine.statistics().waiting_fetches == 1:
                        break
                    await trio.sleep(0.005)
                job_id = await enqueue(client)
        (response,) = result
        assert response.status_code == 200
        assert [j["id"] for j in response.json()["jobs"]] == [job_id]


async def test_draining_server_answers_and_refuses_cleanly() -> None:
    async with http_server() as (engine, client):
        engine.begin_shutdown()
        health = await client.get("/ojs/v1/health")
        assert health.status_code == 200
        assert health.json()["status"] == "draining"
        response = await client.post(
            "/ojs/v1/workers/fetch", json={"queues": ["default"], "wait_ms": 20_000}
        )
        assert response.status_code == 200
        assert response.json()["jobs"] == []  # at once, not after 20 s
        response = await client.post("/ojs/v1/jobs", json={"type": "a.b", "args": []})
        assert_ojs_error(response, 503, "shutting_down")
        assert response.headers["Retry-After"] == "1"


# -- the manifest --------------------------------------------------------------------------


async def test_manifest_declares_level_4_and_strong_unique_jobs() -> None:
    async with http_server() as (_, client):
        response = await client.get("/ojs/manifest")
        assert response.status_code == 200
        manifest = response.json()
    # What the level-0 manifest case checks, and the required fields of
    # ojs-conformance.md 4.2.
    assert manifest["specversion"] == "1.0"
    assert manifest["implementation"] == {
        "name": "ojs-trio",
        "version": ojs_trio.__version__,
        "language": "python",
    }
    assert (manifest["conformance_level"], manifest["conformance_tier"]) == (4, "runtime")
    assert manifest["protocols"] == ["http"]
    assert manifest["backend"] == "memory"
    # ojs-conformance.md 4.2: required once conformance_level >= 4.
    assert manifest["unique_job_strength"] == "strong"
    # ojs-unique-jobs.md 8.3: strength and mechanism under capabilities.
    assert manifest["capabilities"]["unique_jobs"] == {
        "strength": "strong",
        "mechanism": MemoryStorage.unique_guarantee[1],
    }
    assert manifest["schema_validation"] is manifest["capabilities"]["schema_validation"] is False
    assert manifest["extensions"] == {
        "official": [{"name": "dead-letter", "uri": "urn:ojs:ext:dead-letter", "version": "1.0.0"}]
    }


# -- bad input: the OJS error body, never a 500 -------------------------------------------


@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    code: str
    json_body: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": dict(self.headers)}
        if self.content is not None:
            kwargs["content"] = self.content
            kwargs["headers"].setdefault("Content-Type", "application/json")
        elif self.json_body is not None:
            kwargs["json"] = self.json_body
        return kwargs


def post(name: str, path: str, body: Any, status: int = 400, code: str = "invalid_request") -> Case:
    return Case(name, "POST", path, status, code, json_body=body)


BAD_INPUT = [
    # unparseable bodies
    Case("malformed-json", "POST", "/ojs/v1/jobs", 400, "invalid_payload", content=b'{"type": '),
    Case("empty-body", "POST", "/ojs/v1/jobs", 400, "invalid_payload", content=b""),
    Case("not-utf8", "POST", "/ojs/v1/jobs", 400, "invalid_payload", content=b"\xff\xfe{}"),
    Case(
        "malformed-json-fetch",
        "POST",
        "/ojs/v1/workers/fetch",
        400,
        "invalid_payload",
        content=b"{queues: [default]}",
    ),
    Case(
        "nan-in-args",
        "POST",
        "/ojs/v1/jobs",
        400,
        "invalid_request",
        content=b'{"type": "a.b", "args": [NaN]}',
    ),
    # bodies that are JSON but not an object
    post("enqueue-array-body", "/ojs/v1/jobs", ["email.send"]),
    post("enqueue-string-body", "/ojs/v1/jobs", "email.send"),
    post("fetch-array-body", "/ojs/v1/workers/fetch", ["default"]),
    post("ack-number-body", "/ojs/v1/workers/ack", 42),
    post("nack-null-body", "/ojs/v1/workers/nack", [None]),
    post("heartbeat-array-body", "/ojs/v1/workers/heartbeat", []),
    # wrong field types
    post("enqueue-type-not-string", "/ojs/v1/jobs", {"type": 5, "args": []}),
    post("enqueue-args-not-array", "/ojs/v1/jobs", {"type": "a.b", "args": {"x": 1}}),
    post("enqueue-args-missing", "/ojs/v1/jobs", {"type": "a.b"}),
    post("enqueue-bad-type-pattern", "/ojs/v1/jobs", {"type": "Email Send", "args": []}),
    post("enqueue-options-not-object", "/ojs/v1/jobs", {"type": "a.b", "args": [], "options": []}),
    post(
        "enqueue-bad-priority",
        "/ojs/v1/jobs",
        {"type": "a.b", "args": [], "options": {"priority": "urgent"}},
    ),
    post(
        "enqueue-bad-queue",
        "/ojs/v1/jobs",
        {"type": "a.b", "args": [], "options": {"queue": "Not A Queue"}},
    ),
    post("enqueue-bad-id", "/ojs/v1/jobs", {"id": "not-a-uuid", "type": "a.b", "args": []}),
    post(
        "enqueue-bad-retry",
        "/ojs/v1/jobs",
        {"type": "a.b", "args": [], "options": {"retry": {"max_attempts": -1}}},
        422,
        "invalid_retry_policy",
    ),
    post("fetch-queues-not-array", "/ojs/v1/workers/fetch", {"queues": "default"}),
    post("fetch-queues-empty", "/ojs/v1/workers/fetch", {"queues": []}),
    post("fetch-queue-names-not-strings", "/ojs/v1/workers/fetch", {"queues": [1, 2]}),
    post("fetch-queues-missing", "/ojs/v1/workers/fetch", {"worker_id": "w1"}),
    post("fetch-count-string", "/ojs/v1/workers/fetch", {"queues": ["default"], "count": "3"}),
    post("fetch-count-zero", "/ojs/v1/workers/fetch", {"queues": ["default"], "count": 0}),
    post("fetch-wait-negative", "/ojs/v1/workers/fetch", {"queues": ["default"], "wait_ms": -1}),
    post("fetch-wait-bool", "/ojs/v1/workers/fetch", {"queues": ["default"], "wait_ms": True}),
    post("fetch-worker-id-number", "/ojs/v1/workers/fetch", {"queues": ["a"], "worker_id": 7}),
    post("ack-job-id-not-string", "/ojs/v1/workers/ack", {"job_id": 123}),
    post("ack-job-id-missing", "/ojs/v1/workers/ack", {"result": 1}),
    post("nack-error-not-object", "/ojs/v1/workers/nack", {"job_id": MISSING, "error": "boom"}),
    post(
        "nack-error-code-not-string",
        "/ojs/v1/workers/nack",
        {"job_id": MISSING, "error": {"code": 5}},
    ),
    post("nack-requeue-not-bool", "/ojs/v1/workers/nack", {"job_id": MISSING, "requeue": "y"}),
    post(
        "heartbeat-active-jobs-not-array",
        "/ojs/v1/workers/heartbeat",
        {"worker_id": "w1", "active_jobs": "job"},
    ),
    post(
        "heartbeat-active-jobs-not-strings",
        "/ojs/v1/workers/heartbeat",
        {"worker_id": "w1", "active_jobs": [1]},
    ),
    post("heartbeat-worker-id-missing", "/ojs/v1/workers/heartbeat", {"active_jobs": []}),
    post("unknown-worker-directive", "/ojs/v1/admin/workers/w1/explode", {}),
    Case("queues-limit-not-int", "GET", "/ojs/v1/queues?limit=abc", 400, "invalid_request"),
    Case("dead-letter-limit-zero", "GET", "/ojs/v1/dead-letter?limit=0", 400, "invalid_request"),
    Case("events-limit-negative", "GET", "/ojs/v1/events?limit=-1", 400, "invalid_request"),
    # unknown job ids
    Case("get-unknown-job", "GET", f"/ojs/v1/jobs/{MISSING}", 404, "not_found"),
    Case("get-garbage-job-id", "GET", "/ojs/v1/jobs/not-a-job", 404, "not_found"),
    Case("cancel-unknown-job", "DELETE", f"/ojs/v1/jobs/{MISSING}", 404, "not_found"),
    post("ack-unknown-job", "/ojs/v1/workers/ack", {"job_id": MISSING}, 404, "not_found"),
    post("nack-unknown-job", "/ojs/v1/workers/nack", {"job_id": MISSING}, 404, "not_found"),
    Case("retry-unknown-dead", "POST", f"/ojs/v1/dead-letter/{MISSING}/retry", 404, "not_found"),
    Case("delete-unknown-dead", "DELETE", f"/ojs/v1/dead-letter/{MISSING}", 404, "not_found"),
    # media type, routing, methods
    Case(
        "text-plain",
        "POST",
        "/ojs/v1/jobs",
        400,
        "invalid_request",
        content=b'{"type": "a.b", "args": []}',
        headers={"Content-Type": "text/plain"},
    ),
    Case(
        "form-encoded-fetch",
        "POST",
        "/ojs/v1/workers/fetch",
        400,
        "invalid_request",
        content=b"queues=default",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Case(
        "xml-cron",  # a route served by Quart, not the fast path
        "POST",
        "/ojs/v1/cron",
        400,
        "invalid_request",
        content=b"<cron/>",
        headers={"Content-Type": "application/xml"},
    ),
    Case("unknown-route", "GET", "/ojs/v1/nope", 404, "not_found"),
    Case("unknown-root-route", "GET", "/favicon.ico", 404, "not_found"),
    Case("no-static-files", "GET", "/static/app.css", 404, "not_found"),
    Case("unknown-post-route", "POST", "/ojs/v1/jobs/x/y/z", 404, "not_found", json_body={}),
    Case("put-on-jobs", "PUT", "/ojs/v1/jobs", 405, "method_not_allowed", json_body={}),
    Case("get-on-fetch", "GET", "/ojs/v1/workers/fetch", 405, "method_not_allowed"),
    Case("patch-on-job", "PATCH", f"/ojs/v1/jobs/{MISSING}", 405, "method_not_allowed"),
    Case("delete-on-health", "DELETE", "/ojs/v1/health", 405, "method_not_allowed"),
    Case("admin-reset-disabled", "POST", "/ojs/v1/admin/reset", 404, "not_found"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda case: case.name)
async def test_bad_input_gets_an_ojs_error(case: Case) -> None:
    async with http_server() as (_, client):
        response = await client.request(case.method, case.path, **case.request_kwargs())
        assert response.status_code != 500
        assert_ojs_error(response, case.status, case.code)
        await enqueue(client)  # and the server carries on


async def test_server_survives_every_bad_input_on_one_connection() -> None:
    async with http_server() as (engine, client):
        for case in BAD_INPUT:
            response = await client.request(case.method, case.path, **case.request_kwargs())
            assert response.status_code == case.status, (case.name, response.text)
        job_id = await enqueue(client)
        response = await client.post("/ojs/v1/workers/fetch", json={"queues": ["default"]})
        assert [j["id"] for j in response.json()["jobs"]] == [job_id]
        stats = engine.statistics()
        assert stats.enqueued == 1
        # Bad input never reached an actor in a way that crashed it.
        names = {actor["name"] for actor in stats.actors}
        assert {"promoter", "reaper", "heartbeater", "cron", "fetcher:default"} <= names
        crashed = [a for a in stats.actors if a["restarts"] != 0 or a["last_error"] is not None]
        assert crashed == []


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/ojs/v1/jobs", "text/plain; charset=utf-8"),  # served by the fast path
        ("/ojs/v1/workflows", "application/x-www-form-urlencoded"),  # served by Quart
    ],
)
async def test_unsupported_content_type_is_a_400_naming_received_and_accepted_types(
    path: str, content_type: str
) -> None:
    """ojs-http-binding.md 4.1: an unsupported request Content-Type gets 400, not 415."""
    async with http_server() as (engine, client):
        response = await client.post(
            path, content=b'{"type": "a.b", "args": []}', headers={"Content-Type": content_type}
        )
        error = assert_ojs_error(response, 400, "invalid_request")
        assert content_type in error["message"]
        assert OJS_JSON in error["message"] and "application/json" in error["message"]
        assert error["details"] == {
            "content_type": content_type,
            "accepted": [OJS_JSON, "application/json"],
        }
        assert engine.statistics().enqueued == 0


JOB_TEMPLATE: dict[str, Any] = {
    "type": "fuzz.job",
    "args": [1, "two", {"three": [3]}],
    "meta": {"trace": "abc"},
    "options": {
        "queue": "fuzz",
        "priority": 5,
        "timeout_ms": 1_000,
        "delay_until": "+PT1S",
        "tags": ["a"],
        "retry": {"max_attempts": 2, "initial_interval": "PT1S", "jitter": False},
    },
}
FUZZ_TARGETS: list[tuple[str, dict[str, Any]]] = [
    ("/ojs/v1/jobs", JOB_TEMPLATE),
    ("/ojs/v1/jobs/batch", {"jobs": [JOB_TEMPLATE, {"type": "fuzz.other", "args": []}]}),
    ("/ojs/v1/workers/fetch", {"queues": ["fuzz"], "count": 2, "worker_id": "w"}),
    ("/ojs/v1/workers/ack", {"job_id": MISSING, "worker_id": "w", "result": {"ok": True}}),
    (
        "/ojs/v1/workers/nack",
        {"job_id": MISSING, "error": {"code": "x", "message": "m", "details": {}}},
    ),
    (
        "/ojs/v1/workers/heartbeat",
        {"worker_id": "w", "active_jobs": [MISSING], "visibility_timeout_ms": 1_000},
    ),
    ("/ojs/v1/workflows", {"type": "chain", "name": "wf", "steps": [JOB_TEMPLATE]}),
    (
        "/ojs/v1/cron",
        {
            "name": "nightly",
            "expression": "0 3 * * *",
            "timezone": "Europe/Paris",
            "overlap_policy": "skip",
            "job_template": {"type": "fuzz.cron", "args": [], "options": {"queue": "fuzz"}},
        },
    ),
]
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**63,
    -(2**70),
    1e308,
    "",
    "x",
    "Ünïcødé ✓",
    "x" * 300,
    "PT1S",
    "2024-01-01T00:00:00Z",
    MISSING,
    [],
    {},
    [None],
    {"": None},
    [[[[[[[[[[[]]]]]]]]]]],
]


def mutate(value: Any, rng: random.Random) -> Any:
    """One random structural edit somewhere inside ``value``."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.2:
            del out[key]
        elif roll < 0.5:
            out[key] = rng.choice(ODD_VALUES)
        else:
            out[key] = mutate(out[key], rng)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out_list = list(value)
        index = rng.randrange(len(out_list))
        out_list[index] = mutate(out_list[index], rng)
        return out_list
    return rng.choice(ODD_VALUES)


async def test_fuzz_templates_are_accepted_unmutated() -> None:
    """The fuzzer starts from valid bodies, so its mutations probe deep validation."""
    async with http_server() as (_, client):
        for path, template in FUZZ_TARGETS:
            response = await client.post(path, json=template)
            accepted = {200, 201, 404} if MISSING in json.dumps(template) else {200, 201}
            assert response.status_code in accepted, (path, response.text)


async def test_fuzzed_bodies_never_cause_a_500() -> None:
    rng = random.Random(20240229)
    async with http_server() as (_, client):
        statuses: dict[int, int] = {}
        for _ in range(400):
            path, template = rng.choice(FUZZ_TARGETS)
            body = template
            for _ in range(rng.choice((1, 1, 2))):
                body = mutate(body, rng)
            if isinstance(body, dict):
                body.pop("wait_ms", None)  # never park a fuzzed fetch
            response = await client.post(
                path,
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (path, body, response.text)
            assert response.headers["content-type"].startswith(OJS_JSON)
            if response.status_code >= 400:
                assert isinstance(response.json()["error"]["code"], str)
        # The fuzzer reached both accepting and refusing paths.
        assert any(200 <= status < 300 for status in statuses)
        assert any(400 <= status < 500 for status in statuses)
        await enqueue(client)


# -- body size limits ---------------------------------------------------------------------


def padded_job(size: int) -> bytes:
    """A valid enqueue body of exactly ``size`` bytes."""
    skeleton = json.dumps({"type": "bulk.upload", "args": [""]}).encode()
    body = json.dumps({"type": "bulk.upload", "args": ["x" * (size - len(skeleton))]}).encode()
    assert len(body) == size
    return body


async def test_oversized_body_is_413() -> None:
    async with http_server(Settings(port=0, max_body_bytes=1024)) as (engine, client):
        headers = {"Content-Type": "application/json"}
        fits = await client.post("/ojs/v1/jobs", content=padded_job(1024), headers=headers)
        assert fits.status_code == 201, fits.text

        response = await client.post("/ojs/v1/jobs", content=padded_job(1025), headers=headers)
        error = assert_ojs_error(response, 413, "payload_too_large")
        assert error["details"]["limit_bytes"] == 1024

        response = await client.post(
            "/ojs/v1/workers/fetch", content=b'{"queues": ["default"]}' + b" " * 5000
        )
        assert_ojs_error(response, 413, "payload_too_large")

        await enqueue(client)  # the server still serves
        assert engine.statistics().enqueued == 2


async def test_oversized_streamed_body_without_content_length_is_413() -> None:
    async with http_server(Settings(port=0, max_body_bytes=1024)) as (engine, client):

        async def chunks() -> AsyncIterator[bytes]:
            body = padded_job(4096)
            for start in range(0, len(body), 512):
                yield body[start : start + 512]

        request = client.build_request(
            "POST", "/ojs/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert "Content-Length" not in request.headers
        assert request.headers["Transfer-Encoding"] == "chunked"
        response = await client.send(request)
        error = assert_ojs_error(response, 413, "payload_too_large")
        assert error["details"]["limit_bytes"] == 1024

        async def small_chunks() -> AsyncIterator[bytes]:
            yield b'{"type": "bulk.upload",'
            yield b' "args": []}'

        response = await client.post(
            "/ojs/v1/jobs", content=small_chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 201, response.text
        assert engine.statistics().enqueued == 1


# -- authentication -------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/ojs/manifest", None),
    ("POST", "/ojs/v1/jobs", {"type": "a.b", "args": []}),
    ("GET", f"/ojs/v1/jobs/{MISSING}", None),
    ("DELETE", f"/ojs/v1/jobs/{MISSING}", None),
    ("POST", "/ojs/v1/workers/fetch", {"queues": ["default"]}),
    ("POST", "/ojs/v1/workers/ack", {"job_id": MISSING}),
    ("POST", "/ojs/v1/workers/nack", {"job_id": MISSING}),
    ("POST", "/ojs/v1/workers/heartbeat", {"worker_id": "w1"}),
    ("GET", "/ojs/v1/queues", None),
    ("GET", "/ojs/v1/dead-letter", None),
    ("POST", f"/ojs/v1/dead-letter/{MISSING}/retry", None),
    ("DELETE", f"/ojs/v1/dead-letter/{MISSING}", None),
    ("GET", "/ojs/v1/events", None),
    ("GET", "/ojs/v1/admin/workers", None),
    ("POST", "/ojs/v1/admin/workers/w1/quiet", None),
    ("POST", "/ojs/v1/admin/reset", None),
]


async def test_api_key_is_required_everywhere_but_health() -> None:
    async with http_server(Settings(port=0, api_key="k", enable_reset=True)) as (engine, client):
        response = await client.get("/ojs/v1/health")
        assert response.status_code == 200
        assert response.json()["status"] == "ok"

        for method, path, body in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic k"}):
                response = await client.request(method, path, json=body, headers=headers)
                error = assert_ojs_error(response, 401, "unauthenticated")
                assert response.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
                assert error["type"] == "authentication_error"

        assert engine.statistics().enqueued == 0  # nothing got through

        auth = {"Authorization": "Bearer k"}
        for method, path, body in PROTECTED:
            response = await client.request(method, path, json=body, headers=auth)
            assert response.status_code not in (401, 500), (method, path, response.text)
        assert engine.statistics().enqueued == 1


async def test_every_registered_route_requires_the_api_key() -> None:
    """Routes added later are covered too: walk the app's URL map."""
    settings = Settings(port=0, api_key="k", enable_reset=True)
    async with http_server(settings) as (engine, client):
        rules = list(create_app(engine, settings).url_map.iter_rules())
        assert len(rules) >= len(PROTECTED)
        checked = 0
        for rule in rules:
            path = re.sub(r"<[^>]+>", "x", rule.rule)
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                response = await client.request(method, path)
                if path == "/ojs/v1/health":
                    assert response.status_code == 200
                    continue
                assert_ojs_error(response, 401, "unauthenticated")
                checked += 1
        assert checked >= len(PROTECTED)


async def test_auth_is_checked_before_the_body() -> None:
    """An unauthenticated client learns nothing about its payload's validity."""
    settings = Settings(port=0, api_key="k", max_body_bytes=1024)
    async with http_server(settings) as (_, client):
        response = await client.post("/ojs/v1/jobs", content=b"{not json")
        assert_ojs_error(response, 401, "unauthenticated")
        response = await client.post(
            "/ojs/v1/jobs", content=padded_job(4096), headers={"Content-Type": "application/json"}
        )
        assert_ojs_error(response, 401, "unauthenticated")


# -- admin: reset and worker directives ---------------------------------------------------


async def test_reset_is_hidden_unless_enabled() -> None:
    async with http_server() as (engine, client):
        job_id = await enqueue(client)
        assert_ojs_error(await client.post("/ojs/v1/admin/reset"), 404, "not_found")
        assert (await client.get(f"/ojs/v1/jobs/{job_id}")).status_code == 200
        assert engine.statistics().enqueued == 1


async def test_reset_empties_storage_when_enabled() -> None:
    async with http_server(Settings(port=0, enable_reset=True)) as (engine, client):
        job_id = await enqueue(client)
        await enqueue(client, options={"queue": "other"})
        response = await client.post("/ojs/v1/admin/reset")
        assert response.status_code == 200, response.text
        assert response.json() == {"reset": True}
        assert_ojs_error(await client.get(f"/ojs/v1/jobs/{job_id}"), 404, "not_found")
        fetched = await client.post("/ojs/v1/workers/fetch", json={"queues": ["default", "other"]})
        assert fetched.json()["jobs"] == []
        assert engine.events.query() == []
        assert (await client.get("/ojs/v1/dead-letter")).json()["jobs"] == []


async def test_heartbeat_reports_worker_directives() -> None:
    async with http_server() as (_, client):

        async def beat(**body: Any) -> dict[str, Any]:
            response = await client.post(
                "/ojs/v1/workers/heartbeat", json={"worker_id": "w1", **body}
            )
            assert response.status_code == 200, response.text
            return dict(response.json())

        assert (await beat())["state"] == "running"

        job_id = await enqueue(client)
        await client.post(
            "/ojs/v1/workers/fetch",
            json={"queues": ["default"], "worker_id": "w1", "visibility_timeout_ms": 5_000},
        )
        reply = await beat(active_jobs=[job_id, MISSING])
        assert reply["state"] == "running"
        assert reply["jobs_extended"] == [job_id]  # unknown ids are just not extended

        for directive, state in (("quiet", "quiet"), ("terminate", "terminate")):
            response = await client.post(f"/ojs/v1/admin/workers/w1/{directive}")
            assert response.status_code == 200, response.text
            assert response.json()["worker"] == {"id": "w1", "directive": state}
            assert (await beat())["state"] == state

        response = await client.post("/ojs/v1/admin/workers/w1/resume")
        assert response.json()["worker"]["directive"] == "running"
        assert (await beat())["state"] == "running"

        # A directive for one worker does not leak to another.
        await client.post("/ojs/v1/admin/workers/w2/terminate")
        assert (await beat())["state"] == "running"
        workers = (await client.get("/ojs/v1/admin/workers")).json()["workers"]
        assert {w["id"]: w["directive"] for w in workers} == {"w1": "running", "w2": "terminate"}


# -- bind safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_check_bind_allows_loopback_without_a_key(host: str) -> None:
    Settings(host=host).check_bind()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_check_bind_refuses_a_public_host_without_a_key(host: str) -> None:
    with pytest.raises(SystemExit, match="OJS_API_KEY"):
        Settings(host=host).check_bind()
    Settings(host=host, api_key="k").check_bind()
    Settings(host=host, allow_insecure_no_auth=True).check_bind()


def test_settings_from_env() -> None:
    settings = Settings.from_env(
        {
            "OJS_HOST": "0.0.0.0",
            "OJS_PORT": "9999",
            "OJS_API_KEY": "secret",
            "OJS_ENABLE_RESET": "true",
            "OJS_MAX_BODY_BYTES": "2048",
            "OJS_ALLOW_INSECURE_NO_AUTH": "no",
        }
    )
    assert (settings.host, settings.port, settings.api_key) == ("0.0.0.0", 9999, "secret")
    assert settings.enable_reset
    assert not settings.allow_insecure_no_auth
    assert settings.max_body_bytes == 2048
    assert Settings.from_env({"OJS_API_KEY": ""}).api_key is None
    with pytest.raises(SystemExit):
        Settings.from_env({"OJS_HOST": "0.0.0.0"}).check_bind()
