"""A log's id and timestamp columns (read by `log_schema`).

Ids: user_id and item_id -> int64 codes the log computes with, and the exact keys behind them
(`weights.id_vocabulary`: strings and integers alike; 17 and "17" are one id). A column whose keys are all
integers in canonical decimal form within int64 keeps those integers as codes (integer logs read as before;
no key table needed). Any other column - UUIDs, hashes, SKUs, "017", integers beyond int64 - gets dense codes
0, 1, ... in order of first appearance, and its keys (code c -> keys[c]). Either way two cells have the same
code exactly when they have the same key.

Timestamps -> (N,) int64, from integers or ISO-8601 times, detected or declared:
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

from weights.id_vocabulary import IdError, IdVocabulary, id_key

_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_INT64 = np.iinfo(np.int64)
TIMESTAMP_KINDS = ("auto", "integer", "iso8601")
_INTEGER = r"\s*[+-]?[0-9]+(?:\.0*)?\s*"


def id_codes(values: pd.Series, column: str, where: Callable[[int], str], error: type[ValueError],
             vocabulary: IdVocabulary | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """((N,) int64 codes, (K,) object keys by code or None when the codes are the integer ids themselves);
    `error` (LogFormatError) naming the line (`where(i)`) and column of a cell that is not an id. With a
    `vocabulary` (a log read in parts), every id is numbered through it (extending it), integers too."""
    signed_ints = pd.api.types.is_signed_integer_dtype(values.dtype) and not values.isna().any()
    if vocabulary is None and signed_ints:
        return values.to_numpy(dtype=np.int64), None
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        raise error(f"{where(i)}, column {column!r}: the id is missing (empty cell)")
    keys = []
    for u, value in enumerate(uniques.tolist()):
        try:
            keys.append(id_key(value))
        except IdError as err:
            i = int(np.flatnonzero(codes == u)[0])
            raise error(f"{where(i)}, column {column!r}: {err}") from None
    if vocabulary is None and all(_CANONICAL_INT.fullmatch(k) and _INT64.min <= int(k) <= _INT64.max for k in keys):
        return np.array([int(k) for k in keys], dtype=np.int64)[codes], None
    vocabulary = IdVocabulary() if vocabulary is None else vocabulary
    numbers = vocabulary.extend(keys)  # a key can come twice (17 and "17"): same number
    return numbers[codes], np.array(vocabulary.keys, dtype=object)


def keys_of(codes: np.ndarray, keys: np.ndarray | None) -> list[str]:
    """The keys of `codes` (their decimal text when the codes are the ids)."""
    return [str(c) for c in codes.tolist()] if keys is None else keys[codes].tolist()


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
