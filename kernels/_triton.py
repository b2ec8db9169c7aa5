"""Guarded Triton import and the few helpers every launcher shares.

`triton` is optional: where it is not installed, `HAS_TRITON` is False, `@triton.jit` turns a
kernel into a stub that raises when launched, and the PyTorch references (which live in the same
modules as the kernels) still import and run.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Unlaunchable:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.fn.__name__} is a Triton kernel but the triton package is not installed")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.fn.__name__} is a Triton kernel but the triton package is not installed")

    class _MissingTriton:
        """Just enough of `triton` / `triton.language` for kernel definitions to import."""

        def jit(self, fn=None, **_):
            return _Unlaunchable(fn) if fn is not None else _Unlaunchable

        def __getattr__(self, name):
            return None

    triton = _MissingTriton()
    tl = _MissingTriton()

__all__ = ["HAS_TRITON", "triton", "tl", "interpreting", "require_triton", "next_pow2", "tl_dtype",
           "dot_dtype", "dot_precision", "new_output", "poison_outputs", "search_steps"]


def interpreting() -> bool:
    """True when kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op}_triton needs the triton package, which is not installed")


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): `tl.arange` ranges must be powers of two."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


_TL_DTYPES = {}
if HAS_TRITON:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"kernels take float32, float16 or bfloat16 tensors, got {dtype}") from None


def dot_dtype(dtype: torch.dtype):
    """Operand type for `tl.dot` on inputs stored as `dtype`: the storage type on a GPU (tensor
    cores, fp32 accumulation), fp32 for bf16 under the interpreter, which keeps bf16 as raw uint16
    and computes a garbage product from bf16 operands."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return tl_dtype(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot(input_precision=...)`: exact fp32 ("ieee") for fp32 inputs so the fp32 path keeps
    fp32 accuracy instead of TF32's 10-bit mantissa; ignored for 16-bit operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


def search_steps(num_segments: int) -> tuple[int, int]:
    """(first step, number of steps) of the branchless binary search `segment_of` over
    offsets (num_segments + 1,): the first step is the largest power of two <= num_segments."""
    if num_segments <= 0:
        return 1, 0
    steps = int(math.floor(math.log2(num_segments))) + 1
    return 1 << (steps - 1), steps


_poison = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Test hook: launchers fill their outputs with NaN before the launch, so an element the
    kernel fails to write shows up as NaN instead of as stale memory that happens to be right."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The output buffer of a launcher: uninitialized (every element is written by the kernel),
    NaN-filled inside `poison_outputs()`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out


if HAS_TRITON:

    @triton.jit
    def segment_of(offsets_ptr, t, num_segments, first_step, num_steps):
        """Index s of the segment holding packed element t: the largest s in [0, B] with
        offsets[s] <= t, so empty segments (repeated offsets) are skipped and s < B for every
        t < T. Branchless binary search over offsets (B+1,) int64, vectorized over the block of
        element indices `t`; probes past offsets[B] are masked. `first_step`, `num_steps` come
        from `search_steps(B)`: floor(log2 B) + 1 loads of offsets, which sit in L1/L2."""
        seg = tl.zeros_like(t)
        step = first_step
        for _ in range(num_steps):
            probe = seg + step
            value = tl.load(offsets_ptr + probe, mask=probe <= num_segments, other=2**62)
            seg = tl.where(value <= t, probe, seg)
            step = step // 2
        return seg

else:  # pragma: no cover
    segment_of = None
