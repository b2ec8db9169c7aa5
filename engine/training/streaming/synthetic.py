"""A synthetic behavior log of any size over the MovieLens-100K item texts, written as parquet record batch by
record batch (memory: one batch), for the streaming benchmark (bench.stream_log).

Users and items are Zipf-distributed over finite supports (P(rank k) ~ k^-exponent); the i-th event of the
log happens at START + i * SPACING // 1000 seconds (increasing, with ties); a click has probability
sigmoid(BASE + item quality (the movie's MovieLens like-rate, as a logit) + AFFINITY if the movie has the user's
favourite genre + the user's own bias), so the labels have structure a model can learn. No sequence column:
the default sequences (positive, negative, all).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from engine.training.data.movielens import GENRES, movielens_frame

__all__ = ["SyntheticConfig", "write_synthetic_log"]

START = 883_000_000  # 1997-12-25, inside MovieLens' span
SPACING = 1500       # ms between events: 20M events span about a year, many share a second


@dataclass
class SyntheticConfig:
    events: int = 20_000_000
    users: int = 500_000
    user_exponent: float = 0.7   # heaviest user: ~0.6% of the events at 500k users
    item_exponent: float = 1.0
    batch_rows: int = 1 << 20
    seed: int = 0


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _movies() -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """(movie ids, texts, like-rate logits, (I, G) genre flags) from MovieLens-100K."""
    frame = movielens_frame()
    movies = frame.groupby("item_id").agg(text=("item_text", "first"), rate=("label", "mean"), n=("label", "size"))
    rate = (movies["rate"] * movies["n"] + 0.5) / (movies["n"] + 1)  # smoothed
    texts = movies["text"].tolist()
    named = [g for g in GENRES if g != "unknown"]
    genres = np.array([[g in t.split(" | ")[-1].split(", ") for g in named] for t in texts], dtype=bool)
    return movies.index.to_numpy(np.int64), texts, np.log(rate / (1 - rate)).to_numpy(), genres


def write_synthetic_log(path: str | os.PathLike, config: SyntheticConfig = SyntheticConfig()) -> int:
    """Write the log to `path` (parquet), batch by batch; returns the number of events."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(config.seed)
    ids, texts, quality, genres = _movies()
    item_rank = rng.permutation(ids.size)           # which movie is the k-th most popular
    user_rank = rng.permutation(config.users) + 1   # user ids 1..U, popularity unrelated to the id
    favourite = rng.integers(0, genres.shape[1], config.users)
    user_bias = rng.normal(0.0, 0.5, config.users)
    item_cdf, user_cdf = _zipf_cdf(ids.size, config.item_exponent), _zipf_cdf(config.users, config.user_exponent)
    dictionary = pa.array(texts, pa.string())
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                        ("label", pa.int8()), ("item_text", pa.string())])
    with pq.ParquetWriter(os.fspath(path), schema) as writer:
        for first in range(0, config.events, config.batch_rows):
            n = min(config.batch_rows, config.events - first)
            user = np.minimum(np.searchsorted(user_cdf, rng.random(n)), config.users - 1)
            item = item_rank[np.minimum(np.searchsorted(item_cdf, rng.random(n)), ids.size - 1)]
            logit = -0.3 + quality[item] + 1.5 * genres[item, favourite[user]] + user_bias[user]
            label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
            timestamp = START + (np.arange(first, first + n, dtype=np.int64) * SPACING) // 1000
            text = pa.DictionaryArray.from_arrays(pa.array(item.astype(np.int32)), dictionary).dictionary_decode()
            writer.write_table(pa.table([user_rank[user], ids[item], timestamp, label, text], schema=schema))
    return config.events


if __name__ == "__main__":  # python -m engine.training.streaming.synthetic OUT.parquet [EVENTS]
    import sys
    import time

    begin = time.perf_counter()
    count = write_synthetic_log(sys.argv[1], SyntheticConfig(events=int(sys.argv[2]) if len(sys.argv) > 2 else 20_000_000))
    print(f"{count} events in {time.perf_counter() - begin:.1f} s -> {sys.argv[1]}")
