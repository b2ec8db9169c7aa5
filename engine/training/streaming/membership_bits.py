"""Sequence membership as a streamed log's shard files store it: the (N, S) bool matrix of a BehaviorLog
packed into one int64 bit mask per event (bit s set: the event is in sequence s), hence at most
MAX_SEQUENCES sequences. Written by `stream.prepare_stream`; read by `StreamedLog.load` and by the item-count
pass (`stream_items`), which is why it lives in neither of them."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["MAX_SEQUENCES", "pack_membership", "unpack_membership"]

MAX_SEQUENCES = 63  # bits of an int64 below the sign bit


def pack_membership(member: np.ndarray, bits: Sequence[int]) -> np.ndarray:
    """(N, k) bool columns -> (N,) int64 masks with column j at bit `bits[j]`; ValueError for a bit outside
    [0, MAX_SEQUENCES) or a count of bits that does not match the columns."""
    member = np.asarray(member)
    if member.ndim != 2 or member.shape[1] != len(bits):
        raise ValueError(f"need (N, {len(bits)}) membership columns for {len(bits)} bits, got shape {member.shape}")
    bad = [b for b in bits if not 0 <= b < MAX_SEQUENCES]
    if bad:
        raise ValueError(f"membership bits must be in [0, {MAX_SEQUENCES}), got {bad}")
    mask = np.zeros(member.shape[0], dtype=np.int64)
    for j, bit in enumerate(bits):
        mask |= member[:, j].astype(np.int64) << bit
    return mask


def unpack_membership(mask: np.ndarray, sequences: int) -> np.ndarray:
    """(N,) int64 bit masks -> (N, S) bool."""
    return ((mask[:, None] >> np.arange(sequences, dtype=np.int64)[None, :]) & 1).astype(bool)
