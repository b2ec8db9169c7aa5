"""Behavior log files: `load_log` and `write_log`, CSV or parquet by extension, in the schema of
`log_schema`. Parquet files also record the sequence order."""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from engine.training.data.log import BehaviorLog
from engine.training.data.log_catalog import join_catalog
from engine.training.data.log_schema import LogFormatError

__all__ = ["load_log", "read_csv_strict", "write_log"]

_PARQUET_ORDER_KEY = b"bahe.sequence_names"  # parquet schema metadata: the sequence order, as JSON


def _suffix(path: str | os.PathLike) -> str:
    name = os.fspath(path).lower()
    for suffix in (".csv", ".csv.gz", ".parquet", ".pq", ".parquet.brotli"):
        if name.endswith(suffix):
            return "csv" if suffix.startswith(".csv") else "parquet"
    raise LogFormatError(f"{os.fspath(path)}: unknown file type; expected a .csv, .csv.gz, .parquet or .pq file")


def load_log(path: str | os.PathLike, *, min_history: int = 1, sequence_names: Sequence[str] | None = None,
             catalog: str | os.PathLike | None = None, timestamps: str = "auto") -> BehaviorLog:
    """Read and validate a behavior log file (CSV or parquet by extension). Sequence order:
    `sequence_names` if given, else the order stored by `write_log` in a parquet file, else first
    appearance in the file. `catalog`: an item catalog file (item_id, item_text[, cat_<name>]) giving the
    events' item texts (`log_catalog`); `timestamps`: 'auto', 'integer' or 'iso8601' (`log_time`). A file
    that is not a table in the schema is a LogFormatError naming the file, the place (CSV: the file line,
    header counted; parquet: the 0-based row) and the column."""
    path = os.fspath(path)
    frame, lines, stored = _read_table(path)
    sequence_names = stored if sequence_names is None else sequence_names
    if catalog is not None:
        items, item_lines, _ = _read_table(os.fspath(catalog))
        frame = join_catalog(frame, lines, path, items, item_lines, os.fspath(catalog))
    return BehaviorLog.from_frame(frame, min_history=min_history, sequence_names=sequence_names, source=path,
                                  lines=lines, timestamps=timestamps)


def _read_table(path: str) -> tuple[pd.DataFrame, np.ndarray | None, list[str] | None]:
    """(table, the file line of each row (CSV) or None, the sequence order stored in a parquet file or None)."""
    if _suffix(path) == "csv":
        return (*read_csv_strict(path), None)
    frame, stored = _read_parquet(path)
    return frame, None, stored


