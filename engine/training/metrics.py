"""CTR metrics in plain numpy: ROC AUC (rank statistic, ties as average ranks) and log loss.

Both take 1-D array-likes of equal length N (numpy arrays, lists, CPU tensors):
`labels` holds 0/1 (ints, bools or floats), scores/probabilities are finite floats.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["roc_auc", "log_loss"]


def _labels_and_values(labels: ArrayLike, values: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    v = np.asarray(values, dtype=np.float64)
    if y.ndim != 1 or v.ndim != 1:
        raise ValueError(f"labels and {what} must be 1-D, got shapes {y.shape} and {v.shape}")
    if y.shape != v.shape:
        raise ValueError(f"labels and {what} must have the same length, got {y.size} and {v.size}")
    if y.size == 0:
        raise ValueError(f"labels and {what} are empty")
    is_zero, is_one = y == 0, y == 1
    bad = ~(is_zero | is_one)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"labels must be 0 or 1, got {y[i].item()!r} at position {i}")
    not_finite = ~np.isfinite(v)
    if not_finite.any():
        i = int(np.flatnonzero(not_finite)[0])
        raise ValueError(f"{what} must be finite, got {v[i].item()!r} at position {i}")
    return is_one, v


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """(N,) float64 1-based ranks of `values`; a run of equal values shares the mean of its ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    run_start = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run_end = np.r_[run_start[1:], values.size]  # exclusive
    run_of = np.repeat(np.arange(run_start.size), run_end - run_start)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = ((run_start + 1 + run_end) / 2.0)[run_of]  # mean of ranks start+1 .. end
    return ranks


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative),
    a tie counting 1/2. Computed as the Mann-Whitney U statistic,
    AUC = (sum of positives' average ranks - P (P + 1) / 2) / (P * Q), P positives, Q negatives.
    Raises ValueError when only one class is present (AUC is undefined)."""
    positive, s = _labels_and_values(labels, scores, "scores")
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        only = "positive (1)" if num_neg == 0 else "negative (0)"
        raise ValueError(f"ROC AUC is undefined when only one class is present: all {positive.size} labels are {only}")
    rank_sum = float(_average_ranks(s)[positive].sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def log_loss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy -[y log p + (1 - y) log(1 - p)], with p clipped to [eps, 1 - eps]
    so a confident wrong prediction costs -log(eps) instead of infinity. `probs` must lie in [0, 1]."""
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    positive, p = _labels_and_values(labels, probs, "probs")
    outside = (p < 0.0) | (p > 1.0)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"probs must lie in [0, 1], got {p[i].item()!r} at position {i}")
    p = np.clip(p, eps, 1.0 - eps)
    with np.errstate(divide="ignore"):  # eps = 0 with p in {0, 1} gives inf, as it should
        return float(-np.mean(np.where(positive, np.log(p), np.log1p(-p))))
