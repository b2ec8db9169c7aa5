"""Past-only counts of a behavior log (temporary: replaced by the features branch)."""
from __future__ import annotations

import numpy as np

from engine.training.data.log import BehaviorLog


def _strictly_before(key: np.ndarray, timestamp: np.ndarray, membership: np.ndarray,
                     rows: np.ndarray) -> np.ndarray:
    t0 = timestamp.min() if timestamp.size else 0
    span = int(timestamp.max() - t0) + 2 if timestamp.size else 2
    composite = key * span + (timestamp - t0)
    order = np.argsort(composite, kind="stable")
    sorted_c = composite[order]
    cum = np.zeros((order.size + 1, membership.shape[1]), dtype=np.int64)
    np.cumsum(membership[order], axis=0, out=cum[1:])
    first = np.searchsorted(sorted_c, key[rows] * span, side="left")
    lo = np.searchsorted(sorted_c, composite[rows], side="left")
    return cum[lo] - cum[first]


def past_counts(log: BehaviorLog, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows, dtype=np.int64)
    return (_strictly_before(log.user, log.timestamp, log.membership, rows),
            _strictly_before(log.item, log.timestamp, log.membership, rows))
