"""JSON from files the engine does not trust (table headers, scorer.json): bounded in size, nesting
depth and integer length, strict about NaN/Infinity. Every failure is one `ValueError` with a short
reason, which the caller turns into its documented error (TableFormatError, ScorerFormatError)."""
from __future__ import annotations

import json
import math

import numpy as np

MAX_DEPTH = 64          # the engine's own files nest 3 deep at most
MAX_INT_DIGITS = 40     # 2**64 has 20 digits; longer numbers are refused, not parsed
SCAN_CHUNK = 1 << 18    # bytes per vectorized step of the depth scan: bounds its memory to a few MiB
_QUOTE, _BACKSLASH, _OPEN, _CLOSE = ord('"'), ord("\\"), (ord("["), ord("{")), (ord("]"), ord("}"))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(digits)} digits is out of range")
    return int(digits)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth(raw: bytes) -> int:
    """Deepest bracket nesting of `raw`, brackets inside strings ignored. Vectorized chunk by chunk
    (headers can be 100 MiB) with the state carried across chunks: inside a string or not, the trailing
    run of backslashes, the depth. Extra memory is about 40 bytes per byte of one SCAN_CHUNK, whatever
    `raw` holds (a regex over one 20 MB string took 115 bytes per byte)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    inside, run, depth, deepest = False, 0, 0, 0
    for start in range(0, data.size, SCAN_CHUNK):
        chunk = data[start:start + SCAN_CHUNK]
        quotes = np.flatnonzero(chunk == _QUOTE)
        plain = np.flatnonzero(chunk != _BACKSLASH)  # quotes are among these
        if quotes.size:  # a quote after an odd run of backslashes is escaped (outside strings: invalid anyway)
            k = np.searchsorted(plain, quotes)
            before = np.where(k > 0, quotes - plain[np.maximum(k - 1, 0)] - 1, quotes + run)
            quotes = quotes[before % 2 == 0]
        run = chunk.size - 1 - int(plain[-1]) if plain.size else run + chunk.size
        brackets = np.flatnonzero((chunk == _OPEN[0]) | (chunk == _OPEN[1]) | (chunk == _CLOSE[0])
                                  | (chunk == _CLOSE[1]))
        outside = (np.searchsorted(quotes, brackets) + inside) % 2 == 0
        brackets = brackets[outside]
        if brackets.size:
            opens = (chunk[brackets] == _OPEN[0]) | (chunk[brackets] == _OPEN[1])
            levels = depth + np.cumsum(np.where(opens, 1, -1))
            deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        inside ^= bool(quotes.size % 2)
    return deepest


def loads(raw: bytes, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> object:
    """Parse `raw` (UTF-8 JSON) -> Python object; ValueError for more than `max_bytes` bytes, nesting deeper
    than `max_depth`, NaN/Infinity (also as an overflowing float), integers longer than MAX_INT_DIGITS digits, or anything not JSON."""
    if len(raw) > max_bytes:
        raise ValueError(f"{len(raw)} bytes of JSON, more than the {max_bytes} allowed")
    if _depth(raw) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant,
                          parse_int=_bounded_int, parse_float=_finite_float)
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err})") from None
    except RecursionError:  # the depth scan bounds this; kept so nothing else can escape
        raise ValueError("JSON nested too deeply") from None
