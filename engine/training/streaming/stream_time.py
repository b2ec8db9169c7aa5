"""Exact order statistics of a column too big to sort in memory, from repeated streaming passes.

A timestamp t maps to an unsigned 64-bit key that keeps the order (t XOR 2^63, as uint64). Each pass counts the
keys of a range [lo, hi] into BINS equal bins; the bin holding the k-th smallest key becomes the next range,
so every pass narrows the range BINS-fold and at most four passes pin any int64 value exactly (timestamps in
seconds over a few years: two passes). Memory: one (BINS,) histogram per rank sought, whatever the column's
size. The first pass over the whole range is also the histogram that `balanced_edges` cuts into time buckets.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

__all__ = ["BINS", "to_key", "from_key", "histogram", "order_statistics", "balanced_edges"]

BINS = 1 << 16
_SIGN = np.uint64(1 << 63)

Chunks = Callable[[], Iterable[np.ndarray]]  # a fresh pass over the column, chunk by chunk (int64 arrays)


def to_key(values: np.ndarray) -> np.ndarray:
    """(N,) uint64 order-preserving keys of int64 values."""
    return np.asarray(values, dtype=np.int64).view(np.uint64) ^ _SIGN


def from_key(key: int) -> int:
    """The int64 value of a key."""
    return int(key) - (1 << 63)


def _width(lo: int, hi: int, bins: int) -> int:
    return max(1, -(-(hi - lo + 1) // bins))  # ceil, Python ints: hi - lo may exceed int64


def histogram(chunks: Chunks, lo: int, hi: int, bins: int = BINS) -> tuple[np.ndarray, int]:
    """(counts (bins,) int64, width): how many keys fall in [lo + b*width, lo + (b+1)*width), over keys in
    [lo, hi] only."""
    width = _width(lo, hi, bins)
    counts = np.zeros(bins, dtype=np.int64)
    for chunk in chunks():
        counts += _bin_counts(to_key(chunk), lo, hi, width, bins)
    return counts, width


def _bin_counts(keys: np.ndarray, lo: int, hi: int, width: int, bins: int) -> np.ndarray:
    keys = keys[(keys >= np.uint64(lo)) & (keys <= np.uint64(hi))]
    return np.bincount(((keys - np.uint64(lo)) // np.uint64(width)).astype(np.int64), minlength=bins)


def order_statistics(chunks: Chunks, ranks: Sequence[int], n: int, lo: int, hi: int,
                     first: tuple[np.ndarray, int] | None = None, bins: int = BINS) -> list[int]:
    """The values of the given 0-based ranks among the column's n values, whose keys lie in [lo, hi] (a rank
    of n or more: the largest value + 1, the rule of BehaviorLog.split). `first`: the histogram of [lo, hi],
    if a caller already made it (saves a pass)."""
    state = {}  # rank -> [lo, hi, values below lo]
    out: dict[int, int] = {}
    for k in ranks:
        if k >= n:
            out[k] = from_key(hi) + 1
        else:
            state[k] = [lo, hi, 0]
    histograms = {k: first for k in state} if first is not None else None
    while state:
        if histograms is None:  # one pass counts every pending rank's range
            widths = {k: _width(a, b, bins) for k, (a, b, _) in state.items()}
            counts = {k: np.zeros(bins, dtype=np.int64) for k in state}
            for chunk in chunks():
                keys = to_key(chunk)
                for k, (a, b, _) in state.items():
                    counts[k] += _bin_counts(keys, a, b, widths[k], bins)
            histograms = {k: (counts[k], widths[k]) for k in state}
        for k in list(state):
            a, b, below = state[k]
            counts, width = histograms[k]
            cum = np.cumsum(counts) + below
            bin_ = int(np.searchsorted(cum, k, side="right"))  # first bin whose cumulative count exceeds k
            below = int(cum[bin_ - 1]) if bin_ else below
            a, b = a + bin_ * width, min(b, a + (bin_ + 1) * width - 1)
            if width == 1 or a == b:
                out[k] = from_key(a)
                del state[k]
            else:
                state[k] = [a, b, below]
        histograms = None
    return [out[k] for k in ranks]


def balanced_edges(counts: np.ndarray, width: int, lo: int, buckets: int) -> np.ndarray:
    """(buckets-1,) uint64 inner key edges, at bin boundaries of a histogram of [lo, ...], splitting its keys
    into `buckets` time ranges of about equal counts; bucket of a key: searchsorted(edges, key, 'right'). A bin
    heavier than a share stays whole (one timestamp is never split), so a bucket can hold more; ranges may be
    empty."""
    cum = np.cumsum(counts)
    total = int(cum[-1]) if cum.size else 0
    targets = (np.arange(1, buckets) * total) // max(buckets, 1)
    bins = np.searchsorted(cum, targets, side="right")  # a bucket ends after the bin that reaches its target
    last = (1 << 64) - 1
    return np.array([min(lo + int(b) * width, last) for b in bins], dtype=np.uint64)