def read_csv_strict(path: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(every cell as the exact string it holds, the file line each data row starts on). Python's csv reader in
    strict mode, not pandas or pyarrow: both rewrite a field such as `"Heat" (1995)` (a closing quote followed
    by more text) silently, and pyarrow lets an unclosed quote swallow the rest of the file. Refused with
    LogFormatError naming the line: bytes that are not UTF-8, such a quote, a quote never closed, a row
    with more or fewer fields than the header, a header naming a column twice, an empty file. Blank lines
    are skipped; a quoted field may hold commas, doubled quotes and line breaks; a leading BOM is dropped."""
    try:
        with _open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError) as err:
        raise LogFormatError(f"{path}: not a readable CSV file ({type(err).__name__}: {err})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LogFormatError(f"{path}: {_not_utf8(path)}") from None
    parsed = _parse_fast(data, text)
    header, rows, starts = parsed if parsed is not None else _parse_checked(text, path)
    if header is None:
        raise LogFormatError(f"{path}: the file is empty: expected a header line naming the columns")
    ragged = np.flatnonzero(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)) != len(header))
    if ragged.size:
        i = int(ragged[0])
        raise LogFormatError(f"{path}: line {starts[i]} has {len(rows[i])} fields, but the header has {len(header)}")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise LogFormatError(f"{path}: line 1: the header names column(s) {twice} more than once")
    cells = np.empty((len(rows), len(header)), dtype=object)  # rows are all header-long: one C-level copy
    if rows:
        cells[:] = rows
    frame = pd.DataFrame({name: pd.Series(cells[:, j], dtype=object) for j, name in enumerate(header)})
    return frame, np.asarray(starts, dtype=np.int64)


def _parse_fast(data: bytes, text: str) -> tuple | None:
    """(header, data rows, the line each starts on) read in one pass of the csv module, the lines found from
    the newlines outside quotes (an even number of quotes before them: doubled quotes keep the parity); None
    when the file needs the checked pass (a csv error to name, a lone carriage return, a count that differs)."""
    if "\r" in text.replace("\r\n", ""):
        return None
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error:
        return None
    raw = np.frombuffer(data, dtype=np.uint8)
    newlines, quotes = np.flatnonzero(raw == ord("\n")), np.flatnonzero(raw == ord('"'))
    opening = quotes[::2]  # parity holds while every opening quote starts a field or doubles the quote before it
    doubled = np.zeros(opening.size, dtype=bool)
    doubled[1:] = quotes[1::2][:opening.size - 1] == opening[1:] - 1
    starts_field = (opening == 0) | np.isin(raw[np.maximum(opening - 1, 0)], (ord(","), ord("\n")))
    if not (starts_field | doubled).all():  # a quote inside an unquoted field (He"at): kept as text, breaks parity
        return None
    ends = newlines[np.searchsorted(quotes, newlines) % 2 == 0]  # record separators
    lines = np.concatenate([[1], np.searchsorted(newlines, ends) + 2])  # line each segment starts on
    segments = ends.size + (0 if ends.size and ends[-1] == raw.size - 1 else 1) if raw.size else 0
    if len(records) != segments:
        return None
    filled = [i for i, record in enumerate(records) if record]
    if not filled:
        return None, [], []
    body = filled[1:]
    return records[filled[0]], [records[i] for i in body], lines[body]


def _parse_checked(text: str, path: str) -> tuple:
    """(header, data rows, the line each starts on) record by record, naming the line of a csv error."""
    rows: list[list[str]] = []
    starts: list[int] = []
    header: list[str] | None = None
    start = 1
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        for record in reader:
            if record and header is None:
                header = record
            elif record:
                rows.append(record)
                starts.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise LogFormatError(f"{path}: line {start}: {_csv_error(str(err))}") from None
    return header, rows, starts


def _csv_error(message: str) -> str:
    if "unexpected end of data" in message:
        return "a quoted field is never closed"
    if "expected after" in message:
        return ("a quoted field goes on after its closing quote (a field holding a quote must be quoted whole, "
                'its quotes doubled: "The ""Heat"" (1995)")')
    if "field larger than field limit" in message:
        return f"a field is longer than {csv.field_size_limit()} characters"
    return message


def _open(path: str, mode: str, **kwargs):
    return gzip.open(path, mode + ("t" if "b" not in mode else ""), **kwargs) if path.lower().endswith(".gz") \
        else open(path, mode, **kwargs)


def _not_utf8(path: str) -> str:
    """'line L is not UTF-8 text (byte ... at column C)' for the first line of `path` that is not UTF-8."""
    with _open(path, "rb") as raw:
        for number, line in enumerate(raw, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})"
    return "not UTF-8 text"


def _read_parquet(path: str) -> tuple[pd.DataFrame, list[str] | None]:
    """The table and the sequence order `write_log` stored (None if absent)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        frame = table.to_pandas()
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as err:
        raise LogFormatError(f"{path}: not a readable parquet file ({err})") from None
    stored = (table.schema.metadata or {}).get(_PARQUET_ORDER_KEY)
    if stored is None:
        return frame, None
    try:
        names = json.loads(stored)
    except (ValueError, UnicodeDecodeError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LogFormatError(f"{path}: metadata {_PARQUET_ORDER_KEY.decode()} must be a JSON list of sequence "
                             f"names, got {stored[:80]!r}")
    return frame, names


def write_log(log: BehaviorLog, path: str | os.PathLike) -> None:
    """Write `log` in the file schema (CSV or parquet by extension), so that `load_log(path)` gives
    the same log; parquet files also record the sequence order."""
    path = os.fspath(path)
    frame = log.to_frame()
    if _suffix(path) == "csv":
        frame.to_csv(path, index=False)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[_PARQUET_ORDER_KEY] = json.dumps(list(log.sequence_names)).encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)
