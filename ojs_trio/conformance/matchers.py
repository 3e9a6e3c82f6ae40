"""Assertion matchers and the JSONPath subset of the OJS conformance test DSL.

Everything here is pure: each ``match_*``/``check_*`` function returns a list of
human-readable failure strings, and an empty list means the assertion passed.
That keeps the runner free of assertion logic and makes every rule unit-testable.

Value model: a JSONPath that does not resolve yields the :data:`MISSING` sentinel,
which is distinct from a JSON ``null`` (``None``).  The DSL needs both: ``"exists"``
accepts a present ``null`` while ``"absent"`` / ``body_absent`` / ``{"$exists": false}``
accept "missing or null" (the reference describes them as "resolves to nil").
"""

from __future__ import annotations

import enum
import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeGuard

JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"

DEFAULT_TOLERANCE_PCT: Final = 50.0
#: Floor for approximate comparisons (``~N`` and ``timing_ms.approximate``), in ms.
MIN_TOLERANCE_MS: Final = 100.0


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "<missing>"


#: Result of resolving a JSONPath that points at nothing.
MISSING: Final = _Missing.MISSING

Resolved: TypeAlias = "JSONValue | _Missing"


@dataclass(frozen=True)
class NonJSONBody:
    """A non-empty response body that did not parse as JSON (kept verbatim)."""

    text: str


Body: TypeAlias = "JSONValue | NonJSONBody"


@dataclass(frozen=True)
class Response:
    """What one HTTP step observed; the input to :func:`check_response`."""

    status: int
    #: Lower-cased header names; repeated headers joined with ", ".
    headers: Mapping[str, str]
    #: Parsed JSON (``None`` for an empty body) or :class:`NonJSONBody`.
    body: Body
    text: str
    elapsed_ms: float = 0.0


class JSONPathError(ValueError):
    """A JSONPath expression outside the supported subset."""


# --------------------------------------------------------------------------- JSONPath


@dataclass(frozen=True)
class _Field:
    name: str


@dataclass(frozen=True)
class _Index:
    index: int


@dataclass(frozen=True)
class _Wildcard:
    pass


@dataclass(frozen=True)
class _Filter:
    field_path: tuple[str, ...]
    literal: str


_Segment: TypeAlias = "_Field | _Index | _Wildcard | _Filter"

_INDEX_RE: Final = re.compile(r"-?\d+")
_FILTER_RE: Final = re.compile(
    r"""^@\.(?P<field>[^=\s]+)\s*==\s*(?:'(?P<sq>[^']*)'|"(?P<dq>[^"]*)"|(?P<bare>.*?))\s*$"""
)


def parse_jsonpath(path: str) -> list[_Segment]:
    """Parse the supported JSONPath subset into segments.

    Supported: ``$``, ``.field``, ``[n]`` (chained), ``[*]`` and
    ``[?(@.field=='value')]``.  A path without the leading ``$`` is taken as
    relative to the root, as the reference runner does.
    """
    text = path.strip()
    if text.startswith("$"):
        text = text[1:]
    elif text and not text.startswith((".", "[")):
        text = "." + text
    segments: list[_Segment] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ".":
            j = i + 1
            while j < len(text) and text[j] not in ".[":
                j += 1
            name = text[i + 1 : j]
            if not name:
                raise JSONPathError(f"empty field name in JSONPath {path!r}")
            segments.append(_Field(name))
            i = j
        elif ch == "[":
            if text.startswith("[?(", i):
                end = _find_filter_end(text, i + 3)
                if end < 0:
                    raise JSONPathError(f"unclosed filter expression in JSONPath {path!r}")
                segments.append(_parse_filter(text[i + 3 : end], path))
                i = end + 2
                continue
            end = text.find("]", i)
            if end < 0:
                raise JSONPathError(f"unclosed '[' in JSONPath {path!r}")
            inner = text[i + 1 : end].strip()
            if inner == "*":
                segments.append(_Wildcard())
            elif _INDEX_RE.fullmatch(inner):
                segments.append(_Index(int(inner)))
            elif len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                segments.append(_Field(inner[1:-1]))  # bracket notation ['field']
            else:
                raise JSONPathError(f"unsupported bracket expression [{inner}] in {path!r}")
            i = end + 1
        else:
            raise JSONPathError(f"unexpected {ch!r} at offset {i} in JSONPath {path!r}")
    return segments


