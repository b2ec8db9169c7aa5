"""Probability calibration of a scorer's output, fitted on validation data and saved with the scorer.

Ads and marketplaces bid on the probability itself, so a CTR model's p must mean p. Two maps, both monotone:
- `platt` (default): p' = sigmoid(a * logit(p) + b), fitted by Newton's method on the validation log loss. It is
  strictly increasing (a > 0 is enforced), so the order of scores - and every AUC and GAUC - is unchanged:
  a CTR engine is judged by AUC first, and calibration must not cost any.
- `isotonic`: the pool-adjacent-violators fit of the validation labels on p, applied by linear interpolation
  between the fitted blocks' mean scores. More flexible (any monotone shape) but non-decreasing only: scores
  inside one flat block tie, which can move AUC; it needs thousands of validation examples to be smooth.
A calibration is a few numbers, a `CalibrationConfig` saved in scorer.json with the rest of the config.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from engine.config import CalibrationConfig

FITTED = ("platt", "isotonic")
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before taking logits
_NEWTON_STEPS = 100


def _checked(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise ValueError(f"labels and probabilities must be non-empty 1-D arrays of one length, got shapes "
                         f"{y.shape} and {p.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probabilities must be finite and in [0, 1]")
    if y.min() == y.max():
        raise ValueError("calibration needs both classes in the labels")
    return y, p


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _fit_platt(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the log loss of sigmoid(a * logit(p) + b): Newton's method from the constant model
    (a = 0, b = logit of the click rate), each step halved until the loss does not rise."""
    x = _logit(p)

    def loss(w: np.ndarray) -> float:
        z = w[0] * x + w[1]
        return float(np.sum(np.logaddexp(0.0, z) - y * z))

    w = np.array([0.0, float(_logit(np.array([y.mean()]))[0])])
    current = loss(w)
    for _ in range(_NEWTON_STEPS):
        q = _sigmoid(w[0] * x + w[1])
        grad = np.array([np.dot(q - y, x), np.sum(q - y)])
        s = q * (1 - q)
        hess = np.array([[np.dot(s, x * x), np.dot(s, x)], [np.dot(s, x), s.sum()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        while loss(w - step) > current and np.abs(step).max() > 1e-12:
            step = step / 2
        w, previous, current = w - step, current, loss(w - step)
        if previous - current <= 1e-12 * max(1.0, abs(previous)):
            break
    if not (np.isfinite(w).all() and w[0] > 0):
        raise ValueError(f"Platt scaling found no increasing map (a = {w[0]:.4g}): the scores do not rank the "
                         "validation labels")
    return float(w[0]), float(w[1])


def _fit_isotonic(y: np.ndarray, p: np.ndarray) -> tuple[list[float], list[float]]:
    """Pool adjacent violators: block mean scores (x) and block click rates (y), both non-decreasing."""
    order = np.argsort(p, kind="stable")
    xs, ys, ws = [], [], []
    for score, label in zip(p[order], y[order]):
        xs.append(score); ys.append(label); ws.append(1.0)
        while len(ys) > 1 and ys[-2] >= ys[-1]:
            w = ws[-2] + ws[-1]
            ys[-2] = (ys[-2] * ws[-2] + ys[-1] * ws[-1]) / w
            xs[-2] = (xs[-2] * ws[-2] + xs[-1] * ws[-1]) / w
            ws[-2] = w
            del xs[-1], ys[-1], ws[-1]
    return [float(v) for v in xs], [float(v) for v in ys]


def fit_calibration(labels: ArrayLike, probs: ArrayLike, kind: str = "platt") -> CalibrationConfig:
    """The calibration of `kind` fitted on validation labels (0/1) and the scorer's probabilities for them."""
    y, p = _checked(labels, probs)
    if kind == "platt":
        a, b = _fit_platt(y, p)
        return CalibrationConfig("platt", a=a, b=b)
    if kind == "isotonic":
        xs, ys = _fit_isotonic(y, p)
        return CalibrationConfig("isotonic", x=tuple(xs), y=tuple(ys))
    raise ValueError(f"calibration kind must be one of {FITTED}, got {kind!r}")


def calibrate(config: CalibrationConfig, probs: np.ndarray) -> np.ndarray:
    """`probs` through the map (unchanged for kind "none"), same shape and dtype, clipped to [eps, 1 - eps]."""
    if config.kind == "none":
        return probs
    p = np.asarray(probs, dtype=np.float64)
    out = _sigmoid(config.a * _logit(p) + config.b) if config.kind == "platt" else np.interp(p, config.x, config.y)
    return np.clip(out, _EPS, 1 - _EPS).astype(np.asarray(probs).dtype, copy=False)
