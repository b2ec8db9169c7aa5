"""Per-user time split: each user's last examples are test, the ones before them validation, the rest train.

Unlike BehaviorLog.split (one global time cut, so test users are the ones active late), every user with enough
examples appears in every part: this measures how well a model predicts a user's next events, the usual
leave-last-out protocol.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.training.data.log import BehaviorLog

__all__ = ["Split", "per_user_split"]


@dataclass(frozen=True)
class Split:
    """Example rows of each part, ascending (int64)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def items(self) -> list[tuple[str, np.ndarray]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


def _part_size(fraction: float, counts: np.ndarray) -> np.ndarray:
    """(U,) examples the fraction asks of each user: rounded, at least one when the user has >= 3 examples."""
    size = np.rint(fraction * counts).astype(np.int64)
    return np.where((counts >= 3) & (fraction > 0), np.maximum(size, 1), size)


def per_user_split(log: BehaviorLog, val: float = 0.1, test: float = 0.1) -> Split:
    """Each user's last `test` fraction of examples (by time) is test, the `val` fraction before it validation,
    the rest train; a part asked for gets at least one example of a user with >= 3 examples. A cut that falls
    inside a run of one user's equal timestamps moves to the run's start, so the run joins the later part and,
    for each user, train timestamps < val timestamps < test timestamps (ties can thus grow a later part)."""
    if not (0.0 <= val and 0.0 <= test and val + test <= 1.0):
        raise ValueError(f"split fractions must satisfy 0 <= val, 0 <= test, val + test <= 1, got {val}, {test}")
    rows = log.examples  # ascending, so sorted by (user, timestamp)
    user, time = log.user[rows], log.timestamp[rows]
    position = np.arange(rows.size)
    new_user = np.r_[True, user[1:] != user[:-1]]
    starts = np.flatnonzero(new_user)
    counts = np.diff(np.r_[starts, rows.size])
    run_start = np.maximum.accumulate(np.where(new_user | np.r_[True, time[1:] != time[:-1]], position, 0))
    run_start = np.r_[run_start, rows.size]  # an empty part cuts at its end, which starts a run (or is the end)

    def cut(end: np.ndarray, size: np.ndarray) -> np.ndarray:  # (U,) start of the part of `size` ending at `end`
        return run_start[end - np.minimum(size, end - starts)]

    test_from = cut(starts + counts, _part_size(test, counts))
    val_from = cut(test_from, _part_size(val, counts))
    user_of = np.repeat(np.arange(starts.size), counts)
    part = (position >= val_from[user_of]).astype(np.int64) + (position >= test_from[user_of])
    return Split(train=rows[part == 0], val=rows[part == 1], test=rows[part == 2])
