"""Load and execute OJS conformance test cases against a live server.

A case is a JSON file of HTTP steps with assertions (see the conformance
repository's ``docs/test-case-reference.md``).  Cases are independent only if
the server starts empty, so by default every case begins with
``POST /ojs/v1/admin/reset`` and cases run one at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import trio

from ojs_trio.conformance.matchers import (
    CROSS_STEP_ASSERTIONS,
    DEFAULT_TOLERANCE_PCT,
    MISSING,
    JSONPathError,
    JSONValue,
    NonJSONBody,
    Response,
    check_equality,
    check_exclusive_claim,
    check_response,
    go_format,
    resolve_jsonpath,
)

OJS_MEDIA_TYPE: Final = "application/openjobspec+json"
RESET_PATH: Final = "/ojs/v1/admin/reset"
HTTP_ACTIONS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
SPECIAL_ACTIONS: Final = frozenset({"WAIT", "ASSERT"})


class CaseLoadError(ValueError):
    """A case file that is not valid JSON or does not follow the DSL schema."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Step:
    id: str
    action: str
    path: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    body: JSONValue = None
    #: ``body`` was given (a JSON ``null`` body is still a body).
    has_body: bool = False
    #: Sent verbatim instead of a JSON body (used to test malformed payloads).
    raw_body: str | None = None
    delay_ms: float = 0.0
    duration_ms: float = 0.0
    assertions: Mapping[str, JSONValue] = field(default_factory=dict)
    #: Steps run concurrently with this one.
    parallel_with: tuple[str, ...] = ()
    #: name -> JSONPath into this step's response body.
    captures: Mapping[str, str] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def from_json(cls, data: JSONValue, where: str) -> Step:
        if not isinstance(data, dict):
            raise CaseLoadError(f"{where}: a step must be an object")
        step_id = data.get("id")
        action = data.get("action")
        if not isinstance(step_id, str) or not step_id:
            raise CaseLoadError(f"{where}: step needs a string 'id'")
        where = f"{where} step {step_id!r}"
        if not isinstance(action, str) or action.upper() not in HTTP_ACTIONS | SPECIAL_ACTIONS:
            raise CaseLoadError(f"{where}: unsupported action {action!r}")
        action = action.upper()
        path = data.get("path", "")
        if not isinstance(path, str) or (action in HTTP_ACTIONS and not path):
            raise CaseLoadError(f"{where}: HTTP steps need a string 'path'")
        headers = data.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise CaseLoadError(f"{where}: 'headers' must map names to strings")
        raw_body = data.get("raw_body")
        if raw_body is not None and not isinstance(raw_body, str):
            raise CaseLoadError(f"{where}: 'raw_body' must be a string")
        assertions = data.get("assertions", {})
        if not isinstance(assertions, dict):
            raise CaseLoadError(f"{where}: 'assertions' must be an object")
        parallel = data.get("parallel_with", [])
        if isinstance(parallel, str):
            parallel = [parallel]
        if not isinstance(parallel, list) or not all(isinstance(p, str) for p in parallel):
            raise CaseLoadError(f"{where}: 'parallel_with' must be a step id or a list of ids")
        captures = data.get("captures", {})
        if not isinstance(captures, dict) or not all(isinstance(v, str) for v in captures.values()):
            raise CaseLoadError(f"{where}: 'captures' must map names to JSONPaths")
        description = data.get("description", "")
        return cls(
            id=step_id,
            action=action,
            path=path,
            headers={k: str(v) for k, v in headers.items()},
            body=data.get("body"),
            has_body="body" in data,
            raw_body=raw_body,
            delay_ms=_milliseconds(data, "delay_ms", where),
            duration_ms=_milliseconds(data, "duration_ms", where),
            assertions=assertions,
            parallel_with=tuple(str(p) for p in parallel),
            captures={k: str(v) for k, v in captures.items()},
            description=description if isinstance(description, str) else "",
        )


