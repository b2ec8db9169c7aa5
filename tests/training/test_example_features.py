"""engine.training.data.example_features: past counts against a per-row brute force (tiny MovieLens and random logs with
many tied timestamps, where ties must not count), the no-leak property, and the item count snapshot."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.training.data.log import BehaviorLog
from engine.training.data.example_features import item_count_table, past_counts
from tests.synthetic_logs import random_log, rewrite_future, tiny_movielens


def brute_past_counts(log: BehaviorLog, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops: for each row, sum the membership of earlier events (strictly) of its user and of its item."""
    user, item, time = log.user.tolist(), log.item.tolist(), log.timestamp.tolist()
    member = log.membership.astype(np.int64).tolist()
    user_counts, item_counts = [], []
    for r in rows.tolist():
        by_user, by_item = [0] * log.num_sequences, [0] * log.num_sequences
        for j in range(log.num_events):
            if time[j] < time[r]:
                for s in range(log.num_sequences):
                    by_user[s] += member[j][s] * (user[j] == user[r])
                    by_item[s] += member[j][s] * (item[j] == item[r])
        user_counts.append(by_user)
        item_counts.append(by_item)
    shape = (rows.size, log.num_sequences)
    return np.array(user_counts, np.int64).reshape(shape), np.array(item_counts, np.int64).reshape(shape)


def assert_counts_equal(got, expected):
    for g, e in zip(got, expected):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, e)


def test_tiny_movielens_matches_brute_force():
    log = tiny_movielens()
    rows = log.examples
    assert_counts_equal(past_counts(log, rows), brute_past_counts(log, rows))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), users=st.integers(1, 4), items=st.integers(1, 5), times=st.integers(1, 6),
       sequences=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_random_logs_with_ties_match_brute_force(n, users, items, times, sequences, seed):
    rng = np.random.default_rng(seed)
    log = random_log(rng, n, users, items, times, sequences)
    rows = rng.integers(0, n, int(rng.integers(0, 2 * n)))  # any order, repeats, possibly empty
    assert_counts_equal(past_counts(log, rows), brute_past_counts(log, rows))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), times=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_rewriting_the_future_changes_nothing(n, times, seed):
    rng = np.random.default_rng(seed)
    log = random_log(rng, n, 3, 6, times, 3)
    row = int(rng.integers(0, n))
    before = past_counts(log, np.array([row]))
    after = past_counts(rewrite_future(log, row, rng), np.array([row]))
    assert_counts_equal(after, before)


def test_tiny_movielens_future_rewrite_changes_nothing():
    log, rng = tiny_movielens(), np.random.default_rng(0)
    rows = log.examples[:: max(1, log.examples.size // 5)]
    for row in rows.tolist():
        assert_counts_equal(past_counts(rewrite_future(log, row, rng), np.array([row])),
                            past_counts(log, np.array([row])))


@pytest.mark.parametrize("seed", range(4))
def test_item_count_table(seed):
    rng = np.random.default_rng(seed)
    log = random_log(rng, 50, 3, 6, 5, 2)
    for before in (None, 0, 20, 30, 10**9):
        ids, counts = item_count_table(log, before)
        np.testing.assert_array_equal(ids, log.item_ids)
        for k, item in enumerate(ids.tolist()):
            keep = (log.item == item) & (before is None or log.timestamp < before)
            np.testing.assert_array_equal(counts[k], log.membership[keep].sum(axis=0))
