"""Bulk enqueue (POST /ojs/v1/jobs/batch): per-item errors for every batch size.

A batch that holds an invalid envelope is refused as a whole with one error
listing each invalid item by index, a batch of one included; a single
``POST /ojs/v1/jobs`` keeps answering with the envelope's own error.
"""

from __future__ import annotations

from typing import Any

import pytest
from http_fixtures import http_server

from ojs_trio.engine.engine import EngineConfig, open_engine
from ojs_trio.engine.errors import InvalidRequest, OjsError
from ojs_trio.storage.memory import MemoryStorage

INVALID = [
    pytest.param({"type": "bulk.item"}, "invalid_request", "args", id="args-missing"),
    pytest.param(
        {"type": "bulk.item", "args": [], "options": {"retry": {"max_attempts": -1}}},
        "invalid_retry_policy",
        "max_attempts",
        id="bad-retry-policy",
    ),
]


@pytest.mark.parametrize(("body", "code", "field"), INVALID)
async def test_one_item_batch_reports_the_item_error_by_index(
    body: dict[str, Any], code: str, field: str
) -> None:
    async with http_server() as (engine, client):
        response = await client.post("/ojs/v1/jobs/batch", json={"jobs": [body]})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        (item,) = error["details"]["errors"]
        assert (item["index"], item["code"], item["details"]["field"]) == (0, code, field)
        assert engine.statistics().enqueued == 0


@pytest.mark.parametrize(("body", "code", "field"), INVALID)
async def test_one_item_batch_reports_like_a_larger_batch(
    body: dict[str, Any], code: str, field: str
) -> None:
    valid = {"type": "bulk.item", "args": []}
    async with http_server() as (_, client):
        alone = await client.post("/ojs/v1/jobs/batch", json={"jobs": [body]})
        among = await client.post("/ojs/v1/jobs/batch", json={"jobs": [valid, body]})
        assert (alone.status_code, among.status_code) == (400, 400)
        (item_alone,) = alone.json()["error"]["details"]["errors"]
        (item_among,) = among.json()["error"]["details"]["errors"]
        assert item_among.pop("index") == 1
        assert item_alone.pop("index") == 0
        assert item_alone == item_among


@pytest.mark.parametrize(("body", "code", "field"), INVALID)
async def test_single_enqueue_still_answers_with_the_envelope_error(
    body: dict[str, Any], code: str, field: str
) -> None:
    async with http_server() as (engine, client):
        response = await client.post("/ojs/v1/jobs", json=body)
        status = {"invalid_request": 400, "invalid_retry_policy": 422}[code]
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert (error["code"], error["details"]["field"]) == (code, field)
        assert "errors" not in error["details"]
        assert engine.statistics().enqueued == 0


@pytest.mark.parametrize(("body", "code", "field"), INVALID)
async def test_engine_submit_and_submit_many_of_one_invalid_envelope(
    body: dict[str, Any], code: str, field: str
) -> None:
    async with open_engine(MemoryStorage(), EngineConfig()) as engine:
        with pytest.raises(InvalidRequest) as batch:
            await engine.submit_many([body])
        (item,) = batch.value.details["errors"]
        assert (item["index"], item["code"]) == (0, code)
        with pytest.raises(OjsError) as single:
            await engine.submit(body)
        assert (single.value.code, single.value.details["field"]) == (code, field)
