"""What a `BAHEScorer` is built from: its device, its kernel path, the frozen lower layers (ABE encoder) and
the tables, and how many items a saved model was trained with."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.encoding.abe import AtomicEncoder
from engine.config import ScorerConfig
from kernels import ops
from weights.checkpoint import Checkpoint
from weights.table import BehaviorTable, TextEncoder


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def kernel_path(kernels: str) -> contextlib.AbstractContextManager:
    """The block's kernel path: `kernels` when 'torch' or 'triton'; under 'auto', whatever the caller chose:
    an enclosing `ops.use_backend`, else $BAHE_KERNELS (read at each call), else the kernel on CUDA."""
    return contextlib.nullcontext() if kernels == "auto" else ops.use_backend(kernels)


def build_encoder(ckpt: Checkpoint, config: ScorerConfig, device: torch.device | str, progress: bool) -> AtomicEncoder:
    settings = config.encoder
    return AtomicEncoder.from_checkpoint(ckpt, settings.num_lower_layers, max_tokens=settings.max_tokens,
                                         token_budget=settings.token_budget, pooling=settings.pooling, device=device,
                                         progress=progress)


def trained_items(state: dict[str, torch.Tensor]) -> int:
    """How many item-table rows a saved model was trained with (its id embedding / item statistics)."""
    if "side.item_id.weight" in state:
        return state["side.item_id.weight"].shape[0] - 1
    if "item_id_rows" in state:
        return state["item_id_rows"].shape[0]
    return state["item_counts"].shape[0] if "item_counts" in state else 0


def trained_behaviors(state: dict[str, torch.Tensor]) -> int:
    """How many behavior-table rows a saved model learned id rows for (ModelConfig.id_rows; 0 without them)."""
    return state["behavior_id_rows"].shape[0] if "behavior_id_rows" in state else 0


def open_or_build_table(path: Path, texts: Sequence[str], encoder: TextEncoder, dtype: str,
                        kind: str) -> BehaviorTable:
    """Open the table at `path` (it must come from the same model split) and append the texts it
    lacks, or build it when absent."""
    if path.exists():
        table = BehaviorTable.open(path, encoder)
        table.append(texts)
        return table
    return BehaviorTable.build(path, texts, encoder, dtype=dtype, kind=kind)
