"""JSON for the PostgreSQL adapter: orjson where it gives the same answer as ``json``.

Every job crosses this codec two or three times (the enqueue's rows, the claim's
record, the ack's record); the standard library's encoder and decoder took about
an eighth of the drain's CPU.  orjson is several times faster, and where it would
differ from ``json`` we fall back to ``json``:

* it cannot encode integers beyond 64 bits, or strings with lone surrogates
  (``TypeError``): ``json`` writes them and PostgreSQL decides, as before;
* it cannot decode numbers beyond a double or invalid surrogates
  (``JSONDecodeError``): ``json`` reads them.

One difference cannot be caught after the fact: orjson decodes an integer beyond
64 bits as a float.  Such integers never reach storage: ``check_json_native``
rejects them (ojs-json-format.md 4.2 requires integers past 2^53 - 1 to travel
as strings anyway).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(obj).encode()


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)
