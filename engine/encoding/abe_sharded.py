"""Distributed ABE: the unique texts of a build (or the new texts of an append) split across the ranks of a
torchrun job by their 64-bit key, each rank encoding its shard on its own device, and rank 0 writing the
one table through the single-process code path (`BehaviorTable.build` / `append`: same file format, same
lock, same atomic replace), fed with the gathered rows.

Why a gather through torch.distributed, not per-rank files: the rows cross ranks in rounds of at most
`ENCODE_CHUNK` texts per rank (the messages stay small), no shared file system is needed, and a rank that
dies leaves nothing behind to clean: torchrun stops the job, rank 0 never reaches the write, the old table
(or none) stays. The cost: rank 0 holds the new rows in float32 before writing (n x d x 4 bytes: the
MovieLens table is 2.6 MB; a million 896-d rows, 3.6 GB).

The table equals a single-process build: the writer takes the texts in their given order (rows in order of
first appearance), and each row comes from the same model; it differs from the single-process row only by
the float rounding that depends on which other texts share its batch (`engine.encoding.abe.BATCH_TOLERANCE`)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.distributed import Launch, broadcast_outcome
from weights.table import ENCODE_CHUNK, MISSING, BehaviorTable, TextEncoder
from weights.text_key import normalize_text, text_keys

log = logging.getLogger(__name__)


def shard_of(keys: np.ndarray, world_size: int) -> np.ndarray:
    """(n,) rank that encodes each text: its key, read as unsigned, modulo the world size."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return (keys.view(np.uint64) % np.uint64(world_size)).astype(np.int64)


def texts_to_encode(path: Path, texts: list[str], encoder: TextEncoder) -> list[str]:
    """The unique normalized texts (first appearance order) that the table at `path` lacks (all when absent);
    TableMismatchError, on every rank before any encoding, when the table comes from another model split."""
    unique = list(dict.fromkeys(normalize_text(t) for t in dict.fromkeys(texts)))
    if not path.exists():
        return unique
    rows = BehaviorTable.open(path, encoder).lookup(unique, on_missing="mark")
    return [t for t, row in zip(unique, rows) if row == MISSING]


class PrecomputedEncoder:
    """A TextEncoder serving rows encoded beforehand (by the ranks); a text not among them (another writer
    changed the table meanwhile) is encoded by `fallback`, the same model."""

    def __init__(self, fallback: TextEncoder, texts: list[str], rows: torch.Tensor) -> None:
        self.signature, self.fallback = fallback.signature, fallback
        self.slot = {t: i for i, t in enumerate(texts)}
        self.rows = rows

    def encode(self, texts: list[str]) -> torch.Tensor:
        slots = [self.slot.get(t, -1) for t in texts]
        out = torch.empty(len(texts), self.signature.hidden_size, dtype=torch.float32)
        known = [i for i, s in enumerate(slots) if s >= 0]
        out[known] = self.rows[[slots[i] for i in known]]
        fresh = [i for i, s in enumerate(slots) if s < 0]
        if fresh:
            log.info("%d texts were not encoded by the ranks; encoding them on the writer", len(fresh))
            out[fresh] = self.fallback.encode([texts[i] for i in fresh]).float()
        return out


def encode_across_ranks(texts: list[str], encoder: TextEncoder, launch: Launch) -> torch.Tensor | None:
    """Every rank encodes the texts whose key falls on it; rank 0 gets (n, d) float32 rows in `texts` order,
    the others None. Call on every rank with the same `texts`."""
    owner = shard_of(text_keys(texts), launch.world_size)
    mine = np.flatnonzero(owner == launch.rank)
    rounds = max(-(-int(np.sum(owner == r)) // ENCODE_CHUNK) for r in range(launch.world_size)) if texts else 0
    out = torch.empty(len(texts), encoder.signature.hidden_size, dtype=torch.float32) if launch.is_writer else None
    for step in range(rounds):
        part = mine[step * ENCODE_CHUNK:(step + 1) * ENCODE_CHUNK]
        rows = encoder.encode([texts[i] for i in part]).float().cpu() if part.size else None
        gathered = [None] * launch.world_size if launch.is_writer else None
        dist.gather_object((part, rows), gathered, dst=0)
        if out is not None:
            for where, block in gathered:
                if where.size:
                    out[torch.from_numpy(where)] = block
    return out


def build_or_append(path: str | Path, texts: list[str], encoder: TextEncoder, launch: Launch, *,
                    dtype: str = "float32", kind: str = "behavior") -> tuple[str, int, BehaviorTable | None]:
    """Build the table at `path` (or append the texts it lacks) with every rank encoding a shard; rank 0
    writes. Returns ('built' | 'appended', rows added, the table on rank 0 / None elsewhere). Call on every
    rank with the same arguments; an error on the writer is raised on every rank (LaunchError elsewhere)."""
    path = Path(path)
    exists = path.exists()
    todo = texts_to_encode(path, texts, encoder)
    rows = encode_across_ranks(todo, encoder, launch)
    error, result = None, (("appended" if exists else "built"), 0, None)
    if launch.is_writer:
        try:
            ready = PrecomputedEncoder(encoder, todo, rows)
            if exists:
                table = BehaviorTable.open(path, ready)
                result = ("appended", table.append(texts), table)
            else:
                table = BehaviorTable.build(path, texts, ready, dtype=dtype, kind=kind)
                result = ("built", len(table), table)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, else they wait forever
            error = err
    broadcast_outcome(error)
    if error is not None:
        raise error
    return result
