"""UUIDv7 identifiers (RFC 9562): time-ordered, so ids sort by creation."""

from __future__ import annotations

import os
import random
import re
import threading
import time

UUID7_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

_lock = threading.Lock()
_last_ms = 0
_seq = 0
# The random bits only have to keep ids of different processes apart within one
# millisecond and counter value, so a generator seeded from the OS (reseeded in a
# forked child, which would otherwise repeat its parent's stream) serves; reading
# os.urandom for every id was a system call per job and per event.
_random = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(16)))


def uuid7() -> str:
    """A new UUIDv7; monotonic within this process (12-bit counter per millisecond)."""
    global _last_ms, _seq
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            _seq += 1
            if _seq > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _seq = 0
            ms = _last_ms
        else:
            _last_ms = ms
            _seq = _random.getrandbits(10)  # leave room to count up
        seq = _seq
        rand = _random.getrandbits(62)
    return format_uuid7(ms, seq, rand)


def format_uuid7(ms: int, counter: int, rand: int) -> str:
    """The UUIDv7 text for a millisecond timestamp, a 12-bit counter and 62 random bits."""
    value = (
        (ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76
        | (counter & 0xFFF) << 64
        | 0b10 << 62
        | (rand & ((1 << 62) - 1))
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_uuid7(value: str) -> bool:
    return bool(UUID7_RE.match(value))
