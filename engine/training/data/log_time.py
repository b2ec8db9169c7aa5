"""A log's timestamp column -> (N,) int64, from integers or ISO-8601 times, detected or declared.

- `integer`: integers in whatever unit the log uses (seconds, milliseconds, a counter: only the order and the
  split's cut points depend on them), read exactly as int64 (`log_schema`).
- `iso8601`: ISO-8601 strings (`2024-05-01`, `2024-05-01T12:30:00Z`, `2024-05-01 12:30:00.250+02:00`, or
  a parquet timestamp column) -> epoch milliseconds (UTC, finer digits dropped); a time without an offset is
  read as UTC. So an ISO log and a log of epoch-millisecond integers share one time line. Years 1677-2262
  (pandas' nanosecond range) are always read; a time outside them may be refused.
- `auto` (default): `iso8601` when the first row's timestamp is an ISO-8601 time, else `integer`; a cell of
  the other kind is then refused naming its line (a log holds integers or ISO-8601 times, not both).
"""
from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pandas as pd

TIMESTAMP_KINDS = ("auto", "integer", "iso8601")
_INTEGER = r"\s*[+-]?[0-9]+(?:\.0*)?\s*"


def timestamp_kind(values: pd.Series, declared: str) -> str:
    """'integer' or 'iso8601': the `declared` kind, or for 'auto' 'iso8601' when the first cell is an ISO-8601
    time and 'integer' otherwise (the reader of that kind then names any other cell)."""
    if declared not in TIMESTAMP_KINDS:
        raise ValueError(f"timestamps must be one of {TIMESTAMP_KINDS}, got {declared!r}")
    if declared != "auto":
        return declared
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return "iso8601"
    if not (pd.api.types.is_object_dtype(values.dtype) or pd.api.types.is_string_dtype(values.dtype)):
        return "integer"  # numbers (or booleans: refused by the integer reader)
    first = values.iloc[0] if len(values) else None
    if not isinstance(first, str) or re.fullmatch(_INTEGER, first):
        return "integer"
    parsed = pd.to_datetime(pd.Series([first.strip()]), format="ISO8601", utc=True, errors="coerce")
    return "integer" if parsed.isna().iloc[0] else "iso8601"


def iso_milliseconds(values: pd.Series, where: Callable[[int], str], error: type[ValueError]) -> np.ndarray:
    """(N,) int64 epoch milliseconds (UTC) of ISO-8601 cells; `error` naming the first cell that is not one."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        parsed = values if getattr(values.dt, "tz", None) is not None else values.dt.tz_localize("UTC")
    else:
        cells = values.map(lambda v: v.strip() if isinstance(v, str) else None)
        parsed = pd.to_datetime(cells, format="ISO8601", utc=True, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy(dtype=bool))
    if bad.size:
        i = int(bad[0])
        raise error(f"{where(i)}, column 'timestamp': {values.iloc[i]!r} is not an ISO-8601 time "
                    "(such as 2024-05-01T12:30:00Z) in the years 1677-2262")
    return parsed.dt.tz_convert("UTC").dt.as_unit("ms").astype("int64").to_numpy(dtype=np.int64)
