"""The texts `bahe encode` reads: a text file (one per line; blank lines skipped; a leading byte order mark
dropped) or a column of a CSV file (the project's one strict CSV reader, engine.encoding.csv_rows, as for logs)
or of a parquet file, each text checked as the encoder would (UTF-8, visible content, no lone surrogate) before
anything is encoded, so a bad text is named by the file and its line (a CSV file's: the line its row starts on,
header = line 1) or a parquet file's 0-based row, and the column. No pandas."""
from __future__ import annotations

import os
from pathlib import Path

from engine.encoding.csv_rows import read_csv_rows
from engine.encoding.text_checks import check_visible
from weights.text_key import normalize_text

PARQUET_SUFFIXES = (".parquet", ".pq")


def read_texts(path: str | os.PathLike, column: str | None) -> list[str]:
    """The file's texts; ValueError (or OSError) naming the file and the line (or row) and column of the first bad
    one: `texts.csv: line 7, column 'text': text is empty`."""
    path = os.fspath(path)
    texts, places = _text_lines(path) if column is None else _column_texts(path, column)
    for text, place in zip(texts, places):
        try:
            normalize_text(text, "text")
            check_visible(text)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {place}: {err}") from None
    return texts


def _text_lines(path: str) -> tuple[list[str], list[str]]:
    texts, places = [], []
    data = Path(path).read_bytes()
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                             f"{err.start + 1})") from None
        if line.strip():
            texts.append(line)
            places.append(f"line {number}")
    return texts, places


def _column_texts(path: str, column: str) -> tuple[list[object], list[str]]:
    """(the column's cells, the place of each): a CSV cell as the exact string it holds (an empty cell is "",
    refused as empty), a parquet cell as stored (a null is refused as not a str)."""
    if path.lower().endswith(PARQUET_SUFFIXES):
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            names = pq.read_schema(path).names
            if column not in names:
                raise ValueError(f"{path}: column {column!r} not in the file (columns: {names})")
            texts = pq.read_table(path, columns=[column]).column(column).to_pylist()
        except pa.ArrowException as err:
            raise ValueError(f"{path}: not a readable parquet file ({err})") from None
        return texts, [f"row {i}, column {column!r}" for i in range(len(texts))]
    table = read_csv_rows(path)  # ValueError naming the file and line of a malformed row
    if column not in table.header:
        raise ValueError(f"{path}: column {column!r} not in the file (columns: {table.header})")
    j = table.header.index(column)
    return [row[j] for row in table.rows], [f"line {line}, column {column!r}" for line in table.lines.tolist()]
