"""The online BAHE model: Behavior Aggregation over gathered table rows, feature-parallel over
named sequences, item tower, CTR head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config import ModelConfig
from engine.model.head import SideInputs, head_features, user_item_head
from engine.features.similarity import range_soft_counts, unit_rows
from engine.model.stages import stage
from kernels import ops
from kernels._jagged import check_offsets, check_rows, max_length
from engine.backbone.split import UpperEncoder


@dataclass
class PackedBatch:
    """Row ids of a batch of U users, n sequences each, user-major, packed:
    behavior_rows (T,) int64 into the behavior table (ids >= N index `behavior_extra`);
    offsets (U*n+1,) int64, cumulative: sequence s of user u is [offsets[u*n+s], offsets[u*n+s+1]);
    item_rows (U,) int64 into the item table (ids >= N index `item_extra`).
    *_extra: (X, d) rows encoded on the fly for texts not (yet) in the tables;
    dense: (U, F) float32 side features (`engine.features.side_features.count_features`), for a model that takes them;
    categories: (U, C) int64 embedding rows of categorical features (`engine.features.categorical`), likewise;
    max_len: the longest sequence, a host int. Computed from the offsets when the batch is built
    on the host (CPU offsets, no device involved) and carried by `to`, so the model's forward
    never reads a device value; a batch built from device offsets must pass it;
    item_keys: (U,) int64 keys of the items' learned id parameters (None: item_rows); training sets UNSEEN_ITEM
    for targets it scores as ids it never saw (ModelConfig.item_id_dropout)."""
    behavior_rows: torch.Tensor
    offsets: torch.Tensor
    item_rows: torch.Tensor
    behavior_extra: torch.Tensor | None = None
    item_extra: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    max_len: int | None = None
    categories: torch.Tensor | None = None
    item_keys: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.max_len is None and isinstance(self.offsets, torch.Tensor) and self.offsets.device.type == "cpu" \
                and self.offsets.layout == torch.strided and self.offsets.dim() == 1 and self.offsets.numel() >= 1:
            self.max_len = max_length(self.offsets)

    @property
    def num_users(self) -> int:
        return self.item_rows.numel()

    @property
    def id_keys(self) -> torch.Tensor:
        """The keys of the items' learned id parameters: item_keys where set, else the table rows."""
        return self.item_rows if self.item_keys is None else self.item_keys

    def to(self, device: torch.device) -> PackedBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.behavior_rows), move(self.offsets), move(self.item_rows),
                           move(self.behavior_extra), move(self.item_extra), move(self.dense), self.max_len,
                           move(self.categories), move(self.item_keys))

    def validate(self, num_sequences: int, behavior_table_rows: int, item_table_rows: int) -> None:
        """Raise a clear error for ids out of range, bad dtypes or bad offsets (the id-level API):
        the one check of the values, on the host, before the batch moves to the device. Sets
        `max_len` from the validated offsets."""
        extra_b = 0 if self.behavior_extra is None else self.behavior_extra.shape[0]
        extra_i = 0 if self.item_extra is None else self.item_extra.shape[0]
        check_rows(self.behavior_rows, behavior_table_rows + extra_b, "behavior_rows")
        check_rows(self.item_rows, item_table_rows + extra_i, "item_rows")
        check_offsets(self.offsets, self.behavior_rows.numel())
        users = self.item_rows.numel()
        if self.offsets.numel() != users * num_sequences + 1:
            raise ValueError(f"offsets must have U*n+1 = {users}*{num_sequences}+1 = {users * num_sequences + 1} "
                             f"entries, got {self.offsets.numel()}")
        self.max_len = max_length(self.offsets)


