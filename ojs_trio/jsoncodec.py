"""JSON on the hot paths: orjson where it gives the same answer as ``json``.

Every job crosses JSON several times: the HTTP request and response bodies, and
on PostgreSQL the enqueue's rows, the claim's record and the ack's record.  The
standard library's encoder and decoder took about an eighth of the drain's CPU;
orjson is several times faster.  Where it would differ from ``json`` we fall
back to ``json``:

* it cannot encode integers beyond 64 bits, or strings with lone surrogates
  (``TypeError``): ``json`` writes them, with ``\\u`` escapes for anything
  outside ASCII so that the output is always valid UTF-8;
* it cannot decode numbers beyond a double, invalid surrogates, ``NaN`` or
  encodings other than UTF-8 (``JSONDecodeError``): ``json`` reads them, and
  what it rejects gets ``json``'s error message.

One difference cannot be caught after the fact: orjson decodes an integer beyond
64 bits as a float.  Stored data never holds one (``check_json_native`` rejects
them; ojs-json-format.md 4.2 wants integers past 2^53 - 1 sent as strings), so
:func:`loads` trusts its input.  :func:`loads_request` is for bodies from
clients: one with a run of 19 or more digits anywhere goes to ``json``, so the
integer stays exact and validation can name the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# 19 digits reach past -2^63; shorter runs are always within orjson's range.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON written by :func:`dumps` or stored by PostgreSQL."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)


def loads_request(data: bytes) -> Any:
    """Decode a client's JSON exactly as ``json.loads`` would, raising its errors."""
    if _LONG_DIGITS.search(data) is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)
