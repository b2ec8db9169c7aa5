"""Turning a log's id-level histories into the packed user-major layout the models take."""
from __future__ import annotations

import numpy as np

from engine.data.log import Ragged


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


def row_map(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A dense lookup array: out[ids[i]] = rows[i]; -1 for ids not given."""
    out = np.full(int(ids.max()) + 1 if ids.size else 0, -1, dtype=np.int64)
    out[ids] = rows
    return out
