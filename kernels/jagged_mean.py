"""Masked mean pooling over ragged sequences: values (T, d) + offsets -> (B, d).

Kernel layout: one program per (sequence, block of POOL_BLOCK_D columns) walks its sequence in
POOL_BLOCK_T-row tiles, accumulating a (POOL_BLOCK_T, BLOCK_D) fp32 tile that is reduced once at
the end. The same kernel, with ROWS set, is the fused gather + mean of gather_mean.py (rows are
read through an index instead of contiguously, and (T, d) is never written), and with ROWS and
SCALED the dequantizing gather + mean of an int8 table (dequant_gather.py).
"""
from __future__ import annotations

import torch

from kernels._jagged import check_offsets_layout, lengths_from_offsets, segment_ids
from kernels._triton import new_output, next_pow2, require_triton, tl, tl_dtype, triton

POOL_BLOCK_T = 16  # rows of a sequence per loop iteration
POOL_MAX_BLOCK_D = 512  # columns per program
POOL_NUM_WARPS = 8  # (16, 512) fp32 accumulator: 55 registers/thread on sm_90, no spills


def _check_mean_args(values: torch.Tensor, offsets: torch.Tensor, empty: torch.Tensor | None) -> None:
    if values.dim() != 2:
        raise ValueError(f"values must be (T, d), got shape {tuple(values.shape)}")
    check_offsets_layout(offsets)  # dtype and shape only: the values were checked at the boundary
    check_empty_layout(empty, offsets.numel() - 1, values.shape[1])


def check_empty_layout(empty: torch.Tensor | None, batch: int, dim: int) -> None:
    """ValueError unless `empty` (what empty sequences pool to) is None, (dim,) or (batch, dim): shape only, no
    value read, so launchers may call it (`gather_mean` too, which runs this module's kernel)."""
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


@triton.jit
def _pool_mean_kernel(
    values_ptr, scale_ptr, rows_ptr, offsets_ptr, empty_ptr, out_ptr,
    D,
    stride_values_n, stride_values_d, stride_empty_b, stride_empty_d, stride_out_b, stride_out_d,
    ROWS: tl.constexpr, SCALED: tl.constexpr, HAS_EMPTY: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, c] = (1 / L_b) * sum_{t in [offsets[b], offsets[b+1])} values[r(t), c] (* scale[r(t)]
    when SCALED), accumulated in fp32, r(t) = rows[t] if ROWS else t; L_b = 0 gives empty[b, c]
    (HAS_EMPTY) or 0.

    values_ptr:  (N, D) fp32/fp16/bf16 (int8 when SCALED), strides (stride_values_n, stride_values_d);
                 N = T when not ROWS.
    scale_ptr:   (N,) fp32, contiguous: each row's dequantization scale (read only when SCALED).
    rows_ptr:    (T,) int64, contiguous, ids in [0, N) (checked at the API boundary; only when ROWS).
    offsets_ptr: (B+1,) int64, contiguous, cumulative.
    empty_ptr:   (d,) or (B, d) any float dtype, strides (stride_empty_b, stride_empty_d) with
                 stride_empty_b = 0 for (d,) (only when HAS_EMPTY).
    out_ptr:     (B, D) out dtype, strides (stride_out_b, stride_out_d).
    Grid: (B, cdiv(D, BLOCK_D)).
    """
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = cols < D
    start = tl.load(offsets_ptr + b)
    end = tl.load(offsets_ptr + b + 1)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < end
        if ROWS:
            src = tl.load(rows_ptr + t, mask=t_mask, other=0)
        else:
            src = t
        tile = tl.load(values_ptr + src[:, None] * stride_values_n + cols[None, :] * stride_values_d,
                       mask=t_mask[:, None] & c_mask[None, :], other=0).to(tl.float32)
        if SCALED:
            tile *= tl.load(scale_ptr + src, mask=t_mask, other=0.0)[:, None]
        acc += tile
    length = end - start
    mean = tl.sum(acc, axis=0) / tl.maximum(length, 1).to(tl.float32)
    if HAS_EMPTY:
        fallback = tl.load(empty_ptr + b * stride_empty_b + cols * stride_empty_d,
                           mask=c_mask & (length == 0), other=0.0).to(tl.float32)
        mean = tl.where(length == 0, fallback, mean)
    tl.store(out_ptr + b * stride_out_b + cols * stride_out_d, mean.to(out_ptr.dtype.element_ty), mask=c_mask)


def launch_pool_mean(values: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor,
                     empty: torch.Tensor | None, out_dtype: torch.dtype, device: torch.device,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """Shared launcher of `_pool_mean_kernel` (arguments already validated; `scale` (N,) fp32 for int8
    `values`, else None): (B, d) in out_dtype."""
    if scale is None:
        tl_dtype(values.dtype)  # float inputs only (int8 ones come with their scale)
    tl_dtype(out_dtype)  # float outputs only
    batch, dim = offsets.numel() - 1, values.shape[1]
    out = new_output((batch, dim), out_dtype, device)
    if batch == 0 or dim == 0:
        return out
    offsets = offsets.contiguous()
    has_rows, has_empty = rows is not None, empty is not None
    rows = rows.contiguous() if has_rows else offsets  # placeholder, never read
    scaled = scale is not None
    scale = scale.contiguous() if scaled else offsets  # placeholder, never read
    if has_empty:
        empty_strides = (0, empty.stride(0)) if empty.dim() == 1 else (empty.stride(0), empty.stride(1))
    else:
        empty, empty_strides = values, (0, 0)  # placeholder, never read
    block_d = min(next_pow2(dim), POOL_MAX_BLOCK_D)
    _pool_mean_kernel[(batch, triton.cdiv(dim, block_d))](
        values, scale, rows, offsets, empty, out, dim,
        values.stride(0), values.stride(1), *empty_strides, out.stride(0), out.stride(1),
        ROWS=has_rows, SCALED=scaled, HAS_EMPTY=has_empty, BLOCK_T=POOL_BLOCK_T, BLOCK_D=block_d,
        num_warps=POOL_NUM_WARPS,
    )
    return out


def jagged_mean_triton(values: torch.Tensor, offsets: torch.Tensor, *,
                       empty: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `jagged_mean_reference` (same arguments, same result)."""
    _check_mean_args(values, offsets, empty)
    require_triton("jagged_mean")
    return launch_pool_mean(values, None, offsets, empty, values.dtype, values.device)
