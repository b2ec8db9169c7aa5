"""Ranking helpers of `BAHEScorer.rank`/`rank_many`: the result type, the repeated users of a batch
(`score` computes each distinct user once) and the repeated candidates of a ranked user (scored once)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.serving.inputs import InputError


@dataclass(frozen=True)
class Ranking:
    """One user's candidates scored: scores (K,) float32 click probabilities in candidate order; order (k,)
    int64 candidate indices, best first (k = top_k, or K), ties broken by candidate order."""
    scores: np.ndarray
    order: np.ndarray

    @property
    def top_scores(self) -> np.ndarray:
        """(k,) the scores in `order`."""
        return self.scores[self.order]


def ranking(scores: np.ndarray, top_k: int | None) -> Ranking:
    order = np.argsort(-scores, kind="stable")
    return Ranking(scores, order if top_k is None else order[:top_k])


def check_top_k(top_k: object) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InputError(f"top_k must be None or an int >= 1, got {top_k!r}")


def parse_candidates(candidates: object, num_users: int) -> list[list[str]]:
    """candidates: one list of item texts per user (texts are checked at lookup, as score's items)."""
    if not isinstance(candidates, (list, tuple)):
        raise InputError(f"candidates must be a list with one list of item texts per user, got "
                         f"{type(candidates).__name__}")
    if len(candidates) != num_users:
        raise InputError(f"candidates has {len(candidates)} lists but users has {num_users}: one list per user")
    out = []
    for u, items in enumerate(candidates):
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
            raise InputError(f"candidates[{u}] must be a list of item texts, got {type(items).__name__}")
        out.append(list(items))
    return out


def distinct_users(sequences: list[list[list[str]]]) -> tuple[list[int], np.ndarray]:
    """(first, inverse): the index of each distinct user's first occurrence, and each user's distinct index,
    users being equal when every sequence holds the same texts. A user with unhashable behaviors (malformed,
    refused later with its own index) is kept apart."""
    seen: dict[tuple, int] = {}
    first, inverse = [], np.empty(len(sequences), dtype=np.int64)
    for u, user in enumerate(sequences):
        try:
            key = tuple(tuple(seq) for seq in user)
            index = seen.setdefault(key, len(first))
        except TypeError:
            index = len(first)
        if index == len(first):
            first.append(u)
        inverse[u] = index
    return first, inverse


def distinct_pairs(pair_user: np.ndarray, item_rows: np.ndarray,
                   *columns: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(kept, back): the pairs to score, each repeated pair (same user, item row and per-pair side `columns`
    (P, F)) kept once in first-occurrence order (a user's pairs stay contiguous), and each original pair's
    index among them; (None, None) when nothing repeats. Ranking takes it: a repeated candidate costs nothing
    and scores exactly as its twin, so ties stay ties in rank and rank_many alike (GEMM rows are rounded by
    their position in the product)."""
    key = np.concatenate([pair_user[:, None], item_rows[:, None], *(c for c in columns if c is not None)], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    if first.size == key.shape[0]:
        return None, None
    order = np.argsort(first)
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    return first[order], position[inverse.reshape(-1)]
