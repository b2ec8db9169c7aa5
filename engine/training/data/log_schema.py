"""The behavior log file schema and its checks: a table (CSV or parquet, read by `log_files`) with one row
per event:

    user_id    string or integer id (weights.id_vocabulary: 17 and "17" are one id, "017" another)
    item_id    string or integer id
    timestamp  integer (any unit; only the order matters), or ISO-8601 time (read as epoch milliseconds, UTC):
               `log_columns`, detected per log or declared
    label      0 or 1 (clicked)
    item_text  non-empty string; every row of one item_id carries the same text
    sequence   optional: the name of the sequence the event belongs to, or several names
               joined by '|' (e.g. "liked|watched")
    cat_<name> optional, any number: a categorical feature of the event (e.g. cat_gender, cat_occupation):
               strings or integers, empty for unknown (engine.features.categorical)

Without a `sequence` column every event is in `all`, and in `positive` (label 1) or `negative` (label 0).
Errors name the place of the first bad cell: `line L` of a CSV file (its header is line 1; a quoted field may
span lines: the line it starts on), `row R` (0-based) of a parquet file or a table in memory, and the column.
"""
from __future__ import annotations

import decimal
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from engine.encoding.text_checks import has_no_visible_content
from engine.training.data.log_columns import id_codes, iso_milliseconds, keys_of, timestamp_kind

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp", "label", "item_text")
SEQUENCE_COLUMN = "sequence"
CATEGORY_PREFIX = "cat_"
SEQUENCE_SEPARATOR = "|"
DEFAULT_SEQUENCES = ("positive", "negative", "all")


class LogFormatError(ValueError):
    """The behavior log table does not follow the schema; the message names the column and row."""


Place = Callable[[int], str]


def row_places(lines: np.ndarray | None, first_row: int = 0) -> Place:
    """Data row i -> 'line L' (`lines[i]`: the file line a CSV row starts on) or, without lines, 'row R' (R =
    `first_row` + i: a record batch's row in its file)."""
    return (lambda i: f"row {first_row + i}") if lines is None else (lambda i: f"line {int(lines[i])}")


