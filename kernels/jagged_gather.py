"""Jagged embedding gather: rows (T,) of a table (N, d) -> (T, d) in the compute dtype,
optionally adding a position embedding by each element's position inside its sequence."""
from __future__ import annotations

import torch

from kernels._jagged import check_offsets, check_rows, positions_in_sequence


def _check_gather_args(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor | None,
                       pos: torch.Tensor | None) -> None:
    if table.dim() != 2:
        raise ValueError(f"table must be (N, d), got shape {tuple(table.shape)}")
    check_rows(rows, table.shape[0])
    if pos is None:
        return
    if offsets is None:
        raise ValueError("pos needs offsets: positions are counted inside each sequence")
    check_offsets(offsets, rows.numel())
    if pos.dim() != 2 or pos.shape[1] != table.shape[1]:
        raise ValueError(f"pos must be (P, {table.shape[1]}), got shape {tuple(pos.shape)}")
    longest = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    if longest > pos.shape[0]:
        raise ValueError(f"a sequence of length {longest} needs {longest} positions, pos has {pos.shape[0]}")


def jagged_gather_reference(table: torch.Tensor, rows: torch.Tensor, *, offsets: torch.Tensor | None = None,
                            pos: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[t] = table[rows[t]] (+ pos[t - offsets[seq(t)]]), summed in fp32, stored as out_dtype
    (default: the table's dtype). table (N, d), rows (T,) int64, offsets (B+1,) int64, pos (P, d)."""
    _check_gather_args(table, rows, offsets, pos)
    out_dtype = out_dtype or table.dtype
    gathered = table.index_select(0, rows)
    if pos is None:
        return gathered.to(out_dtype)
    where = positions_in_sequence(offsets, rows.numel())
    return (gathered.float() + pos.index_select(0, where).float()).to(out_dtype)
