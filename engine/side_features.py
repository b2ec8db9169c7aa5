"""Dense side features from event counts, the same function at training and at serving time.

The trainer computes counts from the log (engine.training.features.past_counts), the scorer from its stored
snapshot; both pass them through `count_features`, so a model never sees features computed two ways.

Counts come per named sequence (MovieLens: liked, disliked, watched; the generic default: positive, negative,
all). Sequences may overlap (a liked rating is also watched), so the sum over sequences double counts; the
row's total is instead its max over sequences. When one sequence holds every event ('watched', 'all') the max
is exactly the number of events; without such a sequence it is a lower bound, still the same at training and
serving time because it depends on the counts alone.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SIDES", "check_counts", "count_feature_names", "count_features"]

SIDES = ("user", "item")


def check_counts(user_counts: np.ndarray, item_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as (B, S) int64, or ValueError saying which array is wrong and how: not 2-D,
    shapes that differ, a non-integer dtype, or a negative count (with its position)."""
    out = []
    for side, counts in zip(SIDES, (user_counts, item_counts)):
        counts = np.asarray(counts)
        if counts.ndim != 2:
            raise ValueError(f"{side}_counts must be 2-D (B, S), got shape {counts.shape}")
        if not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"{side}_counts must hold integers, got dtype {counts.dtype}")
        if counts.size and counts.min() < 0:
            b, s = np.argwhere(counts < 0)[0].tolist()
            raise ValueError(f"{side}_counts must be >= 0, got {counts[b, s].item()} at [{b}, {s}]")
        out.append(counts.astype(np.int64, copy=False))
    if out[0].shape != out[1].shape:
        raise ValueError(f"user_counts and item_counts must have the same shape (B, S), got {out[0].shape} "
                         f"and {out[1].shape}")
    return out[0], out[1]


def count_feature_names(sequence_names: Sequence[str]) -> list[str]:
    """The F = 4 S names of `count_features` columns, in order: per side (user, item), log1p of each
    sequence's count, then each sequence's smoothed share."""
    return [f"{side}_{kind}_{name}" for side in SIDES for kind in ("log1p", "share") for name in sequence_names]


def count_features(user_counts: np.ndarray, item_counts: np.ndarray) -> np.ndarray:
    """(B, 4 S) float32 features from (B, S) counts: per side, log1p(c_s) (volume, compressed so that heavy
    users and blockbusters do not dominate) and (c_s + 1) / (total + 2) with total = max_s c_s (the mix of
    sequences, Laplace-smoothed so a row with no events gets 1/2 instead of 0/0). Columns are named by
    `count_feature_names`."""
    sides = check_counts(user_counts, item_counts)
    columns = []
    for counts in sides:
        total = counts.max(axis=1, keepdims=True, initial=0)
        columns += [np.log1p(counts), (counts + 1.0) / (total + 2.0)]
    return np.concatenate(columns, axis=1).astype(np.float32)
