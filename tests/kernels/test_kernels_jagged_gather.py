"""jagged_gather_triton against jagged_gather_reference under the Triton interpreter."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.jagged_gather as mod
from kernels import ops
from tests.kernel_checks import NoLaunch, random_bags, assert_fits_sm90, compile_for_sm90, check_dispatch, TOL, poisoned_outputs, rel_err  # noqa: F401 (autouse fixture)
from kernels._jagged import check_offsets, check_rows
from kernels.jagged_gather import jagged_gather_reference, jagged_gather_triton

LENGTHS = [[0], [1], [0, 1, 17, 0, 5], [40, 3, 0, 1], [2] * 9]



def inputs(lengths, num_rows, dim, dtype, seed):
    table, rows, offsets, gen = random_bags(lengths, num_rows, dim, dtype, seed)
    pos = torch.randn(max(max(lengths), 1) + 3, dim, generator=gen).to(dtype)
    return table, rows, offsets, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [72, 384])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_reference(dtype, dim, lengths):
    table, rows, offsets, pos = inputs(lengths, 50, dim, dtype, seed=len(lengths) + dim)
    longest = max(lengths)
    for kwargs in ({}, {"offsets": offsets, "pos": pos, "max_len": longest},
                   {"offsets": offsets, "pos": pos, "max_len": longest, "out_dtype": torch.float32}):
        out = jagged_gather_triton(table, rows, **kwargs)
        ref = jagged_gather_reference(table, rows, **kwargs)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert not out.isnan().any()
        if ref.numel():
            assert rel_err(out, ref) < TOL[ref.dtype]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8), dim=st.sampled_from([8, 40, 96]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_property_random_sequences(lengths, dim, dtype, seed):
    table, rows, offsets, pos = inputs(lengths, 30, dim, dtype, seed)
    longest = max(lengths)
    out = jagged_gather_triton(table, rows, offsets=offsets, pos=pos, max_len=longest, out_dtype=torch.float32)  # poisoned by the autouse fixture
    ref = jagged_gather_reference(table, rows, offsets=offsets, pos=pos, max_len=longest, out_dtype=torch.float32)
    assert not out.isnan().any()
    assert ref.numel() == 0 or rel_err(out, ref) < 1e-6


def test_converts_storage_dtype_on_the_fly():
    table, rows, offsets, pos = inputs([5, 0, 12], 30, 96, torch.bfloat16, seed=1)
    out = jagged_gather_triton(table, rows, offsets=offsets, pos=pos.float(), max_len=12, out_dtype=torch.float32)
    ref = jagged_gather_reference(table, rows, offsets=offsets, pos=pos.float(), max_len=12, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    out16 = jagged_gather_triton(table.float(), rows, out_dtype=torch.float16)
    assert torch.equal(out16, table.float()[rows].half())


def test_many_sequences_positions():
    # 70 sequences: the in-kernel binary search over offsets takes 7 steps.
    lengths = torch.randint(0, 4, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    table, rows, offsets, pos = inputs(lengths, 20, 40, torch.float32, seed=4)
    out = jagged_gather_triton(table, rows, offsets=offsets, pos=pos, max_len=max(lengths))
    assert rel_err(out, jagged_gather_reference(table, rows, offsets=offsets, pos=pos, max_len=max(lengths))) < 1e-6


def test_noncontiguous_table():
    table = torch.randn(80, 30).t()  # (30, 80), strides (1, 30)
    rows = torch.tensor([0, 29, 3, 3])
    assert torch.equal(jagged_gather_triton(table, rows), table[rows])


def test_host_side_errors_before_launch(monkeypatch):
    monkeypatch.setattr(mod, "_jagged_gather_kernel", NoLaunch())
    table, rows, offsets, pos = inputs([3, 2], 10, 16, torch.float32, seed=0)
    with pytest.raises(ValueError):
        jagged_gather_triton(table, rows, pos=pos)  # pos without offsets
    with pytest.raises(ValueError):
        jagged_gather_triton(table, rows, offsets=offsets, pos=pos)  # pos without max_len
    with pytest.raises(ValueError):
        jagged_gather_triton(table, rows, offsets=offsets, pos=pos[:2], max_len=3)  # too few positions
    with pytest.raises(ValueError):
        jagged_gather_triton(table, rows, offsets=offsets, pos=pos, max_len=2)  # 2 sequences of <= 2 < 5 rows
    with pytest.raises(TypeError):
        jagged_gather_triton(table, rows, offsets=offsets, pos=pos, max_len=torch.tensor(3))  # a host int only
    with pytest.raises(TypeError):
        jagged_gather_triton(table, rows.int())


def test_boundary_checks_refuse_bad_values():
    """Ids and offsets are validated once, on the host, at the API boundary (PackedBatch.validate,
    score_ids): the same inputs the launchers used to refuse raise the same errors there."""
    table, rows, offsets, pos = inputs([3, 2], 10, 16, torch.float32, seed=0)
    with pytest.raises(IndexError):
        check_rows(torch.tensor([0, 10]), table.shape[0])
    with pytest.raises(IndexError):
        check_rows(torch.tensor([-1]), table.shape[0])
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 2, 4]), rows.numel())  # does not end at T
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 4, 2, 5]), rows.numel())  # decreasing
    with pytest.raises(TypeError):
        check_rows(rows.int(), table.shape[0])
    check_rows(rows, table.shape[0]), check_offsets(offsets, rows.numel())


def test_empty_and_zero_rows():
    table = torch.randn(4, 24)
    out = jagged_gather_triton(table, torch.zeros(0, dtype=torch.int64), offsets=torch.zeros(3, dtype=torch.int64),
                               pos=torch.randn(1, 24), max_len=0)
    assert out.shape == (0, 24)


def test_dispatch(monkeypatch):
    table, rows, offsets, pos = inputs([3, 0, 4], 10, 16, torch.float32, seed=0)
    check_dispatch(monkeypatch, mod, "jagged_gather", lambda: ops.jagged_gather(table, rows, offsets=offsets, pos=pos, max_len=4),
                   tol=1e-6, call_needing_grad=lambda: ops.jagged_gather(table.requires_grad_(), rows))


def test_compiles_for_sm90_without_spills():
    """Compile (no GPU needed, nothing runs) the launches a bf16 and an fp32 gather make, for sm_90."""
    infos = compile_for_sm90(
        "from kernels.jagged_gather import jagged_gather_triton\n"
        "offsets, rows = torch.tensor([0, 3, 3, 40]), torch.randint(0, 100, (40,))\n"
        "table = torch.randn(100, 896)\n"
        "def launch():\n"
        "    jagged_gather_triton(table.bfloat16(), rows, offsets=offsets, pos=torch.randn(40, 896).bfloat16(), max_len=37)\n"
        "    jagged_gather_triton(table, rows, out_dtype=torch.bfloat16)\n")
    assert_fits_sm90(infos, launches=2)


def test_references_work_without_triton():
    """kernels/_triton.py guards the import: with triton missing, every module imports, the
    references and the dispatcher run, and a kernel launcher raises a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from kernels import ctr_mlp, gather_mean, jagged_gather, jagged_mean, ops, rope, varlen_attention\n"
        "table, rows = torch.randn(5, 4), torch.tensor([0, 4, 2])\n"
        "assert torch.equal(ops.jagged_gather(table, rows), table[rows])\n"
        "try:\n"
        "    jagged_gather.jagged_gather_triton(table, rows)\n"
        "except RuntimeError as err:\n"
        "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert "needs the triton package" in done.stdout
