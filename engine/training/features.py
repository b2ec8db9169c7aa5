"""Past-only event counts of the log's examples: the inputs of engine.side_features.count_features.

Every statistic of an example counts only events with timestamp strictly before the target's, the rule that
defines histories in BehaviorLog: events sharing the target's moment (the target itself included) never count,
so no label leaks from the target's own time or later.
"""
from __future__ import annotations

import numpy as np

from engine.training.data.log import BehaviorLog

__all__ = ["counts_before", "past_counts", "item_count_table"]


def counts_before(keys: np.ndarray, times: np.ndarray, values: np.ndarray, query_keys: np.ndarray,
                  query_times: np.ndarray) -> np.ndarray:
    """(Q, K) int64 sums of `values` over the events whose key equals the query's and whose time is strictly
    before the query's. keys, times: (N,) integer events; values: (N, K) integers; query_keys, query_times: (Q,).

    (key, time) pairs become one sortable code (dense ranks, key major); events are sorted by it once and
    prefix-summed, and a query's sum is the difference of the prefix at two binary searches: the key's first
    event and its first event at or after the query's time. O((N + Q) log(N + Q))."""
    n = len(keys)
    _, key_rank = np.unique(np.concatenate([keys, query_keys]).astype(np.int64), return_inverse=True)
    time_levels, time_rank = np.unique(np.concatenate([times, query_times]).astype(np.int64), return_inverse=True)
    code = key_rank * time_levels.size + time_rank
    order = np.argsort(code[:n], kind="stable")
    cum = np.zeros((n + 1, values.shape[1]), dtype=np.int64)
    np.cumsum(values[order], axis=0, out=cum[1:])
    sorted_code = code[:n][order]
    first = np.searchsorted(sorted_code, key_rank[n:] * time_levels.size, side="left")
    before = np.searchsorted(sorted_code, code[n:], side="left")
    return cum[before] - cum[first]


def past_counts(log: BehaviorLog, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user_counts, item_counts), both (B, S) int64 for the examples at `rows`: the target user's events in
    each sequence, and all users' events of the target item in each sequence, with timestamp strictly before
    the target's."""
    rows = np.asarray(rows, dtype=np.int64)
    member, t = log.membership.astype(np.int64), log.timestamp[rows]
    user_counts = counts_before(log.user, log.timestamp, member, log.user[rows], t)
    item_counts = counts_before(log.item, log.timestamp, member, log.item[rows], t)
    return user_counts, item_counts


def item_count_table(log: BehaviorLog, before: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids (I,) int64 = log.item_ids, counts (I, S) int64): each item's events per sequence with
    timestamp < `before` (None: all events). The snapshot a trained scorer stores to serve item counts."""
    keep = np.ones(log.num_events, bool) if before is None else log.timestamp < before
    counts = np.zeros((log.item_ids.size, log.num_sequences), dtype=np.int64)
    np.add.at(counts, np.searchsorted(log.item_ids, log.item[keep]), log.membership[keep].astype(np.int64))
    return log.item_ids, counts


class PastCounts:
    """`past_counts` of every event of one log, computed once (a fraction of a second for MovieLens-100K);
    batches index it instead of re-sorting the log per batch."""

    def __init__(self, log: BehaviorLog) -> None:
        self.log = log
        self.user, self.item = past_counts(log, np.arange(log.num_events))

    def __call__(self, log: BehaviorLog, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if log is not self.log:
            return past_counts(log, rows)
        return self.user[rows], self.item[rows]
