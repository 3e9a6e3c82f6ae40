"""Timestamps: epoch seconds (float) inside, RFC 3339 UTC with milliseconds outside."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache

# A wall clock: returns epoch seconds.  Injectable so MockClock tests can drive it.
WallClock = Callable[[], float]


def system_clock() -> float:
    return time.time()


# A job's timestamps are formatted again on every write and every answer (and a
# batch shares one `now`), so most calls repeat a recent value.
@lru_cache(maxsize=16384)
def format_ts(epoch: float) -> str:
    dt = datetime.fromtimestamp(epoch, tz=UTC)
    if dt.year < 1000:  # isoformat pads the year; keep strftime's spelling there
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    # isoformat truncates to milliseconds like the strftime form, several times faster.
    return dt.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",
)


def parse_ts(value: str) -> float:
    """Parse an RFC 3339 timestamp (timezone required) into epoch seconds."""
    if not _RFC3339.match(value):
        raise ValueError(f"not an RFC 3339 timestamp with timezone: {value!r}")
    text = value.replace("z", "Z").replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$",
)


def parse_duration(value: str) -> float:
    """Parse an ISO 8601 duration (days and time parts) into seconds."""
    m = _DURATION.match(value)
    if not m or value in ("P", "PT") or value.endswith("T"):
        raise ValueError(f"not an ISO 8601 duration: {value!r}")
    d, h, mi, s = (float(m.group(k) or 0) for k in ("d", "h", "m", "s"))
    return d * 86400 + h * 3600 + mi * 60 + s


def format_duration(seconds: float) -> str:
    """Seconds as the shortest ISO 8601 time duration (PT5M, PT1H30M, PT0.5S)."""
    if seconds <= 0:
        return "PT0S"
    whole = int(seconds)
    frac = seconds - whole  # exact: no rounding, so parse_duration gives `seconds` back
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    out = "PT"
    if hours:
        out += f"{hours}H"
    if minutes:
        out += f"{minutes}M"
    if frac:
        # repr is the shortest exact spelling; Decimal writes it without an exponent.
        out += format(Decimal(repr(secs + frac)), "f") + "S"
    elif secs:
        out += f"{secs}S"
    return out


def parse_time_spec(value: str, now: float) -> float:
    """An absolute RFC 3339 timestamp, or a relative '+PT5S' offset from now."""
    if value.startswith("+"):
        return now + parse_duration(value[1:])
    return parse_ts(value)
