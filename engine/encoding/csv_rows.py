"""The project's one CSV reader: Python's `csv` module in strict mode, every cell the exact string it holds, each
data row with the file line it starts on (header = line 1), for the log loader (`load_log`), the streamed log
(`prepare_stream`) and `bahe encode --column`. No pandas: the caller decides what a cell means.

Why not pandas or pyarrow: both read a field such as `"Heat" (1995)` (text after a closing quote) as
`Heat (1995)` without a word, and pyarrow lets an unclosed quote swallow the rest of the file. Accepted: quoted
fields with commas, doubled quotes and line breaks; a quote inside an unquoted field (`He said "hi"`), kept as
written; blank lines (skipped); CRLF; a leading byte order mark; gzip (`.gz`). Refused with `error` (a ValueError
class of the caller's: LogFormatError for logs) naming the file and line: bytes that are not UTF-8, text after a
closing quote, a quote never closed, a header naming a column twice, a row with more or fewer fields than the
header, a field over 131,072 characters, an empty file. Several defects: the first in file order is named, by
the whole-file reader (`read_csv_rows`) and the batched one (`csv_row_batches`) alike.

Cost: `read_csv_rows` reads the file in one `csv` pass, the lines found from newlines outside quotes with numpy;
a file that needs it (a csv error to name, a lone carriage return) is read again record by record. The batched
reader always goes record by record (memory: one batch)."""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["CsvRows", "csv_row_batches", "open_binary", "read_csv_rows"]


@dataclass
class CsvRows:
    """A CSV file read: header (C,) names; rows, each C strings; lines (R,) int64: the file line row r starts on."""
    header: list[str]
    rows: list[list[str]]
    lines: np.ndarray


def open_binary(path: str):
    """The file's bytes, unpacked on the fly for a `.gz` name."""
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def read_csv_rows(path: str | os.PathLike, error: type[ValueError] = ValueError) -> CsvRows:
    """The whole file (see the module docstring); `error` naming the file and line of the first defect.
    FileNotFoundError passes through."""
    path = os.fspath(path)
    try:
        with open_binary(path) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError) as err:
        raise error(f"{path}: not a readable CSV file ({type(err).__name__}: {err})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: {_not_utf8(path)}") from None
    fast = _parse_fast(data, text)
    if fast is None:  # record by record: names the line of the first defect
        header, rows, lines = None, [], []
        for header, batch, starts in _records(io.StringIO(text, newline=""), path, error, 0):
            rows.extend(batch)
            lines.extend(starts)
        return CsvRows(_checked_header(header, path, error), rows, np.asarray(lines, dtype=np.int64))
    header, rows, lines = fast
    header = _checked_header(header, path, error)
    ragged = np.flatnonzero(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)) != len(header))
    if ragged.size:
        i = int(ragged[0])
        raise error(_ragged(path, int(lines[i]), len(rows[i]), len(header)))
    return CsvRows(header, rows, np.asarray(lines, dtype=np.int64))


def csv_row_batches(path: str | os.PathLike, batch_rows: int,
                    error: type[ValueError] = ValueError) -> tuple[list[str], Iterator[CsvRows]]:
    """(header, an iterator of CsvRows of at most `batch_rows` rows each, in file order): the rules and messages
    of `read_csv_rows`, read as the iterator is advanced (a defect is raised when its batch is reached)."""
    path = os.fspath(path)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    handle = open_binary(path)  # FileNotFoundError here, before any batch
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="strict", newline="")
    records = _guarded(_records(text, path, error, batch_rows), path, error)
    try:
        header, first, starts = next(records, (None, [], []))
    except BaseException:
        text.close()
        raise
    header = _checked_header(header, path, error)

    def batches() -> Iterator[CsvRows]:
        with text:
            if first:
                yield CsvRows(header, first, np.asarray(starts, dtype=np.int64))
            for _, rows, lines in records:
                yield CsvRows(header, rows, np.asarray(lines, dtype=np.int64))
    return header, batches()


def _guarded(records, path: str, error: type[ValueError]):
    """`records`, a decoding or read error of the underlying file turned into `error` naming the line."""
    try:
        yield from records
    except UnicodeDecodeError:
        raise error(f"{path}: {_not_utf8(path)}") from None
    except (OSError, EOFError) as err:
        raise error(f"{path}: not a readable CSV file ({type(err).__name__}: {err})") from None


def _records(text, path: str, error: type[ValueError], batch_rows: int):
    """(header, rows, their start lines) per batch of `batch_rows` data rows (0: one batch, the whole file); each
    row checked against the header as it is read. A csv error is named by the line its record starts on."""
    header: list[str] | None = None
    rows: list[list[str]] = []
    starts: list[int] = []
    start, yielded = 1, False
    reader = csv.reader(text, strict=True)
    try:
        for record in reader:
            if record and header is None:
                header = _checked_header(record, path, error)
            elif record:
                if len(record) != len(header):
                    raise error(_ragged(path, start, len(record), len(header)))
                rows.append(record)
                starts.append(start)
                if len(rows) == batch_rows:
                    yield header, rows, starts
                    rows, starts, yielded = [], [], True
            start = reader.line_num + 1
    except csv.Error as err:
        raise error(f"{path}: line {start}: {_csv_error(str(err))}") from None
    if rows or not yielded:  # the last batch; a file of a header alone: the header and no rows
        yield header, rows, starts


def _checked_header(header: list[str] | None, path: str, error: type[ValueError]) -> list[str]:
    if header is None:
        raise error(f"{path}: the file is empty: expected a header line naming the columns")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise error(f"{path}: line 1: the header names column(s) {twice} more than once")
    return header


def _ragged(path: str, line: int, fields: int, expected: int) -> str:
    return f"{path}: line {line} has {fields} fields, but the header has {expected}"


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


def _csv_error(message: str) -> str:
    if "unexpected end of data" in message:
        return "a quoted field is never closed"
    if "expected after" in message:
        return ("a quoted field goes on after its closing quote (a field holding a quote must be quoted whole, "
                'its quotes doubled: "The ""Heat"" (1995)")')
    if "field larger than field limit" in message:
        return f"a field is longer than {csv.field_size_limit()} characters"
    return message


def _not_utf8(path: str) -> str:
    """'line L is not UTF-8 text (byte ... at column C)' for the first line of `path` that is not UTF-8."""
    with open_binary(path) as raw:
        for number, line in enumerate(raw, 1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})"
    return "not UTF-8 text"
