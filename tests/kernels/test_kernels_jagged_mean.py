"""jagged_mean_triton against jagged_mean_reference under the Triton interpreter."""
import pytest
import torch

import kernels.jagged_mean as mod
from kernels import ops
from kernels._jagged import check_offsets, offsets_from_lengths
from tests.kernel_checks import NoLaunch, assert_fits_sm90, compile_for_sm90, check_dispatch, TOL, poisoned_outputs, rel_err  # noqa: F401 (autouse fixture)
from kernels.jagged_mean import jagged_mean_reference, jagged_mean_triton

LENGTHS = [[0], [1], [0, 1, 33, 0, 5], [70, 3, 0, 1], [2] * 9]



def inputs(lengths, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    offsets = offsets_from_lengths(torch.tensor(lengths))
    values = torch.randn(int(offsets[-1]), dim, generator=gen).to(dtype)
    return values, offsets, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [72, 384])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_reference(dtype, dim, lengths):
    values, offsets, gen = inputs(lengths, dim, dtype, seed=len(lengths) + dim)
    batch = len(lengths)
    for empty in (None, torch.randn(dim, generator=gen), torch.randn(batch, dim, generator=gen).to(dtype)):
        out = jagged_mean_triton(values, offsets, empty=empty)
        ref = jagged_mean_reference(values, offsets, empty=empty)
        assert out.shape == ref.shape == (batch, dim) and out.dtype == ref.dtype == dtype
        assert not out.isnan().any()
        if ref.abs().sum():
            assert rel_err(out, ref) < TOL[dtype]
        else:  # all sequences empty, no `empty`: zeros
            assert not out.any()


def test_empty_rows_take_empty_exactly():
    values, offsets, _ = inputs([0, 4, 0], 96, torch.float32, seed=0)
    empty = torch.randn(3, 96)
    out = jagged_mean_triton(values, offsets, empty=empty)
    assert torch.equal(out[0], empty[0]) and torch.equal(out[2], empty[2])
    assert torch.allclose(out[1], values.mean(0), rtol=1e-6, atol=1e-6)


def test_no_sequences_and_noncontiguous_values():
    out = jagged_mean_triton(torch.zeros(0, 8), torch.zeros(1, dtype=torch.int64))
    assert out.shape == (0, 8)
    values = torch.randn(40, 9).t()  # (9, 40), column stride 9
    offsets = torch.tensor([0, 4, 9])
    assert rel_err(jagged_mean_triton(values, offsets), jagged_mean_reference(values, offsets)) < 1e-6


def test_host_side_errors_before_launch(monkeypatch):
    monkeypatch.setattr(mod, "_pool_mean_kernel", NoLaunch())
    values, offsets, _ = inputs([3, 2], 16, torch.float32, seed=0)
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 3, 4]), values.shape[0])  # does not end at T (the boundary's check)
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([1, 3, 5]), values.shape[0])  # does not start at 0
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 4, 3, 5]), values.shape[0])  # decreasing
    with pytest.raises(ValueError):
        jagged_mean_triton(values, offsets[None])  # not (B+1,)
    with pytest.raises(TypeError):
        jagged_mean_triton(values, offsets.int())
    with pytest.raises(ValueError):
        jagged_mean_triton(values, offsets, empty=torch.zeros(3, 16))  # (B, d) with the wrong B
    with pytest.raises(ValueError):
        jagged_mean_triton(values[0], offsets)


def test_dispatch(monkeypatch):
    values, offsets, _ = inputs([3, 0, 4], 16, torch.float32, seed=0)
    check_dispatch(monkeypatch, mod, "jagged_mean", lambda: ops.jagged_mean(values, offsets), tol=1e-6,
                   call_needing_grad=lambda: ops.jagged_mean(values.requires_grad_(), offsets))


def test_compiles_for_sm90_without_spills():
    """Compile (no GPU needed, nothing runs) the launches of bf16 and fp32 pooling, for sm_90."""
    infos = compile_for_sm90(
        "from kernels.jagged_mean import jagged_mean_triton\n"
        "offsets, values = torch.tensor([0, 3, 3, 40]), torch.randn(40, 896)\n"
        "def launch():\n"
        "    jagged_mean_triton(values.bfloat16(), offsets, empty=torch.zeros(896))\n"
        "    jagged_mean_triton(values, offsets)\n")
    assert_fits_sm90(infos, launches=2)
