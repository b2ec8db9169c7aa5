"""The three CTR models the trainer fits on a behavior log, behind one interface:
`prepare(log, rows)` builds a CPU batch, `forward(batch)` gives (B,) logits,
`pretrained_parameters()` are the ones fine-tuned at the backbone learning rate.

- BAHECTR: BAHE through its scorer (table rows -> upper layers over behavior positions).
- RawTokenCTR: the baseline the paper compares against: the same backbone with ALL layers run over
  the concatenated tokens of each sequence's behaviors (most recent first, truncated), the same
  trainable part (upper layers + head) and the same head.
- IdOnlyCTR: classic CTR with learned item-id embeddings, mean-pooled per sequence, the same head.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from engine.model.packing import pack_lists
from engine.training.loops.batching import packed_histories, require_sequences, row_map
from engine.config import ModelConfig
from engine.training.data.log import BehaviorLog
from engine.training.loops.timeline import TimelineBatch, timeline_batch, timeline_logits
from engine.model.head import CTRHead, SideInputs, head_features, user_item_head
from engine.training.data.example_features import PastCounts, category_batch, dense_features, item_count_table
from engine.model.bahe_model import UNSEEN_ITEM, PackedBatch, pool_user_item
from engine.serving.scorer import BAHEScorer
from kernels import ops
from weights.checkpoint import Checkpoint
from engine.backbone.split import split_checkpoint

SEQUENCE_SEPARATOR = " ; "


class BAHECTR(nn.Module):
    """BAHE trained in place: its weights are the scorer's, so the trained scorer is saved as is.
    Trained and evaluated by timeline batches (engine.training.loops.timeline): one forward per user."""
    name = "BAHE"

    def __init__(self, scorer: BAHEScorer, log: BehaviorLog) -> None:
        super().__init__()
        self.scorer, self.model = scorer, scorer.model
        if not all(layer.attn.causal for layer in self.model.upper.layers):
            raise ValueError("timeline training needs causal upper layers (ModelConfig.attention='causal')")
        ids, texts = log.item_ids, log.item_id_texts
        self.behavior_row = row_map(ids, scorer.behaviors.lookup(texts))
        self.item_row = row_map(ids, scorer.items.lookup(texts))
        self.behavior_table = scorer.table_rows("behaviors")
        self.item_table = scorer.table_rows("items")
        self.counts = PastCounts(log, scorer.config.model.recent_events)

    def epoch_order(self, rows: np.ndarray, log: BehaviorLog, rng: np.random.Generator) -> np.ndarray:
        """Users in random order, each user's targets together and in time order (one forward each)."""
        return rows_by_user(rows, log, rng)

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> TimelineBatch:
        config = self.scorer.config.model
        categories = category_batch(self.model.side, config, log, rows, self.training)
        batch = timeline_batch(log, rows, config.sequence_names, config.max_behaviors, config.history_step,
                               self.behavior_row, self.item_row, self.counts, config.count_features, categories)
        if self.training and config.item_id_dropout:
            batch.item_keys = drop_item_ids(batch.item_rows, config.item_id_dropout)
        return batch

    def forward(self, batch: TimelineBatch) -> torch.Tensor:
        return timeline_logits(self.model, self.behavior_table, self.item_table, batch)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.model.upper.parameters())

    def store_item_counts(self, log: BehaviorLog, before: int) -> None:
        """The item statistics the scorer serves with: each item-table row's events per sequence with
        timestamp < before (the end of the training period: nothing from the evaluated future)."""
        self.set_item_counts(*item_count_table(log, before), log.sequence_names)

    def set_item_counts(self, ids: np.ndarray, by_item: np.ndarray, sequence_names: Sequence[str]) -> None:
        """Store item counts `by_item` (I, S) of item `ids` (I,), sequences in the order `sequence_names`, as the
        statistics the scorer serves with (a streamed log computes them without a BehaviorLog)."""
        order = [list(sequence_names).index(name) for name in self.scorer.config.model.sequence_names]
        counts = np.zeros(tuple(self.model.item_counts.shape), dtype=np.int64)
        counts[self.item_row[ids]] = by_item[:, order]
        self.model.item_counts.copy_(torch.from_numpy(counts))


