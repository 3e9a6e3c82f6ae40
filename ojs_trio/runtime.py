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

__all__ = ["YOUNG_GC_THRESHOLD", "freeze_startup_heap", "raise_gc_threshold"]

# Allocations (net of frees) of tracked objects between young collections.
# CPython's default, 700, is crossed by a single claim of 32 jobs (each job's
# record, args and Job object), so a busy engine collected hundreds of times
# a second, about 9 % of the embedded drain's CPU (docs/performance.md).  A young
# collection is a pause as long as the walk over the young generation: about
# 2 ms (up to 5) at 10,000, which set the embedded enqueue p99 at half the
# maximum rate; about 0.3 ms (up to 1.4) at 2,000, with the same drain throughput.
YOUNG_GC_THRESHOLD = 2_000


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


def raise_gc_threshold(young: int = YOUNG_GC_THRESHOLD) -> None:
    """Collect the youngest generation every ``young`` allocations, not every 700.

    The older generations keep their thresholds; a threshold already higher is
    left as it is.  ``ojs-trio serve`` calls it at start-up; an application
    embedding the engine may call it once, like :func:`freeze_startup_heap`.
    """
    current, older, oldest = gc.get_threshold()
    if current and current < young:  # 0: the collector is off, leave it off
        gc.set_threshold(young, older, oldest)
