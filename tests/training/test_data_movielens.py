"""engine.training.data.movielens: the full MovieLens-100K log (sizes, texts, labels, sequences, leakage,
split), its round trip through the generic file schema, and the committed CI fixture.

Regenerate the fixture with `python -m tests.training.test_data_movielens`."""
import os

import numpy as np
import pandas as pd
import pytest

from engine.training.data.log import BehaviorLog
from engine.training.data.log_files import load_log
from engine.training.data.movielens import SEQUENCES, TINY_USERS, load_movielens, movielens_dir, write_movielens
from tests.training.test_data_log import event_row_log

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "movielens_tiny.parquet")


def regenerate_fixture() -> None:
    write_movielens(FIXTURE, users=TINY_USERS)


@pytest.fixture(scope="module")
def log() -> BehaviorLog:
    return load_movielens()


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    return pd.read_parquet(os.path.join(movielens_dir(), "MovieLens100k_data.parquet.brotli"))


def assert_same_log(a: BehaviorLog, b: BehaviorLog) -> None:
    for name in ("user", "item", "timestamp", "label", "membership"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.item_texts == b.item_texts
    assert a.sequence_names == b.sequence_names
    assert a.min_history == b.min_history
    assert a.categorical.keys() == b.categorical.keys()
    for name in a.categorical:
        np.testing.assert_array_equal(a.categorical[name], b.categorical[name], err_msg=name)


def test_sizes_and_texts(log, ratings):
    assert log.num_events == 100_000
    assert np.unique(log.user).size == 943
    assert np.unique(log.item).size == 1682 == len(log.item_texts)
    assert log.item_texts[1] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert log.item_texts[1373] == "Good Morning (1971)"  # genre 'unknown' only: the title alone
    assert all(t and t == t.strip() for t in log.item_texts.values())
    assert log.sequence_names == SEQUENCES == ("liked", "disliked", "watched")
    positive_rate = float((ratings["rating"] >= 4).mean())
    assert log.label.mean() == pytest.approx(positive_rate)
    assert positive_rate == pytest.approx(0.55375)


def test_labels_and_sequences_follow_ratings(log, ratings):
    # re-derive every event's rating: (user, item) pairs are unique in MovieLens-100K
    by_pair = ratings.set_index(["user_id", "movie_id"])["rating"]
    rating = by_pair.loc[list(zip(log.user.tolist(), log.item.tolist()))].to_numpy()
    liked, disliked, watched = log.membership.T
    np.testing.assert_array_equal(log.label, rating >= 4)
    np.testing.assert_array_equal(liked, rating >= 4)
    np.testing.assert_array_equal(disliked, rating <= 2)
    assert watched.all()


def test_no_leakage_on_real_histories(log):
    rng = np.random.default_rng(0)
    rows = rng.choice(log.examples, 2000, replace=False)
    twin = event_row_log(log)  # its histories are event rows of `log`
    for m in (None, 20):
        histories = twin.sequences(rows, m)
        ids = log.sequences(rows, m)
        texts = log.sequence_texts(rows[:200], m)
        for name, r in histories.items():
            owner = np.repeat(rows, r.lengths)
            assert (log.user[r.values] == log.user[owner]).all()
            assert (log.timestamp[r.values] < log.timestamp[owner]).all()
            assert m is None or r.lengths.max() <= m
            np.testing.assert_array_equal(ids[name].values, log.item[r.values])
            for b in range(200):
                assert texts[b][name] == [log.item_texts[i] for i in ids[name][b].tolist()]
    # the most recent M: every dropped behavior is no later than the earliest one kept
    full, cut = twin.sequences(rows)["watched"], twin.sequences(rows, 20)["watched"]
    for b in range(0, rows.size, 50):
        kept, all_ = cut[b], full[b]
        np.testing.assert_array_equal(kept, all_[len(all_) - len(kept) :])


def test_split(log):
    split = log.split()
    summary = log.summary(split)
    parts = [split.train, split.val, split.test]
    assert sum(p.size for p in parts) == log.examples.size == summary["examples"]["examples"]
    assert np.unique(np.concatenate(parts)).size == log.examples.size
    assert log.timestamp[split.train].max() < log.timestamp[split.val].min()
    assert log.timestamp[split.val].max() < log.timestamp[split.test].min()
    # event fractions by time: 80 / 10 / 10 (timestamps are seconds, so ties barely move the cuts)
    fractions = [
        np.mean(log.timestamp < split.val_start),
        np.mean((log.timestamp >= split.val_start) & (log.timestamp < split.test_start)),
        np.mean(log.timestamp >= split.test_start),
    ]
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=1e-3)
    for name, rows in split.items():
        assert summary["splits"][name]["examples"] == rows.size
        assert summary["splits"][name]["positive_rate"] == pytest.approx(log.label[rows].mean())
        assert 0.5 < summary["splits"][name]["positive_rate"] < 0.6


def test_generic_file_round_trip(log, tmp_path):
    path = tmp_path / "movielens.parquet"
    write_movielens(path)
    assert_same_log(load_log(path), log)
    frame = pd.read_parquet(path)
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "label", "item_text", "sequence", "cat_gender",
                                   "cat_occupation", "cat_age"]
    assert set(frame["sequence"]) == {"liked|watched", "disliked|watched", "watched"}
    assert set(frame["cat_gender"]) == {"M", "F"} and frame["cat_occupation"].nunique() == 21
    assert set(frame["cat_age"]) == {"under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    user = log.user == 1  # MovieLens' user 1: a 24-year-old technician
    assert set(log.category_values("occupation", np.flatnonzero(user))) == {"technician"}
    assert set(log.category_values("age", np.flatnonzero(user))) == {"18-24"}


def test_csv_round_trip_of_a_few_users(tmp_path):
    path = tmp_path / "few.csv"
    write_movielens(path, users=[1, 13])
    expected = load_movielens(users=[1, 13])
    assert np.unique(expected.user).tolist() == [1, 13]
    assert_same_log(load_log(path, sequence_names=SEQUENCES), expected)


def test_fixture_is_the_tiny_subset():
    tiny = load_log(FIXTURE)
    assert_same_log(tiny, load_movielens(users=TINY_USERS))
    split = tiny.split()
    assert min(split.train.size, split.val.size, split.test.size) > 0
    assert len(np.unique(tiny.label[split.test])) == 2  # AUC is defined on every split


if __name__ == "__main__":
    regenerate_fixture()
