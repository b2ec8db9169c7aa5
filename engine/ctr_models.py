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

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.batching import interleave, row_map
from engine.config import ModelConfig
from engine.data.log import BehaviorLog
from engine.head import CTRHead, head_features
from engine.model import PackedBatch, pool_user_item
from engine.scorer import BAHEScorer
from kernels import ops
from weights.checkpoint import Checkpoint
from weights.split import LowerEncoder, UpperEncoder

SEQUENCE_SEPARATOR = " ; "


def _ordered_sequences(log: BehaviorLog, rows: np.ndarray, names: tuple[str, ...], max_behaviors: int):
    missing = [n for n in names if n not in log.sequence_names]
    if missing:
        raise ValueError(f"the model's sequences {missing} are not in the log (it has {list(log.sequence_names)})")
    seqs = log.sequences(rows, max_behaviors)
    return [seqs[name] for name in names]


class BAHECTR(nn.Module):
    """BAHE trained in place: its weights are the scorer's, so the trained scorer is saved as is."""
    name = "BAHE"

    def __init__(self, scorer: BAHEScorer, log: BehaviorLog) -> None:
        super().__init__()
        self.scorer, self.model = scorer, scorer.model
        ids = log.item_ids
        texts = [log.item_texts[int(i)] for i in ids]
        self.behavior_row = row_map(ids, scorer.behaviors.lookup(texts))
        self.item_row = row_map(ids, scorer.items.lookup(texts))
        self.behavior_table = scorer.table_rows("behaviors")
        self.item_table = scorer.table_rows("items")

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> PackedBatch:
        config = self.scorer.config.model
        values, offsets = interleave(_ordered_sequences(log, rows, config.sequence_names, config.max_behaviors))
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

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.ids.to(device), self.offsets.to(device), self.users)


class RawTokenCTR(nn.Module):
    """The raw-token LLM baseline: every layer runs over every token of every sequence, every time.
    Lower layers frozen, upper layers + head trained, exactly BAHE's trainable part."""
    name = "raw-token LLM"

    def __init__(self, ckpt: Checkpoint, num_lower_layers: int, config: ModelConfig, log: BehaviorLog, *,
                 max_tokens_per_sequence: int = 512, item_max_tokens: int = 32) -> None:
        super().__init__()
        self.config, self.tokenizer = config, ckpt.tokenizer
        self.lower = LowerEncoder(ckpt, num_lower_layers)
        self.upper = UpperEncoder.from_checkpoint(ckpt, num_lower_layers)
        limit = getattr(ckpt.config, "max_position_embeddings", max_tokens_per_sequence)
        self.max_tokens, self.item_max_tokens = min(max_tokens_per_sequence, limit), item_max_tokens
        d, n = ckpt.hidden_size, len(config.sequence_names)
        self.empty_sequence = nn.Parameter(torch.randn(n, d) * 0.02)
        self.head = CTRHead((2 * n + 1) * d, config.head_hidden, config.head_activation, config.dropout)
        self.text_of = {int(i): t for i, t in log.item_texts.items()}

    def _tokens(self, texts: list[str], max_length: int) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> TokenBatch:
        values, offsets = interleave(_ordered_sequences(log, rows, self.config.sequence_names,
                                                        self.config.max_behaviors))
        bounds = offsets.tolist()
        texts = [SEQUENCE_SEPARATOR.join(self.text_of[int(i)] for i in values[a:b][::-1])
                 for a, b in zip(bounds[:-1], bounds[1:])]
        nonempty = [i for i, t in enumerate(texts) if t]
        sequence_tokens: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(nonempty, self._tokens([texts[i] for i in nonempty], self.max_tokens)):
            sequence_tokens[i] = ids
        item_tokens = self._tokens([self.text_of[int(i)] for i in log.item[rows]], self.item_max_tokens)
        every = sequence_tokens + item_tokens
        lengths = np.fromiter((len(t) for t in every), dtype=np.int64, count=len(every))
        flat = np.fromiter((x for t in every for x in t), dtype=np.int64, count=int(lengths.sum()))
        return TokenBatch(torch.from_numpy(flat), torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
                          len(rows))

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        with torch.no_grad():
            states = self.lower.forward_packed(batch.ids, batch.offsets)
        states = self.upper.forward_packed(states, batch.offsets)
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
        n = len(config.sequence_names)
        self.empty_sequence = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.head = CTRHead((2 * n + 1) * dim, config.head_hidden, config.head_activation, config.dropout)

    def prepare(self, log: BehaviorLog, rows: np.ndarray) -> PackedBatch:
        values, offsets = interleave(_ordered_sequences(log, rows, self.config.sequence_names,
                                                        self.config.max_behaviors))
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
