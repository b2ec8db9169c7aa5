"""Behavior log files: `load_log` and `write_log`, CSV or parquet by extension, in the schema of
`log_schema`. Parquet files also record the sequence order."""
from __future__ import annotations

import csv
import gzip
import json
import os
import warnings
from collections.abc import Sequence

import pandas as pd

from engine.training.data.log import BehaviorLog
from engine.training.data.log_schema import SEQUENCE_COLUMN, LogFormatError

__all__ = ["PARQUET_ORDER_KEY", "load_log", "log_file_kind", "write_log"]

PARQUET_ORDER_KEY = b"bahe.sequence_names"  # parquet schema metadata: the sequence order, as JSON


def log_file_kind(path: str | os.PathLike) -> str:
    """'csv' or 'parquet', from the file name's extension (how `load_log` and the streamed reader open it);
    LogFormatError naming the file for any other extension."""
    name = os.fspath(path).lower()
    for suffix in (".csv", ".csv.gz", ".parquet", ".pq", ".parquet.brotli"):
        if name.endswith(suffix):
            return "csv" if suffix.startswith(".csv") else "parquet"
    raise LogFormatError(f"{os.fspath(path)}: unknown file type; expected a .csv, .csv.gz, .parquet or .pq file")


def load_log(path: str | os.PathLike, *, min_history: int = 1,
             sequence_names: Sequence[str] | None = None) -> BehaviorLog:
    """Read and validate a behavior log file (CSV or parquet by extension). Sequence order:
    `sequence_names` if given, else the order stored by `write_log` in a parquet file, else first
    appearance in the file. A file that is not a table in the schema is a LogFormatError naming the file
    and, for a CSV file's structure (bytes that are not UTF-8, an open quote, a ragged row), the line."""
    path = os.fspath(path)
    if log_file_kind(path) == "csv":
        frame = _read_csv(path)
    else:
        frame, stored = _read_parquet(path)
        sequence_names = stored if sequence_names is None else sequence_names
    try:
        return BehaviorLog.from_frame(frame, min_history=min_history, sequence_names=sequence_names, source=path)
    except LogFormatError:
        problem = _csv_problem(path) if log_file_kind(path) == "csv" else None  # a short row reads as empty cells
        if problem is None:
            raise
        raise LogFormatError(f"{path}: {problem}") from None


def _read_csv(path: str) -> pd.DataFrame:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # rows longer than the header: data dropped
            # Texts verbatim: no "NA"/"null" -> NaN, and empty cells stay "" so errors can name them. No index
            # column guessed from a header one field short: that would shift every column.
            return pd.read_csv(path, keep_default_na=False, index_col=False,
                               dtype={"item_text": str, SEQUENCE_COLUMN: str})
    except pd.errors.EmptyDataError:
        raise LogFormatError(f"{path}: the file is empty: expected a header line naming the columns") from None
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, pd.errors.ParserWarning) as err:  # ParserError, UnicodeDecodeError, gzip
        problem = _csv_problem(path) if not isinstance(err, (OSError, EOFError)) else None
        raise LogFormatError(f"{path}: {problem or f'not a readable CSV file ({type(err).__name__}: {err})'}") from None


def _open(path: str, mode: str, **kwargs):
    return gzip.open(path, mode + ("t" if "b" not in mode else ""), **kwargs) if path.lower().endswith(".gz") \
        else open(path, mode, **kwargs)


def _csv_problem(path: str) -> str | None:
    """'line L: what' for the first structural fault of a CSV file (bytes that are not UTF-8, a quote left
    open, a row with more or fewer fields than the header), or None. Read only once something failed."""
    try:
        with _open(path, "rb") as raw:
            for number, line in enumerate(raw, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    return f"line {number} is not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})"
        with _open(path, "r", encoding="utf-8-sig", newline="") as text:
            reader, fields, start = csv.reader(text, strict=True), None, 1
            try:
                for record in reader:
                    if record and fields is None:
                        fields = len(record)
                    elif record and len(record) != fields:
                        return f"line {start} has {len(record)} fields, but the header has {fields}"
                    start = reader.line_num + 1
            except csv.Error as err:
                if "field larger than field limit" in str(err):
                    return None
                if "unexpected end of data" in str(err):
                    return f"line {start}: a quoted field is never closed"
                return f"line {start}: {err}"
    except (OSError, EOFError):
        return None
    return None


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
    stored = (table.schema.metadata or {}).get(PARQUET_ORDER_KEY)
    if stored is None:
        return frame, None
    try:
        names = json.loads(stored)
    except (ValueError, UnicodeDecodeError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LogFormatError(f"{path}: metadata {PARQUET_ORDER_KEY.decode()} must be a JSON list of sequence "
                             f"names, got {stored[:80]!r}")
    return frame, names


def write_log(log: BehaviorLog, path: str | os.PathLike) -> None:
    """Write `log` in the file schema (CSV or parquet by extension), so that `load_log(path)` gives
    the same log; parquet files also record the sequence order."""
    path = os.fspath(path)
    frame = log.to_frame()
    if log_file_kind(path) == "csv":
        frame.to_csv(path, index=False)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[PARQUET_ORDER_KEY] = json.dumps(list(log.sequence_names)).encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)
