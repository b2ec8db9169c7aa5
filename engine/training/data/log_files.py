"""Behavior log files: `load_log` and `write_log`, CSV or parquet by extension, in the schema of
`log_schema`. Parquet files also record the sequence order. CSV files are read strictly (`read_csv_strict`).

An item catalog file beside an event log (`join_catalog`): one row per item (`item_id`, `item_text`, optional
`cat_<name>` columns: the item's categorical features), so events need not repeat the item's text on every
row; joined by item id under the key rule of `weights.id_vocabulary` (17 and "17" are one item). Refused,
naming the file, the line (CSV) or row (parquet) and the column: a catalog without `item_id`/`item_text`, an
item listed twice, an item text that is missing, blank or of no visible content, an event whose item the
catalog lacks, an event `item_text` that differs from the catalog's, and a `cat_` column in both files."""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from engine.encoding.text_checks import has_no_visible_content
from engine.training.data.log import BehaviorLog
from engine.training.data.log_schema import CATEGORY_PREFIX, LogFormatError, row_places
from weights.id_vocabulary import IdError, id_key

__all__ = ["PARQUET_ORDER_KEY", "join_catalog", "load_log", "log_file_kind", "read_csv_strict", "write_log"]

PARQUET_ORDER_KEY = b"bahe.sequence_names"  # parquet schema metadata: the sequence order, as JSON


def log_file_kind(path: str | os.PathLike) -> str:
    """'csv' or 'parquet', from the file name's extension (how `load_log` and the streamed reader open it);
    LogFormatError naming the file for any other extension."""
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
    events' item texts (`join_catalog`); `timestamps`: 'auto', 'integer' or 'iso8601' (`log_columns`). A file
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
    if log_file_kind(path) == "csv":
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


CATALOG_COLUMNS = ("item_id", "item_text")


def _keys(values: pd.Series, where: Callable[[int], str], column: str) -> np.ndarray:
    """(N,) object: the key of each cell (each distinct cell converted once); LogFormatError naming a non-id."""
    codes, uniques = pd.factorize(values.to_numpy(dtype=object), use_na_sentinel=True)
    if (codes < 0).any():
        raise LogFormatError(f"{where(int(np.flatnonzero(codes < 0)[0]))}, column {column!r}: the id is missing")
    keys = np.empty(len(uniques), dtype=object)
    for u, value in enumerate(uniques.tolist()):
        try:
            keys[u] = id_key(value)
        except IdError as err:
            raise LogFormatError(f"{where(int(np.flatnonzero(codes == u)[0]))}, column {column!r}: {err}") from None
    return keys[codes]


def join_catalog(events: pd.DataFrame, events_lines: np.ndarray | None, source: str, catalog: pd.DataFrame,
                 catalog_lines: np.ndarray | None, catalog_source: str) -> pd.DataFrame:
    """`events` with `item_text` and the catalog's `cat_` columns filled from `catalog` by item id."""
    at_catalog, at_event = row_places(catalog_lines), row_places(events_lines)
    missing = [c for c in CATALOG_COLUMNS if c not in catalog.columns]
    if missing:
        raise LogFormatError(f"{catalog_source}: missing column(s) {missing}; an item catalog has "
                             f"{list(CATALOG_COLUMNS)} (+ optional cat_<name>), got {list(catalog.columns)}")
    catalog = catalog.reset_index(drop=True)
    keys = _keys(catalog["item_id"], lambda i: f"{catalog_source}: {at_catalog(i)}", "item_id")
    row_of: dict[str, int] = {}
    for i, key in enumerate(keys.tolist()):
        if key in row_of:
            raise LogFormatError(f"{catalog_source}: {at_catalog(i)}, column 'item_id': item {key!r} is listed twice "
                                 f"(first at {at_catalog(row_of[key])})")
        row_of[key] = i
    texts = catalog["item_text"].tolist()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip() or has_no_visible_content(text):
            what = "missing" if not isinstance(text, str) else "empty" if not text.strip() else "of no visible content"
            raise LogFormatError(f"{catalog_source}: {at_catalog(i)}, column 'item_text': {what} (item_id {keys[i]})")
    events = events.reset_index(drop=True)
    if "item_id" not in events.columns:
        raise LogFormatError(f"{source}: missing column 'item_id'")
    event_keys = _keys(events["item_id"], lambda i: f"{source}: {at_event(i)}", "item_id")
    distinct, inverse = np.unique(event_keys.astype(str), return_inverse=True)
    found = np.array([row_of.get(key, -1) for key in distinct.tolist()], dtype=np.int64)
    rows = found[inverse.reshape(-1)]
    if (rows < 0).any():
        i = int(np.flatnonzero(rows < 0)[0])
        raise LogFormatError(f"{source}: {at_event(i)}, column 'item_id': item {event_keys[i]!r} is not in the "
                             f"catalog {catalog_source}")
    joined = np.array(texts, dtype=object)[rows]
    if "item_text" in events.columns:
        given = events["item_text"].to_numpy(dtype=object)
        differ = np.flatnonzero((given != joined) & pd.notna(given) & (given != ""))
        if differ.size:
            i = int(differ[0])
            raise LogFormatError(f"{source}: {at_event(i)}, column 'item_text': {given[i]!r} differs from the "
                                 f"catalog's text {joined[i]!r} for item {event_keys[i]!r}")
    shared = [c for c in catalog.columns if str(c).startswith(CATEGORY_PREFIX) and c in events.columns]
    if shared:
        raise LogFormatError(f"{source}: column(s) {shared} are in the catalog {catalog_source} too; keep each "
                             "categorical feature in one file")
    extra = {c: catalog[c].to_numpy(dtype=object)[rows] for c in catalog.columns if str(c).startswith(CATEGORY_PREFIX)}
    return events.assign(item_text=joined, **extra)