def _milliseconds(data: Mapping[str, JSONValue], key: str, where: str) -> float:
    value = data.get(key, 0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise CaseLoadError(f"{where}: {key!r} must be a non-negative number")
    return float(value)


@dataclass(frozen=True)
class Case:
    path: Path
    #: Path relative to the suites directory, for display and filtering.
    source: str
    test_id: str
    level: int
    category: str
    name: str
    description: str
    spec_ref: str
    tags: tuple[str, ...]
    setup: tuple[Step, ...]
    steps: tuple[Step, ...]
    teardown: tuple[Step, ...]

    @property
    def label(self) -> str:
        return f"{self.test_id} {self.name} ({self.source})"


def _parse_step_block(value: JSONValue, where: str) -> tuple[Step, ...]:
    # The reference types setup/teardown as an object holding "steps"; a bare
    # list is accepted too since it is the obvious shorthand.
    if value is None:
        return ()
    if isinstance(value, dict):
        value = value.get("steps", [])
    if not isinstance(value, list):
        raise CaseLoadError(f"{where}: expected a list of steps")
    return tuple(Step.from_json(item, where) for item in value)


def load_case(path: Path, suites_dir: Path | None = None) -> Case:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CaseLoadError(f"{path}: cannot read case: {exc}") from exc
    if not isinstance(data, dict):
        raise CaseLoadError(f"{path}: a case must be a JSON object")
    test_id, level, steps = data.get("test_id"), data.get("level"), data.get("steps")
    if not isinstance(test_id, str) or not test_id:
        raise CaseLoadError(f"{path}: missing string 'test_id'")
    if isinstance(level, bool) or not isinstance(level, int):
        raise CaseLoadError(f"{path}: 'level' must be an integer")
    if not isinstance(steps, list) or not steps:
        raise CaseLoadError(f"{path}: 'steps' must be a non-empty list")
    where = f"{path}"
    setup = _parse_step_block(data.get("setup"), f"{where} setup")
    main = _parse_step_block(steps, where)
    teardown = _parse_step_block(data.get("teardown"), f"{where} teardown")
    ids = [s.id for s in (*setup, *main, *teardown)]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CaseLoadError(f"{path}: duplicate step ids {duplicates}")
    tags = data.get("tags", [])

    def text(key: str) -> str:
        value = data.get(key, "")
        return value if isinstance(value, str) else ""

    try:
        source = path.relative_to(suites_dir).as_posix() if suites_dir else path.as_posix()
    except ValueError:
        source = path.as_posix()
    return Case(
        path=path,
        source=source,
        test_id=test_id,
        level=level,
        category=text("category"),
        name=text("name") or path.stem,
        description=text("description"),
        spec_ref=text("spec_ref"),
        tags=tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else (),
        setup=setup,
        steps=main,
        teardown=teardown,
    )


def load_cases(suites_dir: Path | str, level: int | None = None) -> list[Case]:
    """Every ``*.json`` case under ``suites_dir`` (recursively), sorted by path.

    ``level`` keeps the cases whose ``level`` is <= it (conformance levels are
    cumulative).  Raises ``FileNotFoundError`` for a missing directory and
    :class:`CaseLoadError` for a malformed case.
    """
    root = Path(suites_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"conformance suites directory not found: {root}")
    cases = [load_case(p, root) for p in sorted(root.rglob("*.json"))]
    return [c for c in cases if level is None or c.level <= level]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Failure:
    step_id: str
    message: str

    def __str__(self) -> str:
        return f"[{self.step_id}] {self.message}"


@dataclass
class StepResult:
    step_id: str
    response: Response | None = None
    #: Transport-level error, when no response was received.
    error: str | None = None


@dataclass
class CaseResult:
    case: Case
    failures: list[Failure] = field(default_factory=list)
    steps: dict[str, StepResult] = field(default_factory=dict)
    captures: dict[str, JSONValue] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        """One line: the case and every failure reason."""
        status = "PASS" if self.passed else "FAIL"
        reasons = "; ".join(str(f) for f in self.failures)
        return f"{status} {self.case.label}" + (f": {reasons}" if reasons else "")


@dataclass
class Report:
    results: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results if r.passed)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.passed)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def summary_line(self) -> str:
        return f"conformance: {self.passed} passed, {self.failed} failed"


