"""Guarded Triton import and the few helpers every launcher shares.

`triton` is optional: where it is not installed, `HAS_TRITON` is False, `@triton.jit` turns a
kernel into a stub that raises when launched, and the PyTorch references (which live in the same
modules as the kernels) still import and run.

Interpreter caveats (triton 3.7.1's interpreter): bf16 operands of `tl.dot` give garbage (`dot_dtype`
uses fp32 instead), and fp32 -> bf16 conversions on store truncate instead of rounding to nearest
even, so interpreted bf16 outputs may sit 1 ulp (2^-8 relative) from torch's; a GPU rounds to
nearest. `compile_for_gpu` compiles the kernels for sm_90 (no GPU needed), to catch what the
interpreter cannot: type errors, shared-memory overflow, register spills.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

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
           "dot_dtype", "dot_precision", "new_output", "poison_outputs", "search_steps", "compile_for_gpu",
           "compile_for_gpu_in_subprocess"]


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
    """`tl.dot(input_precision=...)`: for fp32 inputs "tf32x3" (three TF32 tensor-core products
    recovering ~fp32 accuracy; plain "tf32" keeps a 10-bit mantissa, and "ieee" compiles to FMA
    loops that spill kilobytes of stack on sm_90); ignored for 16-bit operands."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def search_steps(num_segments: int) -> int:
    """Number of probes of the binary search `segment_of` over offsets (num_segments + 1,):
    floor(log2 B) + 1 (0 when B = 0). A constexpr: kernels compile once per value (<= 40)."""
    return num_segments.bit_length() if num_segments > 0 else 0


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


_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
               torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def compile_for_gpu(launch: Callable[[], object], arch: int = 90) -> list[dict]:
    """Compile for CUDA sm_<arch>, without needing a GPU, every kernel launch that `launch()` makes (call
    the launchers on CPU tensors: nothing runs). Arguments get the specializations Triton's
    runtime gives them (an int equal to 1 becomes a constant; pointers and ints divisible by 16
    get divisibility hints). One dict per launch: kernel, constants, shared memory bytes, and
    registers / stack (spill) bytes per thread as reported by cuobjdump. Compiler errors (types,
    shapes, too much shared memory for the target's limit checks) propagate. Needs a process
    without TRITON_INTERPRET, where @triton.jit kernels are JITFunctions: see
    `compile_for_gpu_in_subprocess`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if interpreting():
        raise RuntimeError("compile_for_gpu needs TRITON_INTERPRET unset before triton is imported")
    launches = []
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: launches.append((self, args, kwargs)))
    try:
        launch()
    finally:
        JITFunction.__getitem__ = original
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results = []
    for kernel, args, kwargs in launches:
        kwargs = dict(kwargs)
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
        signature, constants, attrs = {}, {}, {}
        for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
            value = args[i] if i < len(args) else kwargs[name]
            if param.is_constexpr:
                signature[name], constants[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TYPE_NAMES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                if value == 1 and not param.do_not_specialize:
                    signature[name], constants[name] = "constexpr", 1
                    continue
                signature[name] = "i64" if not -2**31 <= value < 2**31 else "i32"
                if value % 16 == 0 and not param.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        info = {"kernel": kernel.__name__, "constants": {k: str(v) for k, v in constants.items()},
                "options": options, "shared": compiled.metadata.shared, "registers": None, "stack": None}
        if cuobjdump.exists():
            cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"bahe-{os.getpid()}-{kernel.__name__}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
            cubin.unlink()
            found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            if found:
                info["registers"], info["stack"] = int(found[1]), int(found[2])
        results.append(info)
    return results


def compile_for_gpu_in_subprocess(code: str, timeout: float = 300) -> list[dict]:
    """Run `code` (which must print `json.dumps(compile_for_gpu(...))` as its last line) in a
    fresh interpreter without TRITON_INTERPRET, from the repository root; return the list."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise RuntimeError(f"GPU compilation failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if HAS_TRITON:

    @triton.jit
    def segment_of(offsets_ptr, t, num_segments, NUM_STEPS: tl.constexpr):
        """Index s of the segment holding packed element t: the largest s in [0, B] with
        offsets[s] <= t, so empty segments (repeated offsets) are skipped and s < B for every
        t < T. Branchless binary search over offsets (B+1,) int64, vectorized over the block of
        element indices `t`, unrolled into NUM_STEPS = `search_steps(B)` probes with constant
        strides 2^(NUM_STEPS-1) ... 1 (their sum reaches B); probes past offsets[B] are masked.
        The offsets array is tiny and stays in L1/L2."""
        seg = tl.zeros_like(t)
        for i in tl.static_range(NUM_STEPS):
            probe = seg + (1 << (NUM_STEPS - 1 - i))
            value = tl.load(offsets_ptr + probe, mask=probe <= num_segments, other=2**62)
            seg = tl.where(value <= t, probe, seg)
        return seg

else:  # pragma: no cover
    segment_of = None