def _find_filter_end(text: str, start: int) -> int:
    """Index of the ``)]`` closing a filter, skipping quoted literals."""
    quote: str | None = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif text.startswith(")]", i):
            return i
        i += 1
    return -1


def _parse_filter(expr: str, path: str) -> _Filter:
    m = _FILTER_RE.match(expr.strip())
    if m is None:
        raise JSONPathError(f"unsupported filter ?({expr}) in {path!r}; only @.field==value")
    literal = m.group("sq")
    if literal is None:
        literal = m.group("dq")
    if literal is None:
        literal = m.group("bare") or ""
    return _Filter(tuple(m.group("field").split(".")), literal)


def _step(segment: _Segment, value: JSONValue) -> list[JSONValue]:
    """Apply one segment to one value; zero results means "did not resolve"."""
    if isinstance(segment, _Field):
        if isinstance(value, dict) and segment.name in value:
            return [value[segment.name]]
        return []
    if isinstance(segment, _Index):
        if isinstance(value, list) and -len(value) <= segment.index < len(value):
            return [value[segment.index]]
        return []
    if isinstance(segment, _Wildcard):
        return list(value) if isinstance(value, list) else []
    if isinstance(value, list):
        for item in value:
            target: Resolved = item
            for name in segment.field_path:
                target = target.get(name, MISSING) if isinstance(target, dict) else MISSING
            if target is not MISSING and go_format(target) == segment.literal:
                return [item]  # the DSL's filter yields the *first* match only
    return []


def resolve_jsonpath(path: str, data: JSONValue) -> Resolved:
    """Resolve ``path`` against ``data``.

    Returns :data:`MISSING` when nothing matches.  A path containing ``[*]``
    always resolves to a (possibly empty) flattened list of the matches;
    elements for which the rest of the path does not resolve are skipped.
    Raises :class:`JSONPathError` for syntax outside the supported subset.
    """
    segments = parse_jsonpath(path)
    current: list[JSONValue] = [data]
    for segment in segments:
        current = [out for value in current for out in _step(segment, value)]
    if any(isinstance(s, _Wildcard) for s in segments):
        return current
    return current[0] if current else MISSING


# --------------------------------------------------------------------------- helpers


def describe(value: Resolved | NonJSONBody, limit: int = 200) -> str:
    """Compact rendering of a value for failure messages."""
    if value is MISSING:
        return "<missing>"
    if isinstance(value, NonJSONBody):
        text = f"non-JSON {value.text!r}"
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: object) -> TypeGuard[int | float]:
    # bool is a subclass of int in Python; JSON booleans are never numbers.
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_type(value: Resolved) -> str:
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def go_format(value: JSONValue) -> str:
    """Render like Go's ``%v`` on decoded JSON, which the DSL uses for
    ``contains:``/``not_contains:`` elements and filter literals."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))  # Go decodes every JSON number as float64
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + " ".join(go_format(v) for v in value) + "]"
    return "map[" + " ".join(f"{k}:{go_format(value[k])}" for k in sorted(value)) + "]"


def json_equal(a: Resolved, b: Resolved) -> bool:
    """Deep JSON equality: ``1 == 1.0`` but a boolean never equals a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return _num_equal(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _num_equal(a: float, b: float) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    # Tiny relative slack: floats may be re-serialised by the server's JSON library.
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _is_empty(value: Resolved | NonJSONBody) -> bool:
    if isinstance(value, NonJSONBody):
        return not value.text.strip()
    return value is MISSING or value in (None, "") or value == [] or value == {}


def approx_tolerance(expected: float, tolerance_pct: float) -> float:
    return max(abs(expected) * tolerance_pct / 100.0, MIN_TOLERANCE_MS)


# --------------------------------------------------------------------------- value matchers

_UUID_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_UUIDV7_RE: Final = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
_DATETIME_RE: Final = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
)
_NUM: Final = r"-?\d+(?:\.\d+)?"
_RANGE_RE: Final = re.compile(rf"^number:range\(\s*({_NUM})\s*,\s*({_NUM})\s*\)$")
_APPROX_RE: Final = re.compile(rf"^~\s*({_NUM})$")
_ARRAY_LEN_RE: Final = re.compile(r"^array:(length|min_length|min)(?::(\d+)|\((\d+)\))$")
_TEMPLATE_HINT_RE: Final = re.compile(r"\{\{.*\}\}")

