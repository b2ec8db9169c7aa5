"""The behavior log file schema and its checks: a table (CSV or parquet, read by `log_files`) with one row
per event:

    user_id    integer
    item_id    integer
    timestamp  integer (any unit; only the order matters)
    label      0 or 1 (clicked)
    item_text  non-empty string; every row of one item_id carries the same text
    sequence   optional: the name of the sequence the event belongs to, or several names
               joined by '|' (e.g. "liked|watched")
    cat_<name> optional, any number: a categorical feature of the event (e.g. cat_gender, cat_occupation):
               strings or integers, empty for unknown (engine.features.categorical)

Without a `sequence` column every event is in `all`, and in `positive` (label 1) or `negative` (label 0).
"""
from __future__ import annotations

import decimal
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from engine.serving.inputs import has_no_visible_content

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp", "label", "item_text")
SEQUENCE_COLUMN = "sequence"
CATEGORY_PREFIX = "cat_"
SEQUENCE_SEPARATOR = "|"
DEFAULT_SEQUENCES = ("positive", "negative", "all")


class LogFormatError(ValueError):
    """The behavior log table does not follow the schema; the message names the column and row."""


def validate_frame(frame: pd.DataFrame, sequence_names: Sequence[str] | None, source: str) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, str], tuple[str, ...]]:
    """(user, item, timestamp, label, membership, item_texts, sequence_names) of a table in the file schema,
    in `BehaviorLog`'s field order; LogFormatError naming the column and row of the first violation.
    `sequence_names` fixes the order of the sequences (it must name every sequence in the table); by default
    they come in order of first appearance. `source` names the table in error messages."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise LogFormatError(f"{source}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)} "
                             f"(+ optional {SEQUENCE_COLUMN!r}), got {list(frame.columns)}")
    if len(frame) == 0:
        raise LogFormatError(f"{source}: the table has no rows")
    categorical = {str(c)[len(CATEGORY_PREFIX):]: _category_column(frame[c], str(c), source) for c in frame.columns
                   if str(c).startswith(CATEGORY_PREFIX)}
    if "" in categorical or "user_id" in categorical:
        raise LogFormatError(f"{source}: a categorical column must be named cat_<name>, <name> not empty nor "
                             f"'user_id' (the user column is that feature already)")
    extra = [c for c in frame.columns if c not in REQUIRED_COLUMNS and c != SEQUENCE_COLUMN
             and not str(c).startswith(CATEGORY_PREFIX)]
    if extra:
        logger.debug("%s: ignoring extra columns %s", source, extra)
    frame = frame.reset_index(drop=True)
    user, item, timestamp, label = (_integer_column(frame, c, source) for c in REQUIRED_COLUMNS[:4])
    bad = np.flatnonzero((label != 0) & (label != 1))
    if bad.size:
        i = int(bad[0])
        raise LogFormatError(f"{source}: column 'label' must be 0 or 1, row {i} holds {_show(frame['label'].iloc[i])}")
    item_texts = _item_texts(frame, item, source)
    if SEQUENCE_COLUMN in frame.columns:
        membership, names = _membership_from_column(frame[SEQUENCE_COLUMN], sequence_names, source)
    else:
        names = DEFAULT_SEQUENCES
        membership = np.stack([label == 1, label == 0, np.ones(label.size, bool)], axis=1)
        if sequence_names is not None and tuple(sequence_names) != DEFAULT_SEQUENCES:
            raise LogFormatError(f"{source}: without a {SEQUENCE_COLUMN!r} column the sequences are "
                                 f"{DEFAULT_SEQUENCES}, got sequence_names={tuple(sequence_names)}")
    return user, item, timestamp, label, membership, item_texts, names, categorical


def _category_column(values: pd.Series, column: str, source: str) -> np.ndarray:
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
            raise LogFormatError(f"{source}: column {column!r} must hold strings or integers, row {i} holds {_show(cell)}")
    return out


def _show(value: Any) -> str:
    """repr of a table cell, numpy scalars as plain Python values (1.5, not np.float64(1.5))."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _integer_column(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
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
                raise _bad_integer(values, column, int(above[0]), source)
        return values.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(values.dtype):
        as_float = values.to_numpy(dtype=np.float64, na_value=np.nan)
        ok = np.isfinite(as_float)
        ok[ok] = (as_float[ok] == np.floor(as_float[ok])) & (np.abs(as_float[ok]) < _EXACT_FLOAT)
        if not ok.all():
            raise _bad_integer(values, column, int(np.flatnonzero(~ok)[0]), source)
        return as_float.astype(np.int64)
    out = np.empty(len(values), dtype=np.int64)  # object or string cells (rare): one by one, exactly
    for i, cell in enumerate(values.tolist()):
        number = _exact_integer(cell)
        if number is None or not _INT64.min <= number <= _INT64.max:
            raise _bad_integer(values, column, i, source)
        out[i] = number
    return out


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


