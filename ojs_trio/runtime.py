"""Process-level tuning for latency-sensitive use.

CPython's cyclic garbage collector walks every tracked object in a full
collection. A server process holds hundreds of thousands of long-lived objects
from start-up (modules, the app, the routing tables) and the storage adds
more; the walks showed up as 30-60 ms stalls in the enqueue-latency benchmark
(p99 54 ms at half the maximum rate on memory storage, 8 ms with the start-up
heap frozen; docs/performance.md).
"""

from __future__ import annotations

import gc

__all__ = [
    "OLDEST_GC_THRESHOLD",
    "YOUNG_GC_THRESHOLD",
    "freeze_startup_heap",
    "raise_gc_threshold",
]

# Allocations (net of frees) of tracked objects between young collections.
# CPython's default, 700, is crossed by a single claim of 32 jobs (each job's
# record, args and Job object), so a busy engine collected hundreds of times
# a second, about 9 % of the embedded drain's CPU (docs/performance.md).  A young
# collection is a pause as long as the walk over the young generation: about
# 2 ms (up to 5) at 10,000, which set the embedded enqueue p99 at half the
# maximum rate; about 0.3 ms (up to 1.4) at 2,000, with the same drain throughput.
YOUNG_GC_THRESHOLD = 2_000

# Middle-generation collections between full ones (CPython: 10, and only once
# the objects promoted since the last full collection are a quarter of those
# that survived it).  Every request parked for a while (a long-poll fetch) is
# promoted, about 130 tracked objects each with Hypercorn's connection state, so
# a server holding 5,000 of them ran a full collection every few seconds: a
# 160-520 ms pause on the benchmark VM, that freed almost nothing (52 objects in
# one; docs/performance.md).  At 1,000 one comes after ~20M allocations at the
# young threshold above.  The price is memory: garbage in reference cycles among
# old objects (mostly from closed connections) waits that much longer.
OLDEST_GC_THRESHOLD = 1_000


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive now out of the collector's reach.

    Call it once when start-up is done. Frozen objects are still freed by
    reference counting; only cycles among them are never collected, which is
    fine for objects meant to live as long as the process. ``ojs-trio serve``
    calls it once it is listening; an application embedding the engine may call
    it after its own start-up.
    """
    gc.collect()
    gc.freeze()


def raise_gc_threshold(young: int = YOUNG_GC_THRESHOLD, oldest: int = OLDEST_GC_THRESHOLD) -> None:
    """Collect the youngest generation every ``young`` allocations, not every 700,
    and the oldest after ``oldest`` middle collections, not 10.

    The middle generation keeps its threshold; a threshold already higher is
    left as it is.  ``ojs-trio serve`` calls it at start-up; an application
    embedding the engine may call it once, like :func:`freeze_startup_heap`.
    """
    current, middle, current_oldest = gc.get_threshold()
    if current:  # 0: the collector is off, leave it off
        gc.set_threshold(max(current, young), middle, max(current_oldest, oldest))
