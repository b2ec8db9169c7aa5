"""Batched multi-sequence (variable-length) attention: every sequence of every user of a batch
in one call, packed q (T, H, Dh), k, v (T, Hkv, Dh) with one offsets array.

Kernel layout: FlashAttention-2 style forward. One program per (query block of one sequence,
query head), read from a small table of (sequence, first query row) pairs, one per BLOCK_M
(the `AttentionConfig`'s block_m) rows of each non-empty sequence, ordered longest work first so
the last wave of programs is short.
The table is built ON THE DEVICE from the device offsets (`query_blocks`: cumsum, searchsorted,
argsort; no value comes back to the host), with a length fixed by what the host already knows:
NB = min(cdiv(T, BLOCK_M) + B, B * cdiv(max_len, BLOCK_M)) >= sum_b cdiv(L_b, BLOCK_M), where
max_len is the caller's bound on the longest sequence. The surplus entries, sorted last, point
at a query row past their sequence's end, so their programs load nothing and store nothing. A
launch therefore never syncs with the host and can be captured in a CUDA graph. A program keeps
its (BLOCK_M, Dh) query tile and an fp32 accumulator on chip and streams its sequence's keys and
values in BLOCK_N-row tiles with an online softmax (running max and sum, base-2 exponentials), so
memory is O(T * Dh), never O(M^2). Causal programs stop at their last query row. GQA: query head h
reads key/value head h // (H / Hkv). Dh need not be a power of two: the head dim is padded to a power
of two and masked.

Inside a program the key loop is split in two: the tiles wholly inside the sequence (and, causal,
wholly at or before the block's first query row) run with no mask at all; only the last tile (and,
causal, the diagonal ones) pay for the sequence-end and causal masks. K is loaded in its natural
(BLOCK_N, Dh) layout, contiguous along Dh, and transposed on chip (`tl.trans`); q, k, v feed `tl.dot`
in their storage dtype (fp32 accumulation), never widened to fp32 and narrowed back, except that bf16
is widened under the interpreter, which cannot compute on raw bf16 (`dot_dtype`). Tile sizes, warps and
stages come from `ATTN_CONFIGS`, one named config per (dtype, head-dim range): chosen to compile for sm_90
without spills (16-bit inputs; fp32 up to Dh 64), not yet timed on a GPU (bench.attention_configs sweeps them).

Why RoPE is not inside this kernel: it runs as the separate pre-pass `rope_triton` (rope.py). In
here, a program would have to rotate every K tile it streams, and each K tile is read by every
query block at or after it (all query blocks when bidirectional), so K would be rotated
O(M / BLOCK_M) times per sequence, with cos/sin reloaded each time; the pre-pass rotates each K
(and Q) element exactly once, in one memory-bound launch for q and k together, which costs a
single extra read + write of q and k, small next to attention's O(M^2) work.

Offsets are validated once at the API boundary; the launcher checks dtypes and shapes only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels._jagged import check_max_len, check_offsets_layout, lengths_from_offsets
from kernels._triton import (dot_dtype, dot_precision, new_output, next_pow2, require_triton, tl, tl_dtype,
                             triton)

ATTN_BLOCK_M = 64  # query rows per program (short sequences: most BAHE behaviors are < 64 tokens)
ATTN_MIN_BLOCK_D = 16  # tl.dot needs K >= 16


@dataclass(frozen=True)
class AttentionConfig:
    """Launch shape of the attention kernel: query rows per program, key/value rows per step, warps, stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {value}")


# (dtype, largest head dim) -> config; a head dim takes the first row whose bound it fits. Compiled for sm_90
# with triton's compiler (`compile_for_gpu`): 16-bit inputs, Dh 64 -> 128 registers/thread, 56 KiB shared
# memory, no spills (Dh 128: 232 registers, 112 KiB); fp32 inputs (tf32x3 dots) need narrower key tiles and
# fewer pipeline stages to fit (Dh 64: 212 registers, 64 KiB; above Dh 64 fp32 spills in every config tried:
# Dh 128 184 bytes of stack per thread, Dh 256 352 with 32 x 32 tiles, the least of the shapes compiled).
_16BIT = ((64, AttentionConfig(ATTN_BLOCK_M, 64, 4, 3)), (128, AttentionConfig(ATTN_BLOCK_M, 64, 4, 3)),
          (256, AttentionConfig(ATTN_BLOCK_M, 32, 8, 2)))
ATTN_CONFIGS: dict[torch.dtype, tuple[tuple[int, AttentionConfig], ...]] = {
    torch.float16: _16BIT,
    torch.bfloat16: _16BIT,
    torch.float32: ((64, AttentionConfig(ATTN_BLOCK_M, 32, 4, 2)), (128, AttentionConfig(ATTN_BLOCK_M, 32, 4, 2)),
                    (256, AttentionConfig(32, 32, 8, 1))),
}


