"""engine.training.data.user_split.per_user_split: properties on random logs with many tied timestamps (disjoint parts
covering the examples, per-user time order, the minimum of one test example) and on the MovieLens fixture."""
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.training.data.user_split import per_user_split
from tests.synthetic_logs import random_log, tiny_movielens


def check_split(log, split, val):
    parts = [rows for _, rows in split.items()]
    assert [name for name, _ in split.items()] == ["train", "val", "test"]
    for rows in parts:
        assert rows.dtype == np.int64 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), log.examples)  # disjoint and covering
    for u in np.unique(log.user[log.examples]).tolist():
        times = [log.timestamp[rows[log.user[rows] == u]] for rows in parts]
        n = sum(t.size for t in times)
        for earlier, later in combinations(times, 2):
            assert earlier.size == 0 or later.size == 0 or earlier.max() < later.min()
        if n >= 3:  # the parts asked for get one example each, unless ties put everything in a later part
            assert times[2].size >= 1
            assert val == 0 or times[1].size >= 1 or times[0].size == 0

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), users=st.integers(1, 5), times=st.integers(1, 30), val=st.sampled_from([0, 0.1, 0.3]),
       test=st.sampled_from([0.1, 0.2, 0.5]), seed=st.integers(0, 2**32 - 1))
def test_random_logs(n, users, times, val, test, seed):
    log = random_log(np.random.default_rng(seed), n, users, 4, times, 1)
    check_split(log, per_user_split(log, val, test), val)


def test_distinct_timestamps_give_exact_sizes():
    rng = np.random.default_rng(0)
    log = random_log(rng, 200, 4, 5, 10**6, 1)  # ties are (almost surely) absent
    assert np.unique(log.timestamp).size == log.num_events
    split = per_user_split(log, 0.1, 0.2)
    for u in np.unique(log.user).tolist():
        n = int((log.user[log.examples] == u).sum())
        sizes = [int((log.user[rows] == u).sum()) for _, rows in split.items()]
        assert n >= 3 and sizes == [n - round(0.1 * n) - round(0.2 * n), round(0.1 * n), round(0.2 * n)]


def test_tiny_movielens_every_user_in_every_part():
    log = tiny_movielens()
    split = per_user_split(log)
    check_split(log, split, 0.1)
    users = np.unique(log.user)
    for _, rows in split.items():
        np.testing.assert_array_equal(np.unique(log.user[rows]), users)


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.6, 0.5)])
def test_bad_fractions(val, test):
    with pytest.raises(ValueError, match="split fractions must satisfy"):
        per_user_split(tiny_movielens(), val, test)
