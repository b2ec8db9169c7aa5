"""Which behaviors of a long history the model reads: the one rule shared by the scorer, timeline training
and the baselines' data.

A history of L <= M behaviors (M = max_behaviors) is read whole. A longer one is read from `window_start`, the
smallest multiple of the step S at which at most M behaviors remain: between M - S + 1 and M of the most recent
behaviors, positions counted from the window's start. Starts move in steps of S, not one behavior at a time,
so many targets of one user share a window: timeline training runs each window once for all of them (about
M / S windows' work per behavior instead of one window per target), and a served user's cached per-layer
states stay valid while appended behaviors leave its window start where it was. S = 1 is the plain "last M".
"""
from __future__ import annotations

import numpy as np


def window_start(lengths: int | np.ndarray, max_behaviors: int, step: int) -> int | np.ndarray:
    """Index of the first behavior read of a history of `lengths` behaviors (an int or an int array)."""
    if max_behaviors < 1 or not 1 <= step <= max_behaviors:
        raise ValueError(f"need max_behaviors >= 1 and 1 <= step <= max_behaviors, got {max_behaviors}, {step}")
    over = np.maximum(np.asarray(lengths, dtype=np.int64) - max_behaviors, 0)
    start = -(-over // step) * step
    return int(start) if np.ndim(start) == 0 else start
