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
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.packing import pack_lists
from engine.training.batching import packed_histories, require_sequences, row_map
from engine.config import ModelConfig
from engine.training.data.log import BehaviorLog
from engine.head import head_features, user_item_head
from engine.model import PackedBatch, pool_user_item
from engine.scorer import BAHEScorer
from kernels import ops
from weights.checkpoint import Checkpoint
from engine.backbone.split import split_checkpoint

SEQUENCE_SEPARATOR = " ; "


class BAHECTR(nn.Module):
    """BAHE trained in place: its weights are the scorer's, so the trained scorer is saved as is."""
    name = "BAHE"

    def __init__(self, scorer: BAHEScorer, log: BehaviorLog) -> None:
        super().__init__()
        self.scorer, self.model = scorer, scorer.model
        ids, texts = log.item_ids, log.item_id_texts
        self.behavior_row = row_map(ids, scorer.behaviors.lookup(texts))
        self.item_row = row_map(ids, scorer.items.lookup(texts))
        self.behavior_table = scorer.table_rows("behaviors")
        self.item_table = scorer.table_rows("items")

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> PackedBatch:
        config = self.scorer.config.model
        values, offsets = packed_histories(log, rows, config.sequence_names, config.max_behaviors)
        return PackedBatch(torch.from_numpy(self.behavior_row[values]), torch.from_numpy(offsets),
                           torch.from_numpy(self.item_row[log.item[rows]]))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(self.behavior_table, self.item_table, batch)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.model.upper.parameters())


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

    def _tokens(self, texts: list[str], max_length: int) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> TokenBatch:
        require_sequences(log, self.config.sequence_names)
        return self.pack(log.sequence_texts(rows, self.config.max_behaviors), log.target_texts(rows))

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
        return self.head(head_features(user, item))

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
        values, offsets = packed_histories(log, rows, self.config.sequence_names, self.config.max_behaviors)
        return PackedBatch(torch.from_numpy(self.row[values]), torch.from_numpy(offsets),
                           torch.from_numpy(self.row[log.item[rows]]))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        users = batch.num_users
        pooled = ops.gather_mean(self.embedding, batch.behavior_rows, batch.offsets,
                                 empty=self.empty_sequence.repeat(users, 1))
        user = pooled.view(users, len(self.config.sequence_names), -1)
        return self.head(head_features(user, self.embedding[batch.item_rows]))

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return []
