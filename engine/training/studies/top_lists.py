"""How much the models' top-10 lists overlap across test users (a model that ranks by popularity gives every
user the same list).

For a sample of test users, at one moment (the start of the test period), every item the user has not rated
before that moment is a candidate. The candidates become probe events of a copy of the log (the user, the item,
that moment; in no sequence, label 0): a probe's features are past-only like every example's and all probes share
the moment, so no probe sees another, and a model scores a probe exactly as it would score that (user, item) at
that moment (tested against a log holding only that user's probes).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.training.data.example_features import PastCounts
from engine.training.data.log import BehaviorLog
from engine.training.loops.train import predict

__all__ = ["TopListOverlap", "anchor_rows", "probe_log", "top_lists", "overlap", "model_top_overlap", "neural_scores"]


@dataclass(frozen=True)
class TopListOverlap:
    """users: lists compared; k: list length; pairwise: mean share of a user's list found in another user's list
    (over all pairs; 1: everyone gets the same list); distinct: items in any list; top_item_share: share of the
    lists that hold the most frequent item."""
    users: int
    k: int
    pairwise: float
    distinct: int
    top_item_share: float

    def __str__(self) -> str:
        return (f"{self.pairwise:.3f} pairwise overlap, {self.distinct} distinct items, most frequent item in "
                f"{self.top_item_share:.0%} of {self.users} lists")


def anchor_rows(log: BehaviorLog, test_rows: np.ndarray, users: int, seed: int = 0) -> np.ndarray:
    """(U,) the first test example of `users` test users drawn at random with `seed` (all when fewer), ascending:
    each gives its user (and the user's categorical values) to `probe_log`."""
    test_rows = np.sort(np.asarray(test_rows, dtype=np.int64))
    owners, first = np.unique(log.user[test_rows], return_index=True)
    chosen = np.random.default_rng(seed).choice(owners.size, min(users, owners.size), replace=False)
    return np.sort(test_rows[first[chosen]])


def probe_log(log: BehaviorLog, anchors: np.ndarray, moment: int) -> tuple[BehaviorLog, np.ndarray, np.ndarray]:
    """(the log with probe events at `moment`, (U, I) rows of the probes of each anchor's user and every item of
    log.item_ids in it, (U, I) bool: the item was rated by the user before `moment`)."""
    anchors = np.asarray(anchors, dtype=np.int64)
    u, i, n = anchors.size, log.item_ids.size, log.num_events
    user = np.r_[log.user, np.repeat(log.user[anchors], i)]
    timestamp = np.r_[log.timestamp, np.full(u * i, moment, dtype=np.int64)]
    item = np.r_[log.item, np.tile(log.item_ids, u)]
    membership = np.r_[log.membership, np.zeros((u * i, log.num_sequences), dtype=bool)]
    categorical = {name: np.r_[values, np.repeat(values[anchors], i)] for name, values in log.categorical.items()}
    probe = BehaviorLog(user, item, timestamp, np.r_[log.label, np.zeros(u * i, np.int8)], membership,
                        log.item_texts, log.sequence_names, log.min_history, categorical)
    order = np.lexsort((timestamp, user))  # BehaviorLog's own stable (user, timestamp) sort
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    rated = np.zeros((u, i), dtype=bool)
    for a, row in enumerate(anchors.tolist()):
        mine = (log.user == log.user[row]) & (log.timestamp < moment)
        rated[a, np.searchsorted(log.item_ids, np.unique(log.item[mine]))] = True
    return probe, position[n:].reshape(u, i), rated


def top_lists(scores: np.ndarray, excluded: np.ndarray, k: int = 10) -> np.ndarray:
    """(U, k) column indices of each row's k best scores among the columns not `excluded` (best first)."""
    masked = np.where(excluded, -np.inf, scores)
    top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(masked, top, axis=1), axis=1, kind="stable"), axis=1)


def overlap(lists: np.ndarray) -> TopListOverlap:
    """The overlap of (U, k) lists (TopListOverlap); the pairwise share from item counts: sum c(c - 1) over the
    items, divided by U (U - 1) k."""
    u, k = lists.shape
    counts = np.bincount(lists.ravel())
    counts = counts[counts > 0]
    pairwise = float((counts * (counts - 1)).sum() / (u * (u - 1) * k)) if u > 1 else float("nan")
    return TopListOverlap(u, k, pairwise, int(counts.size), float(counts.max() / u))


def model_top_overlap(score: Callable[[BehaviorLog, np.ndarray], np.ndarray], probe: BehaviorLog,
                      rows: np.ndarray, rated: np.ndarray, k: int = 10) -> TopListOverlap:
    """The overlap of the top-k lists `score(log, rows) -> (len(rows),) probabilities` gives the probes."""
    return overlap(top_lists(score(probe, rows.ravel()).reshape(rows.shape), rated, k))


def neural_scores(model) -> Callable[[BehaviorLog, np.ndarray], np.ndarray]:
    """A `score` for `model_top_overlap` from a trained CTR model (engine.training.loops.ctr_models): its past
    counts are computed once on the probe log (instead of once per batch), then restored."""
    def score(log: BehaviorLog, rows: np.ndarray) -> np.ndarray:
        saved = getattr(model, "counts", None)
        if isinstance(saved, PastCounts):
            model.counts = PastCounts(log, saved.window)
        try:
            return predict(model, log, np.sort(rows), batch_size=512)[np.argsort(np.argsort(rows))]
        finally:
            if isinstance(saved, PastCounts):
                model.counts = saved
    return score
