"""The PostgreSQL adapter's JSON codec gives the answers the standard library gives."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest

from ojs_trio.engine.validation import parse_job
from ojs_trio.storage.postgres import jsoncodec


def test_a_job_record_round_trips_like_the_standard_library() -> None:
    job = parse_job(
        {"type": "t.x", "args": [1, "é", None, [2.5, {"k": True}]], "meta": {"m": 2**63}},
        time.time(),
    )
    record = job.to_record()
    assert jsoncodec.loads(jsoncodec.dumps(record)) == json.loads(json.dumps(record))


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 2**53 + 1, 0.1, 1e-7, 1.7e9])
def test_numbers_within_range_are_exact(value: Any) -> None:
    assert jsoncodec.loads(jsoncodec.dumps([value])) == [value]


def test_what_orjson_cannot_encode_is_written_by_the_standard_library() -> None:
    for value in ([2**70], ["\ud800"]):
        assert jsoncodec.dumps(value) == json.dumps(value).encode()


def test_what_orjson_cannot_decode_is_read_by_the_standard_library() -> None:
    assert jsoncodec.loads(b"[1e400]") == [math.inf]
    assert jsoncodec.loads('["\\ud800"]') == ["\ud800"]
    assert jsoncodec.loads(memoryview(b"[1e400]")) == [math.inf]


def test_non_json_values_still_fail() -> None:
    with pytest.raises(TypeError):
        jsoncodec.dumps([object()])
