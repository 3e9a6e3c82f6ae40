"""PNG plots (matplotlib, Agg backend; matplotlib comes with the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _series_key(r: dict[str, Any]) -> str:
    return f"{r['storage']}/{r['transport']}"


def render(results: dict[str, Any], out: Path, stem: str) -> list[str]:
    """Write the plots next to the report; returns their file names."""
    written = []
    for name, draw in (
        ("latency-vs-load", _latency),
        ("throughput-vs-workers", _throughput),
        ("cost-vs-resident", _cost),
    ):
        fig = draw(results)
        if fig is None:
            continue
        filename = f"{stem}-{name}.png"
        fig.savefig(out / filename, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(filename)
    return written


def _latency(results: dict[str, Any]) -> Any:
    enq = [r for r in results["records"] if r["scenario"] == "enqueue"]
    deq = [r for r in results["records"] if r["scenario"] == "dequeue"]
    if not enq and not deq:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, records, title in ((axes[0], enq, "enqueue (single job)"), (axes[1], deq, "fetch")):
        series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        for r in records:
            c = r["case"]
            if c.get("phase") != "open" or c.get("kind", "single") != "single":
                continue
            series.setdefault(_series_key(r), []).append(
                (r["metrics"]["offered_rate"], r["metrics"]["latency"])
            )
        for key, points in sorted(series.items()):
            points.sort(key=lambda p: p[0])
            rates = [p[0] for p in points]
            for pct, style in (("p50_ms", ":"), ("p99_ms", "-"), ("p99_9_ms", "--")):
                values = [p[1][pct] for p in points]
                ax.plot(rates, values, style, marker="o", label=f"{key} {pct[:-3]}")
        ax.set_xlabel("offered rate, calls/s (open loop)")
        ax.set_ylabel("latency, ms (from scheduled send)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency percentiles vs offered load")
    return fig


def _throughput(results: dict[str, Any]) -> Any:
    tp = [r for r in results["records"] if r["scenario"] == "throughput"]
    if not tp:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in tp:
        key = f"{_series_key(r)} max_jobs={r['case']['max_jobs']}"
        series.setdefault(key, []).append((r["case"]["workers"], r["metrics"]["jobs_per_s"]))
    for key, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.axhline(2635, color="grey", linestyle="--", linewidth=1)
    ax.text(1, 2635, " Go reference, PG round trips (published)", fontsize=7, va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers")
    ax.set_ylabel("jobs/s (enqueue → fetch → ack)")
    ax.set_title("Full-cycle throughput vs workers")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _cost(results: dict[str, Any]) -> Any:
    cost = [r for r in results["records"] if r["scenario"] == "cost" and r["case"]["dead"] == 0]
    if not cost:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in cost:
        series.setdefault(_series_key(r), []).append(
            (
                r["case"]["resident"],
                r["metrics"]["jobs_per_s"],
                r["metrics"]["claim_latency"]["p99_ms"] or 0.0,
            )
        )
    for key, points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        axes[0].plot(xs, [p[1] for p in points], marker="o", label=key)
        axes[1].plot(xs, [p[2] for p in points], marker="o", label=key)
    for ax, ylabel in ((axes[0], "throughput, jobs/s"), (axes[1], "claim latency p99, ms")):
        ax.set_xscale("log")
        ax.set_xlabel("resident jobs")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Cost vs resident jobs")
    return fig
