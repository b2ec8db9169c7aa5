"""A log's timestamp column -> (N,) int64, from integers or ISO-8601 times, detected or declared.

- `integer`: integers in whatever unit the log uses (seconds, milliseconds, a counter: only the order and the
  split's cut points depend on them), read exactly as int64 (`log_schema`).
- `iso8601`: ISO-8601 strings (`2024-05-01`, `2024-05-01T12:30:00Z`, `2024-05-01 12:30:00.250+02:00`, or
  a parquet timestamp column) -> epoch milliseconds, UTC; a time without an offset is read as UTC. So an
  ISO log and a log of epoch-millisecond integers share one time line.
- `auto` (default): `integer` when every cell is an integer, `iso8601` when none is; a column mixing the two
  kinds is refused naming the first cell of the other kind.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

TIMESTAMP_KINDS = ("auto", "integer", "iso8601")
_INTEGER = r"\s*[+-]?[0-9]+(?:\.0*)?\s*"


def timestamp_kind(values: pd.Series, declared: str) -> str:
    """'integer' or 'iso8601': the `declared` kind, or for 'auto' 'integer' when any cell is an integer (the
    integer reader then names any other cell) and 'iso8601' when none is (the ISO reader names a bad cell)."""
    if declared not in TIMESTAMP_KINDS:
        raise ValueError(f"timestamps must be one of {TIMESTAMP_KINDS}, got {declared!r}")
    if declared != "auto":
        return declared
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return "iso8601"
    if not (pd.api.types.is_object_dtype(values.dtype) or pd.api.types.is_string_dtype(values.dtype)):
        return "integer"  # numbers (or booleans: refused by the integer reader)
    return "integer" if _integer_cells(values).any() else "iso8601"


def _integer_cells(values: pd.Series) -> np.ndarray:
    """(N,) bool: the cell is a number or a string holding an integer (vectorized over strings)."""
    text = values.map(lambda v: v if isinstance(v, str) else None)
    matched = text.str.fullmatch(_INTEGER)
    return (text.isna() | matched.fillna(False).astype(bool)).to_numpy(dtype=bool)


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
                    "(such as 2024-05-01T12:30:00Z)")
    return parsed.dt.tz_convert("UTC").dt.as_unit("ms").astype("int64").to_numpy(dtype=np.int64)
