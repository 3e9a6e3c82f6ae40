"""Unit tests for our OJS conformance DSL runner (ojs_trio.conformance).

The runner is exercised against a tiny in-memory fake OJS server mounted on
``httpx.MockTransport``: no network and no sleeps (every case here uses delay 0).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ojs_trio.conformance import cli
from ojs_trio.conformance.matchers import (
    MISSING,
    JSONPathError,
    JSONValue,
    NonJSONBody,
    Resolved,
    Response,
    check_equality,
    check_exclusive_claim,
    check_response,
    go_format,
    json_equal,
    match_body,
    match_body_absent,
    match_body_contains,
    match_headers,
    match_status,
    match_status_in,
    match_timing,
    match_value,
    resolve_jsonpath,
)
from ojs_trio.conformance.runner import (
    Case,
    CaseLoadError,
    CaseResult,
    Report,
    load_case,
    load_cases,
    resolve_string,
    resolve_templates,
    run_case,
    run_cases,
)

OJS = "application/openjobspec+json"
SUITES = Path(
    os.environ.get("OJS_CONFORMANCE_SUITES")
    or Path(__file__).resolve().parents[2] / "shared" / "ojs-conformance" / "suites"
)
needs_suites = pytest.mark.skipif(not SUITES.is_dir(), reason="official suites not present")

DOC: JSONValue = {
    "job": {
        "id": "abc",
        "attempt": 1,
        "args": [42, "x", {"k": "v"}],
        "nothing": None,
        "matrix": [[1, 2], [3, 4]],
    },
    "jobs": [
        {"id": "a", "state": "active", "n": 1, "tags": ["t1"]},
        {"id": "b", "state": "completed", "n": 2},
        {"id": "c", "state": "active", "n": 3, "tags": ["t2", "t3"]},
    ],
}


# --------------------------------------------------------------------------- JSONPath


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("$", DOC),
        ("$.job.id", "abc"),
        ("$.job.args[0]", 42),
        ("$.job.args[2].k", "v"),
        ("$.job.matrix[1][0]", 3),
        ("$.job.matrix[0][1]", 2),
        ("$.job.nothing", None),
        ("$.jobs[*].id", ["a", "b", "c"]),
        ("$.jobs[*].tags", [["t1"], ["t2", "t3"]]),  # missing element fields are skipped
        ("$.jobs[*].tags[*]", ["t1", "t2", "t3"]),  # nested wildcards flatten
        ("$.job.args[*].k", ["v"]),
        ("$.jobs[?(@.state=='active')].id", "a"),  # first match only
        ('$.jobs[?(@.state=="completed")].n', 2),
        ("$.jobs[?(@.n==3)].id", "c"),  # unquoted literal, compared like Go's %v
        ("$.job['id']", "abc"),
        ("job.attempt", 1),  # "$." is optional, as in the reference runner
    ],
)
def test_jsonpath_resolves(path: str, expected: JSONValue) -> None:
    assert resolve_jsonpath(path, DOC) == expected


@pytest.mark.parametrize(
    "path",
    [
        "$.job.missing",
        "$.job.args[3]",
        "$.job.id.deeper",
        "$.jobs[?(@.state=='dead')]",
        "$.jobs[?(@.state=='dead')].id",
        "$.job.args[0][0]",
    ],
)
def test_jsonpath_missing_is_distinct_from_null(path: str) -> None:
    assert resolve_jsonpath(path, DOC) is MISSING


def test_jsonpath_wildcard_on_non_array_is_empty() -> None:
    assert resolve_jsonpath("$.job.id[*]", DOC) == []


@pytest.mark.parametrize(
    "path", ["$.jobs[", "$.jobs[x]", "$.jobs[?(@.a>1)]", "$..job", "$.jobs[?(@.a=='1'"]
)
def test_jsonpath_rejects_unsupported_syntax(path: str) -> None:
    with pytest.raises(JSONPathError):
        resolve_jsonpath(path, DOC)


# --------------------------------------------------------------------------- value matchers

UUID7 = "019539a4-1234-7abc-8def-0123456789ab"


@pytest.mark.parametrize(
    ("matcher", "actual", "ok"),
    [
        # presence
        ("any", "x", True),
        ("any", None, False),
        ("any", MISSING, False),
        ("exists", None, True),
        ("exists", MISSING, False),
        ("absent", MISSING, True),
        ("absent", None, True),  # "resolves to nil" in the reference
        ("absent", 0, False),
        # strings
        ("string:nonempty", "a", True),
        ("string:non_empty", "", False),
        ("string:nonempty", 5, False),
        ("string:uuid", "019539a4-1234-4abc-8def-0123456789ab", True),
        ("string:uuid", "not-a-uuid", False),
        ("string:uuidv7", UUID7, True),
        ("string:uuidv7", "019539a4-1234-4abc-8def-0123456789ab", False),
        ("string:uuidv7", "019539a4-1234-7abc-cdef-0123456789ab", False),  # bad variant
        ("string:datetime", "2024-01-15T10:30:00Z", True),
        ("string:datetime", "2024-01-15T10:30:00.123+02:00", True),
        ("string:datetime", "2024-01-15 10:30:00", False),
        ("string:contains:not found", "job not found!", True),
        ("string:contains:Not", "job not found", False),
        (r"string:pattern(^test\..*)", "test.echo", True),
        (r"string:pattern(^test\..*)", "prod.echo", False),
        ("available", "available", True),
        ("available", "active", False),
        ("2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z", True),  # colons are not a prefix
        ("42", 42, False),  # a string literal never equals a number
        ("string:bogus", "x", False),
        # numbers
        ("number:positive", 1, True),
        ("number:positive", 0, False),
        ("number:positive", True, False),  # booleans are not numbers
        ("number:non_negative", 0, True),
        ("number:non_negative", -0.5, False),
        ("number:range(400,422)", 409, True),
        ("number:range(400,422)", 422, True),
        ("number:range(400, 422)", 423, False),
        ("number:range(-1.5,1.5)", -1.5, True),
        ("one_of:400,422", 422, True),
        ("one_of:400,422", 409, False),
        ("~2000", 1000, True),
        ("~2000", 3000, True),
        ("~2000", 3001, False),
        ("~2000", 999, False),
        ("~50", 150, True),  # tolerance floor is 100 (ms)
        ("~50", 151, False),
        ("~1000", "1000", False),
        # arrays
        ("array:nonempty", [1], True),
        ("array:nonempty", [], False),
        ("array:empty", [], True),
        ("array:empty", {}, False),
        ("array:length:2", [1, 2], True),
        ("array:length(0)", [], True),
        ("array:length:2", [1], False),
        ("array:min_length:2", [1, 2, 3], True),
        ("array:min:2", [1], False),
        ("contains:urgent", ["a", "urgent"], True),
        ("contains:42", [41, 42], True),  # elements compared via Go's %v
        ("contains:42", [42.0], True),
        ("contains:true", [True], True),
        ("contains:x", "xyz", False),  # arrays only
        ("not_contains:deleted", ["a"], True),
        ("not_contains:deleted", ["deleted"], False),
        # literals: int/float equivalence, bool never equals a number
        (0, 0, True),
        (1, 1.0, True),
        (3.14, 3.14, True),
        (1, 2, False),
        (1, True, False),
        (0, False, False),
        (True, True, True),
        (True, 1, False),
        (False, None, False),
        (None, None, True),
        (None, MISSING, False),
        (0, MISSING, False),
        # positional arrays
        ([1, "string:nonempty", {"k": "v"}], [1.0, "x", {"k": "v"}], True),
        ([1, 2], [1, 2, 3], False),
        ([], [], True),
        ([1], "1", False),
        # object literals: same keys, values matched recursively
        ({"k": "v"}, {"k": "v"}, True),
        ({"k": "v"}, {"k": "v", "extra": 1}, False),
        ({"k": "any"}, {"k": 1}, True),
    ],
)
def test_match_value(matcher: JSONValue, actual: Resolved, ok: bool) -> None:
    failures = match_value(matcher, actual)
    assert (failures == []) is ok, failures


@pytest.mark.parametrize(
    ("matcher", "actual", "ok"),
    [
        ({"$exists": True}, "x", True),
        ({"$exists": True}, MISSING, False),
        ({"$exists": True}, None, False),
        ({"$exists": False}, MISSING, True),
        ({"$exists": False}, None, True),
        ({"$exists": False}, "x", False),
        ({"$exists": True, "$type": "string"}, "x", True),
        ({"$exists": True, "$type": "string"}, 1, False),
        ({"$type": "number"}, 1.5, True),
        ({"$type": "number"}, True, False),
        ({"$type": "boolean"}, False, True),
        ({"$type": "null"}, None, True),
        ({"$type": "array"}, [], True),
        ({"$type": "object"}, {}, True),
        ({"$type": "object"}, MISSING, False),
        ({"$type": "integer"}, 1, False),  # unknown type names fail loudly
        ({"$match": "^Validation.*"}, "ValidationError", True),
        ({"$match": "application/(openjobspec\\+)?json"}, "application/json; charset=utf-8", True),
        ({"$match": "^x$"}, 1, False),
        ({"$match": "("}, "x", False),
        ({"$in": ["available", "active"]}, "active", True),
        ({"$in": [200, 201]}, 201, True),
        ({"$in": [200, 201]}, 500, False),
        ({"$in": ["string:uuidv7", None]}, UUID7, True),
        ({"$or": ["string:nonempty", {"$exists": False}]}, MISSING, True),
        ({"$or": ["string:nonempty", {"$exists": False}]}, "", False),
        ({"$size": 3}, [1, 2, 3], True),
        ({"$size": 0}, [1], False),
        ({"$size": {"$gte": 1}}, [1], True),
        ({"$size": {"$gte": 1}}, [], False),
        ({"$size": {"$gte": 1}}, None, False),
        ({"$empty": True}, None, True),
        ({"$empty": True}, MISSING, True),
        ({"$empty": True}, {}, True),
        ({"$empty": True}, [], True),
        ({"$empty": True}, {"a": 1}, False),
        ({"$empty": False}, {"a": 1}, True),
        ({"range": {"min": 0, "max": 100}}, 100, True),
        ({"range": {"min": 1000}}, 999, False),
        ({"range": {"max": 5}}, 5.0, True),
        ({"range": {"max": 5}}, "5", False),
        ({"$bogus": 1}, 1, False),
    ],
)
def test_match_operators(matcher: JSONValue, actual: Resolved, ok: bool) -> None:
    failures = match_value(matcher, actual)
    assert (failures == []) is ok, failures


def test_approx_tolerance_is_configurable() -> None:
    assert match_value("~1000", 1100, tolerance_pct=10) == []
    assert match_value("~1000", 1101, tolerance_pct=10) != []
    assert match_value("~200", 300, tolerance_pct=10) == []  # the 100 (ms) floor still applies
    assert match_value("~200", 301, tolerance_pct=10) != []
    assert match_value("~1000", 1900, tolerance_pct=100) == []


def test_failure_messages_are_readable() -> None:
    body: JSONValue = {"job": {"state": "active", "args": [{"k": "v"}]}}
    spec: JSONValue = {"$.job.state": "available", "$.job.args": [{"k": "w"}]}
    assert match_body(spec, body) == [
        "$.job.state: expected 'available', got \"active\"",
        "$.job.args: [0]: .k: expected 'w', got \"v\"",
    ]
    assert match_value("{{steps.s1.response.body.job.id}}", "x") == [
        "expected '{{steps.s1.response.body.job.id}}' (its template did not resolve), got \"x\""
    ]


def test_json_equal() -> None:
    assert json_equal({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not json_equal({"a": 1}, {"a": True})
    assert not json_equal({"a": 1}, {"a": 1, "b": None})
    assert not json_equal([1, 2], [2, 1])
    assert not json_equal(None, MISSING)


def test_go_format() -> None:
    assert [go_format(v) for v in (1, 2.0, 2.5, True, None, "s")] == [
        "1",
        "2",
        "2.5",
        "true",
        "<nil>",
        "s",
    ]
    assert go_format({"b": [1, "x"], "a": 1}) == "map[a:1 b:[1 x]]"


# --------------------------------------------------------------------------- assertion groups


def test_match_body_top_level_or_and_empty() -> None:
    spec: JSONValue = {"$or": [{"$.jobs": {"$size": 0}}, {"$empty": True}]}
    assert match_body(spec, {"jobs": []}) == []
    assert match_body(spec, None) == []
    failures = match_body(spec, {"jobs": [{"id": "a"}]})
    assert len(failures) == 1
    assert failures[0].startswith("$or: no alternative matched (alternative 0: $.jobs:")


def test_match_body_with_non_json_body() -> None:
    body = NonJSONBody("<html>oops</html>")
    failures = match_body({"$.job.id": "any", "$": {"$empty": True}}, body)
    assert failures == [
        "$.job.id: response body is not JSON: non-JSON '<html>oops</html>'",
        "$: expected an empty value, got non-JSON '<html>oops</html>'",
    ]
    assert match_body({"$empty": False}, body) == []
    assert match_body_absent(["$.error"], body) != []
    assert match_body_contains(["oops"], body.text) == []


def test_match_body_reports_bad_paths() -> None:
    assert match_body({"$.jobs[": "any"}, {}) == ["$.jobs[: unclosed '[' in JSONPath '$.jobs['"]


def test_body_absent_and_contains() -> None:
    body: JSONValue = {"job": {"result": None, "error": {"code": "x"}}}
    assert match_body_absent(["$.job.result", "$.job.missing"], body) == []
    assert match_body_absent(["$.job.error"], body) == [
        '$.job.error: expected the field to be absent, got {"code":"x"}'
    ]
    text = '{"state":"completed"}'
    assert match_body_contains(['"state":"completed"'], text) == []
    assert match_body_contains(['"state":"active"'], text) == [
        'body_contains: response body does not contain \'"state":"active"\''
    ]


@pytest.mark.parametrize(
    ("spec", "status", "ok"),
    [
        (201, 201, True),
        (201, 200, False),
        ("number:range(400,422)", 404, True),
        ("number:range(400,422)", 500, False),
        ("one_of:200,201,409", 409, True),
        ("one_of:200,201,409", 404, False),
        ({"$in": [200, 409]}, 409, True),
        ({"$in": [200, 409]}, 201, False),
        (True, 200, False),
    ],
)
def test_match_status(spec: JSONValue, status: int, ok: bool) -> None:
    assert (match_status(spec, status) == []) is ok


def test_match_status_in() -> None:
    assert match_status_in([200, 201], 201) == []
    assert match_status_in([200, 201], 404) == ["status: expected one of [200, 201], got 404"]
    assert match_status_in("200", 200) != []


def test_match_headers() -> None:
    headers = {"content-type": OJS, "ojs-version": "1.0"}
    assert match_headers({"Content-Type": OJS, "OJS-Version": "1.0"}, headers) == []
    assert (
        match_headers({"Content-Type": {"$match": "application/(openjobspec\\+)?json"}}, headers)
        == []
    )
    assert match_headers({"CONTENT-TYPE": "application/json"}, headers) == [
        f"header CONTENT-TYPE: expected 'application/json', got \"{OJS}\""
    ]
    assert match_headers({"X-Missing": "1"}, headers) == [
        "header X-Missing: expected '1', but the value is missing"
    ]


def test_match_timing() -> None:
    assert match_timing({"less_than": 500}, 499) == []
    assert match_timing({"less_than": 500}, 500) != []  # bound is exclusive
    assert match_timing({"greater_than": 1000}, 1000) != []
    assert match_timing({"approximate": 3000}, 4500) == []
    assert match_timing({"approximate": 3000}, 4501) != []
    assert match_timing({"approximate": 50}, 150) == []  # 100 ms floor
    assert match_timing({"approximate": 3000}, 3300, tolerance_pct=5) != []
    assert match_timing({"sometime": 1}, 1) == ["unknown timing_ms key 'sometime'"]


def test_check_response_combines_everything() -> None:
    response = Response(
        status=201,
        headers={"content-type": OJS},
        body={"job": {"id": UUID7, "state": "available"}},
        text=json.dumps({"job": {"id": UUID7, "state": "available"}}),
        elapsed_ms=12,
    )
    assertions: dict[str, JSONValue] = {
        "status": 201,
        "status_in": [200, 201],
        "headers": {"Content-Type": OJS},
        "body": {"$.job.id": "string:uuidv7", "$.job.state": "available"},
        "body_absent": ["$.job.error"],
        "body_contains": ['"state": "available"'],
        "timing_ms": {"less_than": 1000},
        "exclusive_claim": {},  # cross-step: evaluated by the runner, ignored here
    }
    assert check_response(assertions, response) == []
    assert check_response({"stauts": 201}, response) == ["unknown assertion key 'stauts'"]


def test_exclusive_claim() -> None:
    job: JSONValue = {"id": "j1"}
    ok: dict[str, JSONValue] = {
        "job_id": "j1",
        "fetches": [[job], []],
        "exactly_one_has_job": True,
        "exactly_one_empty": True,
    }
    assert check_exclusive_claim(ok) == []
    double: JSONValue = {**ok, "fetches": [[job], [job]]}
    assert check_exclusive_claim(double) == [
        "exclusive_claim: expected exactly one fetch to receive job j1, got 2 (fetches [0, 1])",
        "exclusive_claim: expected exactly one empty fetch, got 0 (fetches [])",
    ]
    unresolved: JSONValue = {**ok, "fetches": [[job], "{{steps.s3.response.body.jobs}}"]}
    assert check_exclusive_claim(unresolved) == [
        "exclusive_claim: fetches[1] did not resolve to a jobs array: "
        '"{{steps.s3.response.body.jobs}}"'
    ]


def test_equality() -> None:
    context: JSONValue = {"steps": {"a": {"response": {"body": {"x": [1, 2]}}}}}
    assert check_equality({"$.steps.a.response.body": {"x": [1.0, 2]}}, context) == []
    assert check_equality({"$.steps.a.response.body": {"x": [2]}}, context) == [
        'equality $.steps.a.response.body: expected {"x":[2]}, got {"x":[1,2]}'
    ]
    assert check_equality({"$.steps.zz.response.body": 1}, context) == [
        "equality $.steps.zz.response.body: path does not resolve"
    ]


# --------------------------------------------------------------------------- templates

CONTEXT: JSONValue = {
    "steps": {
        "step-1": {
            "response": {
                "status": 201,
                "headers": {"location": "/ojs/v1/jobs/j1"},
                "body": {"job": {"id": "j1", "attempt": 2, "score": 2.5, "whole": 3.0}},
            }
        },
        "fetch": {"response": {"status": 200, "headers": {}, "body": {"jobs": [{"id": "j1"}]}}},
    }
}


def test_templates_in_strings() -> None:
    assert resolve_string("/ojs/v1/jobs/{{steps.step-1.response.body.job.id}}", CONTEXT) == (
        "/ojs/v1/jobs/j1"
    )
    assert resolve_string("{{steps.fetch.response.body.jobs[0].id}}", CONTEXT) == "j1"
    assert resolve_string("{{ steps.step-1.response.status }}", CONTEXT) == 201
    assert resolve_string("{{steps.step-1.response.headers.location}}", CONTEXT) == (
        "/ojs/v1/jobs/j1"
    )
    text = "a={{steps.step-1.response.body.job.attempt}} b={{steps.step-1.response.body.job.score}}"
    assert resolve_string(text, CONTEXT) == "a=2 b=2.5"
    assert resolve_string("w={{steps.step-1.response.body.job.whole}}", CONTEXT) == "w=3"
    assert resolve_string("j={{steps.fetch.response.body.jobs}}", CONTEXT) == 'j=[{"id":"j1"}]'


def test_whole_template_substitutes_structured_values() -> None:
    assert resolve_string("{{steps.fetch.response.body.jobs}}", CONTEXT) == [{"id": "j1"}]
    assert resolve_string("{{steps.fetch.response.body}}", CONTEXT) == {"jobs": [{"id": "j1"}]}
    assert resolve_string("{{steps.step-1.response.body.job.attempt}}", CONTEXT) == 2


def test_unresolved_templates_are_left_alone() -> None:
    for text in (
        "{{steps.nope.response.body.job.id}}",
        "{{steps.step-1.response.body.job.missing}}",
        "x/{{steps.step-1.response.body.job[}}",
        "{{other.thing}}",
    ):
        assert resolve_string(text, CONTEXT) == text


def test_resolve_templates_walks_lists_dicts_and_keys() -> None:
    value: JSONValue = {
        "job_id": "{{steps.step-1.response.body.job.id}}",
        "fetches": ["{{steps.fetch.response.body.jobs}}"],
        "$.jobs[?(@.id=='{{steps.step-1.response.body.job.id}}')]": "exists",
        "n": 1,
    }
    assert resolve_templates(value, CONTEXT) == {
        "job_id": "j1",
        "fetches": [[{"id": "j1"}]],
        "$.jobs[?(@.id=='j1')]": "exists",
        "n": 1,
    }


# --------------------------------------------------------------------------- loading


def write_case(directory: Path, name: str, steps: list[dict[str, Any]], **extra: Any) -> Path:
    data = {
        "test_id": extra.pop("test_id", name.upper()),
        "level": extra.pop("level", 0),
        "category": "unit",
        "name": name,
        "description": "unit test case",
        "spec_ref": "none",
        "tags": ["unit"],
        "steps": steps,
        **extra,
    }
    path = directory / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_load_cases_sorts_and_filters_by_level(tmp_path: Path) -> None:
    step = {"id": "s", "action": "GET", "path": "/x"}
    write_case(tmp_path / "level-1", "b", [step], level=1)
    write_case(tmp_path / "level-0", "z", [step], level=0)
    write_case(tmp_path / "level-0", "a", [step], level=0)
    write_case(tmp_path / "level-2", "c", [step], level=2)
    assert [c.source for c in load_cases(tmp_path)] == [
        "level-0/a.json",
        "level-0/z.json",
        "level-1/b.json",
        "level-2/c.json",
    ]
    assert [c.name for c in load_cases(tmp_path, level=1)] == ["a", "z", "b"]
    assert [c.name for c in load_cases(str(tmp_path), level=0)] == ["a", "z"]


def test_load_case_parses_steps(tmp_path: Path) -> None:
    path = write_case(
        tmp_path,
        "full",
        [
            {"id": "a", "action": "post", "path": "/p", "body": None, "parallel_with": "b"},
            {"id": "b", "action": "WAIT", "duration_ms": 5, "delay_ms": 1},
        ],
        setup={"steps": [{"id": "s0", "action": "GET", "path": "/h"}]},
        teardown=[{"id": "t0", "action": "GET", "path": "/h"}],
    )
    case = load_case(path, tmp_path)
    a, b = case.steps
    assert (a.action, a.has_body, a.body, a.parallel_with) == ("POST", True, None, ("b",))
    assert (b.duration_ms, b.delay_ms, b.has_body) == (5.0, 1.0, False)
    assert [s.id for s in case.setup] == ["s0"]
    assert [s.id for s in case.teardown] == ["t0"]
    assert case.label == "FULL full (full.json)"


@pytest.mark.parametrize(
    "steps",
    [
        [],
        [{"id": "a", "action": "FROB", "path": "/"}],
        [{"id": "a", "action": "GET"}],
        [{"id": "a", "action": "GET", "path": "/", "delay_ms": -1}],
        [{"id": "a", "action": "GET", "path": "/", "headers": {"X": 1}}],
        [{"id": "a", "action": "WAIT"}, {"id": "a", "action": "WAIT"}],
    ],
)
def test_load_case_rejects_malformed_cases(tmp_path: Path, steps: list[dict[str, Any]]) -> None:
    with pytest.raises(CaseLoadError):
        load_case(write_case(tmp_path, "bad", steps))


def test_load_cases_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_cases(tmp_path / "nope")


# --------------------------------------------------------------------------- fake server


def _json(status: int, payload: object, content_type: str = OJS) -> httpx.Response:
    return httpx.Response(
        status, content=json.dumps(payload).encode(), headers={"content-type": content_type}
    )


def _error(status: int, code: str, message: str) -> httpx.Response:
    return _json(status, {"error": {"code": code, "message": message, "retryable": False}})


class FakeOJS:
    """Just enough of an OJS server for the runner tests: enqueue, info, fetch, ack."""

    def __init__(self, *, double_delivery: bool = False, reset_status: int = 200) -> None:
        self.double_delivery = double_delivery
        self.reset_status = reset_status
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.resets = 0
        self.arrivals = 0
        self.both_arrived = trio.Event()

    def _new_id(self) -> str:
        return f"019539a4-0000-7000-8000-{len(self.jobs) + 1:012x}"

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        method, path = request.method, request.url.path
        if (method, path) == ("POST", "/ojs/v1/admin/reset"):
            self.resets += 1
            self.jobs.clear()
            return _json(self.reset_status, {"reset": True})
        if method == "GET" and path == "/html":
            return httpx.Response(500, text="<html>oops</html>")
        if method == "GET" and path == "/empty":
            return httpx.Response(204)
        if method == "GET" and path == "/barrier":
            # Only returns once two requests are in flight at the same time.
            self.arrivals += 1
            if self.arrivals == 2:
                self.both_arrived.set()
            with trio.fail_after(5):
                await self.both_arrived.wait()
            return _json(200, {"arrivals": self.arrivals})
        if method == "GET" and path.startswith("/ojs/v1/jobs/"):
            job = self.jobs.get(path.rsplit("/", 1)[1])
            if job is None:
                return _error(404, "not_found", "job not found")
            return _json(200, {"job": job})
        try:
            payload = json.loads(request.content) if request.content else {}
        except ValueError:
            return _error(400, "invalid_payload", "request body is not valid JSON")
        if (method, path) == ("POST", "/ojs/v1/jobs"):
            if not isinstance(payload.get("type"), str) or not isinstance(
                payload.get("args"), list
            ):
                return _error(400, "invalid_request", "type and args are required")
            job_id = self._new_id()
            job = {
                "id": job_id,
                "type": payload["type"],
                "args": payload["args"],
                "queue": payload.get("options", {}).get("queue", "default"),
                "meta": payload.get("meta", {}),
                "state": "available",
                "attempt": 0,
                "created_at": "2026-01-01T00:00:00Z",
            }
            self.jobs[job_id] = job
            return _json(201, {"job": job})
        if (method, path) == ("POST", "/ojs/v1/workers/fetch"):
            await trio.lowlevel.checkpoint()  # let concurrent fetches interleave
            for job in self.jobs.values():
                if job["state"] == "available" and job["queue"] in payload.get("queues", []):
                    if not self.double_delivery:
                        job["state"] = "active"
                        job["attempt"] += 1
                    return _json(200, {"jobs": [dict(job)]})
            return _json(200, {"jobs": []})
        if (method, path) == ("POST", "/ojs/v1/workers/ack"):
            ack = self.jobs.get(payload.get("job_id", ""))
            if ack is None:
                return _error(404, "not_found", "job not found")
            ack["state"] = "completed"
            ack["result"] = payload.get("result")
            return _json(200, {"acknowledged": True, "job_id": ack["id"], "state": "completed"})
        return _error(404, "not_found", f"no route for {method} {path}")


async def run_with(fake: FakeOJS, case: Case, **kwargs: Any) -> CaseResult:
    transport = httpx.MockTransport(fake.handler)
    async with httpx.AsyncClient(transport=transport, base_url="http://ojs.test") as client:
        return await run_case(client, case, **kwargs)


ENQUEUE: dict[str, Any] = {
    "id": "enqueue",
    "action": "POST",
    "path": "/ojs/v1/jobs",
    "body": {"type": "test.echo", "args": ["hello", 42], "options": {"queue": "q1"}},
    "assertions": {
        "status": 201,
        "headers": {"Content-Type": OJS},
        "body": {"$.job.id": "string:uuidv7", "$.job.state": "available", "$.job.args[1]": 42},
    },
}
FETCH: dict[str, Any] = {
    "id": "fetch",
    "action": "POST",
    "path": "/ojs/v1/workers/fetch",
    "body": {"queues": ["q1"], "worker_id": "w1"},
    "assertions": {
        "status": 200,
        "body": {
            "$.jobs": "array:length:1",
            "$.jobs[0].id": "{{steps.enqueue.response.body.job.id}}",
            "$.jobs[0].attempt": 1,
        },
    },
}
ACK_AND_GET: list[dict[str, Any]] = [
    {
        "id": "ack",
        "action": "POST",
        "path": "/ojs/v1/workers/ack",
        "body": {"job_id": "{{steps.fetch.response.body.jobs[0].id}}", "result": {"n": 1}},
        "assertions": {"status": 200, "body": {"$.state": "completed"}},
    },
    {
        "id": "info",
        "action": "GET",
        "path": "/ojs/v1/jobs/{{steps.enqueue.response.body.job.id}}",
        "assertions": {
            "status": 200,
            "body": {
                "$.job.state": "completed",
                "$.job.result": {"n": 1.0},
                "$.job.args": ["hello", 42],
            },
        },
    },
]


async def test_passing_case(tmp_path: Path) -> None:
    fake = FakeOJS()
    case = load_case(write_case(tmp_path, "lifecycle", [ENQUEUE, FETCH, *ACK_AND_GET]))
    result = await run_with(fake, case)
    assert result.failures == []
    assert result.passed
    assert fake.resets == 1
    enqueue = fake.requests[1]
    assert enqueue.headers["content-type"] == OJS  # default media type for bodies
    assert "content-type" not in fake.requests[-1].headers  # GET without a body
    (job_id,) = fake.jobs  # templates must have carried the server-assigned id along
    assert fake.requests[-1].url.path == f"/ojs/v1/jobs/{job_id}"
    assert json.loads(fake.requests[3].content)["job_id"] == job_id


async def test_failing_case_reports_step_and_reason(tmp_path: Path) -> None:
    fake = FakeOJS()
    wrong_state = {**FETCH, "assertions": {"status": 200, "body": {"$.jobs[0].state": "pending"}}}
    case = load_case(write_case(tmp_path, "bad", [ENQUEUE, wrong_state, *ACK_AND_GET]), tmp_path)
    result = await run_with(fake, case)
    assert not result.passed
    assert [str(f) for f in result.failures] == [
        "[fetch] $.jobs[0].state: expected 'pending', got \"active\""
    ]
    assert result.describe() == (
        "FAIL BAD bad (bad.json): [fetch] $.jobs[0].state: expected 'pending', got \"active\""
    )


async def test_later_steps_still_run_after_a_failure(tmp_path: Path) -> None:
    fake = FakeOJS()
    steps = [
        {**ENQUEUE, "assertions": {"status": 200}},
        {
            "id": "missing",
            "action": "GET",
            "path": "/ojs/v1/jobs/nope",
            "assertions": {"status": 200},
        },
    ]
    result = await run_with(fake, load_case(write_case(tmp_path, "c", steps)))
    assert [str(f) for f in result.failures] == [
        "[enqueue] status: expected 200, got 201",
        "[missing] status: expected 200, got 404",
    ]


async def test_reset_failure_fails_case_without_running_steps(tmp_path: Path) -> None:
    fake = FakeOJS(reset_status=404)
    result = await run_with(fake, load_case(write_case(tmp_path, "c", [ENQUEUE])))
    assert len(result.failures) == 1
    assert result.failures[0].step_id == "reset"
    assert "returned 404, expected 2xx" in result.failures[0].message
    assert len(fake.requests) == 1
    no_reset = await run_with(
        FakeOJS(), load_case(write_case(tmp_path, "c", [ENQUEUE])), reset=False
    )
    assert no_reset.passed


async def test_setup_failure_skips_steps_but_runs_teardown(tmp_path: Path) -> None:
    fake = FakeOJS()
    probe = {"id": "probe", "action": "GET", "path": "/empty"}
    case = load_case(
        write_case(
            tmp_path,
            "c",
            [ENQUEUE],
            setup={"steps": [{**probe, "id": "s1", "assertions": {"status": 200}}]},
            teardown={"steps": [{**probe, "id": "t1"}]},
        )
    )
    result = await run_with(fake, case, reset=False)
    assert [str(f) for f in result.failures] == ["[s1] setup failed: status: expected 200, got 204"]
    assert [r.url.path for r in fake.requests] == ["/empty", "/empty"]


async def test_parallel_steps_run_concurrently(tmp_path: Path) -> None:
    fake = FakeOJS()
    steps: list[dict[str, Any]] = [
        {"id": "p1", "action": "GET", "path": "/barrier", "parallel_with": "p2"},
        {"id": "p2", "action": "GET", "path": "/barrier", "parallel_with": "p1"},
        {
            "id": "check",
            "action": "ASSERT",
            "assertions": {"equality": {"$.steps.p1.response.body": "{{steps.p2.response.body}}"}},
        },
    ]
    result = await run_with(fake, load_case(write_case(tmp_path, "c", steps)), reset=False)
    assert result.passed, result.failures
    assert result.steps["p1"].response is not None
    assert result.steps["p1"].response.body == {"arrivals": 2}


async def test_non_json_and_empty_responses(tmp_path: Path) -> None:
    fake = FakeOJS()
    steps = [
        {
            "id": "html",
            "action": "GET",
            "path": "/html",
            "assertions": {"status": 500, "body": {"$.error": "any"}, "body_contains": ["oops"]},
        },
        {
            "id": "empty",
            "action": "GET",
            "path": "/empty",
            "assertions": {"status": 204, "body": {"$": {"$empty": True}, "$.x": "absent"}},
        },
    ]
    result = await run_with(fake, load_case(write_case(tmp_path, "c", steps)), reset=False)
    assert [str(f) for f in result.failures] == [
        "[html] $.error: response body is not JSON: non-JSON '<html>oops</html>'"
    ]


async def test_raw_body_is_sent_verbatim(tmp_path: Path) -> None:
    fake = FakeOJS()
    step = {
        "id": "bad-json",
        "action": "POST",
        "path": "/ojs/v1/jobs",
        "raw_body": "{ invalid json }",
        "assertions": {"status": 400, "body": {"$.error.code": "invalid_payload"}},
    }
    result = await run_with(fake, load_case(write_case(tmp_path, "c", [step])), reset=False)
    assert result.passed, result.failures
    assert fake.requests[0].content == b"{ invalid json }"
    assert fake.requests[0].headers["content-type"] == OJS


async def test_assert_and_wait_steps(tmp_path: Path) -> None:
    fake = FakeOJS()
    steps = [
        ENQUEUE,
        {"id": "pause", "action": "WAIT", "duration_ms": 0, "assertions": {"status": 999}},
        {"id": "bad-assert", "action": "ASSERT", "assertions": {"status": 200}},
        {
            "id": "claims",
            "action": "ASSERT",
            "assertions": {
                "exclusive_claim": {
                    "job_id": "{{steps.enqueue.response.body.job.id}}",
                    "fetches": ["{{steps.nope.response.body.jobs}}"],
                    "exactly_one_has_job": True,
                }
            },
        },
    ]
    result = await run_with(fake, load_case(write_case(tmp_path, "c", steps)), reset=False)
    assert [str(f) for f in result.failures] == [
        "[bad-assert] ASSERT steps only support ['equality', 'exclusive_claim'], got ['status']",
        "[claims] exclusive_claim: fetches[0] did not resolve to a jobs array: "
        '"{{steps.nope.response.body.jobs}}"',
    ]


async def test_captures_are_stored(tmp_path: Path) -> None:
    step = {**ENQUEUE, "captures": {"job_id": "$.job.id", "gone": "$.job.nope"}}
    result = await run_with(FakeOJS(), load_case(write_case(tmp_path, "c", [step])))
    assert result.passed
    assert result.captures == {"job_id": "019539a4-0000-7000-8000-000000000001"}


async def test_transport_errors_become_failures(tmp_path: Path) -> None:
    async def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    case = load_case(write_case(tmp_path, "c", [ENQUEUE]))
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(broken), base_url="http://ojs.test"
    ) as client:
        result = await run_case(client, case, reset=False)
    assert len(result.failures) == 1
    assert result.failures[0].step_id == "enqueue"
    assert "POST /ojs/v1/jobs failed: ConnectError" in result.failures[0].message


async def test_run_cases_report(tmp_path: Path) -> None:
    write_case(tmp_path, "a-pass", [ENQUEUE, FETCH, *ACK_AND_GET])
    write_case(tmp_path, "b-fail", [{**ENQUEUE, "assertions": {"status": 202}}])
    seen: list[str] = []
    fake = FakeOJS()
    report = await run_cases(
        "http://ojs.test",
        load_cases(tmp_path),
        transport=httpx.MockTransport(fake.handler),
        on_result=lambda r: seen.append(r.case.name),
    )
    assert (report.passed, report.failed) == (1, 1)
    assert seen == ["a-pass", "b-fail"]
    assert [r.case.name for r in report.failures] == ["b-fail"]
    assert report.summary_line() == "conformance: 1 passed, 1 failed"
    assert Report().summary_line() == "conformance: 0 passed, 0 failed"


async def test_run_cases_concurrency(tmp_path: Path) -> None:
    # Each case blocks on the fake's barrier, so this only passes if both overlap.
    barrier = {"id": "b", "action": "GET", "path": "/barrier", "assertions": {"status": 200}}
    write_case(tmp_path, "one", [barrier])
    write_case(tmp_path, "two", [barrier])
    fake = FakeOJS()
    report = await run_cases(
        "http://ojs.test",
        load_cases(tmp_path),
        concurrency=2,
        reset=False,
        transport=httpx.MockTransport(fake.handler),
    )
    assert [r.case.name for r in report.results] == ["one", "two"]
    assert report.summary_line() == "conformance: 2 passed, 0 failed"


# --------------------------------------------------------------------------- official suites


def _suite_matchers() -> Iterator[tuple[str, JSONValue]]:
    for path in sorted(SUITES.rglob("*.json")):
        data = json.loads(path.read_text())
        for step in data["steps"]:
            body = step.get("assertions", {}).get("body", {})
            alternatives = body.pop("$or", [])
            for spec in [body, *alternatives]:
                for key, matcher in spec.items():
                    yield f"{path.name}:{step['id']}:{key}", matcher


@needs_suites
def test_every_suite_matcher_is_understood() -> None:
    """No matcher in the official suites may hit an "unknown"/"unsupported" branch."""
    probes: list[Resolved] = [MISSING, None, "x", 1, [1], {"a": 1}]
    for where, matcher in _suite_matchers():
        for probe in probes:
            for failure in match_value(matcher, probe):
                assert "unknown" not in failure and "unsupported" not in failure, (where, failure)


@needs_suites
def test_official_suites_load() -> None:
    cases = load_cases(SUITES)
    assert len(cases) == 133
    assert len(load_cases(SUITES, level=1)) == 90
    assert {c.level for c in load_cases(SUITES, level=0)} == {0}


OFFICIAL_CASES = [
    "level-0-core/operations/info-readonly.json",
    "level-0-core/operations/fetch-exclusive-claim.json",
    "level-0-core/operations/error-validation-invalid-payload.json",
    "level-0-core/operations/ack-with-result-retrievable.json",
]


@needs_suites
@pytest.mark.parametrize("source", OFFICIAL_CASES)
async def test_official_cases_pass_against_fake(source: str) -> None:
    result = await run_with(FakeOJS(), load_case(SUITES / source, SUITES))
    assert result.passed, result.describe()


@needs_suites
async def test_official_exclusive_claim_catches_double_delivery() -> None:
    case = load_case(SUITES / "level-0-core/operations/fetch-exclusive-claim.json", SUITES)
    result = await run_with(FakeOJS(double_delivery=True), case)
    assert [f.step_id for f in result.failures] == ["step-4", "step-4"]
    assert "got 2" in result.failures[0].message


# --------------------------------------------------------------------------- CLI


def _patch_cli_transport(monkeypatch: pytest.MonkeyPatch, fake: FakeOJS) -> None:
    patched: Callable[..., Any] = functools.partial(
        run_cases, transport=httpx.MockTransport(fake.handler)
    )
    monkeypatch.setattr(cli, "run_cases", patched)


def test_cli_reports_failures_and_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_case(tmp_path, "a-pass", [ENQUEUE, FETCH, *ACK_AND_GET], level=0)
    write_case(tmp_path, "b-fail", [{**ENQUEUE, "assertions": {"status": 202}}], level=0)
    write_case(tmp_path, "c-level2", [ENQUEUE], level=2)
    _patch_cli_transport(monkeypatch, FakeOJS())
    code = cli.main(["--url", "http://ojs.test", "--suites", str(tmp_path), "--level", "1"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out == [
        "FAIL B-FAIL b-fail (b-fail.json): [enqueue] status: expected 202, got 201",
        "conformance: 1 passed, 1 failed",
    ]
    code = cli.main(["--suites", str(tmp_path), "--filter", "A-PASS"])
    assert code == 0
    assert capsys.readouterr().out.splitlines() == ["conformance: 1 passed, 0 failed"]


def test_cli_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--suites", str(tmp_path / "missing")]) == 2
    assert "suites directory not found" in capsys.readouterr().err
    write_case(tmp_path, "a", [ENQUEUE])
    assert cli.main(["--suites", str(tmp_path), "--filter", "zzz"]) == 2
    assert "no cases selected" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert cli.main(["--suites", str(tmp_path)]) == 2
    assert "cannot read case" in capsys.readouterr().err


def test_cli_default_suites_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.SUITES_ENV, str(tmp_path))
    assert cli.default_suites_dir() == tmp_path
    monkeypatch.delenv(cli.SUITES_ENV)
    monkeypatch.chdir(tmp_path)
    assert cli.default_suites_dir() == tmp_path / ".." / "shared" / "ojs-conformance" / "suites"
