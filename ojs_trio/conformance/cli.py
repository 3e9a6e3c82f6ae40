"""``ojs-trio conformance``: run the OJS conformance suites against a server.

Exit status: 0 when every selected case passed, 1 when any failed, 2 for usage
problems (missing suites directory, unreadable case, nothing selected).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import trio

from ojs_trio.conformance.matchers import DEFAULT_TOLERANCE_PCT
from ojs_trio.conformance.runner import Case, CaseLoadError, CaseResult, load_cases, run_cases

SUITES_ENV = "OJS_CONFORMANCE_SUITES"
DEFAULT_URL = "http://localhost:8080"


def default_suites_dir() -> Path:
    env = os.environ.get(SUITES_ENV)
    return Path(env) if env else Path.cwd() / ".." / "shared" / "ojs-conformance" / "suites"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ojs-trio conformance",
        description="Run the OJS conformance test suites against a running server.",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server base URL ({DEFAULT_URL})")
    parser.add_argument(
        "--suites",
        type=Path,
        default=None,
        help=f"suites directory (${SUITES_ENV} or ../shared/ojs-conformance/suites)",
    )
    parser.add_argument(
        "--level", type=int, default=None, help="run cases up to and including this level"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE_PCT,
        metavar="PCT",
        help="tolerance in percent for approximate matchers (default 50, floor 100 ms)",
    )
    parser.add_argument(
        "--filter",
        default=None,
        metavar="SUBSTRING",
        help="only cases whose test id, name or path contains this (case-insensitive)",
    )
    parser.add_argument(
        "--no-reset",
        action="store_true",
        help="do not POST /ojs/v1/admin/reset before each case",
    )
    return parser


def _selected(case: Case, needle: str) -> bool:
    haystack = f"{case.test_id} {case.name} {case.source}".lower()
    return needle.lower() in haystack


def _print_failure(result: CaseResult) -> None:
    # Printed as each case finishes: a full run takes minutes of DSL-mandated waits.
    if not result.passed:
        print(result.describe(), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suites: Path = args.suites if args.suites is not None else default_suites_dir()
    if not suites.is_dir():
        print(f"conformance: suites directory not found: {suites}", file=sys.stderr)
        return 2
    try:
        cases = load_cases(suites, args.level)
    except CaseLoadError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    if args.filter:
        cases = [c for c in cases if _selected(c, args.filter)]
    if not cases:
        print("conformance: no cases selected", file=sys.stderr)
        return 2
    report = trio.run(
        functools.partial(
            run_cases,
            args.url,
            cases,
            reset=not args.no_reset,
            tolerance_pct=args.tolerance,
            on_result=_print_failure,
        )
    )
    print(report.summary_line(), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
