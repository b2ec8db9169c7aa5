"""Fused CTR head MLP: (Linear + activation) per hidden layer, final Linear to one logit."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _check_mlp_args(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                    activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if not weights or len(weights) != len(biases):
        raise ValueError(f"need one bias per weight and at least one layer, got {len(weights)} and {len(biases)}")
    width = x.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2 or w.shape[1] != width or tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"layer {i}: weight must be (out, {width}) and bias (out,), got "
                             f"{tuple(w.shape)} and {tuple(b.shape)}")
        width = w.shape[0]
    if width != 1:
        raise ValueError(f"the last layer must have 1 output (the logit), got {width}")


def ctr_mlp_reference(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], *,
                      activation: str = "relu", sigmoid: bool = False) -> torch.Tensor:
    """x (B, D) -> act(x W0^T + b0) -> ... -> (B,) fp32 logits (or probabilities with sigmoid=True).
    weights[i] (out_i, in_i) as in nn.Linear; the last has out = 1 and no activation."""
    _check_mlp_args(x, weights, biases, activation)
    act = ACTIVATIONS[activation]
    h = x
    for w, b in zip(weights[:-1], biases[:-1]):
        h = act(F.linear(h, w.to(h.dtype), b.to(h.dtype)))
    logits = F.linear(h, weights[-1].to(h.dtype), biases[-1].to(h.dtype))[:, 0].float()
    return torch.sigmoid(logits) if sigmoid else logits
