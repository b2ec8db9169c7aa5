"""rope_triton against rope_reference (and transformers' Llama RoPE) under the Triton interpreter."""
import pytest
import torch

import kernels.rope as mod
from kernels import ops
from kernels._jagged import check_offsets, positions_in_sequence
from tests.kernel_checks import NoLaunch, packed_qkv, assert_fits_sm90, compile_for_sm90, assert_matches, check_dispatch, TOL, poisoned_outputs, rel_err  # noqa: F401 (autouse fixture)
from kernels.rope import rope_reference, rope_tables, rope_triton

LENGTHS = [[1], [0, 1, 21, 0, 5], [40, 3]]



def inputs(lengths, heads, kv_heads, head_dim, dtype, seed):
    q, k, _, offsets = packed_qkv(lengths, heads, kv_heads, head_dim, dtype, seed)
    return q, k, offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (2, 2, 72)])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_reference(dtype, heads, kv_heads, head_dim, lengths):
    q, k, offsets = inputs(lengths, heads, kv_heads, head_dim, dtype, seed=head_dim + len(lengths))
    cos, sin = rope_tables(max(lengths) + 2, head_dim)
    q_out, k_out = rope_triton(q, k, offsets, cos, sin, max_len=max(lengths))
    q_ref, k_ref = rope_reference(q, k, offsets, cos, sin, max_len=max(lengths))
    for out, ref in ((q_out, q_ref), (k_out, k_ref)):
        assert out.dtype == dtype
        assert_matches(out, ref, TOL[dtype])


def test_general_tables_and_strided_inputs():
    # cos/sin with distinct halves (not the Llama duplicate layout) and q as a view of a fused qkv.
    gen = torch.Generator().manual_seed(5)
    offsets = torch.tensor([0, 3, 3, 10])
    qkv = torch.randn(10, 4 + 2 + 2, 24, generator=gen)
    q, k = qkv[:, :4], qkv[:, 4:6]
    cos, sin = torch.randn(12, 24, generator=gen), torch.randn(12, 24, generator=gen)
    for out, ref in zip(rope_triton(q, k, offsets, cos, sin, max_len=7), rope_reference(q, k, offsets, cos, sin, max_len=7)):
        assert rel_err(out, ref) < 1e-6


def test_matches_transformers_llama_rope():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    lengths = [6, 0, 11]
    q, k, offsets = inputs(lengths, 9, 3, 64, torch.float32, seed=7)
    cos, sin = rope_tables(16, 64)
    pos = positions_in_sequence(offsets, q.shape[0])
    # transformers: (batch, heads, seq, Dh) with cos/sin (batch, seq, Dh); one "batch" of T tokens.
    q_hf, k_hf = llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[pos][None],
                                            sin[pos][None])
    q_out, k_out = rope_triton(q, k, offsets, cos, sin, max_len=11)
    assert rel_err(q_out, q_hf[0].transpose(0, 1)) < 1e-6
    assert rel_err(k_out, k_hf[0].transpose(0, 1)) < 1e-6


def test_empty_batch():
    q, k, offsets = inputs([0, 0], 2, 1, 16, torch.float32, seed=0)
    cos, sin = rope_tables(1, 16)
    q_out, k_out = rope_triton(q, k, offsets, cos, sin, max_len=0)
    assert q_out.shape == (0, 2, 16) and k_out.shape == (0, 1, 16)


def test_host_side_errors_before_launch(monkeypatch):
    monkeypatch.setattr(mod, "_rope_kernel", NoLaunch())
    q, k, offsets = inputs([4, 2], 2, 1, 16, torch.float32, seed=0)
    cos, sin = rope_tables(8, 16)
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 4, 5]), q.shape[0])  # the boundary's check: does not end at T
    with pytest.raises(ValueError):
        rope_triton(q, k, offsets, cos[:3], sin[:3], max_len=4)  # a sequence of 4 needs 4 positions
    with pytest.raises(ValueError):
        rope_triton(q, k, offsets, cos, sin, max_len=2)  # 2 sequences of <= 2 cannot hold 6 tokens
    with pytest.raises(TypeError):
        rope_triton(q, k, offsets, cos, sin, max_len=torch.tensor(4))  # a host int, never a tensor
    with pytest.raises(ValueError):
        rope_triton(q, k[:, :, :8], offsets, cos, sin, max_len=4)
    q3, k3, _ = inputs([4, 2], 2, 1, 15, torch.float32, seed=0)
    with pytest.raises(ValueError, match="even head dim"):
        rope_triton(q3, k3, offsets, cos[:, :15], sin[:, :15], max_len=4)


def test_dispatch(monkeypatch):
    q, k, offsets = inputs([3, 0, 4], 2, 1, 16, torch.float32, seed=0)
    cos, sin = rope_tables(8, 16)
    check_dispatch(monkeypatch, mod, "rope", lambda: ops.rope(q, k, offsets, cos, sin, max_len=4), tol=1e-6,
                   call_needing_grad=lambda: ops.rope(q.requires_grad_(), k, offsets, cos, sin, max_len=4))


def test_compiles_for_sm90_without_spills():
    """Compile (no GPU needed, nothing runs) bf16 and fp32 RoPE launches, for sm_90."""
    infos = compile_for_sm90(
        "from kernels.rope import rope_triton\n"
        "offsets, cos, sin = torch.tensor([0, 3, 3, 40]), torch.randn(40, 64), torch.randn(40, 64)\n"
        "q, k = torch.randn(40, 9, 64), torch.randn(40, 3, 64)\n"
        "def launch():\n"
        "    rope_triton(q.bfloat16(), k.bfloat16(), offsets, cos, sin, max_len=37)\n"
        "    rope_triton(q, k, offsets, cos, sin, max_len=37)\n")
    assert_fits_sm90(infos, launches=2, max_stack_bytes=8)  # fp32 keeps 8 bytes of stack (measured), not a spill of the tiles
