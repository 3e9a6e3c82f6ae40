"""Per-queue delivery limits (ojs-rate-limiting.md): rate windows and concurrency caps.

A job may carry ``options.rate_limit`` (``{"max_per_second": n}``,
``{"max_per_minute": n}`` or ``{"limit": n, "window_ms": w}``) and
``options.concurrency`` (max active jobs); both configure the job's queue.
Delivery is throttled at claim time, so a limited job simply stays available.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ojs_trio.engine.errors import InvalidRequest


def parse_rate_limit(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidRequest(
            "options.rate_limit must be an object", details={"field": "rate_limit"}
        )
    for key, per_ms in (("max_per_second", 1000), ("max_per_minute", 60_000)):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(
                    f"options.rate_limit.{key} must be a positive integer",
                    details={"field": f"rate_limit.{key}"},
                )
            return {"limit": value, "window_ms": per_ms}
    limit, window_ms = raw.get("limit"), raw.get("window_ms")
    if (
        isinstance(limit, bool)
        or not isinstance(limit, int)
        or limit < 1
        or isinstance(window_ms, bool)
        or not isinstance(window_ms, int)
        or window_ms < 1
    ):
        raise InvalidRequest(
            "options.rate_limit needs max_per_second, max_per_minute, or limit and window_ms",
            details={"field": "rate_limit"},
        )
    return {"limit": limit, "window_ms": window_ms}


def queue_limits_from(
    options_extra: dict[str, Any],
) -> tuple[dict[str, Any] | None, int | None] | None:
    """The (rate limit, concurrency) a job sets on its queue, or None if neither."""
    raw_rate = options_extra.get("rate_limit")
    raw_conc = options_extra.get("concurrency")
    if raw_rate is None and raw_conc is None:
        return None
    rate = parse_rate_limit(raw_rate) if raw_rate is not None else None
    concurrency = None
    if raw_conc is not None:
        if isinstance(raw_conc, bool) or not isinstance(raw_conc, int) or raw_conc < 1:
            raise InvalidRequest(
                "options.concurrency must be a positive integer", details={"field": "concurrency"}
            )
        concurrency = raw_conc
    return rate, concurrency


@dataclass
class RateWindow:
    """Sliding window of claim times: at most ``limit`` starts per ``window`` seconds."""

    limit: int
    window: float
    starts: deque[float] = field(default_factory=deque)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RateWindow:
        return cls(limit=int(config["limit"]), window=int(config["window_ms"]) / 1000.0)

    def remaining(self, now: float) -> int:
        while self.starts and self.starts[0] <= now - self.window:
            self.starts.popleft()
        return max(0, self.limit - len(self.starts))

    def record(self, now: float) -> None:
        self.starts.append(now)