_OPERATORS: Final = frozenset(
    {"$exists", "$type", "$match", "$in", "$or", "$size", "$empty", "range"}
)
_JSON_TYPES: Final = frozenset({"string", "number", "boolean", "null", "array", "object"})


def match_value(
    matcher: JSONValue, actual: Resolved, *, tolerance_pct: float = DEFAULT_TOLERANCE_PCT
) -> list[str]:
    """Match one resolved value against one DSL matcher."""
    if isinstance(matcher, str):
        return _match_string(matcher, actual, tolerance_pct)
    if isinstance(matcher, dict):
        if _is_operator_object(matcher):
            return _match_operators(matcher, actual, tolerance_pct)
        return _match_object_literal(matcher, actual, tolerance_pct)
    if actual is MISSING:
        return [f"expected {describe(matcher)}, but the value is missing"]
    if matcher is None:
        return [] if actual is None else [f"expected null, got {describe(actual)}"]
    if isinstance(matcher, bool):
        if isinstance(actual, bool) and actual == matcher:
            return []
        return [f"expected {describe(matcher)}, got {describe(actual)}"]
    if isinstance(matcher, int | float):
        if _is_number(actual) and _num_equal(matcher, actual):
            return []
        return [f"expected {describe(matcher)}, got {describe(actual)}"]
    return _match_positional(matcher, actual, tolerance_pct)


def _is_operator_object(matcher: Mapping[str, JSONValue]) -> bool:
    if any(key.startswith("$") for key in matcher):
        return True
    # A bare {"range": {...}} is the range operator; other objects are literals.
    rng = matcher.get("range")
    return set(matcher) == {"range"} and isinstance(rng, dict) and set(rng) <= {"min", "max"}


def _match_positional(
    matcher: Sequence[JSONValue], actual: Resolved, tolerance_pct: float
) -> list[str]:
    if not isinstance(actual, list):
        return [f"expected an array of {len(matcher)} elements, got {describe(actual)}"]
    if len(actual) != len(matcher):
        return [f"expected an array of length {len(matcher)}, got length {len(actual)}"]
    failures: list[str] = []
    for i, (sub, item) in enumerate(zip(matcher, actual, strict=True)):
        failures += [f"[{i}]: {f}" for f in match_value(sub, item, tolerance_pct=tolerance_pct)]
    return failures


def _match_object_literal(
    matcher: Mapping[str, JSONValue], actual: Resolved, tolerance_pct: float
) -> list[str]:
    """A plain object matcher: same keys, each value matched recursively (so plain
    data compares for equality while nested DSL matchers keep working)."""
    if not isinstance(actual, dict):
        return [f"expected an object, got {describe(actual)}"]
    failures: list[str] = []
    for key, sub in matcher.items():
        failures += [
            f".{key}: {f}"
            for f in match_value(sub, actual.get(key, MISSING), tolerance_pct=tolerance_pct)
        ]
    extra = sorted(set(actual) - set(matcher))
    if extra:
        failures.append(f"unexpected keys {extra} in {describe(actual)}")
    return failures


