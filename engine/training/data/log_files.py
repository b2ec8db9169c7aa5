"""Behavior log files: `load_log` and `write_log`, CSV or parquet by extension, in the schema of
`log_schema`. Parquet files also record the sequence order. CSV files are read strictly (`read_csv_strict`).

An item catalog file beside an event log (`join_catalog`): one row per item (`item_id`, `item_text`, optional
`cat_<name>` columns: the item's categorical features), so events need not repeat the item's text on every
row; joined by item id under the key rule of `weights.id_vocabulary` (17 and "17" are one item). Refused,
naming the file, the line (CSV) or row (parquet) and the column: a catalog without `item_id`/`item_text`, an
item listed twice, an item text that is missing, blank or of no visible content, an event whose item the
catalog lacks, an event `item_text` that differs from the catalog's, and a `cat_` column in both files."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from engine.encoding.csv_rows import CsvRows, read_csv_rows
from engine.encoding.text_checks import has_no_visible_content
from engine.training.data.log import BehaviorLog
from engine.training.data.log_schema import CATEGORY_PREFIX, LogFormatError, row_places
from weights.id_vocabulary import IdError, id_key

__all__ = ["PARQUET_ORDER_KEY", "ItemCatalogFile", "csv_frame", "join_catalog", "load_log", "log_file_kind",
           "read_csv_strict", "read_table", "write_log"]

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
    frame, lines, stored = read_table(path)
    sequence_names = stored if sequence_names is None else sequence_names
    if catalog is not None:
        frame = ItemCatalogFile.read(catalog).join(frame, lines, path)
    return BehaviorLog.from_frame(frame, min_history=min_history, sequence_names=sequence_names, source=path,
                                  lines=lines, timestamps=timestamps)


def read_table(path: str) -> tuple[pd.DataFrame, np.ndarray | None, list[str] | None]:
    """(table, the file line of each row (CSV) or None, the sequence order stored in a parquet file or None)."""
    if log_file_kind(path) == "csv":
        return (*read_csv_strict(path), None)
    frame, stored = _read_parquet(path)
    return frame, None, stored


def read_csv_strict(path: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(every cell as the exact string it holds, the file line each data row starts on): the project's one CSV
    reader (`engine.encoding.csv_rows`, strict: a field such as `"Heat" (1995)` is refused, not rewritten),
    LogFormatError naming the file and line."""
    return csv_frame(read_csv_rows(path, LogFormatError))


def csv_frame(rows: CsvRows) -> tuple[pd.DataFrame, np.ndarray]:
    """(a frame of object columns, one per header name, each cell its exact string; the rows' file lines)."""
    cells = np.empty((len(rows.rows), len(rows.header)), dtype=object)  # rows are all header-long: one C-level copy
    if rows.rows:
        cells[:] = rows.rows
    frame = pd.DataFrame({name: pd.Series(cells[:, j], dtype=object) for j, name in enumerate(rows.header)})
    return frame, rows.lines


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


class ItemCatalogFile:
    """An item catalog (item_id, item_text[, cat_<name> ...]) read and checked once, then joined onto events
    (`join`): a whole log's, or each record batch of a streamed one."""

    def __init__(self, catalog: pd.DataFrame, lines: np.ndarray | None, source: str) -> None:
        at = row_places(lines)
        missing = [c for c in CATALOG_COLUMNS if c not in catalog.columns]
        if missing:
            raise LogFormatError(f"{source}: missing column(s) {missing}; an item catalog has "
                                 f"{list(CATALOG_COLUMNS)} (+ optional cat_<name>), got {list(catalog.columns)}")
        catalog = catalog.reset_index(drop=True)
        keys = _keys(catalog["item_id"], lambda i: f"{source}: {at(i)}", "item_id")
        self.row_of: dict[str, int] = {}
        for i, key in enumerate(keys.tolist()):
            if key in self.row_of:
                raise LogFormatError(f"{source}: {at(i)}, column 'item_id': item {key!r} is listed twice "
                                     f"(first at {at(self.row_of[key])})")
            self.row_of[key] = i
        texts = catalog["item_text"].tolist()
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip() or has_no_visible_content(text):
                what = ("missing" if not isinstance(text, str) else "empty" if not text.strip() else
                        "of no visible content")
                raise LogFormatError(f"{source}: {at(i)}, column 'item_text': {what} (item_id {keys[i]})")
        self.source, self.texts = source, np.array(texts, dtype=object)
        self.categorical = {c: catalog[c].to_numpy(dtype=object) for c in catalog.columns
                            if str(c).startswith(CATEGORY_PREFIX)}

    @classmethod
    def read(cls, path: str | os.PathLike) -> ItemCatalogFile:
        """The catalog file at `path` (CSV or parquet), checked."""
        frame, lines, _ = read_table(os.fspath(path))
        return cls(frame, lines, os.fspath(path))

    def join(self, events: pd.DataFrame, lines: np.ndarray | None, source: str, first_row: int = 0) -> pd.DataFrame:
        """`events` with `item_text` and the catalog's `cat_` columns filled in by item id; LogFormatError naming
        the event's line (`lines`) or row (`first_row` + its index) and column."""
        at = row_places(lines, first_row)
        events = events.reset_index(drop=True)
        if "item_id" not in events.columns:
            raise LogFormatError(f"{source}: missing column 'item_id'")
        event_keys = _keys(events["item_id"], lambda i: f"{source}: {at(i)}", "item_id")
        distinct, inverse = np.unique(event_keys.astype(str), return_inverse=True)
        found = np.array([self.row_of.get(key, -1) for key in distinct.tolist()], dtype=np.int64)
        rows = found[inverse.reshape(-1)]
        if (rows < 0).any():
            i = int(np.flatnonzero(rows < 0)[0])
            raise LogFormatError(f"{source}: {at(i)}, column 'item_id': item {event_keys[i]!r} is not in the "
                                 f"catalog {self.source}")
        joined = self.texts[rows]
        if "item_text" in events.columns:
            given = events["item_text"].to_numpy(dtype=object)
            differ = np.flatnonzero((given != joined) & pd.notna(given) & (given != ""))
            if differ.size:
                i = int(differ[0])
                raise LogFormatError(f"{source}: {at(i)}, column 'item_text': {given[i]!r} differs from the "
                                     f"catalog's text {joined[i]!r} for item {event_keys[i]!r}")
        shared = [c for c in self.categorical if c in events.columns]
        if shared:
            raise LogFormatError(f"{source}: column(s) {shared} are in the catalog {self.source} too; keep each "
                                 "categorical feature in one file")
        return events.assign(item_text=joined, **{c: values[rows] for c, values in self.categorical.items()})


def join_catalog(events: pd.DataFrame, events_lines: np.ndarray | None, source: str, catalog: pd.DataFrame,
                 catalog_lines: np.ndarray | None, catalog_source: str) -> pd.DataFrame:
    """`events` with `item_text` and the catalog's `cat_` columns filled from `catalog` by item id."""
    return ItemCatalogFile(catalog, catalog_lines, catalog_source).join(events, events_lines, source)
