"""One dispatch function per fused op: the Triton kernel on CUDA tensors, the PyTorch reference
on the CPU. `BAHE_KERNELS=auto|torch|triton` (or `use_backend`) forces a path; forcing Triton
on CPU tensors needs TRITON_INTERPRET=1 (tests). Kernels are forward-only: when autograd needs
a graph, `auto` takes the reference."""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Iterator

import torch

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


def _kernel(module: str, name: str):
    return getattr(importlib.import_module(f"kernels.{module}"), name)


def jagged_gather(table: torch.Tensor, rows: torch.Tensor, *, offsets: torch.Tensor | None = None,
                  pos: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(T,) rows of table (N, d) -> (T, d), + pos (P, d) by position inside each sequence if given."""
    impl = "jagged_gather_" + ("triton" if resolve(table, rows, pos) == "triton" else "reference")
    return _kernel("jagged_gather", impl)(table, rows, offsets=offsets, pos=pos, out_dtype=out_dtype)


def jagged_mean(values: torch.Tensor, offsets: torch.Tensor, *, empty: torch.Tensor | None = None) -> torch.Tensor:
    """(T, d) packed + offsets (B+1,) -> (B, d) means; empty sequences give `empty` or zeros."""
    impl = "jagged_mean_" + ("triton" if resolve(values, empty) == "triton" else "reference")
    return _kernel("jagged_mean", impl)(values, offsets, empty=empty)


def gather_mean(table: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, *,
                empty: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of table rows per ragged bag -> (B, d), without materializing (T, d) on the kernel path."""
    impl = "gather_mean_" + ("triton" if resolve(table, rows, empty) == "triton" else "reference")
    return _kernel("gather_mean", impl)(table, rows, offsets, empty=empty, out_dtype=out_dtype)


def rope(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of packed q (T, H, Dh) and k (T, Hkv, Dh) by position inside each sequence."""
    impl = "rope_" + ("triton" if resolve(q, k) == "triton" else "reference")
    return _kernel("rope", impl)(q, k, offsets, cos, sin)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                     causal: bool, scale: float | None = None) -> torch.Tensor:
    """Attention inside each packed sequence of q (T, H, Dh), k, v (T, Hkv, Dh) -> (T, H, Dh)."""
    impl = "varlen_attention_" + ("triton" if resolve(q, k, v) == "triton" else "reference")
    return _kernel("varlen_attention", impl)(q, k, v, offsets, causal=causal, scale=scale)


def ctr_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], *,
            activation: str = "relu", sigmoid: bool = False) -> torch.Tensor:
    """The CTR head's MLP on x (B, D) -> (B,) fp32 logits (or probabilities)."""
    impl = "ctr_mlp_" + ("triton" if resolve(x, *weights) == "triton" else "reference")
    return _kernel("ctr_mlp", impl)(x, weights, biases, activation=activation, sigmoid=sigmoid)
