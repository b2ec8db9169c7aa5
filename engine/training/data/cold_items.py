"""Cold items: test examples whose item had few training examples, and a split that holds a share of the
items out of training altogether (every example of those items leaves train and validation; the test part is
their test examples). Their features stay past-only: a held-out item's counts are its events strictly before
each target, as for every item; id models give them the unseen id bucket (engine.training.loops.unseen_items)."""
from __future__ import annotations

import numpy as np

from engine.training.data.log import BehaviorLog

__all__ = ["COLD_THRESHOLDS", "training_examples_per_item", "cold_subsets", "held_out_items_split"]

COLD_THRESHOLDS = (5, 20)


def training_examples_per_item(log: BehaviorLog, train_rows: np.ndarray) -> np.ndarray:
    """(I,) int64 training examples of each item of `log.item_ids` (aligned with it)."""
    return np.bincount(np.searchsorted(log.item_ids, log.item[np.asarray(train_rows, dtype=np.int64)]),
                       minlength=log.item_ids.size).astype(np.int64)


def cold_subsets(log: BehaviorLog, train_rows: np.ndarray, test_rows: np.ndarray,
                 thresholds: tuple[int, ...] = COLD_THRESHOLDS) -> dict[int, np.ndarray]:
    """threshold k -> positions into `test_rows` of the examples whose item had fewer than k training
    examples among `train_rows`."""
    per_item = training_examples_per_item(log, train_rows)
    seen = per_item[np.searchsorted(log.item_ids, log.item[np.asarray(test_rows, dtype=np.int64)])]
    return {k: np.flatnonzero(seen < k) for k in thresholds}


def held_out_items_split(log: BehaviorLog, rows: dict[str, np.ndarray], fraction: float = 0.1,
                         seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(split, held-out item ids): `fraction` of the log's items drawn at random with `seed`; train and val
    keep `rows`' examples of the other items, test keeps `rows['test']`'s examples of the held-out ones."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    missing = [name for name in ("train", "val", "test") if name not in rows]
    if missing:
        raise ValueError(f"rows must have 'train', 'val' and 'test' parts; missing {missing}")
    ids = log.item_ids
    count = max(1, int(round(fraction * ids.size)))
    held = np.sort(np.random.default_rng(seed).choice(ids, count, replace=False))
    out = {}
    for name in ("train", "val", "test"):
        part = np.asarray(rows[name], dtype=np.int64)
        is_held = np.isin(log.item[part], held)
        out[name] = part[is_held] if name == "test" else part[~is_held]
    return out, held