# --------------------------------------------------------------------------- templates

#: ``{{steps.<id>.response.body.<path>}}``; the expression is a JSONPath into
#: the run context, so ``response.status`` / ``response.headers.<name>`` work too.
TEMPLATE_RE: Final = re.compile(r"\{\{\s*(steps\.[^{}]*?)\s*\}\}")


def build_context(results: Mapping[str, StepResult]) -> dict[str, JSONValue]:
    """The object templates and ``equality`` paths resolve against:
    ``{"steps": {<id>: {"response": {"status", "headers", "body"}}}}``."""
    steps: dict[str, JSONValue] = {}
    for step_id, result in results.items():
        response = result.response
        if response is None:
            continue  # nothing to reference: templates to it stay unresolved
        body = response.body.text if isinstance(response.body, NonJSONBody) else response.body
        headers: dict[str, JSONValue] = dict(response.headers)
        steps[step_id] = {"response": {"status": response.status, "headers": headers, "body": body}}
    return {"steps": steps}


def _lookup(expression: str, context: JSONValue) -> JSONValue:
    """Value of one template expression; raises LookupError when unresolved."""
    try:
        value = resolve_jsonpath("$." + expression, context)
    except JSONPathError as exc:
        raise LookupError(expression) from exc
    if value is MISSING:
        raise LookupError(expression)
    return value


def _stringify(value: JSONValue) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if value is None:
        return "null"
    return go_format(value)  # whole floats without decimals, lower-case booleans


def resolve_string(text: str, context: JSONValue) -> JSONValue:
    """Resolve templates in one string.

    A string that is exactly one template becomes the referenced JSON value
    itself (so objects/arrays stay structured); templates embedded in a longer
    string are spliced in as text.  Unresolvable templates are left untouched.
    """
    whole = TEMPLATE_RE.fullmatch(text.strip())
    if whole is not None:
        try:
            return _lookup(whole.group(1), context)
        except LookupError:
            return text

    def splice(m: re.Match[str]) -> str:
        try:
            return _stringify(_lookup(m.group(1), context))
        except LookupError:
            return m.group(0)

    return TEMPLATE_RE.sub(splice, text)


def resolve_templates(value: JSONValue, context: JSONValue) -> JSONValue:
    """Recursively resolve templates in strings, list items and object keys."""
    if isinstance(value, str):
        return resolve_string(value, context) if "{{" in value else value
    if isinstance(value, list):
        return [resolve_templates(v, context) for v in value]
    if isinstance(value, dict):
        return {_as_text(k, context): resolve_templates(v, context) for k, v in value.items()}
    return value


def _as_text(text: str, context: JSONValue) -> str:
    """Templates in places that must stay strings (paths, keys, headers)."""
    if "{{" not in text:
        return text
    resolved = resolve_string(text, context)
    return resolved if isinstance(resolved, str) else _stringify(resolved)


# --------------------------------------------------------------------------- execution