def drop_item_ids(item_rows: torch.Tensor, share: float) -> torch.Tensor:
    """Id keys of a training batch's targets with a random `share` of them (torch's generator) read as unseen
    ids (ModelConfig.item_id_dropout): like items training never saw, they are scored from text and counts alone,
    which trains the unseen item-id bucket that held-out and newly added items take."""
    dropped = torch.rand(item_rows.shape, device=item_rows.device) < share
    return torch.where(dropped, torch.full_like(item_rows, UNSEEN_ITEM), item_rows)


def rows_by_user(rows: np.ndarray, log: BehaviorLog, rng: np.random.Generator) -> np.ndarray:
    """`rows` regrouped: users in a random order, each user's rows ascending."""
    rows = np.sort(rows)
    users = log.user[rows]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    bounds = np.r_[starts, rows.size]
    pieces = [rows[bounds[g]:bounds[g + 1]] for g in rng.permutation(starts.size)]
    return np.concatenate(pieces) if pieces else rows


@dataclass
class TokenBatch:
    """Packed token ids of U*n sequence texts (user-major) then U item texts."""
    ids: torch.Tensor      # (T,) int64
    offsets: torch.Tensor  # (U*n + U + 1,) int64
    users: int
    max_len: int  # the longest text's token count, known on the host when packing

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.ids.to(device), self.offsets.to(device), self.users, self.max_len)


class RawTokenCTR(nn.Module):
    """The raw-token LLM baseline: every layer runs over every token of every sequence, every time.
    Lower layers frozen, upper layers + head trained, exactly BAHE's trainable part."""
    name = "raw-token LLM"

    def __init__(self, ckpt: Checkpoint, num_lower_layers: int, config: ModelConfig, *,
                 max_tokens_per_sequence: int = 512, item_max_tokens: int = 32) -> None:
        super().__init__()
        self.config, self.tokenizer = config, ckpt.tokenizer
        self.lower, self.upper = split_checkpoint(ckpt, num_lower_layers)
        limit = getattr(ckpt.config, "max_position_embeddings", max_tokens_per_sequence)
        self.max_tokens, self.item_max_tokens = min(max_tokens_per_sequence, limit), item_max_tokens
        self.empty_sequence, self.head = user_item_head(config, ckpt.hidden_size)

    @classmethod
    def from_scorer(cls, scorer: BAHEScorer, *, max_tokens_per_sequence: int = 512,
                    item_max_tokens: int = 32) -> RawTokenCTR:
        """The raw-token baseline over a BAHE scorer's own modules (its lower layers, upper layers,
        empty-sequence vectors and head: shared, not copied, so training one trains the other), on the
        scorer's device: only the input differs from BAHE (each sequence's behavior texts concatenated
        and tokenized, every layer run over every token)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        ckpt = scorer.checkpoint
        model.config, model.tokenizer = scorer.config.model, ckpt.tokenizer
        model.lower, model.upper = scorer.encoder.lower, scorer.model.upper
        limit = getattr(ckpt.config, "max_position_embeddings", max_tokens_per_sequence)
        model.max_tokens, model.item_max_tokens = min(max_tokens_per_sequence, limit), item_max_tokens
        model.empty_sequence, model.head = scorer.model.empty_sequence, scorer.model.head
        return model

    def _tokens(self, texts: list[str], max_length: int) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> TokenBatch:
        require_sequences(log, self.config.sequence_names)
        return self.pack(log.sequence_texts(rows, self.config.max_behaviors, self.config.history_step), log.target_texts(rows))

    def pack(self, users: Sequence[dict[str, list[str]]], item_texts: Sequence[str],
             max_tokens: int | None = None) -> TokenBatch:
        """Tokenize each user's sequences, in the model's order, as one text per sequence (its behaviors
        most recent first, joined; an empty one gets no tokens; cut to `max_tokens`, default the
        model's), then the item texts, and pack them into a TokenBatch."""
        sequence_texts = [SEQUENCE_SEPARATOR.join(reversed(user.get(name, [])))
                          for user in users for name in self.config.sequence_names]
        nonempty = [i for i, t in enumerate(sequence_texts) if t]
        sequence_tokens: list[list[int]] = [[] for _ in sequence_texts]
        for i, ids in zip(nonempty, self._tokens([sequence_texts[i] for i in nonempty], max_tokens or self.max_tokens)):
            sequence_tokens[i] = ids
        flat, lengths = pack_lists(sequence_tokens + self._tokens(list(item_texts), self.item_max_tokens))
        return TokenBatch(torch.from_numpy(flat), torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
                          len(users), int(lengths.max()) if lengths.size else 0)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        with torch.no_grad():
            states = self.lower.forward_packed(batch.ids, batch.offsets, batch.max_len)
        states = self.upper.forward_packed(states, batch.offsets, batch.max_len)
        user, item = pool_user_item(states, batch.offsets, self.empty_sequence, batch.users)
        return self.head(head_features(user, item, self.config.similarity_features))

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.upper.parameters())