def gather_rows(table: torch.Tensor, extra: torch.Tensor | None, rows: torch.Tensor, offsets: torch.Tensor | None,
            pos: torch.Tensor | None, max_len: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Rows of `table` (N, d) and, for ids >= N, of `extra` (rows encoded on the fly), + position embedding,
    as dtype: the one gather of table rows (the model's forward, its towers, serving, incremental users)."""
    if extra is None or extra.shape[0] == 0:
        return ops.jagged_gather(table, rows, offsets=offsets, pos=pos, max_len=max_len, out_dtype=dtype)
    known = rows < table.shape[0]
    extended_rows = torch.where(known, rows, torch.zeros_like(rows))
    out = ops.jagged_gather(table, extended_rows, offsets=offsets, pos=pos, max_len=max_len, out_dtype=dtype)
    fresh = ops.jagged_gather(extra, torch.where(known, torch.zeros_like(rows), rows - table.shape[0]),
                              offsets=offsets, pos=pos, max_len=max_len, out_dtype=dtype)
    return torch.where(known[:, None], out, fresh)


UNSEEN_ITEM = torch.iinfo(torch.int64).max  # an id key past every trained row: no id row, the unseen item-id bucket


def add_id_rows(x: torch.Tensor, id_rows: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """x (T, d) + the learned id row of each table row `rows` (T,) (ModelConfig.id_rows); rows past the trained
    ones (appended after training, or encoded on the fly) add nothing, so they read their text alone."""
    if id_rows is None or id_rows.shape[0] == 0:
        return x
    known = rows < id_rows.shape[0]
    return x + (id_rows[torch.where(known, rows, torch.zeros_like(rows))] * known[:, None]).to(x.dtype)


def pool_user_item(states: torch.Tensor, offsets: torch.Tensor, empty_sequence: torch.Tensor,
                   users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pool packed states laid out as U*n user sequences (user-major) then U item sequences
    -> user (U, n, d), item (U, d); an empty user sequence takes its name's row of empty_sequence (n, d)."""
    n = empty_sequence.shape[0]
    empty = torch.cat([empty_sequence.repeat(users, 1), empty_sequence.new_zeros(users, states.shape[1])])
    pooled = ops.jagged_mean(states, offsets, empty=empty.to(states.dtype))
    return pooled[:users * n].view(users, n, -1), pooled[users * n:]


class BAHEModel(nn.Module):
    """Upper layers over behavior positions + learned empty-sequence vectors + item tower + CTR model.

    Feature parallel: all n sequences of all U users, and the U items, run through the upper layers
    as ONE packed variable-length batch. Each sequence is then mean-pooled over its behaviors (order-
    free; with causal layers the mean over a prefix is the prefix's own pooled state, which timeline
    training reads); an empty sequence gets its name's learned vector. Item tower: the item's ABE row
    runs through the same upper layers as a one-behavior sequence, so items and behaviors (here: the
    same texts) live in the same space. The CTR model beside the text part: dense past-count features
    (`engine.features.side_features`; the item's counts are stored per item-table row in `item_counts`), soft counts
    of each sequence's behaviors like the item (`engine.features.similarity`, from the frozen ABE rows) and a
    learned item-id embedding keyed by item-table row (rows past the trained ones share one unseen
    bucket), all into a DCN-v2 + MLP head over [user sequences, item, sequence * item, side]. With
    `config.id_rows`, every behavior and item the upper layers read is its ABE row plus a learned id row keyed by
    its table row (`num_behaviors` / `num_items` trained rows; `add_id_rows`): text and ids in one sequence."""

    def __init__(self, upper: UpperEncoder, config: ModelConfig, num_items: int = 0, num_behaviors: int = 0,
                 extra_dense: int = 0) -> None:
        super().__init__()
        self.config = config
        self.upper = upper
        d = upper.hidden_size
        self.behavior_pos = (nn.Parameter(torch.zeros(config.max_behaviors, d))
                             if config.behavior_positions == "learned" else None)
        n = len(config.sequence_names)
        self.register_buffer("item_counts", torch.zeros(num_items if config.count_features else 0, n,
                                                         dtype=torch.int64), persistent=config.count_features)
        self.side = SideInputs(config, num_items, extra_dense)  # extra_dense: a training baseline's stacked columns
        self.behavior_id_rows, self.item_id_rows = ((nn.Parameter(torch.zeros(num_behaviors, d)),
                                                     nn.Parameter(torch.zeros(num_items, d))) if config.id_rows
                                                    else (None, None))
        self.empty_sequence, self.head = user_item_head(config, d, self.side.width)

    @property
    def num_sequences(self) -> int:
        return len(self.config.sequence_names)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.empty_sequence.dtype

    def embed(self, behavior_table: torch.Tensor, item_table: torch.Tensor,
              batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed upper-layer input: the U*n sequences' gathered rows (+ positions), then the U items
        as one-behavior sequences -> (T + U, d), offsets (U*n + U + 1,)."""
        users, dtype = batch.num_users, self.compute_dtype
        total = batch.behavior_rows.numel()
        behaviors = add_id_rows(gather_rows(behavior_table, batch.behavior_extra, batch.behavior_rows, batch.offsets,
                                            self.behavior_pos, batch.max_len, dtype),
                                self.behavior_id_rows, batch.behavior_rows)
        items = add_id_rows(gather_rows(item_table, batch.item_extra, batch.item_rows, None, None, None, dtype),
                            self.item_id_rows, batch.id_keys)
        item_offsets = total + torch.arange(1, users + 1, device=batch.offsets.device)
        return torch.cat([behaviors, items]), torch.cat([batch.offsets, item_offsets])

    def towers(self, behavior_table: torch.Tensor, item_table: torch.Tensor,
               batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> user (U, n, d) pooled sequence states, item (U, d)."""
        if batch.max_len is None:
            raise ValueError("PackedBatch.max_len is unknown: build the batch from host (CPU) offsets, or pass "
                             "max_len, so the forward never reads device values back")
        with stage("gather"):
            packed, offsets = self.embed(behavior_table, item_table, batch)
        with stage("upper_layers"):
            states = self.upper.forward_packed(packed, offsets, max(batch.max_len, 1 if batch.num_users else 0))
        with stage("pooling"):
            return pool_user_item(states, offsets, self.empty_sequence, batch.num_users)

    def similar(self, behavior_table: torch.Tensor, item_table: torch.Tensor, batch: PackedBatch) -> torch.Tensor | None:
        """(U, n, k) soft counts of each sequence's behaviors like the user's item (`engine.features.similarity`), from the
        fp32 ABE rows; None for a model without them."""
        temperatures = self.config.similarity_temperatures
        if not temperatures:
            return None
        users, n = batch.num_users, self.num_sequences
        rows = gather_rows(behavior_table, batch.behavior_extra, batch.behavior_rows, None, None, None, torch.float32)
        items = gather_rows(item_table, batch.item_extra, batch.item_rows, None, None, None, torch.float32)
        offsets = batch.offsets
        return range_soft_counts(unit_rows(items), unit_rows(rows), offsets[:-1].view(users, n),
                                 (offsets[1:] - offsets[:-1]).view(users, n), rows.shape[0], temperatures,
                                 shared=False)

    def user_states(self, behavior_table: torch.Tensor, behavior_rows: torch.Tensor, offsets: torch.Tensor,
                    max_len: int, behavior_extra: torch.Tensor | None = None) -> torch.Tensor:
        """The user tower alone: U users' n sequences, packed as in `PackedBatch` (offsets (U*n+1,) int64,
        cumulative, user-major; max_len a host int) -> (U, n, d) pooled states. It does not depend on the
        item: a ranking request runs it once for all of its candidates."""
        users = (offsets.numel() - 1) // self.num_sequences
        with stage("gather"):
            x = add_id_rows(gather_rows(behavior_table, behavior_extra, behavior_rows, offsets, self.behavior_pos,
                                        max_len, self.compute_dtype), self.behavior_id_rows, behavior_rows)
        with stage("upper_layers"):
            states = self.upper.forward_packed(x, offsets, max_len)
        with stage("pooling"):
            empty = self.empty_sequence.repeat(users, 1).to(states.dtype)
            return ops.jagged_mean(states, offsets, empty=empty).view(users, self.num_sequences, -1)

    def item_states(self, item_table: torch.Tensor, item_rows: torch.Tensor,
                    item_extra: torch.Tensor | None = None) -> torch.Tensor:
        """The item tower alone: K item rows as one-behavior sequences through the upper layers -> (K, d)
        (the mean over one behavior is its state). It depends on nothing but the item's table row, so a
        scorer computes it once per item (engine.serving.item_vectors)."""
        k = item_rows.numel()
        x = add_id_rows(gather_rows(item_table, item_extra, item_rows, None, None, None, self.compute_dtype),
                        self.item_id_rows, item_rows)
        if k == 0:
            return x
        return self.upper.forward_packed(x, torch.arange(k + 1, device=x.device), 1)

    def logits(self, user: torch.Tensor, item: torch.Tensor, item_keys: torch.Tensor, dense: torch.Tensor | None,
               similar: torch.Tensor | None = None, categories: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled towers (U, n, d), (U, d) + side inputs -> (U,) fp32 click logits; item_keys (U,): the items'
        id keys (PackedBatch.id_keys)."""
        text = head_features(user, item, self.config.similarity_features)
        side = self.side(item_keys, dense, self.compute_dtype, similar, categories)
        return self.head(torch.cat([text, *side], dim=1))

    def forward(self, behavior_table: torch.Tensor, item_table: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """-> (U,) fp32 click logits."""
        user, item = self.towers(behavior_table, item_table, batch)
        with stage("head"):
            similar = self.similar(behavior_table, item_table, batch)
            return self.logits(user, item, batch.id_keys, batch.dense, similar, batch.categories)
