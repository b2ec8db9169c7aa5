"""Fused CTR head MLP: (Linear + activation) per hidden layer, final Linear to one logit.

Kernel layout: the whole MLP in ONE launch, one program per MLP_BLOCK_B rows of x; the
intermediate activations never leave the chip:
  layer 1: h1 (BLOCK_B, H1) accumulated over the input width D in MLP_BLOCK_K slices of x and W0
           (D may be large, e.g. 2688), kept whole in registers (H1 <= 1024);
  layer 2: computed MLP_BLOCK_N output columns at a time from the whole h1; each slice is
           activated and immediately consumed by the next layer (a dot product with the logit
           weights, or accumulated into h3 = slice @ W2[:, slice]^T), so h2 is never whole;
  layer 3: h3 (BLOCK_B, H3) whole in registers, then its dot product with the logit weights.
So at most MAX_HIDDEN_LAYERS = 3 hidden layers of width <= MAX_HIDDEN_WIDTH = 1024 (two whole
(BLOCK_B, width) fp32 tiles live at once); the launcher raises beyond that. Matmul operands are
in x's dtype (as in the reference, which casts the weights to it), accumulation and activations
in fp32. Every program reads all weights; they stay in L2 across programs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import (dot_dtype, dot_precision, new_output, next_pow2, require_triton, tl, tl_dtype,
                             triton)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
_ACTIVATION_IDS = {"relu": 0, "gelu": 1, "silu": 2}
MAX_HIDDEN_LAYERS = 3
MAX_HIDDEN_WIDTH = 1024
# One config for every width. Compiled for sm_90 with triton's compiler (`compile_for_gpu`): with 1024-wide
# layers, bf16 needs 96 KiB of shared memory and 226 registers/thread without spills; fp32 (tf32x3
# operands) needs 192 KiB, which fits Hopper's 227 KiB but not an A100's 163 KiB.
MLP_BLOCK_B = 16  # rows of x per program (tl.dot needs M >= 16)
MLP_BLOCK_K = 16  # slice of the input width per layer-1 step
MLP_BLOCK_N = 16  # slice of layer 2's outputs per step
MLP_MIN_WIDTH = 16  # tl.dot needs N, K >= 16: narrower layers are zero-padded
MLP_NUM_WARPS = 8
MLP_NUM_STAGES = 1  # no multi-buffering: the (BLOCK_K, 1024) weight slices already fill shared memory


def _check_mlp_args(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                    activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if not weights or len(weights) != len(biases):
        raise ValueError(f"need one bias per weight and at least one layer, got {len(weights)} and {len(biases)}")
    width = x.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2 or w.shape[1] != width or tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"layer {i}: weight must be (out, {width}) and bias (out,), got "
                             f"{tuple(w.shape)} and {tuple(b.shape)}")
        width = w.shape[0]
    if width != 1:
        raise ValueError(f"the last layer must have 1 output (the logit), got {width}")


def ctr_mlp_reference(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], *,
                      activation: str = "relu", sigmoid: bool = False) -> torch.Tensor:
    """x (B, D) -> act(x W0^T + b0) -> ... -> (B,) fp32 logits (or probabilities with sigmoid=True).
    weights[i] (out_i, in_i) as in nn.Linear; the last has out = 1 and no activation."""
    _check_mlp_args(x, weights, biases, activation)
    act = ACTIVATIONS[activation]
    h = x
    for w, b in zip(weights[:-1], biases[:-1]):
        h = act(F.linear(h, w.to(h.dtype), b.to(h.dtype)))
    logits = F.linear(h, weights[-1].to(h.dtype), biases[-1].to(h.dtype))[:, 0].float()
    return torch.sigmoid(logits) if sigmoid else logits


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    """relu (0), exact-erf gelu (1) or silu (2), elementwise in fp32; each maps 0 to 0, so
    zero-padded columns stay zero."""
    if ACTIVATION == 0:
        return tl.maximum(x, 0.0)
    elif ACTIVATION == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _ctr_mlp_kernel(
    x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr,
    B, D, H1, H2, H3,
    stride_x_b, stride_x_d,
    NUM_HIDDEN: tl.constexpr, ACTIVATION: tl.constexpr, SIGMOID: tl.constexpr,
    DOT_T: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    H1_P: tl.constexpr, H3_P: tl.constexpr,
):
    """out[b] = [sigmoid](W_L act(... act(x[b] W0^T + b0) ...) + b_L), fp32, for L = NUM_HIDDEN
    hidden layers (0..3), act = relu / gelu / silu (ACTIVATION 0 / 1 / 2).

    x_ptr:  (B, D) fp32/fp16/bf16, strides (stride_x_b, stride_x_d).
    wi_ptr: (out_i, in_i) as nn.Linear, contiguous, any float dtype (cast to x's dtype for the
            matmuls); bi_ptr: (out_i,) contiguous. Layer widths: D -> H1 -> H2 -> H3 -> 1, cut
            after NUM_HIDDEN hidden layers (the layer after the last hidden one has 1 output);
            pointers of absent layers are placeholders, never read.
    out_ptr: (B,) fp32, contiguous.
    H1_P, H3_P: H1, H3 rounded up to a power of two >= 16 (tile widths).
    Grid: (cdiv(B, BLOCK_B),).
    """
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    r_mask = rows < B
    kk = tl.arange(0, BLOCK_K)
    if NUM_HIDDEN == 0:
        logit = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + kk
            x = tl.load(x_ptr + rows[:, None] * stride_x_b + k[None, :] * stride_x_d,
                        mask=r_mask[:, None] & (k < D)[None, :], other=0.0).to(tl.float32)
            w = tl.load(w0_ptr + k, mask=k < D, other=0.0).to(tl.float32).to(DOT_T).to(tl.float32)
            logit += tl.sum(x * w[None, :], axis=1)
        logit += tl.load(b0_ptr).to(tl.float32)
    else:
        # Layer 1: h1 = act(x W0^T + b0), (BLOCK_B, H1_P), accumulated over D.
        j1 = tl.arange(0, H1_P)
        j1_mask = j1 < H1
        h1 = tl.zeros((BLOCK_B, H1_P), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + kk
            k_mask = k < D
            x = tl.load(x_ptr + rows[:, None] * stride_x_b + k[None, :] * stride_x_d,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            w0_t = tl.load(w0_ptr + j1[None, :].to(tl.int64) * D + k[:, None],
                           mask=k_mask[:, None] & j1_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_K, H1_P)
            h1 = tl.dot(x.to(DOT_T), w0_t.to(DOT_T), h1, input_precision=PRECISION)
        h1 = _activate(h1 + tl.load(b0_ptr + j1, mask=j1_mask, other=0.0).to(tl.float32)[None, :], ACTIVATION)
        if NUM_HIDDEN == 1:
            w1 = tl.load(w1_ptr + j1, mask=j1_mask, other=0.0).to(tl.float32).to(DOT_T).to(tl.float32)
            logit = tl.sum(h1.to(DOT_T).to(tl.float32) * w1[None, :], axis=1) + tl.load(b1_ptr).to(tl.float32)
        else:
            # Layer 2 in BLOCK_N-column slices, each consumed at once by layer 3 (or the logit).
            h1 = h1.to(DOT_T)
            nn = tl.arange(0, BLOCK_N)
            j3 = tl.arange(0, H3_P)
            j3_mask = j3 < H3
            logit = tl.zeros((BLOCK_B,), dtype=tl.float32)
            h3 = tl.zeros((BLOCK_B, H3_P), dtype=tl.float32)
            for n0 in range(0, H2, BLOCK_N):
                n = n0 + nn
                n_mask = n < H2
                w1_t = tl.load(w1_ptr + n[None, :] * H1 + j1[:, None],
                               mask=j1_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # (H1_P, BLOCK_N)
                h2 = tl.dot(h1, w1_t.to(DOT_T), input_precision=PRECISION)
                h2 = _activate(h2 + tl.load(b1_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :], ACTIVATION)
                if NUM_HIDDEN == 2:
                    w2 = tl.load(w2_ptr + n, mask=n_mask, other=0.0).to(tl.float32).to(DOT_T).to(tl.float32)
                    logit += tl.sum(h2.to(DOT_T).to(tl.float32) * w2[None, :], axis=1)
                else:
                    w2_t = tl.load(w2_ptr + j3[None, :] * H2 + n[:, None],
                                   mask=n_mask[:, None] & j3_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, H3_P)
                    h3 = tl.dot(h2.to(DOT_T), w2_t.to(DOT_T), h3, input_precision=PRECISION)
            if NUM_HIDDEN == 2:
                logit += tl.load(b2_ptr).to(tl.float32)
            else:
                h3 = _activate(h3 + tl.load(b2_ptr + j3, mask=j3_mask, other=0.0).to(tl.float32)[None, :], ACTIVATION)
                w3 = tl.load(w3_ptr + j3, mask=j3_mask, other=0.0).to(tl.float32).to(DOT_T).to(tl.float32)
                logit = tl.sum(h3.to(DOT_T).to(tl.float32) * w3[None, :], axis=1) + tl.load(b3_ptr).to(tl.float32)
    if SIGMOID:
        logit = tl.sigmoid(logit)
    tl.store(out_ptr + rows, logit, mask=r_mask)


def ctr_mlp_triton(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], *,
                   activation: str = "relu", sigmoid: bool = False) -> torch.Tensor:
    """Triton twin of `ctr_mlp_reference` (same arguments, same result): the whole MLP in one
    launch, for up to MAX_HIDDEN_LAYERS hidden layers of width <= MAX_HIDDEN_WIDTH."""
    _check_mlp_args(x, weights, biases, activation)
    require_triton("ctr_mlp")
    hidden = [w.shape[0] for w in weights[:-1]]
    if len(hidden) > MAX_HIDDEN_LAYERS:
        raise ValueError(f"ctr_mlp_triton fuses at most {MAX_HIDDEN_LAYERS} hidden layers, got {len(hidden)}; "
                         "use the reference (backend 'torch') for deeper heads")
    if hidden and max(hidden) > MAX_HIDDEN_WIDTH:
        raise ValueError(f"ctr_mlp_triton keeps hidden layers of width <= {MAX_HIDDEN_WIDTH} on chip, "
                         f"got widths {hidden}; use the reference (backend 'torch') for wider heads")
    tl_dtype(x.dtype)
    for t in (*weights, *biases):
        tl_dtype(t.dtype)
    batch, width = x.shape
    out = new_output((batch,), torch.float32, x.device)
    if batch == 0:
        return out
    weights = [w.contiguous() for w in weights]
    biases = [b.contiguous() for b in biases]
    params: list[torch.Tensor] = []
    for w, b in zip(weights, biases):
        params += [w, b]
    params += [x, x] * (4 - len(weights))  # placeholders for absent layers, never read
    widths = hidden + [1] * (3 - len(hidden))
    _ctr_mlp_kernel[(triton.cdiv(batch, MLP_BLOCK_B),)](
        x, *params, out, batch, width, *widths, x.stride(0), x.stride(1),
        NUM_HIDDEN=len(hidden), ACTIVATION=_ACTIVATION_IDS[activation], SIGMOID=bool(sigmoid),
        DOT_T=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_B=MLP_BLOCK_B, BLOCK_K=MLP_BLOCK_K, BLOCK_N=MLP_BLOCK_N,
        H1_P=next_pow2(widths[0], MLP_MIN_WIDTH), H3_P=next_pow2(widths[2], MLP_MIN_WIDTH),
        num_warps=MLP_NUM_WARPS, num_stages=MLP_NUM_STAGES,
    )
    return out
