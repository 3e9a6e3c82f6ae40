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


class DueTimes:
    """A small channel of "something is due at t" hints for a timer actor.

    The actor plans to sleep until its next known due time; a hint for an
    earlier time cuts the sleep short.  Senders never block: a full channel
    already guarantees a wake-up.
    """

    def __init__(self, buffer: int = 32) -> None:
        self._send, self._receive = trio.open_memory_channel[float](buffer)

    def notify_nowait(self, due_at: float) -> None:
        try:
            self._send.send_nowait(due_at)
        except trio.WouldBlock:
            pass

    async def sleep_until(self, next_due: float | None, clock: WallClock, max_sleep: float) -> None:
        """Sleep until ``next_due`` (at most ``max_sleep``) or a hint for something sooner."""
        deadline = trio_deadline_for(next_due, clock, max_sleep)
        with trio.move_on_at(deadline):
            while True:
                due_at = await self._receive.receive()
                # Only a hint due before the planned wake-up changes the plan (one
                # due later is found by the pass at that wake-up); every claim sends
                # a lease deadline, which must not cost a storage pass each time.
                if due_at - clock() < deadline - trio.current_time():
                    return  # sooner than planned: re-plan now
