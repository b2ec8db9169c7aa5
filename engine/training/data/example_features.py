"""Past-only event counts of the log's examples: the inputs of engine.features.side_features.count_features; and the
examples' categorical feature rows (engine.features.categorical).

Every statistic of an example counts only events with timestamp strictly before the target's, the rule that
defines histories in BehaviorLog: events sharing the target's moment (the target itself included) never count,
so no label leaks from the target's own time or later.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.features.categorical import USER_ID, category_buckets, category_rows
from engine.config import ModelConfig
from engine.model.head import SideInputs
from engine.features.side_features import count_features
from engine.training.data.log import BehaviorLog

__all__ = ["counts_before", "past_counts", "item_count_table", "category_batch", "log_categorical_features"]


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


def recent_counts(log: BehaviorLog, rows: np.ndarray, window: int) -> np.ndarray:
    """(B, S) int64: of the target user's last `window` events strictly before the target's timestamp, how
    many are in each sequence (the log is sorted by (user, timestamp), so they are the rows just before the
    target's moment)."""
    rows = np.asarray(rows, dtype=np.int64)
    cum = np.zeros((log.num_events + 1, log.num_sequences), dtype=np.int64)
    np.cumsum(log.membership, axis=0, out=cum[1:])
    end = np.searchsorted(log.user, log.user[rows], side="left") + log.history_length[rows]
    start = np.maximum(end - window, np.searchsorted(log.user, log.user[rows], side="left"))
    return cum[end] - cum[start]


class PastCounts:
    """`past_counts` (and, for a `window` > 0, `recent_counts`) of every event of one log, computed once (a
    fraction of a second for MovieLens-100K); batches index them instead of re-sorting the log per batch."""

    def __init__(self, log: BehaviorLog, window: int = 0) -> None:
        self.log, self.window = log, window
        every = np.arange(log.num_events)
        self.user, self.item = past_counts(log, every)
        self.recent = recent_counts(log, every, window) if window else None

    def __call__(self, log: BehaviorLog, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(user, item, recent or None) counts of the examples at `rows`, each (B, S)."""
        if log is not self.log:
            return (*past_counts(log, rows), recent_counts(log, rows, self.window) if self.window else None)
        return self.user[rows], self.item[rows], None if self.recent is None else self.recent[rows]


def dense_features(counts: PastCounts, log: BehaviorLog, rows: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The CTR model's dense features (engine.features.side_features.count_features) of the examples at `rows`, with the
    sequences in the model's order `names`."""
    user, item, recent = counts(log, rows)
    order = [log.sequence_names.index(name) for name in names]
    return count_features(user[:, order], item[:, order], None if recent is None else recent[:, order])


def category_batch(side: SideInputs, config: ModelConfig, log: BehaviorLog, rows: np.ndarray,
                   training: bool) -> torch.Tensor | None:
    """(B, F) embedding rows of the model's categorical features at `rows` (engine.features.categorical); a training
    batch first marks its buckets as seen, so the unseen row stands for exactly the values training never had.
    None for a model without categorical features."""
    names = config.categorical_features
    if not names:
        return None
    buckets = category_buckets(names, [log.category_values(name, rows) for name in names], config.categorical_buckets)
    if training:
        seen = side.category_seen
        seen[torch.from_numpy(np.unique(buckets[buckets >= 0])).to(seen.device)] = True
    return torch.from_numpy(category_rows(buckets, side.category_seen.cpu().numpy()))


def log_categorical_features(spec: str, log: BehaviorLog) -> tuple[str, ...]:
    """The categorical features to train with: 'all' (the user id and every cat_ column of the log), 'none', or
    names joined by ',' (ValueError naming one the log does not have)."""
    available = (USER_ID, *log.categorical)
    if spec == "all":
        return available
    if spec == "none":
        return ()
    names = tuple(name.strip() for name in spec.split(","))
    missing = [name for name in names if name not in available]
    if missing:
        raise ValueError(f"categorical features {missing} are not in the log, which has {list(available)}")
    return names
