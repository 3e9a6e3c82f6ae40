"""Group commit: concurrent calls of one verb share one transaction.

The first caller to arrive becomes the leader.  It waits a short window (or
until the batch is full) for followers, then runs the whole batch in one
transaction and hands each caller its own result or exception.  No caller
returns before the transaction holding its work has committed.

The batch runs shielded from cancellation: once a leader has taken work on
behalf of other callers it must finish it.  A caller cancelled while waiting
still has its work applied (as if its request had reached the database).  A
leader cancelled meanwhile finishes its batch and returns its own result; the
cancellation takes effect at its next checkpoint.

With ``coalesce=False`` (a benchmark baseline: group commit off) every call
runs as a batch of one of its own, at once and concurrently with the others,
as an uncoalesced adapter would: nobody waits behind a leader.  Each caller
runs its own batch, shielded like a leader's, so a cancelled caller's work is
applied here too (a statement interrupted half-way would leave it unknown
whether it committed), and the caller gets its result as a leader does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")

BatchRunner = Callable[[Sequence[T]], Awaitable[list["R | BaseException"]]]


@dataclass(eq=False)
class _Slot(Generic[T, R]):
    item: T
    wake: trio.Event = field(default_factory=trio.Event)  # finished, or handed the lead
    finished: bool = False
    lead: bool = False
    abandoned: bool = False  # the caller was cancelled while waiting
    result: R | None = None
    error: BaseException | None = None


@dataclass
class CoalescerStatistics:
    calls: int = 0
    batches: int = 0
    largest_batch: int = 0


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        run: BatchRunner[T, R],
        *,
        window: float = 0.0,
        max_batch: int = 256,
        handover_after: float = 0.005,
        coalesce: bool = True,
    ):
        self._run = run
        self._coalesce = coalesce
        self._handover_after = handover_after
        self._window = window
        self._max_batch = max_batch
        self._pending: list[_Slot[T, R]] = []
        self._leader_active = False
        self._full = trio.Event()
        self._stats = CoalescerStatistics()

    async def submit(self, item: T) -> R:
        if not self._coalesce:
            return await self._run_alone(item)
        slot: _Slot[T, R] = _Slot(item)
        self._pending.append(slot)
        self._stats.calls += 1
        if len(self._pending) >= self._max_batch:
            self._full.set()
        if not self._leader_active:
            self._leader_active = True
            # Shielded, gathering window included: followers depend on the
            # leader, so its own cancellation waits until their batch is done.
            with trio.CancelScope(shield=True):
                await self._lead(slot, gather=True)
        else:
            try:
                await slot.wake.wait()
            finally:
                if slot.lead:  # handed the lead: it must be taken even if cancelled
                    with trio.CancelScope(shield=True):
                        # Its batch gathered while the previous one ran: start now.
                        await self._lead(slot, gather=False)
                elif not slot.finished:
                    slot.abandoned = True  # its work is still applied by a later batch
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    async def _run_alone(self, item: T) -> R:
        """A batch of one, run in the caller's task (nobody else depends on it)."""
        self._stats.calls += 1
        self._stats.batches += 1
        self._stats.largest_batch = max(self._stats.largest_batch, 1)
        with trio.CancelScope(shield=True):
            (outcome,) = await self._run([item])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _lead(self, own: _Slot[T, R], *, gather: bool) -> None:
        """Run batches until the leader's own call is done, then hand over.

        A leader whose call is done keeps running the batches that formed
        meanwhile for up to ``handover_after`` seconds, then passes the lead to
        the oldest waiting caller.  Handing over at once leaves the connection
        idle for a scheduling round or two between batches (milliseconds in a
        busy HTTP server); never handing over held one caller, long since
        committed, for as long as a steady stream of callers lasted (5 s).
        By default (window 0) the leader first lets every task that is ready
        to run take its turn -- a burst of callers lands in one batch -- and
        then starts at once: a lone call pays no timer, and under load the
        callers that arrive while a batch runs form the next one.
        """
        handed_over = False
        try:
            if gather and self._window > 0:
                with trio.move_on_after(self._window):
                    await self._full.wait()
            elif gather:
                await trio.lowlevel.cancel_shielded_checkpoint()
            done_at: float | None = None
            while self._pending:
                await self._run_batch()
                if not own.finished:
                    continue  # abandoned calls queued ahead of it filled the batch
                now = trio.current_time()
                done_at = now if done_at is None else done_at
                if now - done_at < self._handover_after:
                    continue
                successor = next((s for s in self._pending if not s.abandoned), None)
                if successor is not None:
                    successor.lead = True
                    successor.wake.set()
                    handed_over = True
                    return
                # Only abandoned calls are left: nobody else will run them.
        finally:
            if not handed_over:
                self._leader_active = False

    async def _run_batch(self) -> None:
        batch, self._pending = (
            self._pending[: self._max_batch],
            self._pending[self._max_batch :],
        )
        if len(self._pending) < self._max_batch:
            self._full = trio.Event()
        self._stats.batches += 1
        self._stats.largest_batch = max(self._stats.largest_batch, len(batch))
        try:
            outcomes = await self._run([s.item for s in batch])
        except Exception as exc:  # the whole batch failed
            outcomes = [exc] * len(batch)
        for slot, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                slot.error = outcome
            else:
                slot.result = outcome
            slot.finished = True
            slot.wake.set()

    def statistics(self) -> CoalescerStatistics:
        return CoalescerStatistics(**vars(self._stats))
