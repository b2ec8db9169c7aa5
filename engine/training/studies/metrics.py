"""CTR metrics in plain numpy: ROC AUC (rank statistic, ties as average ranks), log loss, GAUC (per-user AUC
averaged with impression weights), a calibration curve, and user-level bootstrap intervals of AUC, GAUC and of
their differences.

All take 1-D array-likes of equal length N (numpy arrays, lists, CPU tensors):
`labels` holds 0/1 (ints, bools or floats), scores/probabilities are finite floats.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["Interval", "roc_auc", "weighted_roc_auc", "log_loss", "auc_interval", "paired_auc_difference",
           "user_aucs", "gauc", "gauc_interval", "paired_gauc_difference", "calibration_bins", "UNDEFINED_INTERVAL",
           "undefined_as_nan"]

_BOOTSTRAP_CHUNK = 4_000_000  # weights (resamples x examples) held at once by the bootstrap


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


def _tie_runs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): the ascending stable sort of `scores` and the positions in it where a run of equal
    scores begins."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    return order, np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])


def _weighted_aucs(positive: np.ndarray, starts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R,) AUCs of R weightings of the same examples, sorted by score: positive (N,) bool, starts (K,) tie-run
    starts, weights (R, N). AUC = sum over runs of P_k (Q_below + Q_k / 2) / (P Q), with P_k, Q_k the positive
    and negative weight of run k and Q_below the negative weight of lower runs (a tie counts 1/2). NaN where a
    weighting leaves one class without weight."""
    pos = np.add.reduceat(weights * positive, starts, axis=1)
    neg = np.add.reduceat(weights * ~positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + neg / 2.0)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def weighted_roc_auc(labels: ArrayLike, scores: ArrayLike, weights: ArrayLike) -> float:
    """ROC AUC with example weights: every example counts `weights[i]` times (integer weights give the AUC of
    the examples repeated that often). Raises ValueError when a class has no weight."""
    positive, s = _labels_and_values(labels, scores, "scores")
    _, w = _labels_and_values(labels, weights, "weights")
    if (w < 0).any():
        i = int(np.flatnonzero(w < 0)[0])
        raise ValueError(f"weights must be >= 0, got {w[i].item()!r} at position {i}")
    order, starts = _tie_runs(s)
    auc = float(_weighted_aucs(positive[order], starts, w[order][None])[0])
    if np.isnan(auc):
        raise ValueError("ROC AUC is undefined when one class has no weight")
    return auc


@dataclass(frozen=True)
class Interval:
    """A metric on all data and its 95% user-level bootstrap interval (2.5 and 97.5 percentiles)."""

    value: float
    low: float
    high: float
    users: int  # distinct users in the data

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}] ({self.users} users)"


UNDEFINED_INTERVAL = Interval(float("nan"), float("nan"), float("nan"), 0)


def undefined_as_nan(metric: Callable[..., Interval], *args) -> Interval:
    """`metric(*args)`, or an all-NaN Interval where it is undefined (no test user with both classes: only in
    tiny logs)."""
    try:
        return metric(*args)
    except ValueError:
        return UNDEFINED_INTERVAL


def _bootstrap_aucs(labels: ArrayLike, score_sets: list[ArrayLike], users: ArrayLike, resamples: int,
                    seed: int) -> tuple[list[np.ndarray], int]:
    """(R,) AUCs of each score set under the same R resamples of users drawn with replacement (a user drawn
    k times brings all their examples with weight k), and the number of distinct users."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    checked = [_labels_and_values(labels, scores, "scores") for scores in score_sets]
    u = np.asarray(users)
    if u.shape != checked[0][0].shape:
        raise ValueError(f"users must be 1-D with one entry per label ({checked[0][0].size}), got shape {u.shape}")
    _, user_of = np.unique(u, return_inverse=True)
    num_users = int(user_of.max()) + 1
    draws = np.random.default_rng(seed).multinomial(num_users, np.full(num_users, 1.0 / num_users),
                                                    size=resamples)  # (R, U) times each user is drawn
    chunk = max(1, _BOOTSTRAP_CHUNK // u.size)
    out = []
    for positive, s in checked:
        order, starts = _tie_runs(s)
        example_user, example_positive = user_of[order], positive[order]
        out.append(np.concatenate([_weighted_aucs(example_positive, starts, draws[r : r + chunk][:, example_user])
                                   for r in range(0, resamples, chunk)]))
    return out, num_users


def _interval(value: float, resampled: np.ndarray, users: int) -> Interval:
    """Percentile interval over the resamples where the metric is defined (both classes drawn)."""
    resampled = resampled[~np.isnan(resampled)]
    if resampled.size == 0:
        raise ValueError("no bootstrap resample holds both classes; AUC intervals need more users")
    low, high = np.percentile(resampled, [2.5, 97.5])
    return Interval(float(value), float(low), float(high), users)


def auc_interval(labels: ArrayLike, scores: ArrayLike, users: ArrayLike, *, resamples: int = 1000,
                 seed: int = 0) -> Interval:
    """AUC on all examples with a 95% bootstrap interval that resamples users, not examples: one user's
    examples are correlated, so resampling examples would make the interval too narrow. Resamples that draw
    only one class are skipped."""
    (aucs,), num_users = _bootstrap_aucs(labels, [scores], users, resamples, seed)
    return _interval(roc_auc(labels, scores), aucs, num_users)


def paired_auc_difference(labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike, users: ArrayLike, *,
                          resamples: int = 1000, seed: int = 0) -> Interval:
    """AUC(a) - AUC(b) on all examples with a 95% bootstrap interval, both models scored on the same resampled
    users in each resample, so the interval reflects the difference, not each model's own spread."""
    (aucs_a, aucs_b), num_users = _bootstrap_aucs(labels, [scores_a, scores_b], users, resamples, seed)
    return _interval(roc_auc(labels, scores_a) - roc_auc(labels, scores_b), aucs_a - aucs_b, num_users)


