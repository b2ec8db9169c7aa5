"""Dense side features of the CTR model, computed the same way at training and at serving: from
the user's past counts per named sequence and the item's past counts per sequence."""
from __future__ import annotations

import numpy as np


def count_feature_width(num_sequences: int) -> int:
    return 4 * num_sequences


def count_features(user_counts: np.ndarray, item_counts: np.ndarray) -> np.ndarray:
    """(B, S) user and item counts -> (B, 4S) float32: log1p counts and smoothed shares of each side."""
    out = []
    for counts in (user_counts, item_counts):
        counts = counts.astype(np.float64)
        total = counts.max(axis=1, keepdims=True) if counts.shape[1] else np.zeros((counts.shape[0], 1))
        out += [np.log1p(counts), (counts + 1) / (total + 2)]
    return np.concatenate(out, axis=1).astype(np.float32)
