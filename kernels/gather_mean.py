"""Fused gather + mean pool (EmbeddingBag-mean): rows (T,) + offsets (B+1,) + table (N, d) -> (B, d).

The kernel is jagged_mean.py's `_pool_mean_kernel` with ROWS set: each (bag, column block)
program reads its bag's table rows through the index and accumulates them in fp32 on chip, so
the (T, d) gathered tensor is never materialized; memory traffic is T*d table reads + B*d writes.
"""
from __future__ import annotations

import torch

from kernels._jagged import check_offsets_layout, check_rows_layout
from kernels._triton import require_triton
from kernels.jagged_mean import check_empty_layout, jagged_mean_reference, launch_pool_mean


def _check_gather_mean_args(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                            empty: torch.Tensor | None) -> None:
    if table.dim() != 2:
        raise ValueError(f"table must be (N, d), got shape {tuple(table.shape)}")
    check_rows_layout(rows)  # dtype and shape only: ids and offsets were checked at the boundary
    check_offsets_layout(offsets)
    check_empty_layout(empty, offsets.numel() - 1, table.shape[1])


def gather_mean_reference(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, *,
                          empty: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[b] = mean_t table[rows[t]] over t in [offsets[b], offsets[b+1]), fp32 accumulation,
    stored as out_dtype (default: the table's dtype); empty sequences give `empty` or zeros.
    rows (T,) int64 in [0, N), offsets (B+1,) int64 cumulative (both checked at the API boundary)."""
    _check_gather_mean_args(table, rows, offsets, empty)
    pooled = jagged_mean_reference(table.index_select(0, rows).float(), offsets,
                                   empty=None if empty is None else empty.float())
    return pooled.to(out_dtype or table.dtype)


def gather_mean_triton(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, *,
                       empty: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton twin of `gather_mean_reference` (same arguments, same result); output on rows' device."""
    _check_gather_mean_args(table, rows, offsets, empty)
    require_triton("gather_mean")
    return launch_pool_mean(table, rows, offsets, empty, out_dtype or table.dtype, rows.device)
