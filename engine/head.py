"""CTR head: features of (user, item) -> MLP -> one logit. The fused kernel runs it at inference."""
from __future__ import annotations

import torch
from torch import nn

from kernels import ops
from kernels.ctr_mlp import ACTIVATIONS


def head_features(user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """user (U, n, d), item (U, d) -> (U, (2n+1) d): [user sequences, item, sequence * item].
    The elementwise products give the MLP the user-item match directly instead of making it learn one."""
    return torch.cat([user.flatten(1), item, (user * item[:, None, :]).flatten(1)], dim=1)


class CTRHead(nn.Module):
    """LayerNorm over the features, then the MLP: Linear + activation (+ dropout in training) per
    hidden layer, final Linear to a logit. The norm puts every backbone's states (BERT's are
    normalized, a decoder's final RMSNorm can scale some dimensions by tens) on one footing."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], activation: str, dropout: float) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"head activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.norm = nn.LayerNorm(in_features)
        widths = [in_features, *hidden, 1]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(U, F) -> (U,) fp32 logits."""
        features = self.norm(features)
        if self.training:
            act = ACTIVATIONS[self.activation]
            h = features
            for linear in self.linears[:-1]:
                h = self.dropout(act(linear(h)))
            return self.linears[-1](h)[:, 0].float()
        return ops.ctr_mlp(features, [m.weight for m in self.linears], [m.bias for m in self.linears],
                           activation=self.activation)
