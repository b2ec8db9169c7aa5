"""dequant_gather(_mean)_triton (int8 table + float32 row scales) against their references under the
interpreter, and the routing of QuantizedRows through ops.jagged_gather / ops.gather_mean."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.dequant_gather as mod
import kernels.jagged_gather as gather_module
import kernels.jagged_mean as pool
from kernels import ops
from kernels.dequant_gather import (QuantizedRows, dequant_gather_mean_reference, dequant_gather_mean_triton,
                                    dequant_gather_reference, dequant_gather_triton)
from tests.kernel_checks import (TOL, NoLaunch, assert_fits_sm90, assert_matches, check_dispatch,  # noqa: F401
                                 compile_for_sm90, poisoned_outputs, random_bags, rel_err)
from weights.row_codec import dequantize_rows, quantize_rows

LENGTHS = [[0], [1], [0, 1, 17, 0, 5], [40, 3, 0, 1], [2] * 9]


def int8_bags(lengths, num_rows, dim, seed):
    """An int8 table (values, scale) quantized from random rows of varied magnitude, bags of `lengths`."""
    table, rows, offsets, gen = random_bags(lengths, num_rows, dim, torch.float32, seed)
    values, scale = quantize_rows(table * torch.rand(num_rows, 1, generator=gen) * 4)
    return values, scale, rows, offsets, gen


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [72, 384])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_gather_matches_reference(out_dtype, dim, lengths):
    values, scale, rows, offsets, gen = int8_bags(lengths, 50, dim, seed=len(lengths) + dim)
    longest = max(lengths)
    pos = torch.randn(longest + 3, dim, generator=gen).to(out_dtype)
    for kwargs in ({}, {"offsets": offsets, "pos": pos, "max_len": longest}):
        out = dequant_gather_triton(values, scale, rows, out_dtype=out_dtype, **kwargs)
        ref = dequant_gather_reference(values, scale, rows, out_dtype=out_dtype, **kwargs)
        assert out.shape == ref.shape == (rows.numel(), dim) and out.dtype == ref.dtype == out_dtype
        assert not out.isnan().any()
        if out_dtype == torch.float32:  # one fp32 multiply (and add) per element, in the same order
            assert torch.equal(out, ref)
        elif ref.numel():
            assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [72, 384])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_gather_mean_matches_reference(out_dtype, dim, lengths):
    values, scale, rows, offsets, gen = int8_bags(lengths, 60, dim, seed=len(lengths) + dim)
    batch = len(lengths)
    for kwargs in ({}, {"empty": torch.randn(dim, generator=gen)},
                   {"empty": torch.randn(batch, dim, generator=gen).to(out_dtype)}):
        out = dequant_gather_mean_triton(values, scale, rows, offsets, out_dtype=out_dtype, **kwargs)
        ref = dequant_gather_mean_reference(values, scale, rows, offsets, out_dtype=out_dtype, **kwargs)
        assert_matches(out, ref, TOL[out_dtype]) if ref.abs().sum() else assert_matches(out, ref, float("inf"))
        if not ref.abs().sum():
            assert not out.any()


def test_the_reference_is_the_gather_of_the_dequantized_table():
    values, scale, rows, offsets, _ = int8_bags([3, 0, 5], 20, 24, seed=3)
    table = dequantize_rows(values, scale)
    assert torch.equal(dequant_gather_reference(values, scale, rows), table[rows])
    mean = dequant_gather_mean_reference(values, scale, rows, offsets)
    torch.testing.assert_close(mean, ops.gather_mean(table, rows, offsets), rtol=0, atol=0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8), dim=st.sampled_from([8, 40, 96]),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_empty=st.booleans(), seed=st.integers(0, 99))
def test_property_random_bags(lengths, dim, out_dtype, with_empty, seed):
    values, scale, rows, offsets, gen = int8_bags(lengths, 30, dim, seed)
    longest = max(lengths)
    pos = torch.randn(longest + 1, dim, generator=gen)
    out = dequant_gather_triton(values, scale, rows, offsets=offsets, pos=pos, max_len=longest, out_dtype=out_dtype)
    ref = dequant_gather_reference(values, scale, rows, offsets=offsets, pos=pos, max_len=longest,
                                   out_dtype=out_dtype)
    assert not out.isnan().any()
    assert torch.equal(out, ref) if out_dtype == torch.float32 else (ref.numel() == 0 or rel_err(out, ref) < TOL[out_dtype])
    empty = torch.randn(dim, generator=gen) if with_empty else None
    out = dequant_gather_mean_triton(values, scale, rows, offsets, empty=empty, out_dtype=out_dtype)
    ref = dequant_gather_mean_reference(values, scale, rows, offsets, empty=empty, out_dtype=out_dtype)
    assert not out.isnan().any() and (rel_err(out, ref) < TOL[out_dtype] or not ref.abs().sum())


def test_ops_route_quantized_rows_to_the_dequantizing_ops(monkeypatch):
    values, scale, rows, offsets, gen = int8_bags([4, 0, 6], 20, 32, seed=5)
    table, pos = QuantizedRows(values, scale), torch.randn(8, 32, generator=gen)
    calls = []
    for op in ("dequant_gather", "dequant_gather_mean"):
        reference, kernel = ops.KERNELS[op]
        monkeypatch.setitem(ops.KERNELS, op, tuple(
            lambda *a, _f=f, **k: calls.append(_f.__name__) or _f(*a, **k) for f in (reference, kernel)))
    with ops.use_backend("triton"):
        gathered = ops.jagged_gather(table, rows, offsets=offsets, pos=pos, max_len=6)
        pooled = ops.gather_mean(table, rows, offsets, out_dtype=torch.bfloat16)
    assert calls == ["dequant_gather_triton", "dequant_gather_mean_triton"]
    assert gathered.dtype == torch.float32 and pooled.dtype == torch.bfloat16
    expected = dequant_gather_reference(values, scale, rows, offsets=offsets, pos=pos, max_len=6)
    assert torch.equal(gathered, expected)
    assert table.shape == (20, 32) and not table.is_cuda and table.nbytes() == 20 * 32 + 20 * 4


def test_dispatch(monkeypatch):
    values, scale, rows, offsets, _ = int8_bags([3, 0, 4], 10, 16, seed=0)
    grad_pos = torch.zeros(5, 16, requires_grad=True)
    check_dispatch(monkeypatch, mod, "dequant_gather", lambda: ops.dequant_gather(values, scale, rows), tol=1e-6,
                   call_needing_grad=lambda: ops.dequant_gather(values, scale, rows, offsets=offsets, pos=grad_pos,
                                                                max_len=4))
    check_dispatch(monkeypatch, mod, "dequant_gather_mean", lambda: ops.dequant_gather_mean(values, scale, rows, offsets),
                   tol=1e-6, call_needing_grad=lambda: ops.dequant_gather_mean(
                       values, scale, rows, offsets, empty=torch.zeros(16, requires_grad=True)))


def test_host_side_errors_before_launch(monkeypatch):
    monkeypatch.setattr(gather_module, "_jagged_gather_kernel", NoLaunch())
    monkeypatch.setattr(pool, "_pool_mean_kernel", NoLaunch())
    values, scale, rows, offsets, _ = int8_bags([3, 2], 10, 16, seed=0)
    with pytest.raises(TypeError, match="int8"):
        dequant_gather_triton(values.float(), scale, rows)
    with pytest.raises(TypeError, match="\\(10,\\) float32"):
        dequant_gather_triton(values, scale[:9], rows)
    with pytest.raises(TypeError, match="\\(10,\\) float32"):
        dequant_gather_mean_triton(values, scale.double(), rows, offsets)
    with pytest.raises(TypeError, match="int64"):
        dequant_gather_mean_triton(values, scale, rows.int(), offsets)
    with pytest.raises(ValueError, match="empty must be"):
        dequant_gather_mean_triton(values, scale, rows, offsets, empty=torch.zeros(17))
    with pytest.raises(ValueError, match="pos needs offsets"):
        dequant_gather_triton(values, scale, rows, pos=torch.zeros(4, 16))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dequant_gather_triton(values, scale, rows, out_dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        QuantizedRows(values.to(torch.uint8), scale)


def test_compiles_for_sm90_without_spills():
    """Compile (no GPU needed, nothing runs) the bf16-output dequantizing gather (+pos) and gather-mean, for sm_90."""
    infos = compile_for_sm90(
        "from kernels.dequant_gather import dequant_gather_triton, dequant_gather_mean_triton\n"
        "offsets, rows = torch.tensor([0, 3, 3, 40]), torch.randint(0, 100, (40,))\n"
        "values, scale = torch.randint(-127, 128, (100, 896), dtype=torch.int8), torch.rand(100)\n"
        "pos = torch.randn(64, 896).bfloat16()\n"
        "def launch():\n"
        "    dequant_gather_triton(values, scale, rows, offsets=offsets, pos=pos, max_len=37, out_dtype=torch.bfloat16)\n"
        "    dequant_gather_mean_triton(values, scale, rows, offsets, out_dtype=torch.float32)\n")
    assert_fits_sm90(infos, launches=2)
