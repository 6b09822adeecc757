"""Stable content hashes of specs (canonical JSON), used for every cache key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any


def canonical(value: Any) -> Any:
    """A JSON-able, order-independent form of ``value`` (dataclasses, tuples, paths, floats)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return repr(value)
        # 1.0 and 1 hash alike only if written alike: keep floats as floats, via repr.
        return {"__float__": repr(value)}
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    raise TypeError(f"cannot hash value of type {type(value).__name__}: {value!r}")


def stable_hash(value: Any, length: int = 16) -> str:
    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
