"""Group commit (the PostgreSQL adapter's Coalescer), on an autojump MockClock."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

from ojs_trio.storage.postgres.coalesce import Coalescer

BATCH_S = 0.010  # what one batch "transaction" takes


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.finished: list[list[int]] = []  # batches that ran to the end
        self.fail = fail

    async def run(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        await trio.sleep(BATCH_S)
        self.finished.append(list(items))
        if self.fail:
            raise RuntimeError("batch failed")
        return [item * 10 for item in items]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_leader_returns_after_its_own_batch_while_callers_keep_arriving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Before the lead was handed over, the first caller drained every batch that a
    # steady stream formed, and returned only when the stream stopped (enqueue max
    # latency = the benchmark window, 5 s).
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, handover_after=0.005)
    finished_at: dict[int, float] = {}
    submitted_at: dict[int, float] = {}

    async def call(i: int) -> None:
        submitted_at[i] = trio.current_time()
        assert await coalescer.submit(i) == i * 10
        finished_at[i] = trio.current_time()

    async with trio.open_nursery() as nursery:
        for i in range(200):  # one call every 3 ms for 0.6 s; each batch takes 10 ms
            nursery.start_soon(call, i)
            await trio.sleep(0.003)
    assert sorted(finished_at) == list(range(200))
    assert [i for batch in recorder.batches for i in batch] == list(range(200))  # FIFO
    worst = max(finished_at[i] - submitted_at[i] for i in range(200))
    # The running batch, its own, then at most one more begun within handover_after.
    assert worst <= 3 * BATCH_S + 1e-9, worst
    stats = coalescer.statistics()
    assert stats.calls == 200 and 1 < stats.batches < 200


async def test_a_cancelled_caller_still_has_its_work_applied_and_never_holds_the_lead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, handover_after=0)
    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await coalescer.submit(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, 0)  # leader, its batch runs 10 ms
        await trio.sleep(0.001)
        cancel_me = trio.CancelScope()

        async def cancelled_caller() -> None:
            with cancel_me:
                await coalescer.submit(1)

        nursery.start_soon(cancelled_caller)  # queued first: first in line for the lead
        await trio.sleep(0.0005)
        nursery.start_soon(call, 2)
        await trio.sleep(0.002)
        cancel_me.cancel()  # leaves while the leader's batch runs
    assert results == {0: 0, 2: 20}
    # The cancelled call's work was still done, in the batch led by the next caller.
    assert recorder.batches == [[0], [1, 2]]  # caller 2 led, as 1 had gone
    # A later call finds no stale leader.
    assert await coalescer.submit(3) == 30


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "alone"])
async def test_a_caller_cancelled_while_running_its_batch_gets_its_result(
    autojump_clock: trio.testing.MockClock, coalesce: bool
) -> None:
    # A leader, or any caller without coalescing: its work is applied whole
    # (nothing is interrupted half-way), and it learns so; the cancellation takes
    # effect at its next checkpoint.
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, coalesce=coalesce)
    returned: list[int] = []
    with trio.move_on_after(BATCH_S / 2) as scope:
        returned.append(await coalescer.submit(1))
        await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert returned == [10]
    assert recorder.finished == [[1]]


async def test_a_failed_batch_raises_in_every_caller_of_that_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    coalescer: Coalescer[int, int] = Coalescer(Recorder(fail=True).run)
    errors: list[str] = []

    async def call(i: int) -> None:
        try:
            await coalescer.submit(i)
        except RuntimeError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(call, i)
    assert errors == ["batch failed"] * 3


async def test_without_coalescing_each_call_runs_alone_and_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Group commit off (the benchmark's baseline): no leader, no queue; five
    # concurrent calls are five batches of one, all in flight together.
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, coalesce=False)
    results: dict[int, int] = {}
    finished_at: dict[int, float] = {}
    start = trio.current_time()

    async def call(i: int) -> None:
        results[i] = await coalescer.submit(i)
        finished_at[i] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(call, i)
    assert results == {i: i * 10 for i in range(5)}
    assert sorted(recorder.batches) == [[i] for i in range(5)]
    assert set(finished_at.values()) == {BATCH_S}  # concurrently, not one after another
    stats = coalescer.statistics()
    assert (stats.calls, stats.batches, stats.largest_batch) == (5, 5, 1)


async def test_without_coalescing_a_failure_is_its_callers_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def run(items: Sequence[int]) -> list[int | BaseException]:
        await trio.sleep(BATCH_S)
        return [ValueError(f"bad {i}") if i % 2 else i for i in items]

    coalescer: Coalescer[int, int] = Coalescer(run, coalesce=False)
    outcomes: dict[int, object] = {}

    async def call(i: int) -> None:
        try:
            outcomes[i] = await coalescer.submit(i)
        except ValueError as exc:
            outcomes[i] = str(exc)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(call, i)
    assert outcomes == {0: 0, 1: "bad 1", 2: 2, 3: "bad 3"}


async def test_with_no_handover_delay_a_leader_returns_when_its_own_batch_commits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The enqueue coalescer (handover_after=0): a leader whose call is done passes
    # the lead on at once, so no caller waits for batches that are not its own.
    recorder = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(recorder.run, handover_after=0.0)
    latency: dict[int, float] = {}

    async def call(i: int) -> None:
        start = trio.current_time()
        assert await coalescer.submit(i) == i * 10
        latency[i] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for i in range(100):  # one call every 3 ms; each batch takes 10 ms
            nursery.start_soon(call, i)
            await trio.sleep(0.003)
    assert [i for batch in recorder.batches for i in batch] == list(range(100))  # FIFO
    assert len(recorder.batches) > 10  # still coalesced: ~3 calls per batch
    # At worst: the batch running when it arrived, then its own.
    assert max(latency.values()) <= 2 * BATCH_S + 1e-9, max(latency.values())