def _match_string(matcher: str, actual: Resolved, tolerance_pct: float) -> list[str]:
    if matcher == "absent":
        if actual is MISSING or actual is None:
            return []
        return [f"expected the field to be absent, got {describe(actual)}"]
    if matcher == "exists":
        return ["expected the field to exist, but it is missing"] if actual is MISSING else []
    if matcher == "any":
        if actual is MISSING or actual is None:
            return [f"expected any non-null value, got {describe(actual)}"]
        return []
    if actual is MISSING:
        hint = " (its template did not resolve)" if _TEMPLATE_HINT_RE.search(matcher) else ""
        return [f"expected {matcher!r}{hint}, but the value is missing"]

    special = _match_prefixed(matcher, actual, tolerance_pct)
    if special is not None:
        return special
    if isinstance(actual, str) and actual == matcher:
        return []
    if matcher.startswith(("string:", "number:", "array:")):
        return [f"unknown matcher {matcher!r}"]
    hint = " (its template did not resolve)" if _TEMPLATE_HINT_RE.search(matcher) else ""
    return [f"expected {matcher!r}{hint}, got {describe(actual)}"]


def _match_prefixed(matcher: str, actual: JSONValue, tolerance_pct: float) -> list[str] | None:
    """The ``kind:...`` and ``~N`` string matchers; ``None`` when ``matcher`` is a literal."""
    got = describe(actual)
    if matcher in ("string:nonempty", "string:non_empty"):
        ok = isinstance(actual, str) and actual != ""
        return [] if ok else [f"expected a non-empty string, got {got}"]
    for name, pattern in (
        ("string:uuid", _UUID_RE),
        ("string:uuidv7", _UUIDV7_RE),
        ("string:datetime", _DATETIME_RE),
    ):
        if matcher == name:
            ok = isinstance(actual, str) and pattern.match(actual) is not None
            return [] if ok else [f"expected {name}, got {got}"]
    if matcher.startswith("string:contains:"):
        needle = matcher[len("string:contains:") :]
        ok = isinstance(actual, str) and needle in actual
        return [] if ok else [f"expected a string containing {needle!r}, got {got}"]
    if matcher.startswith("string:pattern(") and matcher.endswith(")"):
        return _regex(matcher[len("string:pattern(") : -1], actual)
    if matcher in ("number:positive", "number:non_negative"):
        if not _is_number(actual):
            return [f"expected a number ({matcher}), got {got}"]
        ok = actual > 0 if matcher == "number:positive" else actual >= 0
        return [] if ok else [f"expected {matcher}, got {got}"]
    if m := _RANGE_RE.match(matcher):
        lo, hi = float(m.group(1)), float(m.group(2))
        if _is_number(actual) and lo <= actual <= hi:
            return []
        return [f"expected a number in [{m.group(1)}, {m.group(2)}], got {got}"]
    if m := _APPROX_RE.match(matcher):
        expected = float(m.group(1))
        tolerance = approx_tolerance(expected, tolerance_pct)
        if _is_number(actual) and abs(actual - expected) <= tolerance:
            return []
        return [f"expected ~{m.group(1)} (±{tolerance:g}), got {got}"]
    if matcher in ("array:nonempty", "array:empty"):
        if not isinstance(actual, list):
            return [f"expected an array ({matcher}), got {got}"]
        ok = bool(actual) == (matcher == "array:nonempty")
        return [] if ok else [f"expected {matcher}, got {got}"]
    if m := _ARRAY_LEN_RE.match(matcher):
        n = int(m.group(2) or m.group(3))
        if not isinstance(actual, list):
            return [f"expected an array ({matcher}), got {got}"]
        exact = m.group(1) == "length"
        if (len(actual) == n) if exact else (len(actual) >= n):
            return []
        want = f"exactly {n}" if exact else f"at least {n}"
        return [f"expected an array with {want} elements, got {len(actual)}: {got}"]
    for prefix in ("contains:", "not_contains:"):
        if matcher.startswith(prefix):
            needle = matcher[len(prefix) :]
            if not isinstance(actual, list):
                return [f"expected an array for {prefix}, got {got}"]
            found = any(go_format(item) == needle for item in actual)
            if found == (prefix == "contains:"):
                return []
            verb = "to contain" if prefix == "contains:" else "not to contain"
            return [f"expected the array {verb} {needle!r}, got {got}"]
    if matcher.startswith("one_of:"):
        options = [o.strip() for o in matcher[len("one_of:") :].split(",")]
        return [] if go_format(actual) in options else [f"expected one of {options}, got {got}"]
    return None


