"""Benchmark scenarios.  Each module has ``async def run(ctx: Context) -> None``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.scenarios import cost, dequeue, enqueue, longpoll, throughput
from bench.scenarios.common import Context

SCENARIOS: dict[str, Callable[[Context], Awaitable[None]]] = {
    "enqueue": enqueue.run,
    "dequeue": dequeue.run,
    "throughput": throughput.run,
    "cost": cost.run,
    "longpoll": longpoll.run,
}
# "peers" and "groupcommit" run once per invocation (embedded on PostgreSQL, on
# databases of their own), not per storage/transport session: see
# bench/scenarios/peers.py and bench/scenarios/groupcommit.py.
ALL = [*SCENARIOS, "peers", "groupcommit"]
