"""Dequantizing gathers of an int8 table (N, d) with a float32 scale per row (weights.row_codec):
row i reads values[i] * scale[i], in fp32, never materialized as a float table.

- `dequant_gather`: rows (T,) -> (T, d) in the compute dtype, optionally + a position embedding by
  position inside each sequence (offsets (B+1,) int64, cumulative; max_len from the caller);
- `dequant_gather_mean`: rows (T,) + offsets (B+1,) -> (B, d) mean per ragged bag (EmbeddingBag-mean).

Kernels: jagged_gather.py's `_jagged_gather_kernel` and jagged_mean.py's `_pool_mean_kernel` with
SCALED set (one gather kernel and one pooling kernel, as gather_mean.py reuses the pooling one): each
program loads its int8 tile and the rows' scales, widens to fp32 and multiplies before the position
add or the accumulation. Memory traffic per gathered row: d bytes + 4, against 4d (fp32) or 2d (bf16).
The PyTorch references are the CPU path (index_select on the int8 values, then one fp32 multiply).
`QuantizedRows` carries the pair through the model: kernels.ops routes a gather of it here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._jagged import check_offsets_layout, check_rows_layout, positions_in_sequence
from kernels._triton import require_triton
from kernels.jagged_gather import check_gather_args, launch_gather
from kernels.jagged_mean import check_empty_layout, jagged_mean_reference, launch_pool_mean


@dataclass(frozen=True)
class QuantizedRows:
    """An int8 table as the ops read it: values (N, d) int8 and scale (N,) float32; row i is
    values[i] * scale[i]. Shape-like enough for the model (`shape`, `device`, `is_cuda`)."""
    values: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        check_quantized(self.values, self.scale)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        """torch.int8: the storage dtype (gathers return float rows)."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def is_cuda(self) -> bool:
        return self.values.is_cuda

    def nbytes(self) -> int:
        """Bytes held: N * d int8 values + N * 4 scale bytes."""
        return self.values.numel() + self.scale.numel() * self.scale.element_size()


def check_quantized(values: torch.Tensor, scale: torch.Tensor) -> None:
    """Dtypes and shapes of an int8 table (no value is read): values (N, d) int8, scale (N,) float32."""
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8 or values.dim() != 2:
        raise TypeError(f"quantized values must be an (N, d) int8 tensor, got "
                        f"{getattr(values, 'dtype', type(values).__name__)} shape {tuple(getattr(values, 'shape', ()))}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (values.shape[0],):
        raise TypeError(f"row scales must be a ({values.shape[0]},) float32 tensor, got "
                        f"{getattr(scale, 'dtype', type(scale).__name__)} shape {tuple(getattr(scale, 'shape', ()))}")


def _dequantized(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(T, d) float32 rows `rows` of the int8 table: values * scale, one fp32 multiply per element (the storage
    codec's formula, weights.row_codec.dequantize_rows: kernels import no storage module; a test holds them equal)."""
    return values.index_select(0, rows).float() * scale.index_select(0, rows)[:, None]


def dequant_gather_reference(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, *,
                             offsets: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                             max_len: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[t] = values[rows[t]] * scale[rows[t]] (+ pos[t - offsets[seq(t)]]) in fp32, stored as out_dtype.
    values (N, d) int8, scale (N,) fp32, rows (T,) int64 in [0, N), offsets (B+1,), pos (P, d), max_len as
    in jagged_gather_reference."""
    check_quantized(values, scale)
    check_gather_args(values, rows, offsets, pos, max_len)
    gathered = _dequantized(values, scale, rows)
    if pos is not None:
        gathered = gathered + pos.index_select(0, positions_in_sequence(offsets, rows.numel())).float()
    return gathered.to(out_dtype)


def dequant_gather_triton(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, *,
                          offsets: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                          max_len: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of `dequant_gather_reference` (same arguments, same result; output on rows' device)."""
    check_quantized(values, scale)
    check_gather_args(values, rows, offsets, pos, max_len)
    require_triton("dequant_gather")
    return launch_gather(values, scale, rows, offsets, pos, out_dtype)


def _check_mean_args(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                     empty: torch.Tensor | None) -> None:
    check_quantized(values, scale)
    check_rows_layout(rows)  # dtype and shape only: ids and offsets were checked at the boundary
    check_offsets_layout(offsets)
    check_empty_layout(empty, offsets.numel() - 1, values.shape[1])


def dequant_gather_mean_reference(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor,
                                  offsets: torch.Tensor, *, empty: torch.Tensor | None = None,
                                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[b] = mean_t values[rows[t]] * scale[rows[t]] over t in [offsets[b], offsets[b+1]), fp32
    accumulation, stored as out_dtype; empty bags give `empty` ((d,) or (B, d)) or zeros."""
    _check_mean_args(values, scale, rows, offsets, empty)
    gathered = _dequantized(values, scale, rows)
    return jagged_mean_reference(gathered, offsets, empty=None if empty is None else empty.float()).to(out_dtype)


def dequant_gather_mean_triton(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor,
                               offsets: torch.Tensor, *, empty: torch.Tensor | None = None,
                               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of `dequant_gather_mean_reference` (same arguments, same result); output on rows' device."""
    _check_mean_args(values, scale, rows, offsets, empty)
    require_triton("dequant_gather_mean")
    return launch_pool_mean(values, rows, offsets, empty, out_dtype, rows.device, scale=scale)
