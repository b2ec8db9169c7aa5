"""A tiny MovieLens-1M in the exact file format (ratings.dat, movies.dat, users.dat: `::`-separated, latin-1
with non-ASCII titles, CRLF line ends), generated into a test's folder: the real files may not be copied into
this repository (engine.training.data.movielens_1m)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# (movie_id, title, genres): non-ASCII (latin-1) titles, a comma-article title, quotes, colons
MOVIES = (
    (1, "Toy Story (1995)", "Animation|Children's|Comedy"),
    (2, "Jumanji (1995)", "Adventure|Children's|Fantasy"),
    (6, "Heat (1995)", "Action|Crime|Thriller"),
    (17, "Sense and Sensibility (1995)", "Drama|Romance"),
    (29, "City of Lost Children, The (1995)", "Adventure|Sci-Fi"),
    (50, "Usual Suspects, The (1995)", "Crime|Thriller"),
    (73, "Misérables, Les (1995)", "Drama|War"),
    (260, "Star Wars: Episode IV - A New Hope (1977)", "Action|Adventure|Fantasy|Sci-Fi"),
    (318, "Shawshank Redemption, The (1994)", "Drama"),
    (593, "Silence of the Lambs, The (1991)", "Drama|Thriller"),
    (1136, "Monty Python and the Holy Grail (1974)", "Comedy"),
    (2019, "Seven Samurai (The Magnificent Seven) (Shichinin no samurai) (1954)", "Action|Drama"),
    (2858, "American Beauty (1999)", "Comedy|Drama"),
    (3624, "Shanghai Noon (2000)", "Action"),
    (3735, "Serpico (1973)", "Crime|Drama"),
    (3122, "Santa Fe Trail (1940)", "Drama|Romance|Western"),
    (3789, "Pawnbroker, The (1965)", "Drama"),
    (3788, "Blow-Up (Blowup) (1966)", "Drama|Mystery"),
    (3045, "Peter's Friends (1992)", "Comedy|Drama"),
    (3513, "Rules of Engagement (2000)", "Drama|Thriller"),
    (2640, "Superman (1978)", "Action|Adventure|Sci-Fi"),
    (3671, "Blazing Saddles (1974)", "Comedy|Western"),
    (1172, "Cinema Paradiso (Nuovo cinema Paradiso) (1988)", "Comedy|Drama|Romance"),
    (1929, 'Grand Hotel (1932)', "Drama"),
    (3910, "Dancer in the Dark (2000)", "Drama|Musical"),
    (2762, "Sixth Sense, The (1999)", "Thriller"),
    (1245, "Miller's Crossing (1990)", "Drama"),
    (2905, "Sanjuro (1962)", "Action|Adventure"),
    (3000, "Princess Mononoke, The (Mononoke Hime) (1997)", "Action|Adventure|Animation"),
    (3952, "Contender, The (2000)", "Drama|Thriller"),
)
# (user_id, gender, age code, occupation code, zip)
USERS = ((1, "F", 1, 10, "48067"), (2, "M", 56, 16, "70072"), (3, "M", 25, 15, "55117"), (4, "M", 45, 7, "02460"),
         (5, "M", 25, 20, "55455"), (6, "F", 50, 9, "55117"), (7, "M", 35, 1, "06810"), (8, "M", 25, 12, "11413"),
         (9, "M", 25, 17, "61614"), (10, "F", 35, 1, "95370"), (11, "F", 25, 1, "04093"), (12, "M", 18, 4, "98107"))
START, END = 956_703_932, 1_046_454_590  # MovieLens-1M's first and last rating


def ratings(seed: int = 0, per_user: tuple[int, int] = (12, 26)) -> list[tuple[int, int, int, int]]:
    """(user_id, movie_id, rating, timestamp) rows, each user rating distinct movies at increasing times (some
    equal), user by user as in ratings.dat; users rate better the movies whose id shares their parity."""
    rng = np.random.default_rng(seed)
    ids = np.array([m[0] for m in MOVIES])
    out = []
    for user, *_ in USERS:
        n = int(rng.integers(*per_user))
        first = int(rng.integers(START, START + (END - START) // 2))
        times = np.sort(rng.integers(first, END, n))
        times[1::7] = times[0::7][: times[1::7].size]  # a few ties: equal seconds are not history
        times = np.sort(times)
        for movie, t in zip(rng.choice(ids, n, replace=False).tolist(), times.tolist()):
            bias = 1.0 if movie % 2 == user % 2 else -1.0
            stars = int(np.clip(np.rint(3 + bias + rng.normal(0, 1)), 1, 5))
            out.append((user, movie, stars, t))
    return out


def write_ml1m_files(folder: str | Path, seed: int = 0) -> Path:
    """Write ratings.dat, movies.dat and users.dat (latin-1, CRLF, `::`) into `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tables = {"movies.dat": MOVIES, "users.dat": USERS, "ratings.dat": ratings(seed)}
    for name, rows in tables.items():
        text = "".join("::".join(str(v) for v in row) + "\r\n" for row in rows)
        (folder / name).write_bytes(text.encode("latin-1"))
    return folder
