"""engine.training.studies.metrics against scikit-learn on random data (with ties) and against hand-computed values;
bootstrap intervals where the answer is known (perfect and random scores, a model against itself) and the
weighted AUC against explicitly repeated examples."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from engine.training.studies.metrics import (auc_interval, calibration_bins, gauc, gauc_interval, log_loss,
                                             paired_auc_difference, paired_gauc_difference, roc_auc, undefined_as_nan,
                                             user_aucs, weighted_roc_auc)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), levels=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_roc_auc_matches_sklearn_with_ties(n, levels, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[rng.choice(n, 2, replace=False)] = [0, 1]  # both classes present
    scores = rng.integers(0, levels, n) / levels  # few levels -> many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_log_loss_matches_sklearn(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = rng.uniform(0.01, 0.99, n)
    probs[: n // 4] = 0.5  # repeated values
    expected = sk_log_loss(labels, probs, labels=[0, 1])
    assert log_loss(labels, probs) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "labels, scores, expected",
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),  # 3 of 4 (pos, neg) pairs ordered
        ([0, 1], [0.5, 0.5], 0.5),  # a tie counts 1/2
        ([1, 0, 1, 0], [0.9, 0.9, 0.2, 0.1], 0.625),  # (1 tie * 1/2 + 1 + 0 + 1) / 4
        ([0, 0, 1], [3.0, 1.0, 2.0], 0.5),
        ([1, 1, 0], [1.0, 2.0, -5.0], 1.0),
        ([1, 1, 0], [-1.0, -2.0, 5.0], 0.0),
    ],
)
def test_roc_auc_known_values(labels, scores, expected):
    assert roc_auc(np.array(labels), np.array(scores)) == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 80), levels=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
def test_weighted_auc_equals_auc_of_repeated_examples(n, levels, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, levels, n) / levels
    weights = rng.integers(0, 4, n)
    weights[:2] = 1  # both classes keep weight
    repeated = np.repeat(np.arange(n), weights)
    assert weighted_roc_auc(labels, scores, weights) == pytest.approx(roc_auc(labels[repeated], scores[repeated]))


def resample_data(seed: int, users: int = 60, per_user: int = 8):
    rng = np.random.default_rng(seed)
    user = np.repeat(rng.permutation(10 * users)[:users], per_user)
    labels = rng.integers(0, 2, user.size)
    return labels, user, rng


def test_interval_of_perfect_scores_is_one():
    labels, user, rng = resample_data(0)
    got = auc_interval(labels, labels + rng.uniform(0, 0.5, labels.size), user, resamples=200)
    assert (got.value, got.low, got.high, got.users) == (1.0, 1.0, 1.0, 60)


@pytest.mark.parametrize("seed", range(3))
def test_interval_of_random_scores_covers_one_half(seed):
    labels, user, rng = resample_data(seed)
    got = auc_interval(labels, rng.random(labels.size), user, resamples=300, seed=seed)
    assert got.low <= got.value <= got.high and got.low < 0.5 < got.high and got.high - got.low < 0.25


def test_resampling_users_widens_the_interval_of_user_correlated_scores():
    labels, user, rng = resample_data(1, users=40, per_user=25)
    bias = rng.normal(size=user.max() + 1)[user]  # a per-user offset of the scores
    labels = (rng.random(user.size) < 1 / (1 + np.exp(-2 * bias))).astype(int)
    by_user = auc_interval(labels, bias, user, resamples=300)
    by_example = auc_interval(labels, bias, np.arange(user.size), resamples=300)
    assert by_user.users == 40 and by_example.users == user.size
    assert by_user.high - by_user.low > 1.5 * (by_example.high - by_example.low)


def test_paired_difference():
    labels, user, rng = resample_data(2)
    scores = rng.random(labels.size)
    same = paired_auc_difference(labels, scores, scores, user, resamples=200)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    good = labels + rng.uniform(0, 1.5, labels.size)
    better = paired_auc_difference(labels, good, scores, user, resamples=200)
    assert better.value == roc_auc(labels, good) - roc_auc(labels, scores) and 0 < better.low < better.high
    assert auc_interval(labels, scores, user, seed=3) == auc_interval(labels, scores, user, seed=3)


def test_log_loss_known_values():
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert log_loss([1, 1, 0, 0], [0.5] * 4) == pytest.approx(math.log(2))
    # a confident miss costs -log(eps), not infinity
    assert log_loss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3))
    assert log_loss([0], [1.0], eps=1e-3) == pytest.approx(-math.log(1e-3))
    assert log_loss([1, 0], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-7))
    assert math.isinf(log_loss([1], [0.0], eps=0.0))


def test_bool_and_float_labels_accepted():
    scores = np.array([0.2, 0.7, 0.4])
    assert roc_auc(np.array([False, True, True]), scores) == roc_auc(np.array([0.0, 1.0, 1.0]), scores) == 1.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: roc_auc([1, 1, 1], [0.1, 0.2, 0.3]), "only one class"),
        (lambda: roc_auc([0, 0], [0.1, 0.2]), "only one class"),
        (lambda: roc_auc([0, 1], [0.1]), "same length"),
        (lambda: roc_auc([0, 2], [0.1, 0.2]), "labels must be 0 or 1, got 2 at position 1"),
        (lambda: roc_auc([0, 1], [0.1, float("nan")]), "scores must be finite"),
        (lambda: roc_auc([], []), "empty"),
        (lambda: roc_auc([[0, 1]], [[0.1, 0.2]]), "1-D"),
        (lambda: log_loss([0, 1], [0.1, 1.5]), r"probs must lie in \[0, 1\], got 1.5 at position 1"),
        (lambda: log_loss([0, 1], [0.1, 0.2], eps=0.7), "eps"),
        (lambda: log_loss([0, -1], [0.1, 0.2]), "labels must be 0 or 1"),
        (lambda: weighted_roc_auc([0, 1], [0.1, 0.2], [1, -1]), "weights must be >= 0, got -1.0 at position 1"),
        (lambda: weighted_roc_auc([0, 1], [0.1, 0.2], [0, 1]), "one class has no weight"),
        (lambda: auc_interval([0, 1], [0.1, 0.2], [1, 2, 3]), r"users must be 1-D with one entry per label \(2\)"),
        (lambda: auc_interval([0, 1], [0.1, 0.2], [1, 2], resamples=0), "resamples must be >= 1"),
        (lambda: gauc([0, 1, 1], [0.1, 0.2, 0.3], [1, 2, 2]), "no user has both"),
        (lambda: gauc([0, 1], [0.1, 0.2], [1]), r"users must be 1-D with one entry per label \(2\)"),
        (lambda: gauc_interval([0, 1], [0.1, 0.2], [1, 1], resamples=0), "resamples must be >= 1"),
        (lambda: calibration_bins([0, 1], [0.1, 1.2]), r"probs must lie in \[0, 1\], got 1.2"),
        (lambda: calibration_bins([0, 1], [0.1, 0.2], bins=0), "bins must be >= 1"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 200), users=st.integers(1, 12), levels=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_gauc_matches_a_per_user_loop(n, users, levels, seed):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n) * 7  # sparse ids
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    user[:2] = user[0]  # one user with both classes at least
    scores = rng.integers(0, levels, n) / levels  # ties within and across users
    expected = {}
    for u in np.unique(user).tolist():
        mine = user == u
        if 0 < labels[mine].sum() < mine.sum():
            expected[u] = (roc_auc_score(labels[mine], scores[mine]), int(mine.sum()))
    ids, aucs, weights = user_aucs(labels, scores, user)
    assert ids.tolist() == sorted(expected)
    np.testing.assert_allclose(aucs, [expected[u][0] for u in ids.tolist()], atol=1e-12)
    assert weights.tolist() == [expected[u][1] for u in ids.tolist()]
    total = sum(w for _, w in expected.values())
    assert gauc(labels, scores, user) == pytest.approx(sum(a * w for a, w in expected.values()) / total, abs=1e-12)


def test_gauc_ignores_what_auc_rewards_across_users():
    # user 1 gets high scores, user 2 low ones: the pooled AUC rewards the user offset, GAUC does not
    labels = np.array([1, 1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.95, 0.3, 0.2, 0.25])
    user = np.array([1, 1, 1, 2, 2, 2])
    assert gauc(labels, scores, user) == pytest.approx(0.0 * 3 / 6 + 1.0 * 3 / 6)
    assert roc_auc(labels, scores) == pytest.approx(6 / 9)


def test_gauc_intervals():
    labels, user, rng = resample_data(4, per_user=3)
    perfect = gauc_interval(labels, labels + rng.uniform(0, 0.5, labels.size), user, resamples=200)
    assert (perfect.value, perfect.low, perfect.high) == (1.0, 1.0, 1.0)
    both = sum(0 < labels[user == u].sum() < (user == u).sum() for u in np.unique(user))
    assert perfect.users == both < 60
    scores = rng.random(labels.size)
    noise = gauc_interval(labels, scores, user, resamples=300)
    assert noise.low < 0.5 < noise.high and noise.value == gauc(labels, scores, user)
    same = paired_gauc_difference(labels, scores, scores, user, resamples=100)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    good = labels + rng.uniform(0, 1.5, labels.size)
    better = paired_gauc_difference(labels, good, scores, user, resamples=200)
    assert better.value == pytest.approx(gauc(labels, good, user) - gauc(labels, scores, user))
    assert 0 < better.low < better.high


def test_calibration_bins():
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([0.05, 0.15, 0.12, 0.95, 1.0, 0.5])
    assert calibration_bins(labels, probs, bins=2) == [
        (pytest.approx((0.05 + 0.15 + 0.12) / 3), pytest.approx(1 / 3), 3),
        (pytest.approx((0.95 + 1.0 + 0.5) / 3), pytest.approx(2 / 3), 3)]
    assert [n for *_, n in calibration_bins(labels, probs)] == [1, 2, 1, 2]  # bins 0, 1, 5, 9; empty ones left out


def test_undefined_gauc_becomes_nan_not_an_error():
    """Every test user with one class only: GAUC is undefined; the reports print NaN instead of stopping."""
    labels, scores, users = np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.4, 0.1]), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError):
        gauc_interval(labels, scores, users)
    nan = undefined_as_nan(gauc_interval, labels, scores, users)
    assert math.isnan(nan.value) and math.isnan(nan.low) and nan.users == 0
    assert undefined_as_nan(auc_interval, labels, scores, users) == auc_interval(labels, scores, users)
