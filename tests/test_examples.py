"""The runnable examples under examples/ run as documented and print what they promise."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 60.0  # seconds; the example itself takes well under one


async def test_embedded_example_runs_every_job_to_its_outcome() -> None:
    with trio.fail_after(DEADLINE):
        done = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / "embedded.py")],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    assert stderr == ""  # no warnings or tracebacks from the engine
    lines = [line.split() for line in stdout.splitlines()]
    assert stdout.startswith("started 4 workers on ['default', 'reports']\nenqueued 4 jobs\n")
    assert stdout.endswith("engine: enqueued=4 acked=3 nacked=2\nengine closed\n")

    # The execution middleware saw every attempt: two sums, one discard, a failed
    # report attempt and its successful retry (worker slots and timings vary).
    ran = sorted((words[1], words[3], words[-1]) for words in lines if words[:1] == ["ran"])
    assert ran == [
        ("legacy.task", "1", "supported"),
        ("math.add", "1", "ok"),
        ("math.add", "1", "ok"),
        ("report.build", "1", "yet"),
        ("report.build", "2", "ok"),
    ]

    results = [" ".join(line.split()) for line in stdout.split("results:\n", 1)[1].splitlines()]
    meta = "meta={'enqueued_by': 'examples/embedded.py'}"  # set by the enqueue middleware
    assert results[:3] == [
        f"math.add completed attempt=1 errors=0 {meta} -> 5",
        f"math.add completed attempt=1 errors=0 {meta} -> 42",
        f"report.build completed attempt=2 errors=1 {meta} -> report q3 built on attempt 2",
    ]
    assert results[3].startswith(
        f"legacy.task discarded attempt=1 errors=1 {meta} -> "
        "{'code': 'DISCARD', 'message': 'legacy jobs are no longer supported'"
    )
