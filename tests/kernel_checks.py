"""What every kernel test shares: tolerances, the relative error, poisoned outputs, the sm_90 compile check."""
import pytest
import torch

from kernels._jagged import offsets_from_lengths
from kernels._triton import compile_for_gpu_in_subprocess, poison_outputs

# ||out - ref|| / ||ref|| bounds per dtype (fp32 on the interpreter; bf16/fp16 with fp32 accumulation).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Hopper's largest shared-memory allocation per block (227 KiB).
SM90_SHARED_LIMIT = 227 * 1024


def packed_qkv(lengths: list[int], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed q (T, H, Dh), k and v (T, Hkv, Dh) of sequences of `lengths`, and their offsets."""
    gen = torch.Generator().manual_seed(seed)
    offsets = offsets_from_lengths(torch.tensor(lengths))
    total = int(offsets[-1])
    q = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v, offsets


def random_bags(lengths: list[int], num_rows: int, dim: int, dtype: torch.dtype,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    """A random table (num_rows, dim), packed row ids of bags of `lengths`, their offsets, and the
    generator (for further draws)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = offsets_from_lengths(torch.tensor(lengths))
    rows = torch.randint(0, num_rows, (int(offsets[-1]),), generator=gen)
    table = torch.randn(num_rows, dim, generator=gen).to(dtype)
    return table, rows, offsets, gen


class NoLaunch:
    """Stands in for a @triton.jit kernel that must not be launched (invalid arguments are refused
    on the host first): indexing it with a grid fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("kernel launched although the arguments are invalid")


def compile_for_sm90(script: str) -> list[dict]:
    """Compile for sm_90, with no GPU (nothing runs), every launch that the function `launch()`
    defined by `script` makes; `torch` is imported for it. One dict per launch (see compile_for_gpu)."""
    return compile_for_gpu_in_subprocess("import json, torch\nfrom kernels._triton import compile_for_gpu\n"
                                         + script + "print(json.dumps(compile_for_gpu(launch)))\n")


def assert_fits_sm90(infos: list[dict], launches: int, max_stack_bytes: int = 0) -> None:
    """`launches` compiled kernels, each within sm_90's shared memory and at most `max_stack_bytes`
    of stack per thread (0: no register spills)."""
    assert len(infos) == launches, infos
    for info in infos:
        assert info["shared"] <= SM90_SHARED_LIMIT and (info["stack"] or 0) <= max_stack_bytes, info


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Launchers allocate their outputs filled with NaN, so an element a kernel never writes fails."""
    with poison_outputs():
        yield


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def check_dispatch(monkeypatch, module, op: str, call, *, tol: float, call_needing_grad) -> None:
    """`call()` runs `kernels.ops.<op>`: its dispatch table entry `ops.KERNELS[op]` must be the
    module's (`<op>_reference`, `<op>_triton`) pair; it must reach `<op>_triton` under the 'triton' backend and
    `<op>_reference` under 'torch' and under 'auto' (CPU tensors), the two outputs (or each pair of
    a tuple) within relative error `tol`; `call_needing_grad()` (an input that requires grad) must
    be refused by the forward-only kernel path."""
    from kernels import ops
    calls = []
    reference, kernel = ops.KERNELS[op]
    assert (reference, kernel) == (getattr(module, f"{op}_reference"), getattr(module, f"{op}_triton"))
    recording = tuple(lambda *a, _n=f.__name__, _f=f, **k: calls.append(_n) or _f(*a, **k) for f in (reference, kernel))
    monkeypatch.setitem(ops.KERNELS, op, recording)
    with ops.use_backend("triton"):
        out = call()
    with ops.use_backend("torch"):
        ref = call()
    with ops.use_backend("auto"):
        call()
    assert calls == [f"{op}_triton", f"{op}_reference", f"{op}_reference"]
    for out_part, ref_part in zip(*((x,) if torch.is_tensor(x) else x for x in (out, ref)), strict=True):
        assert rel_err(out_part, ref_part) < tol
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="forward-only"):
        call_needing_grad()


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Kernel output vs reference: same shape and dtype, every element written, relative error < tol."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert not out.isnan().any(), "an output element was left unwritten (poisoned NaN) or is NaN"
    assert rel_err(out, ref) < tol
