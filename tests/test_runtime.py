"""Process tuning helpers (ojs_trio.runtime)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ojs_trio.runtime import OLDEST_GC_THRESHOLD, YOUNG_GC_THRESHOLD, raise_gc_threshold


@pytest.fixture
def restored_thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_raise_gc_threshold_raises_the_young_and_oldest_generations(
    restored_thresholds: None,
) -> None:
    gc.set_threshold(700, 10, 10)
    raise_gc_threshold()
    assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, 10, OLDEST_GC_THRESHOLD)


def test_raise_gc_threshold_never_lowers_it_or_turns_the_collector_on(
    restored_thresholds: None,
) -> None:
    gc.set_threshold(50_000, 5, 5_000)
    raise_gc_threshold()
    assert gc.get_threshold() == (50_000, 5, 5_000)
    gc.set_threshold(50_000, 5, 5)
    raise_gc_threshold()
    assert gc.get_threshold() == (50_000, 5, OLDEST_GC_THRESHOLD)
    gc.set_threshold(0, 10, 10)  # threshold 0 switches automatic collection off
    raise_gc_threshold()
    assert gc.get_threshold() == (0, 10, 10)