class _CaseRun:
    def __init__(self, client: httpx.AsyncClient, case: Case, tolerance_pct: float) -> None:
        self.client = client
        self.case = case
        self.tolerance_pct = tolerance_pct
        self.result = CaseResult(case=case)

    async def reset(self) -> bool:
        try:
            response = await self.client.post(RESET_PATH)
        except httpx.HTTPError as exc:
            reason = f"POST {RESET_PATH} failed: {exc!r}"
        else:
            if response.is_success:
                return True
            reason = f"POST {RESET_PATH} returned {response.status_code}, expected 2xx"
        self.result.failures.append(
            Failure("reset", f"{reason} (the server must support admin reset, or use --no-reset)")
        )
        return False

    async def run_block(self, steps: Sequence[Step], *, prefix: str = "", stop: bool) -> bool:
        """Run steps in order (parallel groups concurrently); ``stop`` aborts the
        block at the first failing step.  Returns True if every step passed."""
        done: set[str] = set()
        all_ok = True
        for step in steps:
            if step.id in done:
                continue
            group, problems = _parallel_group(step, steps, done)
            done.update(s.id for s in group)
            context = build_context(self.result.steps)
            failures = [Failure(step.id, p) for p in problems]
            if len(group) == 1:
                failures += await self.run_step(step, context)
            else:
                failures += await self._run_group(group, context)
            self.result.failures += [Failure(f.step_id, prefix + f.message) for f in failures]
            if failures:
                all_ok = False
                if stop:
                    break
        return all_ok

    async def _run_group(self, group: Sequence[Step], context: JSONValue) -> list[Failure]:
        outcomes: dict[str, list[Failure]] = {}

        async def run_member(member: Step) -> None:
            outcomes[member.id] = await self.run_step(member, context)

        async with trio.open_nursery() as nursery:
            for member in group:
                nursery.start_soon(run_member, member)
        # Report in file order, not completion order, so output is deterministic.
        return [f for member in group for f in outcomes[member.id]]

    async def run_step(self, step: Step, context: JSONValue) -> list[Failure]:
        """Execute one step; ``context`` is the state before it (or its group) began."""
        if step.delay_ms:
            await trio.sleep(step.delay_ms / 1000)  # the DSL demands real-time waits
        if step.action == "WAIT":
            if step.duration_ms:
                await trio.sleep(step.duration_ms / 1000)
            return []  # the reference says WAIT assertions are never evaluated
        assertions = resolve_templates(dict(step.assertions), context)
        assert isinstance(assertions, dict)
        messages: list[str] = []
        if step.action == "ASSERT":
            unsupported = sorted(set(assertions) - CROSS_STEP_ASSERTIONS)
            if unsupported:
                messages.append(
                    f"ASSERT steps only support {sorted(CROSS_STEP_ASSERTIONS)}, got {unsupported}"
                )
        else:
            response = await self._request(step, context)
            self.result.steps[step.id] = response
            if response.response is None:
                return [Failure(step.id, response.error or "no response")]
            messages += check_response(
                assertions, response.response, tolerance_pct=self.tolerance_pct
            )
            messages += self._capture(step, response.response)
            context = build_context(self.result.steps)
        if "exclusive_claim" in assertions:
            messages += check_exclusive_claim(assertions["exclusive_claim"])
        if "equality" in assertions:
            messages += check_equality(assertions["equality"], context)
        return [Failure(step.id, m) for m in dict.fromkeys(messages)]

    async def _request(self, step: Step, context: JSONValue) -> StepResult:
        path = _as_text(step.path, context)
        headers = {k: _as_text(v, context) for k, v in step.headers.items()}
        content: bytes | None = None
        if step.raw_body is not None:
            content = _as_text(step.raw_body, context).encode()
        elif step.has_body:
            content = json.dumps(resolve_templates(step.body, context)).encode()
        if content is not None and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = OJS_MEDIA_TYPE
        started = trio.current_time()
        try:
            response = await self.client.request(
                step.action, path, headers=headers, content=content
            )
        except httpx.HTTPError as exc:
            return StepResult(step.id, error=f"{step.action} {path} failed: {exc!r}")
        elapsed_ms = (trio.current_time() - started) * 1000
        text = response.text
        body: JSONValue | NonJSONBody = None
        if text.strip():
            try:
                body = json.loads(text)
            except ValueError:
                body = NonJSONBody(text)
        joined: dict[str, list[str]] = {}
        for name, value in response.headers.multi_items():
            joined.setdefault(name.lower(), []).append(value)
        observed = Response(
            status=response.status_code,
            headers={name: ", ".join(values) for name, values in joined.items()},
            body=body,
            text=text,
            elapsed_ms=elapsed_ms,
        )
        return StepResult(step.id, response=observed)

    def _capture(self, step: Step, response: Response) -> list[str]:
        if not step.captures or isinstance(response.body, NonJSONBody):
            return []
        problems: list[str] = []
        for name, path in step.captures.items():
            try:
                value = resolve_jsonpath(path, response.body)
            except JSONPathError as exc:
                problems.append(f"capture {name!r}: {exc}")
                continue
            if value is not MISSING:
                self.result.captures[name] = value
        return problems


