"""Rotary position embedding (RoPE, the Llama/Qwen2 "rotate_half" convention) on packed ragged
q and k, positions counted inside each sequence.

Kernel layout: q and k are rotated in ONE launch. One program per block of ROPE_BLOCK_T packed
tokens finds each token's position inside its sequence (binary search over offsets,
`segment_of`), loads that block's cos/sin rows once, then rotates every q head and every k head
of those tokens. This is the pre-pass of varlen_attention.py (see there for why RoPE is not fused
into the attention kernel).

Offsets are validated once at the API boundary; here only dtypes and shapes are checked, and the
caller's `max_len` (longest sequence, a host int) bounds the cos/sin tables: no device value is read.
"""
from __future__ import annotations

import torch

from kernels._jagged import check_max_len, check_offsets_layout, positions_in_sequence
from kernels._triton import new_output, next_pow2, require_triton, search_steps, segment_of, tl, tl_dtype, triton

ROPE_BLOCK_T = 16  # tokens per program


def rope_tables(positions: int, head_dim: int, theta: float = 100000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (positions, head_dim) float32 of plain RoPE with base `theta` (SmolLM2's 1e5 by
    default), the rotate_half layout the op takes; models pass their own from RotaryTable."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _check_rope_args(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, max_len: int) -> None:
    """Dtypes and shapes only (no value is read: offsets were checked at the boundary)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be (T, H, Dh) and k (T, Hkv, Dh), got {tuple(q.shape)} and {tuple(k.shape)}")
    check_offsets_layout(offsets)
    head_dim = q.shape[2]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"cos and sin must both be (P, {head_dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    longest = check_max_len(max_len, offsets, q.shape[0])
    if longest > cos.shape[0]:
        raise ValueError(f"a sequence of length {longest} needs {longest} rotary positions, cos has {cos.shape[0]}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, *, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x * cos[p] + rotate_half(x) * sin[p] for q (T, H, Dh) and k (T, Hkv, Dh), p = position of
    the element inside its sequence; cos, sin (P, Dh); offsets (B+1,) int64 cumulative; max_len >=
    the longest sequence, <= P. Computed in fp32, returned in the inputs' dtypes."""
    _check_rope_args(q, k, offsets, cos, sin, max_len)
    where = positions_in_sequence(offsets, q.shape[0])
    cos_t = cos.float().index_select(0, where)[:, None, :]
    sin_t = sin.float().index_select(0, where)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * cos_t + _rotate_half(x32) * sin_t).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, num_heads, t, t_mask, j, j_mask, cos1, cos2, sin1, sin2,
                  stride_x_t, stride_x_h, stride_x_d, stride_out_t, stride_out_h, stride_out_d,
                  HALF: tl.constexpr):
    """Rotate heads 0..num_heads-1 of tokens t: out[:, :half] = x1 cos1 - x2 sin1 and
    out[:, half:] = x2 cos2 + x1 sin2, x1 = x[..., :half], x2 = x[..., half:] (fp32 math)."""
    mask = t_mask[:, None] & j_mask[None, :]
    for h in range(num_heads):
        src = x_ptr + t[:, None] * stride_x_t + h * stride_x_h
        x1 = tl.load(src + j[None, :] * stride_x_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + (j[None, :] + HALF) * stride_x_d, mask=mask, other=0.0).to(tl.float32)
        dst = out_ptr + t[:, None] * stride_out_t + h * stride_out_h
        tl.store(dst + j[None, :] * stride_out_d, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + (j[None, :] + HALF) * stride_out_d, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, offsets_ptr, cos_ptr, sin_ptr,
    T, num_q_heads, num_k_heads,
    stride_q_t, stride_q_h, stride_q_d, stride_k_t, stride_k_h, stride_k_d,
    stride_qo_t, stride_qo_h, stride_qo_d, stride_ko_t, stride_ko_h, stride_ko_d,
    stride_cos_p, stride_cos_d, stride_sin_p, stride_sin_d,
    num_segments,
    NUM_STEPS: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """y[t, h] = x[t, h] * cos[p(t)] + rotate_half(x[t, h]) * sin[p(t)] for x in (q, k), where
    p(t) = t - offsets[s(t)] is t's position inside its sequence and rotate_half(x) =
    (-x[half:], x[:half]); fp32 math, stored in the outputs' dtypes.

    q_ptr, q_out_ptr: (T, H, Dh) fp32/fp16/bf16, strides (stride_q_t, stride_q_h, stride_q_d) and
                      (stride_qo_t, ...); k_ptr, k_out_ptr: (T, Hkv, Dh), likewise. Dh = 2 * HALF.
    offsets_ptr:      (B+1,) int64, contiguous, cumulative.
    cos_ptr, sin_ptr: (P, Dh) any float dtype (fp32 in practice), strides (stride_cos_p, stride_cos_d).
    Grid: (cdiv(T, BLOCK_T),).
    """
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = t < T
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    mask = t_mask[:, None] & j_mask[None, :]
    seg = segment_of(offsets_ptr, t, num_segments, NUM_STEPS)
    where = t - tl.load(offsets_ptr + seg, mask=t_mask, other=0)
    cos_row = cos_ptr + where[:, None] * stride_cos_p
    sin_row = sin_ptr + where[:, None] * stride_sin_p
    cos1 = tl.load(cos_row + j[None, :] * stride_cos_d, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + (j[None, :] + HALF) * stride_cos_d, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row + j[None, :] * stride_sin_d, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + (j[None, :] + HALF) * stride_sin_d, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, num_q_heads, t, t_mask, j, j_mask, cos1, cos2, sin1, sin2,
                  stride_q_t, stride_q_h, stride_q_d, stride_qo_t, stride_qo_h, stride_qo_d, HALF)
    _rotate_heads(k_ptr, k_out_ptr, num_k_heads, t, t_mask, j, j_mask, cos1, cos2, sin1, sin2,
                  stride_k_t, stride_k_h, stride_k_d, stride_ko_t, stride_ko_h, stride_ko_d, HALF)


def rope_triton(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, *, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `rope_reference` (same arguments, same result), q and k in one launch.
    Needs an even head dim (every rotate_half model has one)."""
    _check_rope_args(q, k, offsets, cos, sin, max_len)
    require_triton("rope")
    head_dim = q.shape[2]
    if head_dim % 2:
        raise ValueError(f"rope_triton needs an even head dim, got {head_dim}")
    tl_dtype(q.dtype), tl_dtype(k.dtype), tl_dtype(cos.dtype), tl_dtype(sin.dtype)  # floats only
    total = q.shape[0]
    q_out = new_output(tuple(q.shape), q.dtype, q.device)
    k_out = new_output(tuple(k.shape), k.dtype, k.device)
    if total == 0 or head_dim == 0:
        return q_out, k_out
    offsets = offsets.contiguous()
    num_segments = offsets.numel() - 1
    _rope_kernel[(triton.cdiv(total, ROPE_BLOCK_T),)](
        q, k, q_out, k_out, offsets, cos, sin, total, q.shape[1], k.shape[1],
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(), *sin.stride(),
        num_segments,
        NUM_STEPS=search_steps(num_segments), HALF=head_dim // 2, BLOCK_T=ROPE_BLOCK_T, BLOCK_HALF=next_pow2(head_dim // 2),
    )
    return q_out, k_out
