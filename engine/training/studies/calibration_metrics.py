"""Calibration metrics of CTR probabilities: the reliability curve (mean predicted vs observed click rate per
probability bin) and the expected calibration error, ECE = sum over bins of (bin share) x |observed - predicted|.

Bins are equal-width over [0, 1] (Guo et al., 2017), 15 by default; empty bins are left out. A model can be
well ranked (high AUC) and badly calibrated: these measure the probability itself, which bidding uses.

ECE is biased upward on a finite sample: even perfectly calibrated probabilities show an ECE of about
sqrt(2 p (1 - p) / (pi n_bin)) per bin (about 0.01 on 10,000 examples). `ece_noise_floor` measures that floor for
given probabilities by drawing labels from them, so a measured ECE can be read against what this many examples
allow; `ece_interval` resamples users (one user's examples are not independent), as the AUC intervals do."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_BINS = 15


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per non-empty bin: mean predicted probability, observed click rate and example count."""

    predicted: np.ndarray
    observed: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        return float(np.sum(self.count * np.abs(self.observed - self.predicted)) / self.count.sum())


def reliability_curve(labels: ArrayLike, probs: ArrayLike, bins: int = DEFAULT_BINS,
                      weights: ArrayLike | None = None) -> ReliabilityCurve:
    """The curve over `bins` equal-width bins; `weights` (one per example, e.g. bootstrap counts) weigh the
    examples, and `count` is then their summed weight."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise ValueError(f"labels and probs must be non-empty 1-D arrays of one length, got {y.shape} and {p.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probs must be finite and in [0, 1]")
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != p.shape or (w < 0).any():
        raise ValueError(f"weights must be one non-negative number per example, got shape {w.shape}")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, weights=w, minlength=bins)
    keep = count > 0
    predicted = np.bincount(which, weights=w * p, minlength=bins)[keep] / count[keep]
    observed = np.bincount(which, weights=w * y, minlength=bins)[keep] / count[keep]
    return ReliabilityCurve(predicted, observed, count[keep])


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, bins: int = DEFAULT_BINS) -> float:
    return reliability_curve(labels, probs, bins).ece


def ece_noise_floor(probs: ArrayLike, bins: int = DEFAULT_BINS, *, draws: int = 200, seed: int = 0
                    ) -> tuple[float, float]:
    """(mean, 95th percentile) of the ECE that perfectly calibrated `probs` show on this many examples: labels
    drawn as Bernoulli(probs) `draws` times, each draw's ECE measured as a real one would be."""
    p = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    eces = np.array([reliability_curve(rng.random(p.size) < p, p, bins).ece for _ in range(draws)])
    return float(eces.mean()), float(np.percentile(eces, 95))


def ece_interval(labels: ArrayLike, probs: ArrayLike, users: ArrayLike, bins: int = DEFAULT_BINS, *,
                 resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(ECE, 2.5 and 97.5 percentiles of it over `resamples` draws of the users with replacement), a user drawn
    k times weighing k."""
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    keys, user_of = np.unique(np.asarray(users), return_inverse=True)
    rng = np.random.default_rng(seed)
    eces = [reliability_curve(y, p, bins, np.bincount(rng.integers(0, keys.size, keys.size),
                                                      minlength=keys.size)[user_of]).ece for _ in range(resamples)]
    low, high = np.percentile(eces, [2.5, 97.5])
    return reliability_curve(y, p, bins).ece, float(low), float(high)
