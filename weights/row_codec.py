"""The int8 row codec of behavior tables: symmetric per-row absmax quantization.

A float row x (d,) is stored as q = round(x / s) in [-127, 127] (int8) with one float32 scale
s = max|x| / 127 per row (s = 0 and q = 0 for an all-zero row); it reads back as q * s, within s / 2
of x in every column. 1 byte per value + 4 per row: about a quarter of float32, half of bf16.
"""
from __future__ import annotations

import torch

INT8_LIMIT = 127  # symmetric range: -128 is never written


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) float rows -> ((n, d) int8 values, (n,) float32 scales), symmetric absmax / 127 per row."""
    if rows.dim() != 2 or not rows.is_floating_point():
        raise ValueError(f"rows must be a floating (n, d) tensor, got {rows.dtype} shape {tuple(rows.shape)}")
    x = rows.float()
    scale = x.abs().amax(dim=1) / INT8_LIMIT if x.shape[1] else x.new_zeros(x.shape[0])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(x / safe[:, None]).clamp_(-INT8_LIMIT, INT8_LIMIT).to(torch.int8)
    return values, scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(n, d) int8 values and (n,) float32 scales -> (n, d) float32 rows values * scale."""
    return values.float() * scale.float()[:, None]