def user_aucs(labels: ArrayLike, scores: ArrayLike, users: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids (U,), AUCs (U,), impressions (U,) int64) of the users whose examples hold both classes: each
    user's AUC over their own examples (ties count 1/2), computed for all users at once from ranks within a
    user (sort by (user, score))."""
    positive, s = _labels_and_values(labels, scores, "scores")
    u = np.asarray(users)
    if u.shape != positive.shape:
        raise ValueError(f"users must be 1-D with one entry per label ({positive.size}), got shape {u.shape}")
    ids, user_of = np.unique(u, return_inverse=True)
    order = np.lexsort((s, user_of))
    su, ss, sp = user_of[order], s[order], positive[order]
    new_run = np.r_[True, (su[1:] != su[:-1]) | (ss[1:] != ss[:-1])]
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], su.size]
    user_first = np.searchsorted(su, np.arange(ids.size), side="left")
    run_of = np.repeat(np.arange(run_start.size), run_end - run_start)
    ranks = ((run_start + 1 + run_end) / 2.0)[run_of] - user_first[su]  # 1-based average ranks within the user
    n = np.bincount(su, minlength=ids.size)
    p = np.bincount(su, weights=sp, minlength=ids.size)
    rank_sum = np.bincount(su, weights=np.where(sp, ranks, 0.0), minlength=ids.size)
    q = n - p
    both = (p > 0) & (q > 0)
    aucs = (rank_sum[both] - p[both] * (p[both] + 1) / 2.0) / (p[both] * q[both])
    return ids[both], aucs, n[both].astype(np.int64)


def gauc(labels: ArrayLike, scores: ArrayLike, users: ArrayLike) -> float:
    """Group AUC: the mean of each user's AUC weighted by the user's examples (impressions), over the users with
    both classes; ValueError when no user has both."""
    _, aucs, weights = user_aucs(labels, scores, users)
    if aucs.size == 0:
        raise ValueError("GAUC is undefined: no user has both a positive and a negative example")
    return float(np.average(aucs, weights=weights))


def _bootstrap_gaucs(labels: ArrayLike, score_sets: list[ArrayLike], users: ArrayLike, resamples: int,
                     seed: int) -> tuple[list[float], list[np.ndarray], int]:
    """(GAUC of each score set, (R,) GAUCs of each under the same R user resamples, users with both classes).
    The resample draws every user of `users` (as the AUC bootstrap does), a user drawn k times counting k times."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    all_users = np.unique(np.asarray(users))
    draws = np.random.default_rng(seed).multinomial(all_users.size, np.full(all_users.size, 1.0 / all_users.size),
                                                    size=resamples)  # (R, U_all)
    values, resampled, counted = [], [], 0
    for scores in score_sets:
        ids, aucs, weights = user_aucs(labels, scores, users)
        if aucs.size == 0:
            raise ValueError("GAUC is undefined: no user has both a positive and a negative example")
        w = draws[:, np.searchsorted(all_users, ids)] * weights  # (R, U_both)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled.append((w @ aucs) / w.sum(axis=1))
        values.append(float(np.average(aucs, weights=weights)))
        counted = ids.size
    return values, resampled, counted


def gauc_interval(labels: ArrayLike, scores: ArrayLike, users: ArrayLike, *, resamples: int = 1000,
                  seed: int = 0) -> Interval:
    """GAUC with a 95% bootstrap interval over users (the same resampling as `auc_interval`); `users` of the
    Interval: the users with both classes, the ones GAUC averages."""
    (value,), (resampled,), counted = _bootstrap_gaucs(labels, [scores], users, resamples, seed)
    return _interval(value, resampled, counted)


def paired_gauc_difference(labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike, users: ArrayLike, *,
                           resamples: int = 1000, seed: int = 0) -> Interval:
    """GAUC(a) - GAUC(b) with a 95% paired bootstrap interval: both on the same resampled users."""
    (a, b), (ra, rb), counted = _bootstrap_gaucs(labels, [scores_a, scores_b], users, resamples, seed)
    return _interval(a - b, ra - rb, counted)


def calibration_bins(labels: ArrayLike, probs: ArrayLike, bins: int = 10) -> list[tuple[float, float, int]]:
    """The calibration curve: (mean predicted probability, observed positive rate, examples) of each non-empty
    bin of `bins` equal-width probability bins over [0, 1]."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    positive, p = _labels_and_values(labels, probs, "probs")
    if ((p < 0.0) | (p > 1.0)).any():
        i = int(np.flatnonzero((p < 0.0) | (p > 1.0))[0])
        raise ValueError(f"probs must lie in [0, 1], got {p[i].item()!r} at position {i}")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    n = np.bincount(which, minlength=bins)
    mean_p = np.bincount(which, weights=p, minlength=bins)
    rate = np.bincount(which, weights=positive, minlength=bins)
    return [(float(mean_p[b] / n[b]), float(rate[b] / n[b]), int(n[b])) for b in range(bins) if n[b]]