def validate_frame(frame: pd.DataFrame, sequence_names: Sequence[str] | None, source: str,
                   lines: np.ndarray | None = None, timestamps: str = "auto",
                   vocabularies: dict | None = None, first_row: int = 0) -> tuple:
    """(user, item, timestamp, label, membership, item_texts, sequence_names, categorical, ids) of a table in the
    file schema, in `BehaviorLog`'s field order (ids: {"user": keys or None, "item": keys or None}, see
    `log_columns`); LogFormatError naming the place (`lines[i]`: CSV file line of data row i; else the row) and
    column of the first violation. `sequence_names` fixes the order of the sequences (it must name every
    sequence in the table); by default they come in order of first appearance. `source` names the table.
    `timestamps`: 'auto', 'integer' or 'iso8601' (`log_columns`); `vocabularies` ({"user": IdVocabulary,
    "item": IdVocabulary}, a log read in parts): number every id through them (`log_columns.id_codes`);
    `first_row`: the file row of the table's row 0 (a record batch of a parquet file), for the places named."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise LogFormatError(f"{source}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)} "
                             f"(+ optional {SEQUENCE_COLUMN!r}), got {list(frame.columns)}")
    if len(frame) == 0:
        raise LogFormatError(f"{source}: the table has no rows")
    frame = frame.reset_index(drop=True)
    at = row_places(lines, first_row)
    categorical = {str(c)[len(CATEGORY_PREFIX):]: _category_column(frame[c], str(c), source, at)
                   for c in frame.columns if str(c).startswith(CATEGORY_PREFIX)}
    if "" in categorical or "user_id" in categorical:
        raise LogFormatError(f"{source}: a categorical column must be named cat_<name>, <name> not empty nor "
                             f"'user_id' (the user column is that feature already)")
    extra = [c for c in frame.columns if c not in REQUIRED_COLUMNS and c != SEQUENCE_COLUMN
             and not str(c).startswith(CATEGORY_PREFIX)]
    if extra:
        logger.debug("%s: ignoring extra columns %s", source, extra)
    where = lambda i: f"{source}: {at(i)}"  # noqa: E731
    shared = vocabularies or {}
    user, user_keys = id_codes(frame["user_id"], "user_id", where, LogFormatError, shared.get("user"))
    item, item_keys = id_codes(frame["item_id"], "item_id", where, LogFormatError, shared.get("item"))
    if timestamp_kind(frame["timestamp"], timestamps) == "integer":
        timestamp = _integer_column(frame, "timestamp", source, at)
    else:
        timestamp = iso_milliseconds(frame["timestamp"], where, LogFormatError)
    label = _integer_column(frame, "label", source, at)
    bad = np.flatnonzero((label != 0) & (label != 1))
    if bad.size:
        i = int(bad[0])
        raise LogFormatError(f"{source}: {at(i)}, column 'label': must be 0 or 1, got {_show(frame['label'].iloc[i])}")
    item_texts = _item_texts(frame, item, item_keys, source, at)
    if SEQUENCE_COLUMN in frame.columns:
        membership, names = _membership_from_column(frame[SEQUENCE_COLUMN], sequence_names, source, at)
    else:
        names = DEFAULT_SEQUENCES
        membership = np.stack([label == 1, label == 0, np.ones(label.size, bool)], axis=1)
        if sequence_names is not None and tuple(sequence_names) != DEFAULT_SEQUENCES:
            raise LogFormatError(f"{source}: without a {SEQUENCE_COLUMN!r} column the sequences are "
                                 f"{DEFAULT_SEQUENCES}, got sequence_names={tuple(sequence_names)}")
    return (user, item, timestamp, label, membership, item_texts, names, categorical,
            {"user": user_keys, "item": item_keys})


def _category_column(values: pd.Series, column: str, source: str, at: Place) -> np.ndarray:
    """(N,) object: each cell as text (integers, integral floats as their decimal digits), None where empty;
    LogFormatError naming the row of any other value."""
    out = np.empty(len(values), dtype=object)
    for i, cell in enumerate(values.tolist()):
        if cell is None or (isinstance(cell, float) and math.isnan(cell)) or (isinstance(cell, str) and not cell.strip()):
            out[i] = None
        elif isinstance(cell, str):
            out[i] = cell
        elif (number := _exact_integer(cell)) is not None:
            out[i] = str(number)
        else:
            raise LogFormatError(f"{source}: {at(i)}, column {column!r}: must hold strings or integers, got {_show(cell)}")
    return out


def _show(value: Any) -> str:
    """repr of a table cell, numpy scalars as plain Python values (1.5, not np.float64(1.5))."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _integer_column(frame: pd.DataFrame, column: str, source: str, at: Place) -> np.ndarray:
    """(N,) int64, exactly: LogFormatError naming the first row that is not an integer, lies outside the int64
    range (a larger id would merge users, a larger timestamp would wrap negative) or is a float too large to
    be an exact integer (2^53 or more in magnitude: 2^53 + 1 reads as 2^53)."""
    values = frame[column]
    if pd.api.types.is_bool_dtype(values.dtype):
        if column == "label" and not values.isna().any():
            return values.to_numpy(dtype=np.int64)
        raise LogFormatError(f"{source}: column {column!r} must hold integers, got booleans")
    if pd.api.types.is_integer_dtype(values.dtype) and not values.isna().any():
        if pd.api.types.is_unsigned_integer_dtype(values.dtype):
            above = np.flatnonzero(values.to_numpy() > np.uint64(_INT64.max))
            if above.size:
                raise _bad_integer(values, column, int(above[0]), source, at)
        return values.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(values.dtype):
        as_float = values.to_numpy(dtype=np.float64, na_value=np.nan)
        ok = np.isfinite(as_float)
        ok[ok] = (as_float[ok] == np.floor(as_float[ok])) & (np.abs(as_float[ok]) < _EXACT_FLOAT)
        if not ok.all():
            raise _bad_integer(values, column, int(np.flatnonzero(~ok)[0]), source, at)
        return as_float.astype(np.int64)
    fast = _integer_strings(values)
    if fast is not None:
        return fast
    out = np.empty(len(values), dtype=np.int64)  # other object cells, or a bad one to name: one by one, exactly
    for i, cell in enumerate(values.tolist()):
        number = _exact_integer(cell)
        if number is None or not _INT64.min <= number <= _INT64.max:
            raise _bad_integer(values, column, i, source, at)
        out[i] = number
    return out


def _integer_strings(values: pd.Series) -> np.ndarray | None:
    """(N,) int64 of a column of strings that all hold plain ASCII integers (a CSV file's), vectorized; None
    when a cell is anything else (then read one by one, which names it)."""
    cells = values.to_numpy(dtype=object)
    if not all(isinstance(c, str) for c in cells):
        return None
    joined = "".join(cells)
    if not joined.isascii() or "_" in joined:  # numpy, like int(), would read "1_000" and non-ASCII digits
        return None
    try:
        return np.asarray(cells, dtype=str).astype(np.int64)
    except (ValueError, OverflowError):
        return None


_INT64 = np.iinfo(np.int64)
_EXACT_FLOAT = 2 ** 53  # from here on floats skip integers: 2^53 + 1 reads as 2^53
_INTEGER_TEXT = re.compile(r"\s*[+-]?[0-9]+(\.0*)?\s*")


def _exact_integer(cell: Any) -> int | None:
    """The integer a table cell holds exactly (an int, an integral float below 2^53, a decimal string such
    as '12' or '12.0', an integral Decimal), else None."""
    if isinstance(cell, (bool, np.bool_)):
        return None
    if isinstance(cell, (int, np.integer)):
        return int(cell)
    if isinstance(cell, (float, np.floating)):
        ok = math.isfinite(cell) and cell == math.floor(cell) and abs(cell) < _EXACT_FLOAT
        return int(cell) if ok else None
    if isinstance(cell, str):
        return int(cell.strip().split(".")[0]) if _INTEGER_TEXT.fullmatch(cell) else None
    if isinstance(cell, decimal.Decimal):
        return int(cell) if cell.is_finite() and cell == cell.to_integral_value() else None
    return None


