"""What every scenario gets: the target, the sizes, a place for records and progress."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.load import Progress
from bench.modes import Sizes
from bench.targets import Target

QUEUE = "bench"


@dataclass
class Context:
    target: Target
    sizes: Sizes
    progress: Progress
    records: list[dict[str, Any]]
    # Facts measured earlier in the same session, for later scenarios (e.g. max rates).
    measured: dict[str, float] = field(default_factory=dict)

    def record(self, scenario: str, case: dict[str, Any], metrics: dict[str, Any]) -> None:
        self.records.append(
            {
                "scenario": scenario,
                "storage": self.target.storage,
                "transport": self.target.transport,
                "case": case,
                "metrics": metrics,
            }
        )

    def label(self, text: str) -> str:
        return f"{self.target.storage}/{self.target.transport}: {text}"


async def fill(
    target: Target, queue: str, count: int, *, chunk: int = 1000, tick: Callable[[int], None]
) -> float:
    """Enqueue ``count`` jobs in batches (a few in parallel); returns jobs per second."""
    t0 = trio.current_time()
    done = 0
    next_start = 0
    lock = trio.Lock()

    async def filler() -> None:
        nonlocal done, next_start
        while True:
            async with lock:
                start = next_start
                if start >= count:
                    return
                n = min(chunk, count - start)
                next_start += n
            if n == 1:
                await target.enqueue(queue, 1, start)
            else:
                await target.enqueue(queue, n, start)
            done += n
            tick(done)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(filler)
    elapsed = trio.current_time() - t0
    return count / elapsed if elapsed > 0 else 0.0


async def with_timeout(seconds: float, fn: Callable[[], Awaitable[Any]]) -> Any:
    with trio.fail_after(seconds):
        return await fn()