class IdOnlyCTR(nn.Module):
    """Classic CTR: a learned embedding per item id, mean-pooled per sequence (the fused
    gather + mean op), an empty-sequence vector per name, and the same head over [user, item, product]."""
    name = "id-only"

    def __init__(self, config: ModelConfig, log: BehaviorLog, dim: int = 64) -> None:
        super().__init__()
        self.config = config
        ids = log.item_ids
        self.row = row_map(ids, np.arange(ids.size))
        self.embedding = nn.Parameter(torch.randn(ids.size, dim) * 0.05)
        self.empty_sequence, self.head = user_item_head(config, dim)

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> PackedBatch:
        values, offsets = packed_histories(log, rows, self.config.sequence_names, self.config.max_behaviors,
                                           self.config.history_step)
        return PackedBatch(torch.from_numpy(self.row[values]), torch.from_numpy(offsets),
                           torch.from_numpy(self.row[log.item[rows]]))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        users = batch.num_users
        pooled = ops.gather_mean(self.embedding, batch.behavior_rows, batch.offsets,
                                 empty=self.empty_sequence.repeat(users, 1))
        user = pooled.view(users, len(self.config.sequence_names), -1)
        return self.head(head_features(user, self.embedding[batch.item_rows], self.config.similarity_features))

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return []


@dataclass
class SideBatch:
    """Side inputs only: item rows (B,), dense count features (B, F), categorical feature rows (B, C)."""
    item_rows: torch.Tensor
    dense: torch.Tensor | None
    categories: torch.Tensor | None = None

    def to(self, device: torch.device) -> SideBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SideBatch(move(self.item_rows), move(self.dense), move(self.categories))


class SideOnlyCTR(nn.Module):
    """The BAHE CTR model without its LLM part (the ablation): the same side inputs (count features,
    item-id embedding) and the same DCN-v2 + MLP head, no text vectors."""
    name = "CTR model without text"

    def __init__(self, config: ModelConfig, log: BehaviorLog) -> None:
        super().__init__()
        config = replace(config, similarity_temperatures=())  # those come from the ABE rows: the LLM part
        self.config = config
        ids = log.item_ids
        self.row = row_map(ids, np.arange(ids.size))
        self.side = SideInputs(config, ids.size)
        self.counts = PastCounts(log, config.recent_events)
        self.head = CTRHead(self.side.width, config.head_hidden, config.head_activation, config.dropout,
                            config.head_cross_layers, config.head_cross_rank)

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> SideBatch:
        names = self.config.sequence_names
        dense = dense_features(self.counts, log, rows, names) if self.config.count_features else None
        return SideBatch(torch.from_numpy(self.row[log.item[rows]]), None if dense is None else torch.from_numpy(dense),
                         category_batch(self.side, self.config, log, rows, self.training))

    def forward(self, batch: SideBatch) -> torch.Tensor:
        side = self.side(batch.item_rows, batch.dense, torch.float32, categories=batch.categories)
        return self.head(torch.cat(side, dim=1))

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return []
