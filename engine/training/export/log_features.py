"""The feature block of a log's examples, past-only by construction: the same timeline forward BAHE trains with
(engine.training.loops.timeline), which reads each target's sequences strictly before its timestamp (the history
rule of engine.training.data.log: equal timestamps are not history), its count features from the events before it
(engine.training.data.example_features.PastCounts: not the scorer's served item-count snapshot, which counts
events up to the end of its training period) and its similarity counts over the same prefixes. Changing any event
at or after an example's moment changes none of its features (tested)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from engine.export.block import Projection, assemble, block_names
from engine.features.similarity import similarity_features
from engine.model.head import sequence_item_cosines
from engine.serving.scorer import BAHEScorer
from engine.training.data.log import BehaviorLog
from engine.training.loops.ctr_models import BAHECTR
from engine.training.loops.timeline import timeline_towers
from engine.training.loops.train import row_batches

__all__ = ["log_parts", "log_block", "item_vectors"]


def log_parts(scorer: BAHEScorer, log: BehaviorLog, rows: np.ndarray, *, batch_size: int = 256
              ) -> Iterator[dict[str, np.ndarray | None]]:
    """The head's inputs for the log's example `rows` (ascending), one dict per `batch_size` targets: user (B, n, d),
    item (B, d), cosines (B, n), similar (B, 2 n k) or None, logits (B,) - what `BAHEScorer.score_parts` returns for
    a live request, here from each example's past alone. The scorer's tables must hold the log's item texts."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (np.diff(rows) <= 0).any():
        raise ValueError("example rows must be strictly ascending (a user's targets together, in time order)")
    ctr, model = BAHECTR(scorer, log), scorer.model
    ctr.eval()
    with torch.inference_mode():
        for chunk in row_batches(rows, batch_size):
            batch = ctr.prepare(log, chunk).to(scorer.device)
            user, item, similar = timeline_towers(model, ctr.behavior_table, ctr.item_table, batch)
            logits = model.logits(user, item, batch.item_rows, batch.dense, similar, batch.categories)
            yield {"user": user.float().cpu().numpy(), "item": item.float().cpu().numpy(),
                   "cosines": sequence_item_cosines(user, item).float().cpu().numpy(),
                   "logits": logits.float().cpu().numpy(),
                   "similar": None if similar is None else similarity_features(similar).cpu().numpy()}


def log_block(scorer: BAHEScorer, log: BehaviorLog, rows: np.ndarray, projection: Projection, *,
              batch_size: int = 256) -> np.ndarray:
    """(B, F) float32 feature block (engine.export.block) of the log's example `rows` (ascending), projected batch
    by batch (memory: the block, not the full-width vectors of every example)."""
    model = scorer.config.model
    width = len(block_names(model.sequence_names, model.similarity_temperatures,
                            projection.width(scorer.model.upper.hidden_size)))
    out = np.empty((np.asarray(rows).size, width), dtype=np.float32)
    done = 0
    for parts in log_parts(scorer, log, rows, batch_size=batch_size):
        block = assemble(parts, projection)
        out[done:done + block.shape[0]] = block
        done += block.shape[0]
    return out


def item_vectors(scorer: BAHEScorer, log: BehaviorLog) -> np.ndarray:
    """(I, d) float32: the item tower's vectors of the log's items (what a PCA projection is fitted on: no label)."""
    rows = torch.from_numpy(scorer.items.lookup(log.item_id_texts))
    with torch.inference_mode():
        return scorer.model.item_states(scorer.table_rows("items"), rows.to(scorer.device)).float().cpu().numpy()
