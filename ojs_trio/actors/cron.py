"""Cron ticker: fires each due occurrence of every schedule, exactly once.

It sleeps until the earliest ``next_run_at`` (or until a schedule changes),
then asks storage to fire each due occurrence.  ``fire_cron`` is a
compare-and-set on ``next_run_at``, so when several server processes tick on
one backend exactly one of them creates the job.  Occurrences missed while no
server ran are not replayed: the schedule resumes at its next occurrence.

The server whose ``fire_cron`` advanced the schedule reports the occurrence
(``cron.triggered``, or ``cron.skipped`` for an overlap or a schedule disabled
meanwhile) and, first, one ``cron.skipped`` with reason ``dst_skip`` for each
wall time of the schedule that a spring-forward gap removed since the previous
occurrence: those are found when the next existing occurrence comes due.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import trio

from ojs_trio.actors.timers import trio_deadline_for
from ojs_trio.engine.cron import CronFire, job_for_occurrence, next_occurrence, skipped_by_dst
from ojs_trio.engine.errors import OjsError
from ojs_trio.engine.timeutil import WallClock
from ojs_trio.storage.port import Storage

log = logging.getLogger("ojs_trio.cron")

# A tick fired later than this after its occurrence is considered missed.
MISFIRE_GRACE = 60.0


class CronTicker:
    def __init__(
        self,
        storage: Storage,
        clock: WallClock,
        on_fired: Callable[[CronFire], None],
        *,
        max_sleep: float = 30.0,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._on_fired = on_fired
        self._max_sleep = max_sleep
        self._changed_send, self._changed_receive = trio.open_memory_channel[None](1)
        self.fired = 0
        self.skipped = 0

    def notify_changed_nowait(self) -> None:
        """A schedule was added, changed or removed: re-plan."""
        try:
            self._changed_send.send_nowait(None)
        except trio.WouldBlock:
            pass  # a re-plan is already pending

    async def run(self) -> None:
        while True:
            next_due = await self.tick()
            with trio.move_on_at(trio_deadline_for(next_due, self._clock, self._max_sleep)):
                await self._changed_receive.receive()

    async def tick(self) -> float | None:
        """Fire everything due now; return the earliest future occurrence."""
        now = self._clock()
        earliest: float | None = None
        for record in await self._storage.list_crons():
            occurrence = record.next_run_at
            if occurrence is None or not record.enabled:
                continue
            if occurrence > now:
                earliest = occurrence if earliest is None else min(earliest, occurrence)
                continue
            following = next_occurrence(record.expression, record.timezone, max(occurrence, now))
            if now - occurrence > MISFIRE_GRACE:
                # Missed while no server ran: run it once now (not once per missed
                # occurrence), then resume at the next occurrence after now.
                log.warning(
                    "cron %s missed its run at %s; running it once now", record.name, occurrence
                )
            try:
                job = job_for_occurrence(record, occurrence, now)
                fire = await self._storage.fire_cron(record.name, occurrence, following, job, now)
            except OjsError as exc:
                log.error("cron %s could not fire: %s", record.name, exc.message)
                continue
            if fire.fired or fire.reason == "overlap":
                # This server advanced the schedule past ``occurrence``: it reports
                # the occurrence, and the wall times DST removed just before it.
                # (Disabled since our read: the disabling call reported it.)
                self._report_dst_gap(fire, occurrence)
                self._report(replace(fire, occurrence=occurrence))
            earliest = following if earliest is None else min(earliest, following)
        return earliest

    def _report(self, fire: CronFire) -> None:
        if fire.fired:
            self.fired += 1
        else:
            self.skipped += 1
            name = fire.record.name if fire.record is not None else None
            if fire.reason == "overlap":
                log.info("cron %s skipped: previous run still in progress", name)
        self._on_fired(fire)

    def _report_dst_gap(self, fire: CronFire, occurrence: float) -> None:
        """ojs-cron 9.2: a ``dst_skip`` for each wall time of the schedule that a
        spring-forward gap removed between its previous occurrence and this one."""
        record = fire.record
        if record is None:
            return
        gap = skipped_by_dst(record.expression, record.timezone, occurrence, record.updated_at)
        if gap:
            log.info(
                "cron %s skipped %d run(s) from %s to %s %s: those times do not exist (DST)",
                record.name,
                len(gap),
                gap[0][0].isoformat(),
                gap[-1][0].isoformat(),
                record.timezone,
            )
        for local, at in gap:
            self._report(
                CronFire(
                    False,
                    reason="dst_skip",
                    record=record,
                    occurrence=at,
                    local_time=local.isoformat(),
                )
            )
