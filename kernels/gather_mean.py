"""Fused gather + mean pool (EmbeddingBag-mean): rows (T,) + offsets (B+1,) + table (N, d) -> (B, d)."""
from __future__ import annotations

import torch

from kernels._jagged import check_offsets, check_rows
from kernels.jagged_mean import _check_empty, jagged_mean_reference


def _check_gather_mean_args(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                            empty: torch.Tensor | None) -> None:
    if table.dim() != 2:
        raise ValueError(f"table must be (N, d), got shape {tuple(table.shape)}")
    check_rows(rows, table.shape[0])
    check_offsets(offsets, rows.numel())
    _check_empty(empty, offsets.numel() - 1, table.shape[1])


def gather_mean_reference(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, *,
                          empty: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[b] = mean_t table[rows[t]] over t in [offsets[b], offsets[b+1]), fp32 accumulation,
    stored as out_dtype (default: the table's dtype); empty sequences give `empty` or zeros."""
    _check_gather_mean_args(table, rows, offsets, empty)
    pooled = jagged_mean_reference(table.index_select(0, rows).float(), offsets,
                                   empty=None if empty is None else empty.float())
    return pooled.to(out_dtype or table.dtype)
