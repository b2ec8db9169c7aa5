"""One dispatch function per fused op: the Triton kernel on CUDA tensors, the PyTorch reference
on the CPU. `BAHE_KERNELS=auto|torch|triton` (or `use_backend`) forces a path; forcing Triton
on CPU tensors needs TRITON_INTERPRET=1 (tests). Kernels are forward-only: when autograd needs
a graph, `auto` takes the reference.

`KERNELS` maps each op to its (PyTorch reference, Triton launcher) pair, imported directly, so a
reader follows a dispatch straight to its kernel. Importing works without the triton package:
kernels/_triton.py then stubs `triton.jit` and only launching a kernel raises.

No dispatch reads a device value: offsets and ids are validated once at the API boundary (on the
host), and the ops that need the longest sequence take it as `max_len` (a host int)."""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

from kernels.ctr_mlp import ctr_mlp_reference, ctr_mlp_triton
from kernels.dequant_gather import (
    QuantizedRows,
    dequant_gather_mean_reference,
    dequant_gather_mean_triton,
    dequant_gather_reference,
    dequant_gather_triton,
)
from kernels.gather_mean import gather_mean_reference, gather_mean_triton
from kernels.jagged_gather import jagged_gather_reference, jagged_gather_triton
from kernels.jagged_mean import jagged_mean_reference, jagged_mean_triton
from kernels.rope import rope_reference, rope_triton
from kernels.varlen_attention import varlen_attention_reference, varlen_attention_triton

BACKENDS = ("auto", "torch", "triton")
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("bahe_kernel_backend", default=None)


def _validated(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend asked for: `use_backend`'s if inside one, else $BAHE_KERNELS, else 'auto'."""
    chosen = _backend.get()
    if chosen is not None:
        return chosen
    return _validated(os.environ.get("BAHE_KERNELS", "auto"), "$BAHE_KERNELS")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with the given backend ('auto', 'torch' or 'triton')."""
    token = _backend.set(_validated(name, "kernel backend"))
    try:
        yield
    finally:
        _backend.reset(token)


def triton_available() -> bool:
    """True when the `triton` package imports (kernels can then run on CUDA, or on CPU when interpreting)."""
    return importlib.util.find_spec("triton") is not None


def _needs_grad(tensors: tuple[torch.Tensor | None, ...]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve(*tensors: torch.Tensor | None) -> str:
    """'triton' or 'torch' for an op on these tensors, following the requested backend: under 'auto',
    the kernel when any of them is on CUDA (a table may sit in pinned host memory) and no gradient is needed."""
    requested = current_backend()
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if requested == "torch":
        return "torch"
    if requested == "auto":
        usable = on_cuda and triton_available() and not _needs_grad(tensors)
        return "triton" if usable else "torch"
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' was forced but the triton package is not installed")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    if _needs_grad(tensors):
        raise RuntimeError("the Triton kernels are forward-only; use backend 'auto' or 'torch' for training")
    return "triton"


KERNELS = {
    "jagged_gather": (jagged_gather_reference, jagged_gather_triton),
    "jagged_mean": (jagged_mean_reference, jagged_mean_triton),
    "gather_mean": (gather_mean_reference, gather_mean_triton),
    "dequant_gather": (dequant_gather_reference, dequant_gather_triton),
    "dequant_gather_mean": (dequant_gather_mean_reference, dequant_gather_mean_triton),
    "rope": (rope_reference, rope_triton),
    "varlen_attention": (varlen_attention_reference, varlen_attention_triton),
    "ctr_mlp": (ctr_mlp_reference, ctr_mlp_triton),
}


def _pick(op: str, *tensors: torch.Tensor | None):
    """The reference or the Triton launcher of `op`, per `resolve`."""
    reference, kernel = KERNELS[op]
    return kernel if resolve(*tensors) == "triton" else reference


def jagged_gather(table: torch.Tensor | QuantizedRows, rows: torch.Tensor, *, offsets: torch.Tensor | None = None,
                  pos: torch.Tensor | None = None, max_len: int | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(T,) rows of table (N, d) -> (T, d), + pos (P, d) by position inside each sequence if given
    (then offsets (B+1,) and max_len >= the longest sequence are needed). An int8 table (QuantizedRows)
    is read through `dequant_gather` (out_dtype default float32)."""
    if isinstance(table, QuantizedRows):
        return dequant_gather(table.values, table.scale, rows, offsets=offsets, pos=pos, max_len=max_len,
                              out_dtype=out_dtype or torch.float32)
    return _pick("jagged_gather", table, rows, pos)(table, rows, offsets=offsets, pos=pos, max_len=max_len,
                                                    out_dtype=out_dtype)


def jagged_mean(values: torch.Tensor, offsets: torch.Tensor, *, empty: torch.Tensor | None = None) -> torch.Tensor:
    """(T, d) packed + offsets (B+1,) -> (B, d) means; empty sequences give `empty` or zeros."""
    return _pick("jagged_mean", values, empty)(values, offsets, empty=empty)


def gather_mean(table: torch.Tensor | QuantizedRows, rows: torch.Tensor, offsets: torch.Tensor, *,
                empty: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of table rows per ragged bag -> (B, d), without materializing (T, d) on the kernel path; an
    int8 table (QuantizedRows) through `dequant_gather_mean`."""
    if isinstance(table, QuantizedRows):
        return dequant_gather_mean(table.values, table.scale, rows, offsets, empty=empty,
                                   out_dtype=out_dtype or torch.float32)
    return _pick("gather_mean", table, rows, empty)(table, rows, offsets, empty=empty, out_dtype=out_dtype)


def dequant_gather(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, *,
                   offsets: torch.Tensor | None = None, pos: torch.Tensor | None = None, max_len: int | None = None,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(T,) rows of an int8 table values (N, d) * scale (N,) -> (T, d) out_dtype, + pos as in jagged_gather."""
    return _pick("dequant_gather", values, scale, rows, pos)(values, scale, rows, offsets=offsets, pos=pos,
                                                              max_len=max_len, out_dtype=out_dtype)


def dequant_gather_mean(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, *,
                        empty: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean of int8 table rows (values (N, d) * scale (N,)) per ragged bag -> (B, d) out_dtype."""
    return _pick("dequant_gather_mean", values, scale, rows, empty)(values, scale, rows, offsets, empty=empty,
                                                                     out_dtype=out_dtype)


def rope(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor, *, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of packed q (T, H, Dh) and k (T, Hkv, Dh) by position inside each sequence."""
    return _pick("rope", q, k)(q, k, offsets, cos, sin, max_len=max_len)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                     causal: bool, max_len: int, scale: float | None = None) -> torch.Tensor:
    """Attention inside each packed sequence of q (T, H, Dh), k, v (T, Hkv, Dh) -> (T, H, Dh)."""
    return _pick("varlen_attention", q, k, v)(q, k, v, offsets, causal=causal, max_len=max_len, scale=scale)


def ctr_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], *,
            activation: str = "relu", sigmoid: bool = False) -> torch.Tensor:
    """The CTR head's MLP on x (B, D) -> (B,) fp32 logits (or probabilities)."""
    return _pick("ctr_mlp", x, *weights)(x, weights, biases, activation=activation, sigmoid=sigmoid)
