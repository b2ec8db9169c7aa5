"""engine.training.baselines.lightgbm_peers: the text features against a brute force on random logs with tied
timestamps, the no-leak property of every feature (an event's features never change when later events are
altered), and the search training on the generated MovieLens-1M fixture."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.training.baselines.lightgbm_peers import SEARCH, fit_lightgbm, peer_features, text_features
from engine.training.data.log import BehaviorLog
from engine.training.data.movielens_1m import load_movielens_1m
from tests.ml1m_fixture import write_ml1m_files
from tests.synthetic_logs import random_log, rewrite_future


def brute_text(log, row, vectors, sequence):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    s = log.sequence_names.index(sequence)
    past = [j for j in range(log.num_events) if log.user[j] == log.user[row] and log.timestamp[j] < log.timestamp[row]
            and log.membership[j, s]]
    if not past:
        return np.nan
    mean = unit[np.searchsorted(log.item_ids, log.item[past])].mean(axis=0)
    target = unit[np.searchsorted(log.item_ids, log.item[row])]
    return float(mean @ target / np.linalg.norm(mean))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), users=st.integers(1, 3), times=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_text_features_match_brute_force(n, users, times, seed):
    rng = np.random.default_rng(seed)
    log = random_log(rng, n, users, 9, times, 2)
    vectors = rng.normal(size=(log.item_ids.size, 5))
    rows = rng.permutation(n)
    got, names = text_features(log, rows, vectors, ("s0", "s1"))
    assert names == ["text_cos_s0", "text_cos_s1"] and got.dtype == np.float32
    expected = [[brute_text(log, r, vectors, s) for s in ("s0", "s1")] for r in rows.tolist()]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory):
    return load_movielens_1m(write_ml1m_files(tmp_path_factory.mktemp("ml-1m")))


def test_features_do_not_see_the_future(ml1m):
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(ml1m.item_ids.size, 8))
    for row in ml1m.examples[:: ml1m.examples.size // 8].tolist():
        future = rewrite_future(ml1m, row, rng)
        future = BehaviorLog(future.user, future.item, future.timestamp, future.label, future.membership,
                             future.item_texts, future.sequence_names, future.min_history, ml1m.categorical)
        assert (future.label != ml1m.label).any()
        before, names, categorical = peer_features(ml1m, np.array([row]), vectors)
        after, _, _ = peer_features(future, np.array([row]), vectors)
        np.testing.assert_array_equal(after, before)
        assert categorical == ["cat_gender", "cat_age", "cat_occupation"] and "text_cos_liked" in names


def test_peer_features_carry_the_demographics(ml1m):
    rows = ml1m.examples
    x, names, categorical = peer_features(ml1m, rows)
    assert "text_cos_liked" not in names and x.shape == (rows.size, len(names))
    gender = x[:, names.index("cat_gender")]
    np.testing.assert_array_equal(gender, [{"F": 0, "M": 1}[v] for v in ml1m.category_values("gender", rows)])
    with pytest.raises(ValueError, match=r"vectors must be \(I, D\) with I = 30 rows"):
        peer_features(ml1m, rows, np.zeros((3, 4)))


def test_search_trains_and_predicts(ml1m):
    split = ml1m.split()
    vectors = np.random.default_rng(0).normal(size=(ml1m.item_ids.size, 8))
    for given_vectors in (None, vectors):
        peer = fit_lightgbm(ml1m, split.train, split.val, vectors=given_vectors, search=SEARCH[:2], threads=1)
        probs = peer.predict(ml1m, split.test)
        assert probs.shape == split.test.shape and ((probs > 0) & (probs < 1)).all()
        assert [r["min_child_samples"] for r in peer.search] == [20, 100] and all(0 <= r["val_auc"] <= 1 for r in peer.search)
        assert ("text_cos_liked" in peer.names) == (given_vectors is not None)
        again = fit_lightgbm(ml1m, split.train, split.val, vectors=given_vectors, search=SEARCH[:2], threads=1)
        np.testing.assert_array_equal(again.predict(ml1m, split.test), probs)
    assert len(SEARCH) == 6
    with pytest.raises(ValueError, match="needs validation rows"):
        fit_lightgbm(ml1m, split.train, split.val[:0])
