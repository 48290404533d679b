"""JSON written on the request path: orjson (20-30x faster than the standard library on a hybrid
query or a page of hits), the standard library where orjson refuses a value. Reading stays with
the standard library: orjson reads an integer past 64 bits as a float, and OpenSearch's
`unsigned_long` holds up to 2^64 - 1, so a document's value would come back altered."""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """`value` as compact JSON. Integers past 64 bits and keys that are not strings, which orjson
    refuses, go through the standard library; NaN and infinities are refused either way."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
