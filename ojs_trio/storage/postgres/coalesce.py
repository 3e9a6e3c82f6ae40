"""Group commit: concurrent calls of one verb share one transaction.

The first caller to arrive becomes the leader.  It waits a short window (or
until the batch is full) for followers, then runs the whole batch in one
transaction and hands each caller its own result or exception.  No caller
returns before the transaction holding its work has committed.

The batch runs shielded from cancellation: once a leader has taken work on
behalf of other callers it must finish it.  A caller cancelled while waiting
still has its work applied (as if its request had reached the database).
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
    done: trio.Event = field(default_factory=trio.Event)
    result: R | None = None
    error: BaseException | None = None


@dataclass
class CoalescerStatistics:
    calls: int = 0
    batches: int = 0
    largest_batch: int = 0


class Coalescer(Generic[T, R]):
    def __init__(self, run: BatchRunner[T, R], *, window: float = 0.0, max_batch: int = 256):
        self._run = run
        self._window = window
        self._max_batch = max_batch
        self._pending: list[_Slot[T, R]] = []
        self._leader_active = False
        self._full = trio.Event()
        self._stats = CoalescerStatistics()

    async def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        self._pending.append(slot)
        self._stats.calls += 1
        if len(self._pending) >= self._max_batch:
            self._full.set()
        if not self._leader_active:
            self._leader_active = True
            try:
                # Shielded, gathering window included: followers depend on the
                # leader, so its own cancellation waits until their batch is done.
                with trio.CancelScope(shield=True):
                    await self._lead()
            finally:
                self._leader_active = False
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    async def _lead(self) -> None:
        # Gather followers, then drain in batches until empty.  By default
        # (window 0) the leader lets every task that is ready to run take its turn
        # first -- a burst of callers lands in one batch -- and then starts at
        # once: a lone call pays no timer, and under load the callers that arrive
        # while a batch runs form the next one (batch size follows the load).
        if self._window > 0:
            with trio.move_on_after(self._window):
                await self._full.wait()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while self._pending:
            batch, self._pending = (
                self._pending[: self._max_batch],
                self._pending[self._max_batch :],
            )
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
                slot.done.set()

    def statistics(self) -> CoalescerStatistics:
        return CoalescerStatistics(**vars(self._stats))