def _bad_integer(values: pd.Series, column: str, i: int, source: str) -> LogFormatError:
    """The error for row i of an integer column: out of the int64 range, an inexact float, or not an integer."""
    cell = values.iloc[i]
    cell = cell.item() if isinstance(cell, np.generic) else cell
    number = _exact_integer(cell)
    if number is not None or (isinstance(cell, float) and math.isfinite(cell) and cell == math.floor(cell)
                              and abs(cell) > _INT64.max):
        return LogFormatError(f"{source}: column {column!r} row {i} holds {cell!r}, outside the int64 range "
                              f"[-2^63, 2^63 - 1]")
    if isinstance(cell, float) and math.isfinite(cell) and cell == math.floor(cell):
        return LogFormatError(f"{source}: column {column!r} row {i} holds {cell!r}, a float too large to be an "
                              f"exact integer (2^53 or more); write the column as integers, without a decimal point")
    return LogFormatError(f"{source}: column {column!r} must hold integers, row {i} holds {cell!r}")


def _item_texts(frame: pd.DataFrame, item: np.ndarray, source: str) -> dict[int, str]:
    """item id -> text; LogFormatError for a missing, non-string or blank text, or an id with two texts."""
    texts = frame["item_text"]
    missing = np.flatnonzero(texts.isna().to_numpy(dtype=bool))
    if missing.size:
        i = int(missing[0])
        raise LogFormatError(f"{source}: column 'item_text' is missing at row {i} (item_id {int(item[i])})")
    not_text = np.flatnonzero(~texts.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool))
    if not_text.size:
        i = int(not_text[0])
        raise LogFormatError(f"{source}: column 'item_text' must hold strings, row {i} holds {_show(texts.iloc[i])}")
    empty = np.flatnonzero(texts.str.strip().eq("").to_numpy(dtype=bool))
    if empty.size:
        i = int(empty[0])
        raise LogFormatError(f"{source}: column 'item_text' is empty at row {i} (item_id {int(item[i])})")
    invisible = np.flatnonzero(texts.map(has_no_visible_content).to_numpy(dtype=bool))
    if invisible.size:
        i = int(invisible[0])
        raise LogFormatError(f"{source}: column 'item_text' has no visible content at row {i} (item_id "
                             f"{int(item[i])}): {texts.iloc[i]!r}")
    pairs = pd.DataFrame({"item_id": item, "item_text": texts.to_numpy(dtype=object)}).drop_duplicates()
    clash = pairs["item_id"].duplicated(keep=False).to_numpy()
    if clash.any():
        item_id = int(pairs["item_id"].to_numpy()[clash][0])
        rows = pairs.index[pairs["item_id"].to_numpy() == item_id][:2].tolist()
        raise LogFormatError(f"{source}: item_id {item_id} has two different texts: {texts.iloc[rows[0]]!r} "
                             f"(row {rows[0]}) and {texts.iloc[rows[1]]!r} (row {rows[1]})")
    return dict(zip(pairs["item_id"].tolist(), pairs["item_text"].tolist()))


def _membership_from_column(column: pd.Series, sequence_names: Sequence[str] | None,
                            source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(N, S) bool membership and the sequence order from a `sequence` column of names joined by '|'."""
    codes, cells = pd.factorize(column, use_na_sentinel=True)  # cells in order of first appearance
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        raise LogFormatError(f"{source}: column {SEQUENCE_COLUMN!r} is missing at row {i}")
    parsed: list[list[str]] = []
    for code, cell in enumerate(cells):
        names = [n.strip() for n in str(cell).split(SEQUENCE_SEPARATOR)] if isinstance(cell, str) else [""]
        if not all(names):
            i = int(np.flatnonzero(codes == code)[0])
            raise LogFormatError(f"{source}: column {SEQUENCE_COLUMN!r} must name one or more sequences joined by "
                                 f"{SEQUENCE_SEPARATOR!r}, row {i} holds {cell!r}")
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
