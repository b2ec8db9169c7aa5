"""Item vectors: the item tower's output for every row of the item table, computed once and kept with the
scorer, so scoring a known item never runs the upper layers.

File (`item_vectors.safetensors` in the scorer folder, memory-mapped on load):
  vectors   (N, d) float32, row i = BAHEModel.item_states of item-table row i
  metadata  bahe_item_vectors_fingerprint: `fingerprint(model, items, N)`, i.e. a digest of the upper layers'
            weights and compute dtype and of the first N item-table keys (and "int8" for an int8 item table).
A file whose fingerprint is not the loaded scorer's (weights trained further, another table) is stale: it is
refused (logged) and the vectors are computed afresh, never used. In memory, `ItemVectors` notices weight
updates by the parameters' version counters (every optimizer step and load_state_dict bumps them; a write
through `param.data` does not, and is not seen) and recomputes; rows appended to the item table later are
computed on first use."""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from engine.model.bahe_model import BAHEModel
from weights.atomic import atomic_write
from weights.safetensors_io import SafetensorsFormatError, mmap_tensor, read_header, source_of, write_safetensors
from weights.table import BehaviorTable

log = logging.getLogger(__name__)

FINGERPRINT_KEY, DTYPE_KEY = "bahe_item_vectors_fingerprint", "bahe_item_vectors_dtype"
CHUNK = 4096  # items per forward when computing the vectors


def weights_fingerprint(model: BAHEModel) -> str:
    """Digest of what the item tower computes with: the upper layers' weights (as fp32 bytes) and the dtype."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(model.compute_dtype).encode())
    for name, tensor in model.upper.state_dict().items():
        data = tensor.detach().float().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def fingerprint(weights: str, items: BehaviorTable, rows: int) -> str:
    """The signature of the vectors of item-table rows [0, rows): weights' fingerprint + those rows' text keys
    (+ the row dtype of an int8 table, whose rows differ from the float table it may replace)."""
    digest = hashlib.blake2b(weights.encode(), digest_size=16)
    digest.update(np.ascontiguousarray(items.keys[:rows]).tobytes())
    if items.row_scale is not None:
        digest.update(items.dtype.encode())
    return f"{rows}:{digest.hexdigest()}"


def _versions(training: bool, tensors) -> tuple:
    return (training, *((id(t), t.data_ptr(), t._version, t.dtype) for t in tensors))


def weights_version(model: BAHEModel) -> tuple:
    """Changes whenever an upper-layer weight is updated in place, replaced or moved, or the model switches
    between training and eval mode (cheap: no data read). What the item vectors depend on."""
    return _versions(model.training, model.upper.parameters())


def model_version(model: torch.nn.Module) -> tuple:
    """`weights_version` of every parameter and buffer of the model (the head, the item counts, the seen
    categorical buckets too): what a scorer's served state depends on (engine.serving.pipeline)."""
    return _versions(model.training, [*model.parameters(), *model.buffers()])


@torch.inference_mode()
def compute(model: BAHEModel, item_table: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """(stop - start, d) float32 item-tower outputs of item-table rows [start, stop)."""
    stop = item_table.shape[0] if stop is None else stop
    device = next(model.parameters()).device
    out = [model.item_states(item_table, torch.arange(lo, min(lo + CHUNK, stop), device=device)).float().cpu()
           for lo in range(start, stop, CHUNK)]
    return torch.cat(out) if out else torch.empty(0, model.upper.hidden_size)


class ItemVectors:
    """The scorer's item vectors: `get(model, items, table_rows)` -> (N, d) float32 rows for every item-table row,
    fresh for the model's current weights. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vectors: torch.Tensor | None = None
        self._version: tuple | None = None
        self._signature: str | None = None  # fingerprint(...) of _vectors, once computed (saving needs it)

    def load(self, path: Path, model: BAHEModel, items: BehaviorTable) -> bool:
        """Adopt the vectors of `path` if its fingerprint is this model's and table's; False (logged) if stale."""
        try:
            with open(path, "rb") as handle:
                header = read_header(path, handle)
                stored = header.metadata.get(FINGERPRINT_KEY, "")
                if header.metadata.get(DTYPE_KEY, str(model.compute_dtype)) != str(model.compute_dtype):
                    log.info("item vectors %s were computed in %s, this scorer computes in %s: computing them",
                             path, header.metadata[DTYPE_KEY], model.compute_dtype)
                    return False
                rows = int(stored.split(":", 1)[0]) if ":" in stored else -1
                info = header.tensors.get("vectors")
                if info is None or info.dtype != "F32" or info.shape != (rows, model.upper.hidden_size):
                    raise SafetensorsFormatError(f"{path}: no (N, {model.upper.hidden_size}) float32 'vectors'")
                vectors = mmap_tensor(header, "vectors", handle)
        except (OSError, ValueError) as err:
            log.warning("item vectors %s unreadable (%s): computing them afresh", path, err)
            return False
        if rows > len(items) or stored != fingerprint(weights_fingerprint(model), items, rows):
            log.warning("item vectors %s are stale (signed %s, not for this scorer's weights, compute dtype and "
                        "item table): computing them afresh", path, stored)
            return False
        with self._lock:
            self._vectors, self._version, self._signature = vectors, weights_version(model), stored
        return True

    def get(self, model: BAHEModel, items: BehaviorTable, item_table: torch.Tensor) -> torch.Tensor:
        with self._lock:
            version, n = weights_version(model), item_table.shape[0]
            if self._vectors is None or self._version != version:
                self._vectors, self._version, self._signature = compute(model, item_table), version, None
            elif self._vectors.shape[0] < n:  # rows appended to the item table since
                self._vectors = torch.cat([self._vectors, compute(model, item_table, self._vectors.shape[0], n)])
                self._signature = None
            return self._vectors[:n]

    def save(self, path: Path, model: BAHEModel, items: BehaviorTable, item_table: torch.Tensor) -> None:
        """Write the vectors of every item-table row, signed, atomically."""
        vectors = self.get(model, items, item_table)
        with self._lock:
            signature = self._signature or fingerprint(weights_fingerprint(model), items, vectors.shape[0])
        with atomic_write(path) as handle:
            write_safetensors(handle, [source_of("vectors", vectors.contiguous())],
                              {"format": "pt", FINGERPRINT_KEY: signature, DTYPE_KEY: str(model.compute_dtype)})
