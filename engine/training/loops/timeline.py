"""Timeline training: every target of a user from ONE forward of the user's sequences.

For each user of a batch, each named sequence's history (oldest first, its first `max_behaviors`
behaviors) runs once through the causal upper layers; target t reads, for each sequence, the prefix
of behaviors strictly before its timestamp, pooled as the mean of the causal states over that
prefix (a difference of cumulative sums). With causal layers the state at position j depends on
behaviors 0..j alone, so this equals the per-example forward on that prefix exactly (tested).

Histories longer than `max_behaviors` M: a target reads each sequence from its window start
(engine.features.history_window, the scorer's rule), positions from 0 at that start. Every distinct (user, sequence,
window start) of the batch is one packed sequence, the window's first M behaviors, and each target reads
its prefix of its window; starts move in steps of S, so a window serves up to S targets' prefixes and a
long history costs about M / S windows of work per behavior, not one window per target. Training and
serving compute the same function for every target (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.features.history_window import window_start
from engine.model.bahe_model import BAHEModel, PackedBatch, gather_rows
from engine.features.similarity import range_soft_counts, unit_rows
from engine.training.loops.batching import interleave
from engine.training.data.log import BehaviorLog
from engine.training.data.example_features import PastCounts, dense_features


@dataclass
class TimelineBatch:
    """K packed behavior sequences (offsets (K+1,)) and B targets reading them.
    sequence[b, s]: packed sequence that target b's sequence s reads; prefix[b, s]: how many of its first
    behaviors (0: empty); item_rows (B,), dense (B, F) side features or None; pairs: the sum of prefix, a
    host int (the (target, behavior) pairs of the similarity features); item_keys: the targets' id keys where they
    differ from item_rows (PackedBatch.item_keys)."""
    behavior_rows: torch.Tensor
    offsets: torch.Tensor
    sequence: torch.Tensor
    prefix: torch.Tensor
    item_rows: torch.Tensor
    dense: torch.Tensor | None
    max_len: int  # the longest packed sequence, known on the host
    pairs: int
    categories: torch.Tensor | None = None  # (B, F) categorical feature rows (engine.features.categorical)
    item_keys: torch.Tensor | None = None

    def to(self, device: torch.device) -> TimelineBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TimelineBatch(move(self.behavior_rows), move(self.offsets), move(self.sequence), move(self.prefix),
                             move(self.item_rows), move(self.dense), self.max_len, self.pairs, move(self.categories),
                             move(self.item_keys))

    def packed(self) -> PackedBatch:
        """The batch's packed sequences and targets as the model's forward reads them (`BAHEModel.embed`)."""
        return PackedBatch(self.behavior_rows, self.offsets, self.item_rows, max_len=self.max_len,
                           item_keys=self.item_keys)


def timeline_batch(log: BehaviorLog, rows: np.ndarray, names: tuple[str, ...], max_behaviors: int,
                   window_step: int, behavior_row: np.ndarray, item_row: np.ndarray, counts: PastCounts,
                   with_dense: bool, categories: torch.Tensor | None = None) -> TimelineBatch:
    """The timeline batch of example `rows` (ascending: a user's targets are contiguous). Item ids map to
    table rows through `behavior_row` / `item_row` (dense lookup arrays); `counts` gives the prefix lengths
    and, `with_dense`, the dense side features."""
    order = [log.sequence_names.index(name) for name in names]
    before = counts(log, rows)[0][:, order]                               # (B, n) behaviors before each target
    users = log.user[rows]
    last_of_user = np.flatnonzero(np.r_[users[1:] != users[:-1], True])  # each user's latest target
    group = np.cumsum(np.r_[0, users[1:] != users[:-1]])                  # (B,) index of the target's user
    whole = log.sequences(rows[last_of_user], None)                       # holds every earlier target's history
    history_values, history_offsets = interleave([whole[name] for name in names])  # history h = user * n + s
    n = len(names)
    start = window_start(before, max_behaviors, window_step)
    history = group[:, None] * n + np.arange(n)[None, :]
    windows, sequence = np.unique(np.stack([history.ravel(), start.ravel()], axis=1), axis=0, return_inverse=True)
    window_history, window_first = windows[:, 0], windows[:, 1]
    lengths = np.minimum(np.diff(history_offsets)[window_history] - window_first, max_behaviors)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    first = history_offsets[window_history] + window_first
    values = history_values[np.repeat(first - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)]
    sequence, prefix = sequence.reshape(before.shape), before - start
    dense = torch.from_numpy(dense_features(counts, log, rows, names)) if with_dense else None
    return TimelineBatch(torch.from_numpy(behavior_row[values]), torch.from_numpy(offsets),
                         torch.from_numpy(sequence), torch.from_numpy(prefix),
                         torch.from_numpy(item_row[log.item[rows]]), dense, int(np.diff(offsets).max(initial=0)),
                         int(prefix.sum()), categories)


def prefix_means(states: torch.Tensor, offsets: torch.Tensor, sequence: torch.Tensor, prefix: torch.Tensor,
                 empty: torch.Tensor) -> torch.Tensor:
    """Mean of the first prefix[b, s] states of packed sequence sequence[b, s] -> (B, n, d); a zero prefix
    takes empty[s]. Cumulative sums in float64, so long sequences lose no precision to the subtraction."""
    sums = torch.cat([states.new_zeros(1, states.shape[1], dtype=torch.float64),
                      torch.cumsum(states.double(), dim=0)])
    start = offsets[sequence]
    total = sums[start + prefix] - sums[start]
    count = prefix.clamp(min=1).unsqueeze(-1).double()
    means = (total / count).to(states.dtype)
    return torch.where((prefix > 0).unsqueeze(-1), means, empty.to(states.dtype)[None, :, :])


def prefix_similar(model: BAHEModel, behavior_table: torch.Tensor, item_table: torch.Tensor,
                   batch: TimelineBatch) -> torch.Tensor | None:
    """(B, n, k) soft counts of each target's prefixes: `engine.features.similarity.range_soft_counts` (the
    function the forward and serving call) over each target's prefix of its window, the cosines read from one
    (targets x distinct rows) product; None for a model without them."""
    temperatures = model.config.similarity_temperatures
    if not temperatures:
        return None
    distinct, which = torch.unique(batch.behavior_rows, return_inverse=True)  # training: a host read is fine
    items = gather_rows(item_table, None, batch.item_rows, None, None, None, torch.float32)  # float or int8 tables
    behaviors = gather_rows(behavior_table, None, distinct, None, None, None, torch.float32)
    return range_soft_counts(unit_rows(items), unit_rows(behaviors), batch.offsets[batch.sequence],
                             batch.prefix, batch.pairs, temperatures, rows=which)


def timeline_towers(model: BAHEModel, behavior_table: torch.Tensor, item_table: torch.Tensor,
                    batch: TimelineBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What the head reads of every target of the batch, from one pass of the upper layers: pooled prefixes
    user (B, n, d), item tower item (B, d), soft counts similar (B, n, k) or None (`prefix_similar`)."""
    targets = batch.item_rows.numel()
    x, offsets = model.embed(behavior_table, item_table, batch.packed())
    states = model.upper.forward_packed(x, offsets, max(batch.max_len, 1))
    behaviors = batch.behavior_rows.numel()
    user = prefix_means(states[:behaviors], batch.offsets, batch.sequence, batch.prefix, model.empty_sequence)
    return user, states[behaviors:behaviors + targets], prefix_similar(model, behavior_table, item_table, batch)


def timeline_logits(model: BAHEModel, behavior_table: torch.Tensor, item_table: torch.Tensor,
                    batch: TimelineBatch) -> torch.Tensor:
    """(B,) fp32 logits of every target of the batch from one pass of the upper layers."""
    user, item, similar = timeline_towers(model, behavior_table, item_table, batch)
    return model.logits(user, item, batch.packed().id_keys, batch.dense, similar, batch.categories)
