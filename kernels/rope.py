"""Rotary position embedding (RoPE, the Llama/Qwen2 "rotate_half" convention) on packed ragged
q and k, positions counted inside each sequence."""
from __future__ import annotations

import torch

from kernels._jagged import check_offsets, positions_in_sequence


def _check_rope_args(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be (T, H, Dh) and k (T, Hkv, Dh), got {tuple(q.shape)} and {tuple(k.shape)}")
    check_offsets(offsets, q.shape[0])
    head_dim = q.shape[2]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"cos and sin must both be (P, {head_dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    longest = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    if longest > cos.shape[0]:
        raise ValueError(f"a sequence of length {longest} needs {longest} rotary positions, cos has {cos.shape[0]}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x * cos[p] + rotate_half(x) * sin[p] for q (T, H, Dh) and k (T, Hkv, Dh), p = position of
    the element inside its sequence; cos, sin (P, Dh). Computed in fp32, returned in the inputs' dtypes."""
    _check_rope_args(q, k, offsets, cos, sin)
    where = positions_in_sequence(offsets, q.shape[0])
    cos_t = cos.float().index_select(0, where)[:, None, :]
    sin_t = sin.float().index_select(0, where)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * cos_t + _rotate_half(x32) * sin_t).to(x.dtype)

    return rotate(q), rotate(k)