def _regex(pattern: str, actual: Resolved) -> list[str]:
    if not isinstance(actual, str):
        return [f"expected a string matching /{pattern}/, got {describe(actual)}"]
    try:
        found = re.search(pattern, actual) is not None  # unanchored, like Go's MatchString
    except re.error as exc:
        return [f"invalid regex /{pattern}/: {exc}"]
    return [] if found else [f"expected a string matching /{pattern}/, got {describe(actual)}"]


def _match_operators(
    matcher: Mapping[str, JSONValue], actual: Resolved | NonJSONBody, tolerance_pct: float
) -> list[str]:
    unknown = sorted(set(matcher) - _OPERATORS)
    if unknown:
        return [f"unknown operator(s) {unknown} in matcher {describe(dict(matcher))}"]
    if "$empty" in matcher:
        want = matcher["$empty"]
        if not isinstance(want, bool):
            return [f"$empty must be a boolean, got {describe(want)}"]
        if _is_empty(actual) != want:
            return [
                f"expected {'an empty' if want else 'a non-empty'} value, got {describe(actual)}"
            ]
        if len(matcher) == 1:
            return []
    if isinstance(actual, NonJSONBody):
        return [f"response body is not JSON: {describe(actual)}"]

    failures: list[str] = []
    if "$exists" in matcher:
        want = matcher["$exists"]
        if not isinstance(want, bool):
            return [f"$exists must be a boolean, got {describe(want)}"]
        present = actual is not MISSING and actual is not None
        if not want:
            # Nothing else can hold for a missing value, so "$exists: false" ends here.
            return (
                [] if not present else [f"expected the field to be absent, got {describe(actual)}"]
            )
        if not present:
            return [f"expected the field to exist, got {describe(actual)}"]
    if "$type" in matcher:
        want_type = matcher["$type"]
        if not isinstance(want_type, str) or want_type not in _JSON_TYPES:
            failures.append(f"unknown $type {describe(want_type)}")
        elif json_type(actual) != want_type:
            failures.append(f"expected type {want_type}, got {json_type(actual)}")
    if "$match" in matcher:
        pattern = matcher["$match"]
        if not isinstance(pattern, str):
            failures.append(f"$match needs a regex string, got {describe(pattern)}")
        else:
            failures += _regex(pattern, actual)
    for op in ("$in", "$or"):
        if op in matcher:
            failures += _match_any(op, matcher[op], actual, tolerance_pct)
    if "$size" in matcher:
        failures += _match_size(matcher["$size"], actual)
    if "range" in matcher:
        failures += _match_range(matcher["range"], actual)
    return failures


def _match_any(op: str, options: JSONValue, actual: Resolved, tolerance_pct: float) -> list[str]:
    if not isinstance(options, list):
        return [f"{op} needs an array of alternatives, got {describe(options)}"]
    for option in options:
        if not match_value(option, actual, tolerance_pct=tolerance_pct):
            return []
    return [f"{describe(actual)} matched none of {op} {describe(options)}"]


_SIZE_OPS: Final[dict[str, Callable[[int, float], bool]]] = {
    "$eq": operator.eq,
    "$gte": operator.ge,
    "$gt": operator.gt,
    "$lte": operator.le,
    "$lt": operator.lt,
}


