"""Turning a log's id-level histories into the packed user-major layout the models take."""
from __future__ import annotations

import numpy as np

from engine.training.data.log import BehaviorLog, Ragged


def interleave(sequences: list[Ragged]) -> tuple[np.ndarray, np.ndarray]:
    """n Ragged (each over the same B examples) -> user-major packed values (T,) and offsets
    (B*n+1,): sequence s of example b is values[offsets[b*n+s]:offsets[b*n+s+1]]."""
    n, batch = len(sequences), len(sequences[0])
    lengths = np.stack([s.lengths for s in sequences], axis=1)  # (B, n)
    offsets = np.concatenate([[0], np.cumsum(lengths.ravel())]).astype(np.int64)
    values = np.empty(int(offsets[-1]), dtype=np.int64)
    for s, ragged in enumerate(sequences):
        example = np.repeat(np.arange(batch), ragged.lengths)
        inside = np.arange(ragged.values.size) - ragged.offsets[example]
        values[offsets[example * n + s] + inside] = ragged.values
    return values, offsets


def require_sequences(log: BehaviorLog, names: tuple[str, ...]) -> None:
    """A model's sequence names must all be in the log."""
    missing = [n for n in names if n not in log.sequence_names]
    if missing:
        raise ValueError(f"the model's sequences {missing} are not in the log (it has {list(log.sequence_names)})")


def packed_histories(log: BehaviorLog, rows: np.ndarray, names: tuple[str, ...],
                     max_behaviors: int, window_step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Item ids of the examples' histories in the model's sequence order, packed user-major
    (see `interleave`), each its window (`BehaviorLog.sequences`), oldest first."""
    require_sequences(log, names)
    seqs = log.sequences(rows, max_behaviors, window_step)
    return interleave([seqs[name] for name in names])


def row_map(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A dense lookup array: out[ids[i]] = rows[i]; -1 for ids not given."""
    out = np.full(int(ids.max()) + 1 if ids.size else 0, -1, dtype=np.int64)
    out[ids] = rows
    return out
