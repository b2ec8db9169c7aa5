"""Behavior text -> normalized text -> stable signed 64-bit key (the table's row index key)."""
from __future__ import annotations

import hashlib
import unicodedata

import numpy as np


def normalize_text(text: object, what: str = "behavior text") -> str:
    """NFC-normalize, strip and collapse runs of whitespace; reject non-strings, blank texts and
    texts that are not valid Unicode (lone surrogates: they have no UTF-8 form to store or hash)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r}")
    normalized = " ".join(unicodedata.normalize("NFC", text).split())
    if not normalized:
        raise ValueError(f"{what} is empty or whitespace-only: {text!r}")
    try:
        normalized.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid Unicode (lone surrogate at position {err.start}): {text!r}") from None
    return normalized


def text_key(normalized: str) -> int:
    """Stable signed 64-bit key of an already-normalized text (BLAKE2b, 8-byte digest)."""
    digest = hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_keys(normalized: list[str]) -> np.ndarray:
    """(n,) int64 keys of already-normalized texts."""
    return np.fromiter((text_key(t) for t in normalized), dtype=np.int64, count=len(normalized))
