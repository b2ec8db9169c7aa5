"""CTR head: features of (user, item) -> MLP -> one logit. The fused kernel runs it at inference."""
from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from kernels import ops
from kernels.ctr_mlp import ACTIVATIONS


def head_features(user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """user (U, n, d), item (U, d) -> (U, (2n+1) d): [user sequences, item, sequence * item].
    The elementwise products give the MLP the user-item match directly instead of making it learn one."""
    return torch.cat([user.flatten(1), item, (user * item[:, None, :]).flatten(1)], dim=1)


class CTRHead(nn.Module):
    """BatchNorm over the features, then the MLP: Linear + activation (+ dropout in training) per
    hidden layer, final Linear to a logit. Per-feature normalization matters for decoders: their
    states carry a few "massive activation" dimensions hundreds of times larger than the rest,
    which would otherwise drown the informative ones. At inference the norm is an affine map
    folded into the first Linear, so the fused MLP kernel runs the whole head."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], activation: str, dropout: float) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"head activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.norm = nn.BatchNorm1d(in_features)
        widths = [in_features, *hidden, 1]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def folded_first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W0, b0 of the first Linear with the eval-mode BatchNorm folded in."""
        norm, first = self.norm, self.linears[0]
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        shift = norm.bias - norm.running_mean * scale
        return first.weight * scale[None, :], first.bias + first.weight @ shift

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(U, F) -> (U,) fp32 logits."""
        if self.training:
            act = ACTIVATIONS[self.activation]
            h = self.norm(features)
            for linear in self.linears[:-1]:
                h = self.dropout(act(linear(h)))
            return self.linears[-1](h)[:, 0].float()
        weight, bias = self.folded_first_layer()
        weights = [weight, *(m.weight for m in self.linears[1:])]
        biases = [bias, *(m.bias for m in self.linears[1:])]
        return ops.ctr_mlp(features, [w.to(features.dtype) for w in weights], [b.to(features.dtype) for b in biases],
                           activation=self.activation)


def user_item_head(config: ModelConfig, dim: int) -> tuple[nn.Parameter, CTRHead]:
    """A CTR model's learned empty-sequence vectors (n, dim), one per sequence name, and its head
    over `head_features` of n sequences of width dim (drawn in this order, so seeded runs repeat)."""
    n = len(config.sequence_names)
    empty_sequence = nn.Parameter(torch.randn(n, dim) * 0.02)
    return empty_sequence, CTRHead((2 * n + 1) * dim, config.head_hidden, config.head_activation, config.dropout)