def _match_size(spec: JSONValue, actual: Resolved) -> list[str]:
    if not isinstance(actual, list):
        return [f"expected an array for $size, got {describe(actual)}"]
    n = len(actual)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [] if n == spec else [f"expected an array of size {spec}, got size {n}"]
    if isinstance(spec, dict) and spec and set(spec) <= set(_SIZE_OPS):
        failures: list[str] = []
        for op, bound in spec.items():
            if not _is_number(bound):
                failures.append(f"$size {op} needs a number, got {describe(bound)}")
            elif not _SIZE_OPS[op](n, bound):
                failures.append(f"expected an array size {op} {bound}, got size {n}")
        return failures
    return [f"unsupported $size {describe(spec)}"]


def _match_range(spec: JSONValue, actual: Resolved) -> list[str]:
    if not isinstance(spec, dict):
        return [f"range needs an object with min/max, got {describe(spec)}"]
    if not _is_number(actual):
        return [f"expected a number for range {describe(spec)}, got {describe(actual)}"]
    failures: list[str] = []
    lo, hi = spec.get("min"), spec.get("max")
    if isinstance(lo, int | float) and actual < lo:
        failures.append(f"expected a number >= {lo}, got {describe(actual)}")
    if isinstance(hi, int | float) and actual > hi:
        failures.append(f"expected a number <= {hi}, got {describe(actual)}")
    return failures


# --------------------------------------------------------------------------- assertion groups


def match_body(
    spec: JSONValue, body: Body, *, tolerance_pct: float = DEFAULT_TOLERANCE_PCT
) -> list[str]:
    """Evaluate a ``body`` assertion map (JSONPath -> matcher).

    Also handles a top-level ``$or`` (list of alternative maps) and a
    top-level ``$empty`` key (whole-body emptiness), both used by the suites.
    """
    if not isinstance(spec, dict):
        return [f"body assertions must be an object, got {describe(spec)}"]
    failures: list[str] = []
    for path, matcher in spec.items():
        if path == "$or":
            failures += _match_body_or(matcher, body, tolerance_pct)
        elif path == "$empty":
            failures += _match_operators({"$empty": matcher}, body, tolerance_pct)
        elif isinstance(body, NonJSONBody):
            if isinstance(matcher, dict) and set(matcher) == {"$empty"}:
                failures += [f"{path}: {f}" for f in _match_operators(matcher, body, tolerance_pct)]
            else:
                failures.append(f"{path}: response body is not JSON: {describe(body)}")
        else:
            try:
                actual = resolve_jsonpath(path, body)
            except JSONPathError as exc:
                failures.append(f"{path}: {exc}")
                continue
            failures += [
                f"{path}: {f}" for f in match_value(matcher, actual, tolerance_pct=tolerance_pct)
            ]
    return failures


def _match_body_or(alternatives: JSONValue, body: Body, tolerance_pct: float) -> list[str]:
    if not isinstance(alternatives, list) or not alternatives:
        return [f"$or needs a non-empty array of body assertion maps, got {describe(alternatives)}"]
    reasons: list[str] = []
    for i, alternative in enumerate(alternatives):
        failures = match_body(alternative, body, tolerance_pct=tolerance_pct)
        if not failures:
            return []
        reasons.append(f"alternative {i}: " + "; ".join(failures))
    return ["$or: no alternative matched (" + " | ".join(reasons) + ")"]


def match_body_absent(paths: JSONValue, body: Body) -> list[str]:
    if not isinstance(paths, list):
        return [f"body_absent must be an array of JSONPaths, got {describe(paths)}"]
    failures: list[str] = []
    for path in paths:
        if not isinstance(path, str):
            failures.append(f"body_absent entries must be strings, got {describe(path)}")
        elif isinstance(body, NonJSONBody):
            failures.append(f"{path}: response body is not JSON: {describe(body)}")
        else:
            failures += [
                f"{path}: {f}" for f in match_value("absent", _resolve_or_missing(path, body))
            ]
    return failures


