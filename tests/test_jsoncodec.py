"""The hot paths' JSON codec gives the answers the standard library gives."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest

from ojs_trio import jsoncodec
from ojs_trio.engine.validation import parse_job


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
    assert jsoncodec.dumps([2**70]) == b"[1180591620717411303424]"
    # A lone surrogate is escaped: the output stays valid UTF-8.
    assert jsoncodec.dumps(["\ud800", "é"]) == b'["\\ud800","\\u00e9"]'
    assert jsoncodec.loads(jsoncodec.dumps(["\ud800", "é"])) == ["\ud800", "é"]


def test_what_orjson_cannot_decode_is_read_by_the_standard_library() -> None:
    assert jsoncodec.loads(b"[1e400]") == [math.inf]
    assert jsoncodec.loads('["\\ud800"]') == ["\ud800"]
    assert jsoncodec.loads(memoryview(b"[1e400]")) == [math.inf]


def test_non_json_values_still_fail() -> None:
    with pytest.raises(TypeError):
        jsoncodec.dumps([object()])


@pytest.mark.parametrize(
    "body",
    [
        b'{"args": [1, "\xc3\xa9", null, 2.5], "a": 1, "a": 2}',
        b"[18446744073709551615, -9223372036854775808]",
        b"[18446744073709551616, -9223372036854775809, 123456789012345678901234]",
        b'["12345678901234567890"]',  # a long run inside a string: still the same answer
        b"[NaN, Infinity, 1e400]",
        b'["\\ud800"]',
        '[1, "\u00e9"]'.encode("utf-16"),
    ],
)
def test_a_request_body_reads_as_the_standard_library_reads_it(body: bytes) -> None:
    got, want = jsoncodec.loads_request(body), json.loads(body)
    assert repr(got) == repr(want)  # repr: NaN != NaN, and 1 == 1.0 would hide a float


@pytest.mark.parametrize("body", [b"{", b"[1,]", b"\xff", b"[1] x", b"{'a': 1}"])
def test_a_bad_request_body_fails_with_the_standard_library_error(body: bytes) -> None:
    with pytest.raises(ValueError) as want:
        json.loads(body)
    with pytest.raises(ValueError) as got:
        jsoncodec.loads_request(body)
    assert str(got.value) == str(want.value)
