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

__all__ = ["freeze_startup_heap"]


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
