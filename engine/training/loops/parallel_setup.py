"""`bahe train --distributed`: the scorer every rank trains, built once. The behavior table is encoded by all
ranks (engine.encoding.abe_sharded, rank 0 writes); the item table (rows copied from the behavior table) is written by
rank 0, then the other ranks open both tables. Every rank ends with the same tables, memory-mapped."""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from engine.encoding.abe import AtomicEncoder
from engine.encoding.abe_sharded import build_or_append
from engine.config import ScorerConfig
from engine.distributed import Launch
from engine.serving.scorer import BAHEScorer
from engine.serving.scorer_folder import BEHAVIORS_FILE
from engine.training.data.log import BehaviorLog
from engine.training.studies.experiment import TableReport, build_scorer
from weights.checkpoint import Checkpoint
from weights.registry import resolve_model


def parallel_scorer(model: str, data: BehaviorLog, config: ScorerConfig, tables_dir: str | Path, launch: Launch,
                    device: str) -> tuple[BAHEScorer, TableReport]:
    """The fresh scorer of `build_scorer`, its behavior table encoded across the ranks (call on every rank)."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    settings = config.encoder
    encoder = AtomicEncoder.from_checkpoint(Checkpoint(resolve_model(model)), settings.num_lower_layers,
                                            max_tokens=settings.max_tokens, token_budget=settings.token_budget,
                                            pooling=settings.pooling, device=device, progress=launch.is_writer)
    build_or_append(tables_dir / BEHAVIORS_FILE, data.item_id_texts, encoder, launch, dtype=settings.table_dtype,
                    kind="behavior")
    built = None
    if launch.is_writer:  # the item table: rows copied from the behavior table, written once
        built = build_scorer(model, data, config, tables_dir, device=device, progress=True)
    dist.barrier()
    return built or build_scorer(model, data, config, tables_dir, device=device, progress=False)