def _resolve_or_missing(path: str, body: JSONValue) -> Resolved:
    try:
        return resolve_jsonpath(path, body)
    except JSONPathError:
        return MISSING


def match_body_contains(needles: JSONValue, text: str) -> list[str]:
    if not isinstance(needles, list):
        return [f"body_contains must be an array of strings, got {describe(needles)}"]
    return [
        f"body_contains: response body does not contain {needle!r}"
        for needle in needles
        if not isinstance(needle, str) or needle not in text
    ]


def match_status(spec: JSONValue, status: int) -> list[str]:
    """``status``: an int, ``"number:range(a,b)"``, ``"one_of:a,b"`` or an operator
    object such as ``{"$in": [200, 409]}``."""
    if isinstance(spec, bool) or spec is None:
        return [f"invalid status assertion {describe(spec)}"]
    if isinstance(spec, int):
        return [] if status == spec else [f"status: expected {spec}, got {status}"]
    return [f"status: {f}" for f in match_value(spec, status)]


def match_status_in(spec: JSONValue, status: int) -> list[str]:
    if not isinstance(spec, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in spec
    ):
        return [f"status_in must be an array of integers, got {describe(spec)}"]
    return [] if status in spec else [f"status: expected one of {spec}, got {status}"]


def match_headers(spec: JSONValue, headers: Mapping[str, str]) -> list[str]:
    """Header names are case-insensitive; a string value must match exactly,
    anything else is a matcher applied to the header's string value."""
    if not isinstance(spec, dict):
        return [f"headers assertions must be an object, got {describe(spec)}"]
    lowered = {k.lower(): v for k, v in headers.items()}
    failures: list[str] = []
    for name, expected in spec.items():
        actual: Resolved = lowered.get(name.lower(), MISSING)
        failures += [f"header {name}: {f}" for f in match_value(expected, actual)]
    return failures


def match_timing(
    spec: JSONValue, elapsed_ms: float, *, tolerance_pct: float = DEFAULT_TOLERANCE_PCT
) -> list[str]:
    if not isinstance(spec, dict):
        return [f"timing_ms must be an object, got {describe(spec)}"]
    failures: list[str] = []
    took = f"took {elapsed_ms:.0f}ms"
    for key, bound in spec.items():
        if not _is_number(bound):
            failures.append(f"timing_ms.{key} needs a number, got {describe(bound)}")
            continue
        if key == "less_than":
            if elapsed_ms >= bound:
                failures.append(f"timing: expected < {bound}ms, {took}")
        elif key == "greater_than":
            if elapsed_ms <= bound:
                failures.append(f"timing: expected > {bound}ms, {took}")
        elif key == "approximate":
            tolerance = approx_tolerance(bound, tolerance_pct)
            if abs(elapsed_ms - bound) > tolerance:
                failures.append(f"timing: expected ~{bound}ms (±{tolerance:g}ms), {took}")
        else:
            failures.append(f"unknown timing_ms key {key!r}")
    return failures


def match_body_raw(spec: JSONValue, response: Response) -> list[str]:
    """``body_raw`` is reserved in the reference; we give it the obvious meaning:
    a string must equal the raw body, anything else must deep-equal the JSON body."""
    if isinstance(spec, str):
        if response.text == spec:
            return []
        return [f"body_raw: expected {spec!r}, got {describe(response.text)}"]
    if isinstance(response.body, NonJSONBody) or not json_equal(spec, response.body):
        return [f"body_raw: expected {describe(spec)}, got {describe(response.body)}"]
    return []


#: Assertion keys evaluated against a single HTTP response.
RESPONSE_ASSERTIONS: Final = frozenset(
    {
        "status",
        "status_in",
        "body",
        "body_absent",
        "body_contains",
        "body_raw",
        "headers",
        "timing_ms",
    }
)
#: Assertion keys that compare results of several earlier steps (ASSERT steps).
CROSS_STEP_ASSERTIONS: Final = frozenset({"exclusive_claim", "equality"})


