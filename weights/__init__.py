"""Storage only: checkpoint files, safetensors I/O, atomic writes, behavior tables, the embedded-model
registry. No nn.Module lives here, and nothing here imports `kernels` or `engine`.
Names are imported on first use, so `weights.registry` and friends load without transformers."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Checkpoint": "weights.checkpoint", "CheckpointError": "weights.checkpoint",
    **{name: "weights.table" for name in ("BehaviorTable", "HashCollisionError", "ModelSignature", "NonFiniteRowError",
                                          "TableError", "TableFormatError", "TableMismatchError", "UnknownTextError")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
