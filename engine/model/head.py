"""CTR head: features of (user, item) -> [DCN-v2 cross layers] -> MLP -> one logit. The fused MLP
kernel runs the MLP at inference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.features.side_features import count_feature_names
from engine.features.similarity import similarity_feature_names, similarity_features
from kernels import ops
from kernels.ctr_mlp import ACTIVATIONS


def head_features(user: torch.Tensor, item: torch.Tensor, similarity: bool = False) -> torch.Tensor:
    """user (U, n, d), item (U, d) -> (U, (2n+1) d [+ n]): [user sequences, item, sequence * item
    [, cosine(sequence, item)]]. The elementwise products give the MLP the user-item match directly instead
    of making it learn one; the cosines give it the match as one number per sequence (how close the item is
    to what the user liked, disliked, watched), which a normalized MLP would have to sum over d columns."""
    parts = [user.flatten(1), item, (user * item[:, None, :]).flatten(1)]
    if similarity:
        parts.append(sequence_item_cosines(user, item))
    return torch.cat(parts, dim=1)


def sequence_item_cosines(user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """user (U, n, d), item (U, d) -> (U, n) cosine of each pooled sequence with the item: the head's similarity
    columns (`head_features`), and the feature block's (engine.export.block)."""
    return torch.nn.functional.cosine_similarity(user, item[:, None, :], dim=-1)


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer, low-rank (Wang et al., WWW'21): x_{l+1} = x0 * (U (V x_l) + b) + x_l.
    It builds explicit, bounded-degree feature crosses (a user's like-share x the item's popularity x a
    text direction) that an MLP only approximates; rank r keeps it O(F r) instead of O(F^2)."""

    def __init__(self, features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(features, rank, bias=False)
        self.up = nn.Linear(rank, features)
        nn.init.zeros_(self.up.weight)  # starts as the identity map: the MLP alone, crosses grow in training

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.up(self.down(x)) + x


class CTRHead(nn.Module):
    """BatchNorm over the features, DCN-v2 cross layers (stacked), then the MLP: Linear + activation
    (+ dropout in training) per hidden layer, final Linear to a logit. Per-feature normalization
    matters for decoders: their states carry a few "massive activation" dimensions hundreds of times
    larger than the rest, which would otherwise drown the informative ones; and for the count
    features beside the text vectors. At inference without cross layers the norm is an affine map
    folded into the first Linear, so the fused MLP kernel runs the whole head."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], activation: str, dropout: float,
                 cross_layers: int = 0, cross_rank: int = 64, project: tuple[int, int] | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"head activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.norm = nn.BatchNorm1d(in_features)
        # project = (k, p): the first k (text) columns are projected to p before they meet the side columns
        self.project = nn.Linear(*project) if project else None
        width = in_features - project[0] + project[1] if project else in_features
        self.cross = nn.ModuleList(CrossLayer(width, cross_rank) for _ in range(cross_layers))
        widths = [width, *hidden, 1]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation
        self.dropout = nn.Dropout(dropout)
        self.norm_frozen = False  # see freeze_norm

    def freeze_norm(self) -> None:
        """From now on normalize with the running statistics in training too. A trainer whose batches are not
        independent draws (timeline batches hold the targets of a few users) first accumulates the statistics
        over many batches, then freezes them: batch statistics of two or three users would swing from batch
        to batch, and training would see other features than inference."""
        self.norm_frozen = True

    def _normalized(self, features: torch.Tensor) -> torch.Tensor:
        if self.training and self.norm_frozen:
            norm = self.norm
            return F.batch_norm(features, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0,
                                norm.eps)
        return self.norm(features)

    def _norm_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode BatchNorm as x * scale + shift, per feature."""
        norm = self.norm
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return scale, norm.bias - norm.running_mean * scale

    def folded_first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W0, b0 of the first Linear with the eval-mode BatchNorm folded in."""
        first = self.linears[0]
        scale, shift = self._norm_affine()
        return first.weight * scale[None, :], first.bias + first.weight @ shift

    def _mixed(self, features: torch.Tensor) -> torch.Tensor:
        """Normalized, text columns projected, crossed: the MLP's input."""
        x0 = self._normalized(features)
        if self.project is not None:
            k = self.project.in_features
            x0 = torch.cat([self.project(x0[:, :k]), x0[:, k:]], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return x

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(U, F) -> (U,) fp32 logits."""
        if self.training:
            act = ACTIVATIONS[self.activation]
            h = self._mixed(features)
            for linear in self.linears[:-1]:
                h = self.dropout(act(linear(h)))
            return self.linears[-1](h)[:, 0].float()
        if self.cross or self.project is not None:
            x, (weight, bias) = self._mixed(features), (self.linears[0].weight, self.linears[0].bias)
        else:
            x, (weight, bias) = features, self.folded_first_layer()
        return self._mlp(x, weight, bias)

    def _mlp(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The MLP with (weight, bias) as its first layer, through the fused kernel's dispatch."""
        weights = [weight, *(m.weight for m in self.linears[1:])]
        biases = [bias, *(m.bias for m in self.linears[1:])]
        return ops.ctr_mlp(x, [w.to(x.dtype) for w in weights], [b.to(x.dtype) for b in biases],
                           activation=self.activation)

    def forward_folded(self, user: torch.Tensor, item: torch.Tensor, cosines: torch.Tensor | None,
                       side: torch.Tensor | None) -> torch.Tensor:
        """Eval: one user (n, d) against K items (K, d) -> (K,) fp32 logits: `forward_folded_users` of one user."""
        k = item.shape[0]
        slots = torch.arange(k, device=item.device)
        return self.forward_folded_users(user[None], item, torch.zeros_like(slots), slots, k, cosines, side)

    def forward_folded_users(self, users: torch.Tensor, item: torch.Tensor, pair_user: torch.Tensor,
                             slot: torch.Tensor, widest: int, cosines: torch.Tensor | None,
                             side: torch.Tensor | None) -> torch.Tensor:
        """Eval: U users (U, n, d), P items (P, d), item p a candidate of user pair_user[p] in its slot[p]
        (< widest, a host int) -> (P,) fp32 logits, the function `forward` computes on [head_features(user,
        item), side] for each pair, without materializing the P (2n+1) d features: the first linear map of the
        text columns (the projection, or the first MLP layer, BatchNorm folded in) is linear in [user, item,
        user * item], so each user folds into its weights once (W_item + sum_s W_s * user_s, bias + W_user .
        user) and its candidates meet a (d [+ n], out) matrix, all users in one batched product over their
        candidate slots. cosines (P, n) if the model has similarity features; side (P, S) the side columns."""
        rest = [t for t in (cosines, side) if t is not None]
        if self.project is None and self.cross:  # crosses multiply the normalized features: no folding
            user = users[pair_user]
            return self.forward(torch.cat([user.flatten(1), item, (user * item[:, None]).flatten(1), *rest], dim=1))
        act = ACTIVATIONS[self.activation]
        if self.project is None:
            weight, bias = _fold_users(*self.folded_first_layer(), users)
            h = _per_user_linear(torch.cat([item, *rest], dim=1), weight, bias, pair_user, slot, widest)
            if len(self.linears) == 1:
                return h[:, 0].float()
            return ops.ctr_mlp(act(h), [m.weight.to(h.dtype) for m in self.linears[1:]],
                               [m.bias.to(h.dtype) for m in self.linears[1:]], activation=self.activation)
        width, (scale, shift) = self.project.in_features, self._norm_affine()
        weight = self.project.weight * scale[None, :width]
        weight, bias = _fold_users(weight, self.project.bias + self.project.weight @ shift[:width], users)
        text = torch.cat([item, cosines], dim=1) if cosines is not None else item
        x0 = _per_user_linear(text, weight, bias, pair_user, slot, widest)
        if side is not None:
            x0 = torch.cat([x0, side * scale[width:].to(side.dtype) + shift[width:].to(side.dtype)], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self._mlp(x, self.linears[0].weight, self.linears[0].bias)


def _per_user_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pair_user: torch.Tensor,
                     slot: torch.Tensor, widest: int) -> torch.Tensor:
    """x (P, F) rows through their user's linear map (weight (U, out, F), bias (U, out)) -> (P, out): the rows laid
    into (U, widest, F) candidate slots, one batched product."""
    slots = x.new_zeros(weight.shape[0], widest, x.shape[1])
    slots[pair_user, slot] = x
    out = torch.baddbmm(bias.to(x.dtype)[:, None, :], slots, weight.to(x.dtype).transpose(1, 2))
    return out[pair_user, slot]


def _fold_users(weight: torch.Tensor, bias: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, F) over [user (n d), item (d), user * item (n d), rest...] columns, bias (out,), users (U, n, d)
    -> (U, out, d + rest) over [item, rest...] and (U, out): the same map with each user's columns applied (fp32)."""
    u, n, d = users.shape
    weight, bias, users = weight.float(), bias.float(), users.float()
    per_sequence = weight[:, n * d + d:2 * n * d + d].reshape(-1, n, d)
    item_weight = weight[None, :, n * d:n * d + d] + (per_sequence[None] * users[:, None]).sum(2)
    rest = weight[:, 2 * n * d + d:].expand(u, -1, -1)
    return torch.cat([item_weight, rest], dim=2), bias + users.flatten(1) @ weight[:, :n * d].T



class SideInputs(nn.Module):
    """The CTR model's columns beside the text: dense count features (`engine.features.side_features`), the
    similarity-weighted counts of the item among each sequence (`engine.features.similarity`), hashed categorical
    features (`engine.features.categorical`) and a learned item-id embedding keyed by item-table row (rows past the `num_items` trained ones share one
    unseen bucket, so items appended after training still score)."""

    def __init__(self, config: ModelConfig, num_items: int, extra_dense: int = 0) -> None:
        super().__init__()
        names = count_feature_names(config.sequence_names, recent=config.recent_events > 0)
        # dense columns: the count features, then `extra_dense` computed outside the model (a stacked ranker's)
        self.counts = (len(names) if config.count_features else 0) + extra_dense
        self.similar = len(similarity_feature_names(config.sequence_names, config.similarity_temperatures))
        self.categories = len(config.categorical_features)
        self.category = nn.Embedding(config.categorical_buckets + 1, config.categorical_dim) if self.categories else None
        if self.category is not None:
            nn.init.normal_(self.category.weight, std=0.05)
        # which hash buckets training saw (engine.features.categorical); values in other buckets take the last row
        self.register_buffer("category_seen", torch.zeros(config.categorical_buckets if self.categories else 0,
                                                          dtype=torch.bool), persistent=bool(self.categories))
        self.item_id = nn.Embedding(num_items + 1, config.item_id_dim) if config.item_id_dim else None
        if self.item_id is not None:
            nn.init.normal_(self.item_id.weight, std=0.05)

    @property
    def width(self) -> int:
        categories = self.categories * self.category.embedding_dim if self.category is not None else 0
        return self.counts + self.similar + categories + (self.item_id.embedding_dim if self.item_id is not None else 0)

    def forward(self, item_rows: torch.Tensor, dense: torch.Tensor | None, dtype: torch.dtype,
                similar: torch.Tensor | None = None, categories: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The side columns of a batch; `similar`: (B, S, k) soft counts (`engine.features.similarity`), `categories`:
        (B, F) embedding rows of the categorical features (`engine.features.categorical.category_rows`), for a model that
        takes them."""
        out = []
        if self.counts:
            if dense is None or dense.shape[1] != self.counts:
                raise ValueError(f"this model takes {self.counts} dense features per example, got "
                                 f"{None if dense is None else dense.shape[1]}")
            out.append(dense.to(dtype))
        if self.similar:
            if similar is None:
                raise ValueError(f"this model takes {self.similar} similarity features per example, got none")
            out.append(similarity_features(similar).to(dtype))
        if self.category is not None:
            if categories is None or categories.shape[1:] != (self.categories,):
                raise ValueError(f"this model takes {self.categories} categorical features per example, got "
                                 f"{None if categories is None else tuple(categories.shape)}")
            out.append(self.category(categories).flatten(1).to(dtype))
        if self.item_id is not None:
            unseen = self.item_id.num_embeddings - 1
            out.append(self.item_id(torch.where(item_rows < unseen, item_rows, unseen)).to(dtype))
        return out


def user_item_head(config: ModelConfig, dim: int, side_features: int = 0) -> tuple[nn.Parameter, CTRHead]:
    """A CTR model's learned empty-sequence vectors (n, dim), one per sequence name, and its head
    over `head_features` of n sequences of width dim plus `side_features` columns (drawn in this
    order, so seeded runs repeat)."""
    n = len(config.sequence_names)
    empty_sequence = nn.Parameter(torch.randn(n, dim) * 0.02)
    text = (2 * n + 1) * dim + n * config.similarity_features
    project = (text, config.head_text_dim) if config.head_text_dim else None
    return empty_sequence, CTRHead(text + side_features, config.head_hidden, config.head_activation, config.dropout,
                                   config.head_cross_layers, config.head_cross_rank, project)
