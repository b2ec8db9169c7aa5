"""varlen_attention_triton against varlen_attention_reference under the Triton interpreter."""
import math

import pytest
import torch

import kernels.varlen_attention as mod
from kernels import ops
from kernels._jagged import check_offsets, offsets_from_lengths
from tests.kernel_checks import NoLaunch, packed_qkv, assert_fits_sm90, compile_for_sm90, assert_matches, check_dispatch, TOL, poisoned_outputs, rel_err  # noqa: F401 (autouse fixture)
from kernels.rope import rope_reference, rope_tables, rope_triton
from kernels.varlen_attention import (ATTN_BLOCK_M, ATTN_CONFIGS, AttentionConfig, attention_config, query_blocks,
                                     varlen_attention_reference, varlen_attention_triton)

# Lengths 0 and 1, and lengths that are not multiples of the 64-row blocks (70 spans two).
LENGTHS = [[1], [0, 1, 70, 0, 7]]



@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 72), (2, 2, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_reference(lengths, dtype, heads, kv_heads, head_dim, causal):
    q, k, v, offsets = packed_qkv(lengths, heads, kv_heads, head_dim, dtype, seed=len(lengths) + head_dim)
    out = varlen_attention_triton(q, k, v, offsets, causal=causal, max_len=max(lengths))
    ref = varlen_attention_reference(q, k, v, offsets, causal=causal, max_len=max(lengths))
    assert out.dtype == dtype
    assert_matches(out, ref, TOL[dtype])


@pytest.mark.parametrize("config", [AttentionConfig(16, 16, 4, 1), AttentionConfig(32, 16, 4, 1),
                                    AttentionConfig(16, 32, 4, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_tiles_split_the_key_loop_exactly(config, causal, dtype):
    """Tiles smaller than the sequences: several unmasked tiles, diagonal tiles (causal) and a ragged last
    tile per program, with block_m above, equal to and below block_n; GQA, empty and one-row sequences."""
    lengths = [0, 1, 70, 0, 7, 33, 16]
    q, k, v, offsets = packed_qkv(lengths, 4, 2, 24, dtype, seed=7)
    out = varlen_attention_triton(q, k, v, offsets, causal=causal, max_len=70, config=config)
    ref = varlen_attention_reference(q, k, v, offsets, causal=causal, max_len=70)
    assert_matches(out, ref, TOL[dtype])


def test_named_configs_per_dtype_and_head_dim():
    assert attention_config(torch.bfloat16, 64) == AttentionConfig(ATTN_BLOCK_M, 64, 4, 3)
    assert attention_config(torch.float32, 40).block_n == 32
    assert attention_config(torch.bfloat16, 200) == attention_config(torch.bfloat16, 256)
    assert attention_config(torch.bfloat16, 512) == ATTN_CONFIGS[torch.bfloat16][-1][1]
    assert set(ATTN_CONFIGS) == {torch.float32, torch.float16, torch.bfloat16}
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        AttentionConfig(64, 24, 4, 2)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        AttentionConfig(8, 16, 4, 2)


def test_custom_scale_and_strided_qkv():
    gen = torch.Generator().manual_seed(11)
    offsets = torch.tensor([0, 5, 5, 25])
    qkv = torch.randn(25, 3 + 1 + 1, 40, generator=gen)  # fused projection output: views with head stride 40
    q, k, v = qkv[:, :3], qkv[:, 3:4], qkv[:, 4:5]
    for causal in (True, False):
        out = varlen_attention_triton(q, k, v, offsets, causal=causal, max_len=20, scale=0.3)
        assert rel_err(out, varlen_attention_reference(q, k, v, offsets, causal=causal, max_len=20, scale=0.3)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_shapes_with_rope(dtype):
    """SmolLM2-135M attention: 9 query heads, 3 KV heads, head dim 64, causal, RoPE (theta 1e5) as the pre-pass."""
    lengths = [13, 0, 1, 66]
    q, k, v, offsets = packed_qkv(lengths, 9, 3, 64, dtype, seed=135)
    cos, sin = rope_tables(max(lengths), 64)
    longest = max(lengths)
    q_rot, k_rot = rope_triton(q, k, offsets, cos, sin, max_len=longest)
    out = varlen_attention_triton(q_rot, k_rot, v, offsets, causal=True, max_len=longest)
    q_ref, k_ref = rope_reference(q, k, offsets, cos, sin, max_len=longest)
    ref = varlen_attention_reference(q_ref, k_ref, v, offsets, causal=True, max_len=longest)
    assert_matches(out, ref, TOL[dtype])


def test_matches_dense_softmax_single_sequence():
    # Independent of the reference: plain softmax(q k^T / sqrt(Dh)) v with a causal mask.
    q, k, v, offsets = packed_qkv([9], 2, 1, 16, torch.float32, seed=3)
    out = varlen_attention_triton(q, k, v, offsets, causal=True, max_len=9)
    scores = torch.einsum("ihd,jd->hij", q, k[:, 0]) / math.sqrt(16)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    dense = torch.einsum("hij,jd->ihd", scores.softmax(-1), v[:, 0])
    assert rel_err(out, dense) < 1e-5


def test_query_block_table():
    lengths = [ATTN_BLOCK_M + 1, 0, 1]
    offsets = offsets_from_lengths(torch.tensor(lengths))
    seq, row = query_blocks(offsets, sum(lengths), max(lengths), ATTN_BLOCK_M, causal=True)
    assert seq.dtype == row.dtype == torch.int32
    # Sized from T, B and max_len alone (no value read): min(cdiv(66, 64) + 3, 3 * cdiv(65, 64)) = 5.
    assert seq.numel() == row.numel() == 5
    # The surplus entries come last and point at their sequence's end: their programs do nothing.
    real = [(s, r) for s, r in zip(seq.tolist(), row.tolist()) if r < lengths[s]]
    assert all(r >= lengths[s] for s, r in zip(seq.tolist()[len(real):], row.tolist()[len(real):]))
    assert sorted(real) == [(0, 0), (0, ATTN_BLOCK_M), (2, 0)]
    # The block streaming the most keys goes first: under a causal mask, the last one.
    assert real[0] == (0, ATTN_BLOCK_M) and real[-1] == (2, 0)


def test_empty_batch():
    q, k, v, offsets = packed_qkv([0, 0, 0], 2, 2, 16, torch.float32, seed=0)
    assert varlen_attention_triton(q, k, v, offsets, causal=False, max_len=0).shape == (0, 2, 16)


def test_host_side_errors_before_launch(monkeypatch):
    monkeypatch.setattr(mod, "_varlen_attention_kernel", NoLaunch())
    q, k, v, offsets = packed_qkv([4, 2], 4, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 4, 5]), q.shape[0])  # the boundary's checks of the values
    with pytest.raises(ValueError):
        check_offsets(torch.tensor([0, 5, 4, 6]), q.shape[0])
    with pytest.raises(ValueError):
        varlen_attention_triton(q, k, v, offsets, causal=True, max_len=2)  # 2 sequences of <= 2 < 6 rows
    with pytest.raises(TypeError):
        varlen_attention_triton(q, k, v, offsets, causal=True, max_len=torch.tensor(4))
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention_triton(q[:, :3], k, v, offsets, causal=True, max_len=4)
    with pytest.raises(ValueError):
        varlen_attention_triton(q, k, v[:, :1], offsets, causal=True, max_len=4)
    with pytest.raises(TypeError, match="dtype"):
        varlen_attention_triton(q, k.half(), v.half(), offsets, causal=True, max_len=4)


def test_dispatch(monkeypatch):
    q, k, v, offsets = packed_qkv([3, 0, 4], 2, 1, 16, torch.float32, seed=0)
    check_dispatch(monkeypatch, mod, "varlen_attention", lambda: ops.varlen_attention(q, k, v, offsets, causal=True, max_len=4),
                   tol=1e-5, call_needing_grad=lambda: ops.varlen_attention(q, k, v.requires_grad_(), offsets, causal=True, max_len=4))


def test_compiles_for_sm90_without_spills():
    """Compile (no GPU needed, nothing runs) the attention launches for sm_90: bf16 head dims 64
    and 128, causal and not, and fp32 (tf32x3 dots); none may spill or overflow shared memory."""
    infos = compile_for_sm90(
        "from kernels.varlen_attention import varlen_attention_triton\n"
        "offsets = torch.tensor([0, 3, 3, 73, 74])\n"
        "def launch():\n"
        "    for dtype, dh in ((torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64)):\n"
        "        q, k = torch.randn(74, 9, dh).to(dtype), torch.randn(74, 3, dh).to(dtype)\n"
        "        for causal in (True, False):\n"
        "            varlen_attention_triton(q, k, k, offsets, causal=causal, max_len=70)\n")
    assert_fits_sm90(infos, launches=6)
