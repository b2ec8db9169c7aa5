"""Behavior log files: `load_log` and `write_log`, CSV or parquet by extension, in the schema of
`log_schema`. Parquet files also record the sequence order."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import pandas as pd

from engine.training.data.log import BehaviorLog
from engine.training.data.log_schema import SEQUENCE_COLUMN, LogFormatError

__all__ = ["load_log", "write_log"]

_PARQUET_ORDER_KEY = b"bahe.sequence_names"  # parquet schema metadata: the sequence order, as JSON


def _suffix(path: str | os.PathLike) -> str:
    name = os.fspath(path).lower()
    for suffix in (".csv", ".csv.gz", ".parquet", ".pq", ".parquet.brotli"):
        if name.endswith(suffix):
            return "csv" if suffix.startswith(".csv") else "parquet"
    raise LogFormatError(f"{os.fspath(path)}: unknown file type; expected a .csv, .csv.gz, .parquet or .pq file")


def load_log(path: str | os.PathLike, *, min_history: int = 1,
             sequence_names: Sequence[str] | None = None) -> BehaviorLog:
    """Read and validate a behavior log file (CSV or parquet by extension). Sequence order:
    `sequence_names` if given, else the order stored by `write_log` in a parquet file, else first
    appearance in the file."""
    path = os.fspath(path)
    if _suffix(path) == "csv":
        # Keep texts verbatim: no "NA"/"null" -> NaN, and empty cells stay "" so errors can name them.
        frame = pd.read_csv(path, keep_default_na=False, dtype={"item_text": str, SEQUENCE_COLUMN: str})
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        stored = (table.schema.metadata or {}).get(_PARQUET_ORDER_KEY)
        if sequence_names is None and stored is not None:
            sequence_names = json.loads(stored)
        frame = table.to_pandas()
    return BehaviorLog.from_frame(frame, min_history=min_history, sequence_names=sequence_names, source=path)


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
