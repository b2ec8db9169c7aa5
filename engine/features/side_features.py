"""Dense side features from event counts, the same function at training and at serving time.

The trainer computes counts from the log (engine.training.data.example_features.past_counts), the scorer from its stored
snapshot; both pass them through `count_features`, so a model never sees features computed two ways.

Counts come per named sequence (MovieLens: liked, disliked, watched; the generic default: positive, negative,
all). Sequences may overlap (a liked rating is also watched), so the sum over sequences double counts; the
row's total is instead its max over sequences. When one sequence holds every event ('watched', 'all') the max
is exactly the number of events; without such a sequence it is a lower bound, still the same at training and
serving time because it depends on the counts alone.

Recent counts: of the user's last R events, how many are in each sequence (MovieLens: how many of the last 10
ratings were likes) - the user's current taste, which whole-history counts average away. The scorer takes the
last R behaviors of the widest sequence as the user's latest events and counts, per sequence, those whose text
the sequence holds (`recent_counts`); the trainer counts the log's events (engine.training.data.example_features). The two
agree when the widest sequence holds every event and a user's events have distinct texts (MovieLens: one
rating per movie).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SIDES", "check_counts", "count_feature_names", "count_features", "recent_counts"]

SIDES = ("user", "item")
RECENT = "recent"


def check_counts(user_counts: np.ndarray, item_counts: np.ndarray,
                 recent: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The arrays as (B, S) int64, or ValueError saying which array is wrong and how: not 2-D,
    shapes that differ, a non-integer dtype, or a negative count (with its position)."""
    out = []
    arrays = (user_counts, item_counts) if recent is None else (user_counts, item_counts, recent)
    for side, counts in zip((*SIDES, RECENT), arrays):
        counts = np.asarray(counts)
        if counts.ndim != 2:
            raise ValueError(f"{side}_counts must be 2-D (B, S), got shape {counts.shape}")
        if not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"{side}_counts must hold integers, got dtype {counts.dtype}")
        if counts.size and counts.min() < 0:
            b, s = np.argwhere(counts < 0)[0].tolist()
            raise ValueError(f"{side}_counts must be >= 0, got {counts[b, s].item()} at [{b}, {s}]")
        out.append(counts.astype(np.int64, copy=False))
    if any(o.shape != out[0].shape for o in out[1:]):
        raise ValueError("user_counts, item_counts (and recent counts) must have the same shape (B, S), got "
                         + " and ".join(str(o.shape) for o in out))
    return tuple(out)


def count_feature_names(sequence_names: Sequence[str], recent: bool = False) -> list[str]:
    """The names of `count_features` columns, in order: per side (user, item), log1p of each sequence's
    count, then each sequence's smoothed share (4 S); with `recent`, the smoothed share of each sequence among
    the user's last events (S more)."""
    names = [f"{side}_{kind}_{name}" for side in SIDES for kind in ("log1p", "share") for name in sequence_names]
    return names + ([f"{RECENT}_share_{name}" for name in sequence_names] if recent else [])


def _share(counts: np.ndarray) -> np.ndarray:
    total = counts.max(axis=1, keepdims=True, initial=0)
    return (counts + 1.0) / (total + 2.0)


def count_features(user_counts: np.ndarray, item_counts: np.ndarray, recent: np.ndarray | None = None) -> np.ndarray:
    """(B, 4 S [+ S]) float32 features from (B, S) counts: per side, log1p(c_s) (volume, compressed so that
    heavy users and blockbusters do not dominate) and (c_s + 1) / (total + 2) with total = max_s c_s (the mix
    of sequences, Laplace-smoothed so a row with no events gets 1/2 instead of 0/0); then, given the recent
    counts, their shares alike. Columns are named by `count_feature_names`."""
    arrays = check_counts(user_counts, item_counts, recent)
    columns = []
    for counts in arrays[:2]:
        columns += [np.log1p(counts), _share(counts)]
    if recent is not None:
        columns.append(_share(arrays[2]))
    return np.concatenate(columns, axis=1).astype(np.float32)


def recent_counts(sequences: Sequence[Sequence[Sequence]], window: int, num_sequences: int,
                  lengths: np.ndarray | None = None) -> np.ndarray:
    """(U, S) int64: for each user (a list of S = num_sequences sequences of texts or ids, oldest first), how
    many of the last `window` behaviors of the widest sequence (the first of the longest) each sequence holds
    among its own last `window` (all a sequence of the widest one's events can share with them), so nothing
    older than the last `window` behaviors of a sequence is read. lengths (U, S): the sequences' whole lengths,
    for sequences passed as their last behaviors only (at least the last `window` of each); default: as passed."""
    out = np.zeros((len(sequences), num_sequences), dtype=np.int64)
    for u, user in enumerate(sequences):
        size = (lambda s: len(user[s])) if lengths is None else (lambda s: int(lengths[u][s]))  # noqa: E731
        widest = max(range(len(user)), key=size) if user else 0
        latest = list(user[widest][-window:]) if window > 0 and user else []
        for s, seq in enumerate(user):
            held = set(seq[-window:]) if window > 0 else set()
            out[u, s] = sum(x in held for x in latest)
    return out
