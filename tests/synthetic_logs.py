"""Logs for the feature, split and baseline tests: random ones with many tied timestamps, the MovieLens CI
fixture, and a copy of a log with everything at or after one target's moment rewritten (the no-leak check)."""
from pathlib import Path

import numpy as np

from engine.training.data import BehaviorLog, load_log

FIXTURE = Path(__file__).parent / "fixtures" / "movielens_tiny.parquet"
GENRES = ("Action", "Comedy", "Drama", "Film-Noir")


def tiny_movielens() -> BehaviorLog:
    return load_log(FIXTURE)


def item_text(item: int) -> str:
    """MovieLens-style text; every 5th item has no year, every 7th no genres."""
    year = "" if item % 5 == 0 else f" ({1990 + item % 9})"
    genres = ", ".join(GENRES[g] for g in range(len(GENRES)) if (item >> g) & 1)
    return f"Movie {item}{year}" + ("" if item % 7 == 0 or not genres else f" | {genres}")


def random_log(rng: np.random.Generator, n: int, users: int, items: int, times: int, sequences: int) -> BehaviorLog:
    """n events over few users, items and distinct timestamps (few -> many ties); random sequence membership."""
    item = rng.integers(1, items + 1, n)
    return BehaviorLog(
        user=rng.integers(0, users, n),
        item=item,
        timestamp=rng.integers(0, times, n) * 10,
        label=rng.integers(0, 2, n),
        membership=rng.random((n, sequences)) < 0.5,
        item_texts={int(i): item_text(int(i)) for i in np.unique(item)},
        sequence_names=tuple(f"s{s}" for s in range(sequences)),
    )


def rewrite_future(log: BehaviorLog, row: int, rng: np.random.Generator) -> BehaviorLog:
    """`log` with the item, label and membership of every event at or after `row`'s timestamp redrawn (users
    and timestamps kept, so rows keep their places; `row` keeps its item; categorical columns and id keys kept).
    Past-only features of `row` must not change."""
    later = log.timestamp >= log.timestamp[row]
    item, label, membership = log.item.copy(), log.label.copy(), log.membership.copy()
    item[later] = rng.choice(log.item_ids, int(later.sum()))
    item[row] = log.item[row]
    label[later] = rng.integers(0, 2, int(later.sum()))
    membership[later] = rng.random((int(later.sum()), log.num_sequences)) < 0.5
    return BehaviorLog(log.user, item, log.timestamp, label, membership, log.item_texts, log.sequence_names,
                       log.min_history, log.categorical, log.user_keys, log.item_keys)
