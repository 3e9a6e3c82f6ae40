"""Sizes and durations of each run mode: smoke (make test), quick (≤ 2 min), full."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Sizes:
    name: str
    # enqueue: closed-loop max, then open-loop runs at fractions of it
    max_s: float
    rate_s: float
    fractions: tuple[float, ...]
    batch: int
    concurrency: int  # closed-loop tasks when measuring a maximum rate
    # dequeue
    dq_prefill: int
    dq_fractions: tuple[float, ...]
    e2s_jobs: int
    e2s_gap_s: float
    # full-cycle throughput
    tp_workers: tuple[int, ...]
    tp_max_jobs: tuple[int, ...]
    tp_s: float
    tp_warm_s: float
    # cost growth
    cost_resident: tuple[int, ...]
    cost_dead: int
    cost_samples: int
    cost_tp_s: float
    # long-poll workers held open
    longpoll_workers: int
    longpoll_s: float
    # peers
    peer_jobs: int
    peer_concurrency: int
    # group commit on and off (embedded, PostgreSQL): jobs, tasks, runs each way
    gc_jobs: int
    gc_concurrency: int
    gc_runs: int
    # the throughput scenario's smallest backlog (jobs queued ahead of the workers)
    tp_backlog: int = 500
    # Throughput runs per resident size in ``cost`` (the backlog topped up between
    # them); the median is the figure.  One run of 5,000 jobs on memory storage
    # lasts about 0.2 s, and one full collection can take a third of that.
    cost_runs: int = 1
    # Windows of ``rate_s`` (``longpoll_s``) at each point a target is read from
    # (half the maximum; the held long-polls), each prepared afresh.  The verdict
    # reads the p99 of all their samples; the report lists each window's p99.
    judged_windows: int = 1


SMOKE = Sizes(
    name="smoke",
    max_s=0.2,
    rate_s=0.2,
    fractions=(0.5,),
    batch=10,
    concurrency=4,
    dq_prefill=300,
    dq_fractions=(0.5,),
    e2s_jobs=5,
    e2s_gap_s=0.005,
    tp_workers=(1, 4),
    tp_max_jobs=(1, 10),
    tp_s=0.2,
    tp_warm_s=0.05,
    cost_resident=(50, 200),
    cost_dead=100,
    cost_samples=10,
    cost_tp_s=0.2,
    longpoll_workers=10,
    longpoll_s=0.2,
    peer_jobs=100,
    peer_concurrency=4,
    gc_jobs=200,
    gc_concurrency=4,
    gc_runs=1,
)

QUICK = Sizes(
    name="quick",
    max_s=0.5,
    rate_s=0.6,
    fractions=(0.25, 0.5, 0.9),
    batch=10,
    concurrency=16,
    dq_prefill=3_000,
    dq_fractions=(0.5,),
    e2s_jobs=40,
    e2s_gap_s=0.01,
    tp_workers=(1, 16, 256),
    tp_max_jobs=(1, 10),
    tp_s=0.6,
    tp_warm_s=0.2,
    cost_resident=(1_000, 4_000),
    cost_dead=300,
    cost_samples=50,
    cost_tp_s=0.5,
    longpoll_workers=50,
    longpoll_s=0.6,
    peer_jobs=600,
    peer_concurrency=32,
    gc_jobs=2_000,
    gc_concurrency=32,
    gc_runs=2,
)

FULL = Sizes(
    name="full",
    max_s=3.0,
    rate_s=5.0,
    fractions=(0.1, 0.25, 0.5, 0.75, 0.9, 1.1),
    batch=10,
    concurrency=32,
    dq_prefill=60_000,
    dq_fractions=(0.25, 0.5, 0.75, 0.9),
    e2s_jobs=200,
    e2s_gap_s=0.02,
    tp_workers=(1, 4, 16, 64, 256),
    tp_max_jobs=(1, 10, 100),
    tp_s=5.0,
    tp_warm_s=1.0,
    cost_resident=(10_000, 100_000, 1_000_000),
    cost_dead=1_000_000,
    cost_samples=1_000,
    cost_tp_s=5.0,
    longpoll_workers=10_000,
    longpoll_s=5.0,
    peer_jobs=20_000,
    peer_concurrency=32,
    gc_jobs=20_000,
    gc_concurrency=64,
    gc_runs=3,
    judged_windows=3,
    cost_runs=3,
)

# The fraction of the measured maximum that the latency targets are read at.
JUDGED_FRACTION = 0.5

MODES = {"smoke": SMOKE, "quick": QUICK, "full": FULL}

# Storages that only get a smoke run (SQS on moto: moto handles one request at a
# time, and every job is an item and a message): the smoke sizes, trimmed so
# that every scenario still runs each code path once.
SMOKE_ONLY_SIZES = replace(
    SMOKE,
    dq_prefill=60,
    tp_workers=(4,),
    tp_max_jobs=(10,),
    tp_backlog=40,
    cost_resident=(20, 50),
    cost_dead=20,
)
