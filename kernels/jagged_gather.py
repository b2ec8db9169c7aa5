"""Jagged embedding gather: rows (T,) of a table (N, d) -> (T, d) in the compute dtype,
optionally adding a position embedding by each element's position inside its sequence.

Kernel layout: one program per (block of GATHER_BLOCK_T packed elements, block of GATHER_BLOCK_D
columns). With `pos`, each element finds its own sequence in-kernel by a branchless binary
search over offsets (`segment_of`, floor(log2 B) + 1 probes of an array that stays in cache), so
the grid is independent of the ragged layout and no (T,) position array is built on the host.
With SCALED set the table is int8 with a float32 scale per row, dequantized as it is read
(dequant_gather.py's kernel path: the float rows never exist in memory).

Ids and offsets are validated once at the API boundary (`kernels._jagged.check_rows` /
`check_offsets` on host tensors); here only dtypes and shapes are checked, and the caller's
`max_len` (longest sequence) bounds the position table, so a launch reads no device value.
"""
from __future__ import annotations

import torch

from kernels._jagged import check_max_len, check_offsets_layout, check_rows_layout, positions_in_sequence
from kernels._triton import new_output, next_pow2, require_triton, search_steps, segment_of, tl, tl_dtype, triton

GATHER_BLOCK_T = 16  # packed elements per program
GATHER_MAX_BLOCK_D = 512  # columns per program (d is covered by cdiv(d, block) programs)
GATHER_NUM_WARPS = 8


def check_gather_args(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor | None,
                       pos: torch.Tensor | None, max_len: int | None) -> None:
    """Dtypes and shapes only (no value is read: ids and offsets were checked at the boundary)."""
    if table.dim() != 2:
        raise ValueError(f"table must be (N, d), got shape {tuple(table.shape)}")
    check_rows_layout(rows)
    if pos is None:
        return
    if offsets is None or max_len is None:
        raise ValueError("pos needs offsets and max_len: positions are counted inside each sequence")
    check_offsets_layout(offsets)
    longest = check_max_len(max_len, offsets, rows.numel())
    if pos.dim() != 2 or pos.shape[1] != table.shape[1]:
        raise ValueError(f"pos must be (P, {table.shape[1]}), got shape {tuple(pos.shape)}")
    if longest > pos.shape[0]:
        raise ValueError(f"a sequence of length {longest} needs {longest} positions, pos has {pos.shape[0]}")


def jagged_gather_reference(table: torch.Tensor, rows: torch.Tensor, *, offsets: torch.Tensor | None = None,
                            pos: torch.Tensor | None = None, max_len: int | None = None,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[t] = table[rows[t]] (+ pos[t - offsets[seq(t)]]), summed in fp32, stored as out_dtype
    (default: the table's dtype). table (N, d), rows (T,) int64 in [0, N), offsets (B+1,) int64,
    pos (P, d), max_len >= the longest sequence (<= P; needed with pos)."""
    check_gather_args(table, rows, offsets, pos, max_len)
    out_dtype = out_dtype or table.dtype
    gathered = table.index_select(0, rows)
    if pos is None:
        return gathered.to(out_dtype)
    where = positions_in_sequence(offsets, rows.numel())
    return (gathered.float() + pos.index_select(0, where).float()).to(out_dtype)


@triton.jit
def _jagged_gather_kernel(
    table_ptr, scale_ptr, rows_ptr, offsets_ptr, pos_ptr, out_ptr,
    T, D,
    stride_table_n, stride_table_d, stride_pos_p, stride_pos_d, stride_out_t, stride_out_d,
    num_segments,
    NUM_STEPS: tl.constexpr, HAS_POS: tl.constexpr, SCALED: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, c] = table[rows[t], c] (* scale[rows[t]] when SCALED) (+ pos[t - offsets[s(t)], c]),
    in fp32, stored in out's dtype, where s(t) is the sequence holding t.

    table_ptr:   (N, D) fp32/fp16/bf16 (int8 when SCALED), strides (stride_table_n, stride_table_d);
                 may be pinned host memory read through UVA.
    scale_ptr:   (N,) fp32, contiguous: each row's dequantization scale (read only when SCALED).
    rows_ptr:    (T,) int64, contiguous, every id in [0, N) (checked at the API boundary).
    offsets_ptr: (B+1,) int64, contiguous, cumulative (read only when HAS_POS).
    pos_ptr:     (P, D) fp32/fp16/bf16, strides (stride_pos_p, stride_pos_d) (only when HAS_POS).
    out_ptr:     (T, D) out dtype, strides (stride_out_t, stride_out_d).
    Grid: (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)).
    """
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = t < T
    mask = t_mask[:, None] & (cols < D)[None, :]
    rows = tl.load(rows_ptr + t, mask=t_mask, other=0)
    vals = tl.load(table_ptr + rows[:, None] * stride_table_n + cols[None, :] * stride_table_d,
                   mask=mask, other=0).to(tl.float32)
    if SCALED:
        vals *= tl.load(scale_ptr + rows, mask=t_mask, other=0.0)[:, None]
    if HAS_POS:
        seg = segment_of(offsets_ptr, t, num_segments, NUM_STEPS)
        where = t - tl.load(offsets_ptr + seg, mask=t_mask, other=0)
        vals += tl.load(pos_ptr + where[:, None] * stride_pos_p + cols[None, :] * stride_pos_d,
                        mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t[:, None] * stride_out_t + cols[None, :] * stride_out_d,
             vals.to(out_ptr.dtype.element_ty), mask=mask)


def jagged_gather_triton(table: torch.Tensor, rows: torch.Tensor, *, offsets: torch.Tensor | None = None,
                         pos: torch.Tensor | None = None, max_len: int | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton twin of `jagged_gather_reference` (same arguments, same result). The output lives
    on rows' device, so a table in pinned host memory is read zero-copy by a GPU kernel."""
    check_gather_args(table, rows, offsets, pos, max_len)
    require_triton("jagged_gather")
    tl_dtype(table.dtype)  # float tables only
    return launch_gather(table, None, rows, offsets, pos, out_dtype or table.dtype)


def launch_gather(table: torch.Tensor, scale: torch.Tensor | None, rows: torch.Tensor, offsets: torch.Tensor | None,
                  pos: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Shared launcher of `_jagged_gather_kernel` (arguments already validated; `scale` (N,) fp32 for
    an int8 table, else None): (T, d) in out_dtype on rows' device."""
    tl_dtype(out_dtype)  # float outputs only
    total, dim = rows.numel(), table.shape[1]
    out = new_output((total, dim), out_dtype, rows.device)
    if total == 0 or dim == 0:
        return out
    rows = rows.contiguous()
    has_pos = pos is not None
    if has_pos:
        offsets = offsets.contiguous()
        num_segments = offsets.numel() - 1
    else:  # placeholders, never read
        offsets, pos, num_segments = rows, table, 0
    scaled = scale is not None
    scale = scale.contiguous() if scaled else rows  # placeholder, never read
    block_d = min(next_pow2(dim), GATHER_MAX_BLOCK_D)
    grid = (triton.cdiv(total, GATHER_BLOCK_T), triton.cdiv(dim, block_d))
    _jagged_gather_kernel[grid](
        table, scale, rows, offsets, pos, out, total, dim,
        table.stride(0), table.stride(1), pos.stride(0), pos.stride(1), out.stride(0), out.stride(1),
        num_segments,
        NUM_STEPS=search_steps(num_segments), HAS_POS=has_pos, SCALED=scaled, BLOCK_T=GATHER_BLOCK_T,
        BLOCK_D=block_d, num_warps=GATHER_NUM_WARPS,
    )
    return out
