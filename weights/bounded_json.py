"""JSON from files the engine does not trust (table headers, scorer.json): bounded in size, nesting
depth and integer length, strict about NaN/Infinity. Every failure is one `ValueError` with a short
reason, which the caller turns into its documented error (TableFormatError, ScorerFormatError)."""
from __future__ import annotations

import json
import math
import re

import numpy as np

MAX_DEPTH = 64          # the engine's own files nest 3 deep at most
MAX_INT_DIGITS = 40     # 2**64 has 20 digits; longer numbers are refused, not parsed
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


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
    """Deepest bracket nesting of `raw`, strings ignored (vectorized: headers can be megabytes)."""
    skeleton = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = (np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(skeleton, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(steps).max()) if steps.size else 0


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
