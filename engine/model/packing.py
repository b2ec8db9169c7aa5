"""Packing variable-length lists of ids into the ragged layout (values (T,), lengths (n,))."""
from __future__ import annotations

import numpy as np


def pack_lists(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ints (token ids per text) -> their concatenation (T,) int64 and lengths (n,) int64."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    return np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(lengths.sum())), lengths
