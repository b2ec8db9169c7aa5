"""The sequential id model (the SASRec / DIN family) behind the CTR-model interface of
engine.training.loops.ctr_models: BAHE's CTR model with the frozen-LLM behavior rows replaced by learned
item-id embeddings, trained from scratch.

Everything else is BAHE's: the same upper-layer architecture (the scorer's layers, heads, hidden size, causal
attention, behavior positions) but randomly initialised; the same windows of the same histories; the same item
tower (the item's id row through the upper layers as a one-behavior sequence); the same count and categorical
side features, item-id side embedding and DCN-v2 + MLP head; the same timeline training (one forward per user,
each target reading its prefix). Only the similarity-weighted counts are dropped: they are cosines of ABE rows,
the LLM part. So the pair answers one question: do frozen-LLM behavior rows beat ids learned from the log, in
the same architecture?

The id vocabulary is the items seen in training (training targets and the behaviors of their histories) plus
one unseen bucket, the last row: an item that training never saw, as a target or inside a history, takes that
bucket in every position (never a row of its own that no gradient reached), so on a held-out-items split the
model cannot score a new item as "some random id". `training_items` defines "seen".
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from engine.backbone.layers import RMSNorm
from engine.backbone.split import UpperEncoder
from engine.config import ModelConfig
from engine.model.bahe_model import BAHEModel
from engine.serving.scorer import BAHEScorer
from engine.training.data.example_features import PastCounts, category_batch
from engine.training.data.extra_columns import ExtraColumns
from engine.training.data.log import BehaviorLog
from engine.training.loops.batching import require_sequences
from engine.training.loops.ctr_models import rows_by_user
from engine.training.loops.timeline import TimelineBatch, timeline_batch, timeline_logits

__all__ = ["SequentialIdCTR", "training_items"]

INIT_STD = 0.02  # BERT's initializer range: new linear weights and id rows ~ N(0, 0.02^2)


def training_items(log: BehaviorLog, train_rows: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """(V,) sorted unique item ids seen in training: the targets at `train_rows` and every behavior of their
    histories in sequences `names` (events of the same user strictly before a training target's moment)."""
    rows = np.asarray(train_rows, dtype=np.int64)
    if rows.size == 0:
        raise ValueError("the sequential id model needs at least one training example to build its id vocabulary")
    require_sequences(log, names)
    start = np.searchsorted(log.user, log.user[rows], side="left")   # the user's first event (sorted log)
    end = start + log.history_length[rows]                           # first event at the target's moment
    cover = np.zeros(log.num_events + 1, dtype=np.int64)             # union of the [start, end) intervals
    np.add.at(cover, start, 1)
    np.add.at(cover, end, -1)
    in_history = np.cumsum(cover[:-1]) > 0
    member = log.membership[:, [log.sequence_names.index(name) for name in names]].any(axis=1)
    return np.unique(np.concatenate([log.item[rows], log.item[in_history & member]]))


def _reinitialise(upper: nn.Module, std: float) -> None:
    """Every parameter of `upper` drawn afresh: linear weights ~ N(0, std^2) with zero biases (BERT's and
    SASRec's initialisation), norms at scale 1 and shift 0."""
    for module in upper.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class SequentialIdCTR(nn.Module):
    """Learned item-id rows through BAHE's upper-layer architecture (fresh weights), BAHE's side features and
    head, timeline training. `like`: the upper layers whose architecture is copied (never their weights);
    `config`: BAHE's model config (its similarity temperatures are dropped); `train_rows`: the training examples,
    whose items (`training_items`) get rows, as wide as the upper layers; `extra`: columns joined to the dense side
    features by example row (BAHE's exported block: a stacked sequential id model; NaN read as 0)."""
    name = "sequential id"

    def __init__(self, like: UpperEncoder, config: ModelConfig, log: BehaviorLog, train_rows: np.ndarray,
                 extra: ExtraColumns | None = None) -> None:
        super().__init__()
        if config.attention != "causal":
            raise ValueError("the sequential id model trains by timelines, which need causal upper layers "
                             f"(ModelConfig.attention='causal'), got attention={config.attention!r}")
        # no similarity counts (cosines of ABE rows: the LLM part) and no id rows on top (its rows are learned ids)
        config = replace(config, similarity_temperatures=(), id_rows=False)
        upper = copy.deepcopy(like)
        for layer in upper.layers:
            layer.attn.causal = True
        _reinitialise(upper, INIT_STD)
        self.config = config
        self.items = training_items(log, train_rows, config.sequence_names)
        vocabulary = self.items.size
        self.extra = extra
        # side item id: rows >= V share its bucket
        self.model = BAHEModel(upper, config, num_items=vocabulary, extra_dense=len(extra.names) if extra else 0)
        # rows 0..V-1: the training items, row V: the unseen bucket
        self.embedding = nn.Parameter(torch.randn(vocabulary + 1, upper.hidden_size) * INIT_STD)
        self.counts = PastCounts(log, config.recent_events)
        self._lookup: tuple[BehaviorLog, np.ndarray] | None = None

    @classmethod
    def from_scorer(cls, scorer: BAHEScorer, log: BehaviorLog, train_rows: np.ndarray,
                    extra: ExtraColumns | None = None) -> SequentialIdCTR:
        """The sequential id counterpart of BAHE's scorer: its upper-layer architecture and model config (M,
        window step, side features, head), new weights drawn from torch's generator (seed it first)."""
        return cls(scorer.model.upper, scorer.config.model, log, train_rows, extra)

    @property
    def unseen_row(self) -> int:
        """The embedding row of every item training never saw."""
        return self.items.size

    def item_rows(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows of item `ids` (any shape): the training item's row, else the unseen bucket."""
        ids = np.asarray(ids, dtype=np.int64)
        where = np.clip(np.searchsorted(self.items, ids), 0, max(self.items.size - 1, 0))
        return np.where(self.items[where] == ids, where, self.unseen_row)

    def _row_map(self, log: BehaviorLog) -> np.ndarray:
        """A dense lookup array over `log`'s item ids (0 .. max id): id -> embedding row (kept for the last log)."""
        if self._lookup is None or self._lookup[0] is not log:
            size = int(max(log.item.max(initial=0), log.item_ids.max(initial=0))) + 1
            self._lookup = (log, self.item_rows(np.arange(size)))
        return self._lookup[1]

    def epoch_order(self, rows: np.ndarray, log: BehaviorLog, rng: np.random.Generator) -> np.ndarray:
        """Users in random order, each user's targets together and in time order (one forward each)."""
        return rows_by_user(rows, log, rng)

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> TimelineBatch:
        config = self.config
        require_sequences(log, config.sequence_names)
        lookup = self._row_map(log)
        categories = category_batch(self.model.side, config, log, rows, self.training)
        batch = timeline_batch(log, rows, config.sequence_names, config.max_behaviors, config.history_step, lookup,
                               lookup, self.counts, config.count_features, categories)
        if self.extra is not None:
            extra = torch.from_numpy(np.nan_to_num(self.extra.take(rows), nan=0.0))
            batch.dense = extra if batch.dense is None else torch.cat([batch.dense, extra], dim=1)
        return batch

    def forward(self, batch: TimelineBatch) -> torch.Tensor:
        return timeline_logits(self.model, self.embedding, self.embedding, batch)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return []  # nothing pretrained: every weight trains at the new-parameter learning rate

