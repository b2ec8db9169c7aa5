"""The texts `bahe encode` reads: a text file (one per line; blank lines skipped; a leading byte order mark
dropped) or a CSV/parquet column, each checked as the encoder would (UTF-8, visible content, no lone surrogate)
before anything is encoded, so a bad line is named by the file and line (or column row) it came from."""
from __future__ import annotations

from pathlib import Path

from engine.encoding.text_checks import check_visible
from weights.text_key import normalize_text


def read_texts(path: str, column: str | None) -> list[str]:
    """The file's texts; ValueError (or OSError) naming the file and the line or row of the first bad one."""
    try:
        texts, places = _text_lines(path) if column is None else _column_texts(path, column)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
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
            raise ValueError(f"line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
        if line.strip():
            texts.append(line)
            places.append(f"line {number}")
    return texts, places


def _column_texts(path: str, column: str) -> tuple[list[object], list[str]]:
    import pandas as pd
    if path.endswith((".parquet", ".pq")):
        frame = pd.read_parquet(path)
    else:  # cells verbatim: an empty cell stays "" (refused), not NaN -> "nan"
        frame = pd.read_csv(path, keep_default_na=False, dtype={column: str})
    if column not in frame.columns:
        raise ValueError(f"column {column!r} not in the file (columns: {list(frame.columns)})")
    texts = frame[column].tolist()
    return texts, [f"column {column!r} row {i}" for i in range(len(texts))]