def attention_config(dtype: torch.dtype, head_dim: int) -> AttentionConfig:
    """The named config for q's dtype and head dim (the last row past 256)."""
    rows = ATTN_CONFIGS[dtype]
    return next((config for bound, config in rows if head_dim <= bound), rows[-1][1])
LOG2E = 1.4426950408889634


def _check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                          max_len: int) -> int:
    """Dtypes and shapes only (no value is read: offsets were checked at the boundary); -> max_len."""
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"q must be (T, H, Dh), k and v (T, Hkv, Dh); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on T or Dh")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    check_offsets_layout(offsets)
    return check_max_len(max_len, offsets, q.shape[0])


def _length_buckets(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Group non-empty sequences whose lengths share a power-of-two range, so padding wastes < 2x."""
    nonempty = torch.nonzero(lengths > 0).flatten()
    if nonempty.numel() == 0:
        return []
    bucket = torch.ceil(torch.log2(lengths[nonempty].double())).long()
    return [nonempty[bucket == b] for b in torch.unique(bucket)]


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                               causal: bool, max_len: int, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v inside each sequence; query head h reads key/value
    head h // (H / Hkv); offsets (B+1,) int64 cumulative, max_len >= the longest sequence.
    Sequences are padded in a few length buckets and run through `scaled_dot_product_attention`
    (flash path on CPU: memory O(T * Dh), not O(M^2)); the buckets are data-dependent (host reads),
    which the reference may do. Returns (T, H, Dh)."""
    max_len = _check_attention_args(q, k, v, offsets, max_len)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[2])
    lengths = lengths_from_offsets(offsets)
    out = torch.empty_like(q)
    last = q.shape[0] - 1
    for seqs in _length_buckets(lengths):
        starts, lens = offsets[seqs], lengths[seqs]
        longest = int(lens.max())
        if longest > max_len:
            raise ValueError(f"max_len {max_len} is shorter than a sequence of length {longest}")
        steps = torch.arange(longest, device=q.device)
        mask = steps[None, :] < lens[:, None]
        # (B, L) packed row of each padded slot; padding slots read some valid row, which no real
        # query attends (masked keys, or past the end under a causal mask) and whose output is dropped.
        where = (starts[:, None] + steps[None, :]).clamp(max=last)
        full = bool(mask.all())
        res = F.scaled_dot_product_attention(
            q[where].transpose(1, 2), k[where].transpose(1, 2), v[where].transpose(1, 2),
            attn_mask=None if causal or full else mask[:, None, None, :], is_causal=causal, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1])
        out[where[mask]] = res.transpose(1, 2)[mask]
    return out


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, start, n0, length, m, d, d_mask, kv_head,
                 stride_k_t, stride_k_h, stride_k_d, stride_v_t, stride_v_h, stride_v_d, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """One key/value tile [n0, n0 + BLOCK_N) of the online softmax -> (acc, m_i, l_i). MASKED: the tile
    may cross the sequence end (or, CAUSAL, the diagonal), so keys past it are masked; unmasked tiles
    only mask the padded head dim."""
    n = n0 + tl.arange(0, BLOCK_N)
    kv_rows = (start + n).to(tl.int64)
    if MASKED:
        kv_mask = (n < length)[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]  # broadcast over the tile's rows
    k = tl.load(k_ptr + kv_rows[:, None] * stride_k_t + kv_head * stride_k_h + d[None, :] * stride_k_d,
                mask=kv_mask, other=0.0).to(DOT_T)  # (BLOCK_N, BLOCK_D), contiguous along Dh
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        valid = (n < length)[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= m[:, None])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + kv_rows[:, None] * stride_v_t + kv_head * stride_v_h + d[None, :] * stride_v_d,
                mask=kv_mask, other=0.0).to(DOT_T)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, offsets_ptr, block_seq_ptr, block_row_ptr,
    stride_q_t, stride_q_h, stride_q_d, stride_k_t, stride_k_h, stride_k_d,
    stride_v_t, stride_v_h, stride_v_d, stride_o_t, stride_o_h, stride_o_d,
    qk_scale, group, head_dim,
    CAUSAL: tl.constexpr, DOT_T: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[i, h] = sum_j softmax_j(q[i, h] . k[j, g] * scale) v[j, g] over the keys j of i's
    sequence (j <= i when CAUSAL), g = h // group; fp32 scores, softmax and accumulator.

    q_ptr:   (T, H, Dh) fp32/fp16/bf16, strides (stride_q_t, stride_q_h, stride_q_d).
    k_ptr, v_ptr: (T, Hkv, Dh), same dtype as q, strides (stride_k_*), (stride_v_*).
    out_ptr: (T, H, Dh), q's dtype, strides (stride_o_*).
    offsets_ptr: (B+1,) int64, contiguous, cumulative.
    block_seq_ptr, block_row_ptr: (NB,) int32, contiguous: program p handles query rows
        [block_row[p], block_row[p] + BLOCK_M) (relative to the sequence start) of sequence
        block_seq[p]; an entry with block_row[p] >= that sequence's length is surplus (no loads,
        no stores). qk_scale = scale * log2(e) (the softmax runs in base 2).
    Grid: (NB, H).
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(block_seq_ptr + pid)
    row0 = tl.load(block_row_ptr + pid)
    start = tl.load(offsets_ptr + seq)
    length = tl.load(offsets_ptr + seq + 1) - start
    kv_head = head // group

    m = row0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = m < length
    d_mask = d < head_dim
    q_rows = (start + m).to(tl.int64)
    # DOT_T is q's own dtype on a GPU (a no-op), fp32 for bf16 only under the interpreter
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_t + head * stride_q_h + d[None, :] * stride_q_d,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_T)

    # A finite floor instead of -inf keeps alpha = exp2(m_i - m_new) NaN-free for rows whose
    # keys of one tile are all masked.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(length, row0 + BLOCK_M)
    else:
        hi = length
    hi = tl.where(row0 < length, hi, 0)  # a surplus entry of the block table streams no keys
    # Tiles [0, lo) lie inside the sequence and, causal, at or before the first query row: no mask.
    if CAUSAL:
        lo = (row0 // BLOCK_N) * BLOCK_N
    else:
        lo = (length // BLOCK_N) * BLOCK_N
    lo = tl.minimum(lo, hi)
    for n0 in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, start, n0, length, m, d, d_mask, kv_head,
                                     stride_k_t, stride_k_h, stride_k_d, stride_v_t, stride_v_h, stride_v_d,
                                     qk_scale, False, CAUSAL, DOT_T, PRECISION, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_ptr, v_ptr, start, n0, length, m, d, d_mask, kv_head,
                                     stride_k_t, stride_k_h, stride_k_d, stride_v_t, stride_v_h, stride_v_d,
                                     qk_scale, True, CAUSAL, DOT_T, PRECISION, BLOCK_N)
    # Rows past the sequence end are never stored; every stored row saw key 0, so l_i > 0.
    out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_t + head * stride_o_h + d[None, :] * stride_o_d,
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def num_query_blocks(total: int, num_sequences: int, max_len: int, block_m: int) -> int:
    """Host-side bound on sum_b cdiv(L_b, block_m) from what the host knows without reading the
    offsets: T = sum L_b, B, and max_len >= max L_b."""
    return min(-(-total // block_m) + num_sequences, num_sequences * -(-max_len // block_m))


def query_blocks(offsets: torch.Tensor, total: int, max_len: int, block_m: int,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sequence, first row) table of the attention grid, built on offsets' device without
    reading a value back: (NB,) int32 each, NB = `num_query_blocks(total, B, max_len, block_m)`.
    One entry per block_m query rows of every non-empty sequence, sorted by decreasing work (keys
    streamed), then the surplus entries, each pointing at its sequence's end (row = length)."""
    lengths = lengths_from_offsets(offsets)
    batch = lengths.numel()
    size = num_query_blocks(total, batch, max_len, block_m)
    blocks = (lengths + block_m - 1) // block_m
    ends = torch.cumsum(blocks, 0)
    index = torch.arange(size, device=offsets.device)
    seq = torch.searchsorted(ends, index, right=True)  # B for the surplus entries
    valid = seq < batch
    seq = seq.clamp(max=max(batch - 1, 0))
    length = lengths[seq]
    row = (index - (ends[seq] - blocks[seq])) * block_m
    work = torch.minimum(row + block_m, length) if causal else length
    row = torch.where(valid, row, length)
    order = torch.argsort(torch.where(valid, work, -1), descending=True, stable=True)
    return seq[order].to(torch.int32).contiguous(), row[order].to(torch.int32).contiguous()


def varlen_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                            causal: bool, max_len: int, scale: float | None = None,
                            config: AttentionConfig | None = None) -> torch.Tensor:
    """Triton twin of `varlen_attention_reference` (same arguments, same result). No device value
    is read on the host: the grid is sized from T, B and max_len (see the module docstring). `config`
    overrides the named one of `attention_config` (benchmarks sweep it)."""
    max_len = _check_attention_args(q, k, v, offsets, max_len)
    require_triton("varlen_attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    tl_dtype(q.dtype)  # floats only
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[2])
    out = new_output(tuple(q.shape), q.dtype, q.device)
    total, heads, head_dim = q.shape
    if total == 0 or heads == 0 or head_dim == 0:
        return out
    offsets = offsets.contiguous()
    config = config or attention_config(q.dtype, head_dim)
    block_seq, block_row = query_blocks(offsets, total, max_len, config.block_m, causal)
    _varlen_attention_kernel[(block_seq.numel(), heads)](
        q, k, v, out, offsets, block_seq, block_row,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        scale * LOG2E, heads // k.shape[1], head_dim,
        CAUSAL=bool(causal), DOT_T=dot_dtype(q.dtype), PRECISION=dot_precision(q.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=next_pow2(head_dim, ATTN_MIN_BLOCK_D),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