def _bad_integer(values: pd.Series, column: str, i: int, source: str, at: Place) -> LogFormatError:
    """The error for row i of an integer column: out of the int64 range, an inexact float, or not an integer."""
    cell = values.iloc[i]
    cell = cell.item() if isinstance(cell, np.generic) else cell
    number = _exact_integer(cell)
    if number is not None or (isinstance(cell, float) and math.isfinite(cell) and cell == math.floor(cell)
                              and abs(cell) > _INT64.max):
        return LogFormatError(f"{source}: {at(i)}, column {column!r}: {cell if number is None else number!r} is "
                              f"outside the int64 range "
                              f"[-2^63, 2^63 - 1]")
    if isinstance(cell, float) and math.isfinite(cell) and cell == math.floor(cell):
        return LogFormatError(f"{source}: {at(i)}, column {column!r}: {cell!r} is a float too large to be an "
                              f"exact integer (2^53 or more); write the column as integers, without a decimal point")
    return LogFormatError(f"{source}: {at(i)}, column {column!r}: must hold integers, got {cell!r}")


def _item_texts(frame: pd.DataFrame, item: np.ndarray, keys: np.ndarray | None, source: str,
                at: Place) -> dict[int, str]:
    """item code -> text; LogFormatError for a missing, non-string or blank text, or an id with two texts."""
    texts = frame["item_text"]

    def fail(i: int, what: str) -> LogFormatError:
        item_id = keys_of(item[i:i + 1], keys)[0]
        return LogFormatError(f"{source}: {at(i)}, column 'item_text': {what} (item_id {item_id})")

    codes, uniques = pd.factorize(texts.to_numpy(dtype=object), use_na_sentinel=True)  # each text checked once
    if (codes < 0).any():
        raise fail(int(np.flatnonzero(codes < 0)[0]), "missing")
    problems = [None if isinstance(t, str) and t.strip() and not has_no_visible_content(t) else
                f"must hold strings, got {_show(t)}" if not isinstance(t, str) else "empty" if not t.strip() else
                f"no visible content in {t!r}" for t in uniques.tolist()]
    bad = np.array([p is not None for p in problems], dtype=bool)
    if bad.any():
        i = int(np.flatnonzero(bad[codes])[0])
        raise fail(i, problems[codes[i]])
    pairs = pd.DataFrame({"item_id": item, "item_text": texts.to_numpy(dtype=object)}).drop_duplicates()
    clash = pairs["item_id"].duplicated(keep=False).to_numpy()
    if clash.any():
        code = pairs["item_id"].to_numpy()[clash][:1]
        rows = pairs.index[pairs["item_id"].to_numpy() == code[0]][:2].tolist()
        raise LogFormatError(f"{source}: item_id {keys_of(code, keys)[0]} has two different texts: "
                             f"{texts.iloc[rows[0]]!r} ({at(rows[0])}) and {texts.iloc[rows[1]]!r} ({at(rows[1])})")
    return dict(zip(pairs["item_id"].tolist(), pairs["item_text"].tolist()))


def _membership_from_column(column: pd.Series, sequence_names: Sequence[str] | None,
                            source: str, at: Place) -> tuple[np.ndarray, tuple[str, ...]]:
    """(N, S) bool membership and the sequence order from a `sequence` column of names joined by '|'."""
    codes, cells = pd.factorize(column, use_na_sentinel=True)  # cells in order of first appearance
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        raise LogFormatError(f"{source}: {at(i)}, column {SEQUENCE_COLUMN!r}: missing")
    parsed: list[list[str]] = []
    for code, cell in enumerate(cells):
        names = [n.strip() for n in str(cell).split(SEQUENCE_SEPARATOR)] if isinstance(cell, str) else [""]
        if not all(names):
            i = int(np.flatnonzero(codes == code)[0])
            raise LogFormatError(f"{source}: {at(i)}, column {SEQUENCE_COLUMN!r}: must name one or more sequences "
                                 f"joined by {SEQUENCE_SEPARATOR!r}, got {cell!r}")
        parsed.append(names)
    seen = list(dict.fromkeys(n for names in parsed for n in names))
    if sequence_names is None:
        order = tuple(seen)
    else:
        order = tuple(sequence_names)
        unknown = [n for n in seen if n not in order]
        if unknown:
            raise LogFormatError(f"{source}: sequences {unknown} occur in the table but not in sequence_names {order}")
    index = {n: s for s, n in enumerate(order)}
    table = np.zeros((len(parsed), len(order)), dtype=bool)
    for code, names in enumerate(parsed):
        table[code, [index[n] for n in names]] = True
    return table[codes], order
