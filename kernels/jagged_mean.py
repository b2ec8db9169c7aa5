"""Masked mean pooling over ragged sequences: values (T, d) + offsets -> (B, d)."""
from __future__ import annotations

import torch

from kernels._jagged import check_offsets, lengths_from_offsets, segment_ids


def _check_mean_args(values: torch.Tensor, offsets: torch.Tensor, empty: torch.Tensor | None) -> None:
    if values.dim() != 2:
        raise ValueError(f"values must be (T, d), got shape {tuple(values.shape)}")
    check_offsets(offsets, values.shape[0])
    _check_empty(empty, offsets.numel() - 1, values.shape[1])


def _check_empty(empty: torch.Tensor | None, batch: int, dim: int) -> None:
    if empty is not None and tuple(empty.shape) not in ((dim,), (batch, dim)):
        raise ValueError(f"empty must be ({dim},) or ({batch}, {dim}), got shape {tuple(empty.shape)}")


def fill_empty(pooled: torch.Tensor, lengths: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
    """Replace the rows of empty sequences by `empty` ((d,) or (B, d)); zeros stay if it is None."""
    if empty is None:
        return pooled
    empty = empty.to(pooled.dtype).expand_as(pooled)
    return torch.where((lengths == 0)[:, None], empty, pooled)


def jagged_mean_reference(values: torch.Tensor, offsets: torch.Tensor, *,
                          empty: torch.Tensor | None = None) -> torch.Tensor:
    """out[b] = mean(values[offsets[b]:offsets[b+1]]) accumulated in fp32, stored in values' dtype;
    an empty sequence gives `empty` ((d,) or (B, d)) or zeros."""
    _check_mean_args(values, offsets, empty)
    lengths = lengths_from_offsets(offsets)
    batch, total = lengths.numel(), values.shape[0]
    sums = torch.zeros(batch, values.shape[1], dtype=torch.float32, device=values.device)
    sums.index_add_(0, segment_ids(offsets, total), values.float())
    pooled = sums / lengths.clamp(min=1).to(torch.float32)[:, None]
    return fill_empty(pooled, lengths, empty).to(values.dtype)
