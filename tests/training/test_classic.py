"""engine.training.baselines.classic: item text parsing, the past-only rates against a brute force on random logs with
tied timestamps, the no-leak property, and both baselines training on the MovieLens fixture."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.training.baselines.classic import RECENT, classic_features, fit_classic, parse_item_text
from tests.synthetic_logs import random_log, rewrite_future, tiny_movielens


@pytest.mark.parametrize("text, genres, year", [
    ("Toy Story (1995) | Animation, Children's, Comedy", ["Animation", "Children's", "Comedy"], 1995.0),
    ("City of Lost Children, The (Cité des enfants perdus, La) (1995) | Adventure", ["Adventure"], 1995.0),
    ("Untitled (1999)", [], 1999.0),
    ("No year | Drama", ["Drama"], math.nan),
    ("Odd (19x5) | A (1990)", ["A (1990)"], math.nan),  # the year is read from the title only
])
def test_parse_item_text(text, genres, year):
    got_genres, got_year = parse_item_text(text)
    assert got_genres == genres and (got_year == year or (math.isnan(got_year) and math.isnan(year)))


def brute_rates(log, row):
    """Plain loops: (recent rate, genre rate, item rate) of one example from the events strictly before it."""
    t, user, item = log.timestamp[row], log.user[row], log.item[row]
    genres = set(parse_item_text(log.item_texts[int(item)])[0])
    past = [j for j in range(log.num_events) if log.timestamp[j] < t]
    mine = [j for j in past if log.user[j] == user]  # log order: by timestamp, ties in file order
    recent = mine[-RECENT:]
    on_genres = [(log.label[j], len(genres & set(parse_item_text(log.item_texts[int(log.item[j])])[0]))) for j in mine]
    same_item = [log.label[j] for j in past if log.item[j] == item]
    return ((sum(log.label[j] for j in recent) + 1) / (len(recent) + 2),
            (sum(int(y) * k for y, k in on_genres) + 1) / (sum(k for _, k in on_genres) + 2),
            (sum(same_item) + 1) / (len(same_item) + 2))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 50), users=st.integers(1, 3), times=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_rates_match_brute_force(n, users, times, seed):
    rng = np.random.default_rng(seed)
    log = random_log(rng, n, users, 12, times, 2)
    rows = np.arange(n)
    x, names = classic_features(log, rows)
    got = x[:, [names.index(c) for c in (f"user_recent{RECENT}_rate", "user_genre_rate", "item_rate")]]
    np.testing.assert_allclose(got, [brute_rates(log, r) for r in rows.tolist()], rtol=1e-6)


def test_tiny_movielens_features():
    log = tiny_movielens()
    x, names = classic_features(log, log.examples)
    assert x.shape == (log.examples.size, len(names)) and x.dtype == np.float32
    year = names.index("year")
    no_year = np.isnan([parse_item_text(t)[1] for t in log.target_texts(log.examples)])
    np.testing.assert_array_equal(np.isnan(x[:, year]), no_year)
    assert not np.isnan(np.delete(x, year, axis=1)).any()
    genres = [n.removeprefix("genre=") for n in names if n.startswith("genre=")]
    assert genres == sorted(genres) and "Comedy" in genres
    flags = x[:, [names.index(f"genre={g}") for g in genres]]
    expected = [[g in parse_item_text(t)[0] for g in genres] for t in log.target_texts(log.examples)]
    np.testing.assert_array_equal(flags, expected)


def test_tiny_movielens_features_do_not_see_the_future():
    log, rng = tiny_movielens(), np.random.default_rng(1)
    for row in log.examples[:: log.examples.size // 6].tolist():
        before = classic_features(log, np.array([row]))[0]
        after = classic_features(rewrite_future(log, row, rng), np.array([row]))[0]
        np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("kind, counts_only", [("gbdt", False), ("gbdt", True), ("logistic", False)])
def test_baselines_train_and_predict(kind, counts_only):
    log = tiny_movielens()
    split = log.split()
    model = fit_classic(kind, log, split.train, split.val, seed=0, counts_only=counts_only)
    probs = model.predict(log, split.test)
    assert probs.shape == split.test.shape and ((probs > 0) & (probs < 1)).all()
    assert len(model.names) == (12 if counts_only else len(classic_features(log, split.test[:1])[1]))
    np.testing.assert_array_equal(probs, fit_classic(kind, log, split.train, split.val, seed=0,
                                                     counts_only=counts_only).predict(log, split.test))


def test_errors():
    log = tiny_movielens()
    split = log.split()
    with pytest.raises(ValueError, match="kind must be 'gbdt' or 'logistic', got 'forest'"):
        fit_classic("forest", log, split.train, split.val)
    with pytest.raises(ValueError, match="gbdt needs validation rows"):
        fit_classic("gbdt", log, split.train, split.val[:0])
    model = fit_classic("logistic", log, split.train, split.val)
    model.names = [*model.names, "genre=Opera"]
    with pytest.raises(ValueError, match=r"lack 1 columns .*'genre=Opera'"):
        model.predict(log, split.test)
