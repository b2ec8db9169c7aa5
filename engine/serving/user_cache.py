"""A bounded LRU of pooled user vectors, so a user who comes back (the next page of a feed, a re-rank)
skips the upper layers. Keyed by the user's behavior-table rows per sequence (`user_key`); bounded by
bytes (keys + vectors); thread-safe. Entries carry the version they were computed at (a
`engine.serving.pipeline.PipelineVersion`: the model's weights and the tables' lengths); a lookup at a version
that does not serve them (`version.serves(old)`: other weights, a shorter table) drops them all first."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

ENTRY_OVERHEAD = 200  # bytes per entry besides key and vector: dict slot, tensor header (an estimate)


def user_key(rows: np.ndarray, lengths: np.ndarray) -> bytes:
    """One user's key: its n sequence lengths (n,) and its behavior rows (T,), int64 -> bytes."""
    return np.ascontiguousarray(lengths, dtype=np.int64).tobytes() + np.ascontiguousarray(rows, dtype=np.int64).tobytes()


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int


class UserStateCache:
    """LRU by bytes of user key -> (n, d) pooled states. `max_bytes` 0: off (get misses, put drops)."""

    def __init__(self, max_bytes: int = 0) -> None:
        if max_bytes < 0:
            raise ValueError(f"user cache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = self._hits = self._misses = 0
        self._version = None  # the PipelineVersion the entries were computed at (the newest that serves them)

    @staticmethod
    def _size(key: bytes, value: torch.Tensor) -> int:
        return len(key) + value.numel() * value.element_size() + ENTRY_OVERHEAD

    def get_many(self, keys: list[bytes | None], version) -> list[torch.Tensor | None]:
        """The cached states of each key (None: a miss; a None key is not cacheable) for a request at `version`.
        Entries computed at a version it does not serve are dropped first."""
        with self._lock:
            if self._version is None or not version.serves(self._version):
                self._entries.clear()
                self._bytes = 0
            self._version = version
            out = []
            for key in keys:
                value = self._entries.get(key) if key is not None and self.max_bytes else None
                if value is None:
                    self._misses += key is not None and self.max_bytes > 0
                else:
                    self._entries.move_to_end(key)
                    self._hits += 1
                out.append(value)
            return out

    def put_many(self, keys: list[bytes | None], values: list[torch.Tensor], version) -> None:
        """Keep the states of keys computed at `version` (dropped when the entries are at another one)."""
        with self._lock:
            if version != self._version or not self.max_bytes:
                return
            for key, value in zip(keys, values):
                size = self._size(key, value) if key is not None else 0
                if key is None or size > self.max_bytes or key in self._entries:
                    continue
                self._entries[key] = value.clone()  # not a view of the batch it came from
                self._bytes += size
                while self._bytes > self.max_bytes:
                    old_key, old = self._entries.popitem(last=False)
                    self._bytes -= self._size(old_key, old)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries), self._bytes, self.max_bytes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
