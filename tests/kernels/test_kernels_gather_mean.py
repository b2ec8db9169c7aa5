"""gather_mean_triton (fused EmbeddingBag-mean) against gather_mean_reference under the interpreter."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.gather_mean as mod
import kernels.jagged_mean as pool
from kernels import ops
from kernels._jagged import check_offsets, check_rows
from tests.kernel_checks import NoLaunch, random_bags, assert_fits_sm90, compile_for_sm90, check_dispatch, TOL, poisoned_outputs, rel_err  # noqa: F401 (autouse fixture)
from kernels.gather_mean import gather_mean_reference, gather_mean_triton

LENGTHS = [[0], [1], [0, 1, 33, 0, 5], [70, 3, 0, 1], [2] * 9]



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [72, 384])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_reference(dtype, dim, lengths):
    table, rows, offsets, gen = random_bags(lengths, 60, dim, dtype, seed=len(lengths) + dim)
    batch = len(lengths)
    cases = [{}, {"empty": torch.randn(dim, generator=gen)},
             {"empty": torch.randn(batch, dim, generator=gen).to(dtype), "out_dtype": torch.float32}]
    for kwargs in cases:
        out = gather_mean_triton(table, rows, offsets, **kwargs)
        ref = gather_mean_reference(table, rows, offsets, **kwargs)
        assert out.shape == ref.shape == (batch, dim) and out.dtype == ref.dtype
        assert not out.isnan().any()
        if ref.abs().sum():
            assert rel_err(out, ref) < TOL[ref.dtype]
        else:
            assert not out.any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8), dim=st.sampled_from([8, 40, 96]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_empty=st.booleans(), seed=st.integers(0, 99))
def test_property_random_bags(lengths, dim, dtype, with_empty, seed):
    table, rows, offsets, gen = random_bags(lengths, 30, dim, dtype, seed)
    empty = torch.randn(dim, generator=gen) if with_empty else None
    out = gather_mean_triton(table, rows, offsets, empty=empty)  # poisoned by the autouse fixture
    ref = gather_mean_reference(table, rows, offsets, empty=empty)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype] or not ref.abs().sum()


def test_does_not_materialize_the_gather(monkeypatch):
    # The fused path never builds the (T, d) gather (the reference does, with index_select).
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("materialized (T, d)"))
    table, rows, offsets, _ = random_bags([5, 0, 9], 30, 96, torch.bfloat16, seed=2)
    out = gather_mean_triton(table, rows, offsets, out_dtype=torch.float32)
    monkeypatch.undo()
    assert rel_err(out, gather_mean_reference(table, rows, offsets, out_dtype=torch.float32)) < 1e-6


def test_host_side_errors_before_launch(monkeypatch):
    monkeypatch.setattr(pool, "_pool_mean_kernel", NoLaunch())
    table, rows, offsets, _ = random_bags([3, 2], 10, 16, torch.float32, seed=0)
    with pytest.raises(ValueError):
        gather_mean_triton(table, rows, offsets, empty=torch.zeros(17))
    with pytest.raises(TypeError):
        gather_mean_triton(table, rows.int(), offsets)
    with pytest.raises(ValueError):
        gather_mean_triton(table, rows, offsets[None])


def test_boundary_checks_refuse_bad_values():
    """Ids and offsets are validated once, on the host, at the API boundary: the same inputs the
    launcher used to refuse raise the same errors there (and never reach a kernel)."""
    table, rows, offsets, _ = random_bags([3, 2], 10, 16, torch.float32, seed=0)
    with pytest.raises(IndexError):
        check_rows(torch.tensor([0, 1, 2, 3, 10]), table.shape[0])
    with pytest.raises(IndexError):
        check_rows(torch.tensor([0, 1, -2, 3, 4]), table.shape[0])
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 3, 4]), rows.numel())
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 4, 3, 5]), rows.numel())


def test_dispatch(monkeypatch):
    table, rows, offsets, _ = random_bags([3, 0, 4], 10, 16, torch.float32, seed=0)
    check_dispatch(monkeypatch, mod, "gather_mean", lambda: ops.gather_mean(table, rows, offsets), tol=1e-6,
                   call_needing_grad=lambda: ops.gather_mean(table.requires_grad_(), rows, offsets))


def test_compiles_for_sm90_without_spills():
    """Compile (no GPU needed, nothing runs) the launch of a bf16 gather-mean, for sm_90."""
    infos = compile_for_sm90(
        "from kernels.gather_mean import gather_mean_triton\n"
        "offsets, rows = torch.tensor([0, 3, 3, 40]), torch.randint(0, 100, (40,))\n"
        "table = torch.randn(100, 896).bfloat16()\n"
        "def launch():\n"
        "    gather_mean_triton(table, rows, offsets, out_dtype=torch.float32)\n")
    assert_fits_sm90(infos, launches=1)
