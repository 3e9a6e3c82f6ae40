"""Shared sleeping logic for actors driven by storage due times."""

from __future__ import annotations

import trio

from ojs_trio.engine.timeutil import WallClock


def trio_deadline_for(wall_time: float | None, clock: WallClock, max_sleep: float) -> float:
    """The trio-clock deadline for a wall-clock time, at most ``max_sleep`` away."""
    now = trio.current_time()
    if wall_time is None:
        return now + max_sleep
    return now + min(max_sleep, max(0.0, wall_time - clock()))
