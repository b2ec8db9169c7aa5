"""Batched multi-sequence (variable-length) attention: every sequence of every user of a batch
in one call, packed q (T, H, Dh), k, v (T, Hkv, Dh) with one offsets array."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels._jagged import check_offsets, lengths_from_offsets, pad, unpad


def _check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"q must be (T, H, Dh), k and v (T, Hkv, Dh); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on T or Dh")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    check_offsets(offsets, q.shape[0])


def _length_buckets(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Group non-empty sequences whose lengths share a power-of-two range, so padding wastes < 2x."""
    nonempty = torch.nonzero(lengths > 0).flatten()
    if nonempty.numel() == 0:
        return []
    bucket = torch.ceil(torch.log2(lengths[nonempty].double())).long()
    return [nonempty[bucket == b] for b in torch.unique(bucket)]


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                               causal: bool, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v inside each sequence; query head h reads key/value
    head h // (H / Hkv). Sequences are padded in a few length buckets and run through
    `scaled_dot_product_attention` (flash path on CPU: memory O(T * Dh), not O(M^2)). Returns (T, H, Dh)."""
    _check_attention_args(q, k, v, offsets)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[2])
    lengths = lengths_from_offsets(offsets)
    out = torch.empty_like(q)
    for seqs in _length_buckets(lengths):
        starts, lens = offsets[seqs], lengths[seqs]
        idx = torch.repeat_interleave(starts - torch.cumsum(lens, 0) + lens, lens) + torch.arange(
            int(lens.sum()), device=q.device)
        sub_offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=q.device)
        torch.cumsum(lens, 0, out=sub_offsets[1:])
        qp, mask = pad(q[idx], sub_offsets)
        kp, _ = pad(k[idx], sub_offsets)
        vp, _ = pad(v[idx], sub_offsets)
        # Right padding: under a causal mask no real query sees a padded key, so no extra mask.
        attn_mask = None if causal else mask[:, None, None, :]
        res = F.scaled_dot_product_attention(
            qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=attn_mask,
            is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        out[idx] = unpad(res.transpose(1, 2), mask)
    return out