def _parallel_group(
    step: Step, steps: Sequence[Step], done: set[str]
) -> tuple[list[Step], list[str]]:
    """``step`` plus every not-yet-run step linked to it through ``parallel_with``
    (in either direction, transitively), in file order."""
    by_id = {s.id: s for s in steps}
    problems = [
        f"parallel_with refers to unknown step {ref!r}"
        for ref in step.parallel_with
        if ref not in by_id
    ]
    members = {step.id}
    frontier = [step]
    while frontier:
        current = frontier.pop()
        linked = {ref for ref in current.parallel_with if ref in by_id}
        linked |= {s.id for s in steps if current.id in s.parallel_with}
        for ref in linked - members - done:
            members.add(ref)
            frontier.append(by_id[ref])
    return [s for s in steps if s.id in members], problems


async def run_case(
    client: httpx.AsyncClient,
    case: Case,
    *,
    reset: bool = True,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
) -> CaseResult:
    """Run one case with ``client`` (whose ``base_url`` points at the server).

    Order: optional reset, setup (aborting the case at the first failure),
    steps (all run; failures accumulate), teardown (always run).
    """
    started = trio.current_time()
    run = _CaseRun(client, case, tolerance_pct)
    if not reset or await run.reset():
        if await run.run_block(case.setup, prefix="setup failed: ", stop=True):
            await run.run_block(case.steps, stop=False)
        await run.run_block(case.teardown, prefix="teardown: ", stop=False)
    run.result.duration_s = trio.current_time() - started
    return run.result


async def run_cases(
    base_url: str,
    cases: Sequence[Case],
    *,
    concurrency: int = 1,
    reset: bool = True,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
    request_timeout: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
) -> Report:
    """Run ``cases`` against ``base_url`` and collect a :class:`Report` (in case order).

    Keep ``concurrency`` at 1 unless the server is shared-nothing per case:
    every case resets the whole server.  ``on_result`` sees each result as it
    completes (for progress output); ``transport`` lets tests inject a fake server.
    """
    results: list[CaseResult | None] = [None] * len(cases)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=request_timeout, transport=transport
    ) as client:

        async def one(index: int, case: Case) -> None:
            try:
                result = await run_case(client, case, reset=reset, tolerance_pct=tolerance_pct)
            except Exception as exc:  # a runner bug must not hide the other cases' results
                result = CaseResult(case=case, failures=[Failure("runner", f"crashed: {exc!r}")])
            results[index] = result
            if on_result is not None:
                on_result(result)

        if concurrency <= 1:
            for index, case in enumerate(cases):
                await one(index, case)
        else:
            limiter = trio.CapacityLimiter(concurrency)

            async def limited(index: int, case: Case) -> None:
                async with limiter:
                    await one(index, case)

            async with trio.open_nursery() as nursery:
                for index, case in enumerate(cases):
                    nursery.start_soon(limited, index, case)
    return Report([r for r in results if r is not None])


__all__ = [
    "OJS_MEDIA_TYPE",
    "RESET_PATH",
    "Case",
    "CaseLoadError",
    "CaseResult",
    "Failure",
    "Report",
    "Step",
    "StepResult",
    "build_context",
    "load_case",
    "load_cases",
    "resolve_string",
    "resolve_templates",
    "run_case",
    "run_cases",
]
