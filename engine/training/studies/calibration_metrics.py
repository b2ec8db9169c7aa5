"""Calibration metrics of CTR probabilities: the reliability curve (mean predicted vs observed click rate per
probability bin) and the expected calibration error, ECE = sum over bins of (bin share) x |observed - predicted|.

Bins are equal-width over [0, 1] (Guo et al., 2017), 15 by default; empty bins are left out. A model can be
well ranked (high AUC) and badly calibrated: these measure the probability itself, which bidding uses."""
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


def reliability_curve(labels: ArrayLike, probs: ArrayLike, bins: int = DEFAULT_BINS) -> ReliabilityCurve:
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise ValueError(f"labels and probs must be non-empty 1-D arrays of one length, got {y.shape} and {p.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probs must be finite and in [0, 1]")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    keep = count > 0
    predicted = np.bincount(which, weights=p, minlength=bins)[keep] / count[keep]
    observed = np.bincount(which, weights=y, minlength=bins)[keep] / count[keep]
    return ReliabilityCurve(predicted, observed, count[keep])


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, bins: int = DEFAULT_BINS) -> float:
    return reliability_curve(labels, probs, bins).ece
