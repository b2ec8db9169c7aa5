"""engine.features.side_features: hand-computed values, properties on random counts (a catch-all sequence is the
total), names, input validation, and that the serving module imports numpy only."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.features.side_features import count_feature_names, count_features, recent_counts


def test_known_values():
    user = np.array([[2, 0, 2], [0, 0, 0]])  # liked, disliked, watched
    item = np.array([[1, 2, 5], [3, 1, 4]])
    got = count_features(user, item)
    assert got.dtype == np.float32 and got.shape == (2, 12)
    np.testing.assert_allclose(got[0], [*np.log1p([2, 0, 2]), 3 / 4, 1 / 4, 3 / 4,
                                        *np.log1p([1, 2, 5]), 2 / 7, 3 / 7, 6 / 7], rtol=1e-6)
    np.testing.assert_allclose(got[1, 3:6], [0.5, 0.5, 0.5])  # no events: every share is 1/2


@pytest.mark.parametrize("seed", range(5))
def test_random_counts_with_a_catch_all_sequence(seed):
    rng = np.random.default_rng(seed)
    b, s = int(rng.integers(0, 20)), int(rng.integers(1, 5))
    parts = [rng.integers(0, 50, (b, s)) for _ in range(2)]
    counts = [np.concatenate([p, p.sum(axis=1, keepdims=True)], axis=1) for p in parts]  # last = 'all'
    got = count_features(*counts)
    assert got.shape == (b, 4 * (s + 1)) and np.isfinite(got).all()
    for side, c in enumerate(counts):
        log1p, share = np.split(got[:, 2 * side * (s + 1): 2 * (side + 1) * (s + 1)], 2, axis=1)
        np.testing.assert_allclose(np.expm1(log1p), c, rtol=1e-5)
        total = c[:, -1:]
        np.testing.assert_allclose(share, (c + 1) / (total + 2), rtol=1e-6)
        assert ((share > 0) & (share < 1)).all()


@pytest.mark.parametrize("seed", range(5))
def test_recent_counts_of_last_behaviors_with_whole_lengths(seed):
    """Sequences cut to their last `window` (or more) behaviors, with their whole lengths: the counts of the
    whole sequences (what a cached user state keeps, engine.serving.incremental)."""
    rng = np.random.default_rng(seed)
    window = int(rng.integers(1, 6))
    users = [[list(rng.integers(0, 8, int(rng.integers(0, 15)))) for _ in range(3)] for _ in range(20)]
    cut = [[seq[max(len(seq) - window - int(rng.integers(0, 3)), 0):] for seq in user] for user in users]
    lengths = np.array([[len(seq) for seq in user] for user in users])
    np.testing.assert_array_equal(recent_counts(cut, window, 3, lengths=lengths), recent_counts(users, window, 3))


def test_names_follow_columns():
    names = count_feature_names(("liked", "watched"))
    assert names == ["user_log1p_liked", "user_log1p_watched", "user_share_liked", "user_share_watched",
                     "item_log1p_liked", "item_log1p_watched", "item_share_liked", "item_share_watched"]
    assert count_features(np.zeros((3, 2), np.int64), np.zeros((3, 2), np.int32)).shape == (3, len(names))


@pytest.mark.parametrize("user, item, message", [
    (np.zeros(3, np.int64), np.zeros((1, 3), np.int64), r"user_counts must be 2-D \(B, S\), got shape \(3,\)"),
    (np.zeros((2, 3), np.int64), np.zeros((2, 2), np.int64), r"same shape \(B, S\), got \(2, 3\) and \(2, 2\)"),
    (np.zeros((2, 3)), np.zeros((2, 3), np.int64), "user_counts must hold integers, got dtype float64"),
    (np.zeros((2, 3), np.int64), np.array([[0, 1, 2], [3, -4, 5]]), r"item_counts must be >= 0, got -4 at \[1, 1\]"),
])
def test_errors_name_the_problem(user, item, message):
    with pytest.raises(ValueError, match=message):
        count_features(user, item)


def test_serving_module_imports_numpy_only():
    code = ("import sys, engine.features.side_features; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'pandas', 'sklearn') or m.startswith('engine.training'))[:3])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[2])
    assert done.stdout.strip() == "[]"