def check_response(
    assertions: Mapping[str, JSONValue],
    response: Response,
    *,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
) -> list[str]:
    """Evaluate every response-level assertion of one step.  Cross-step keys are
    ignored here (the runner evaluates them); any other key is reported."""
    failures: list[str] = []
    for key, spec in assertions.items():
        if key == "status":
            failures += match_status(spec, response.status)
        elif key == "status_in":
            failures += match_status_in(spec, response.status)
        elif key == "body":
            failures += match_body(spec, response.body, tolerance_pct=tolerance_pct)
        elif key == "body_absent":
            failures += match_body_absent(spec, response.body)
        elif key == "body_contains":
            failures += match_body_contains(spec, response.text)
        elif key == "body_raw":
            failures += match_body_raw(spec, response)
        elif key == "headers":
            failures += match_headers(spec, response.headers)
        elif key == "timing_ms":
            failures += match_timing(spec, response.elapsed_ms, tolerance_pct=tolerance_pct)
        elif key not in CROSS_STEP_ASSERTIONS:
            failures.append(f"unknown assertion key {key!r}")
    return failures


def check_exclusive_claim(spec: JSONValue) -> list[str]:
    """``exclusive_claim`` (templates already resolved): among ``fetches`` (each a
    jobs array), exactly one holds ``job_id`` and/or exactly one is empty."""
    if not isinstance(spec, dict):
        return [f"exclusive_claim must be an object, got {describe(spec)}"]
    known = {"job_id", "fetches", "exactly_one_has_job", "exactly_one_empty"}
    unknown = sorted(set(spec) - known)
    if unknown:
        return [f"exclusive_claim: unknown key(s) {unknown}"]
    job_id, fetches = spec.get("job_id"), spec.get("fetches")
    if not isinstance(job_id, str) or _TEMPLATE_HINT_RE.search(job_id):
        return [f"exclusive_claim: job_id did not resolve to a string id: {describe(job_id)}"]
    if not isinstance(fetches, list) or not fetches:
        return [f"exclusive_claim: fetches must be a non-empty array, got {describe(fetches)}"]
    failures: list[str] = []
    holders: list[int] = []
    empties: list[int] = []
    for i, jobs in enumerate(fetches):
        if not isinstance(jobs, list):
            failures.append(
                f"exclusive_claim: fetches[{i}] did not resolve to a jobs array: {describe(jobs)}"
            )
            continue
        if not jobs:
            empties.append(i)
        if any(isinstance(job, dict) and job.get("id") == job_id for job in jobs):
            holders.append(i)
    if failures:
        return failures
    if spec.get("exactly_one_has_job") is True and len(holders) != 1:
        failures.append(
            f"exclusive_claim: expected exactly one fetch to receive job {job_id}, "
            f"got {len(holders)} (fetches {holders})"
        )
    if spec.get("exactly_one_empty") is True and len(empties) != 1:
        failures.append(
            f"exclusive_claim: expected exactly one empty fetch, got {len(empties)} "
            f"(fetches {empties})"
        )
    return failures


def check_equality(spec: JSONValue, context: JSONValue) -> list[str]:
    """``equality``: each key is a JSONPath into the run context (``$.steps.<id>...``),
    each value (templates already resolved) must deep-equal what it points at."""
    if not isinstance(spec, dict):
        return [f"equality must be an object, got {describe(spec)}"]
    failures: list[str] = []
    for path, expected in spec.items():
        try:
            actual = resolve_jsonpath(path, context)
        except JSONPathError as exc:
            failures.append(f"equality {path}: {exc}")
            continue
        if actual is MISSING:
            failures.append(f"equality {path}: path does not resolve")
        elif not json_equal(actual, expected):
            failures.append(
                f"equality {path}: expected {describe(expected)}, got {describe(actual)}"
            )
    return failures
