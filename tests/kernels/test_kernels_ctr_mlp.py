"""ctr_mlp_triton (the whole head MLP in one launch) against ctr_mlp_reference under the interpreter."""
import pytest
import torch

import kernels.ctr_mlp as mod
from kernels import ops
from tests.kernel_checks import NoLaunch, SM90_SHARED_LIMIT, check_dispatch, compile_for_sm90, poisoned_outputs, rel_err  # noqa: F401 (autouse fixture)
from kernels.ctr_mlp import MAX_HIDDEN_WIDTH, ctr_mlp_reference, ctr_mlp_triton

# bf16: the reference rounds every hidden activation to bf16, the kernel keeps them in fp32.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
HIDDEN = [[], [48], [100, 40], [72, 40, 24]]



def head(batch, width, hidden, dtype, seed, weight_dtype=torch.float32):
    """x (B, D) and nn.Linear-initialized layers D -> hidden... -> 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=gen).to(dtype)
    dims = [width, *hidden, 1]
    weights = [((torch.rand(o, i, generator=gen) * 2 - 1) * 2 / i ** 0.5).to(weight_dtype)
               for i, o in zip(dims[:-1], dims[1:])]
    biases = [((torch.rand(o, generator=gen) * 2 - 1) * 0.5).to(weight_dtype) for o in dims[1:]]
    return x, weights, biases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
@pytest.mark.parametrize("width,batch", [(96, 1), (384, 37)])
def test_matches_reference(dtype, hidden, width, batch):
    x, weights, biases = head(batch, width, hidden, dtype, seed=width + len(hidden))
    for activation, sigmoid in (("relu", False), ("gelu", True), ("silu", False)):
        out = ctr_mlp_triton(x, weights, biases, activation=activation, sigmoid=sigmoid)
        ref = ctr_mlp_reference(x, weights, biases, activation=activation, sigmoid=sigmoid)
        assert out.shape == ref.shape == (batch,) and out.dtype == ref.dtype == torch.float32
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOL[dtype], (activation, sigmoid)
        if dtype != torch.float32:  # the gap is the reference's own 16-bit rounding, not the kernel's
            exact = ctr_mlp_reference(x.float(), weights, biases, activation=activation, sigmoid=sigmoid)
            assert rel_err(out, exact) <= rel_err(ref, exact) + 1e-3


def test_wide_input_and_widest_hidden_layer():
    # A BAHE-like head: input width not a multiple of the K block, first layer at the width limit.
    x, weights, biases = head(5, 2688 // 16, [MAX_HIDDEN_WIDTH, 20], torch.float32, seed=9)
    out = ctr_mlp_triton(x, weights, biases, activation="gelu")
    assert rel_err(out, ctr_mlp_reference(x, weights, biases, activation="gelu")) < 1e-5


def test_bf16_weights_with_fp32_input():
    x, weights, biases = head(20, 96, [64, 32], torch.float32, seed=2, weight_dtype=torch.bfloat16)
    out = ctr_mlp_triton(x, weights, biases, activation="silu", sigmoid=True)
    assert rel_err(out, ctr_mlp_reference(x, weights, biases, activation="silu", sigmoid=True)) < 1e-5


def test_empty_batch():
    x, weights, biases = head(0, 32, [16], torch.float32, seed=0)
    assert ctr_mlp_triton(x, weights, biases).shape == (0,)


def test_host_side_errors_before_launch(monkeypatch):
    monkeypatch.setattr(mod, "_ctr_mlp_kernel", NoLaunch())
    x, weights, biases = head(4, 32, [16, 16], torch.float32, seed=0)
    with pytest.raises(ValueError, match="activation"):
        ctr_mlp_triton(x, weights, biases, activation="tanh")
    with pytest.raises(ValueError):
        ctr_mlp_triton(x[:, :31], weights, biases)
    with pytest.raises(ValueError, match="1 output"):
        ctr_mlp_triton(x, weights[:-1], biases[:-1])
    deep_x, deep_w, deep_b = head(4, 32, [16] * 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="at most 3 hidden layers"):
        ctr_mlp_triton(deep_x, deep_w, deep_b)
    wide_x, wide_w, wide_b = head(2, 8, [MAX_HIDDEN_WIDTH + 1], torch.float32, seed=0)
    with pytest.raises(ValueError, match="width"):
        ctr_mlp_triton(wide_x, wide_w, wide_b)


def test_dispatch(monkeypatch):
    x, weights, biases = head(6, 32, [16], torch.float32, seed=0)
    check_dispatch(monkeypatch, mod, "ctr_mlp", lambda: ops.ctr_mlp(x, weights, biases, sigmoid=True), tol=1e-5,
                   call_needing_grad=lambda: ops.ctr_mlp(x, [w.requires_grad_() for w in weights], biases))


def test_compiles_for_sm90():
    """Compile (no GPU needed, nothing runs) the one-launch MLP for sm_90 at the width limit: bf16
    must fit shared memory without spills; fp32 (tf32x3 dots) must fit shared memory."""
    infos = compile_for_sm90(
        "from kernels.ctr_mlp import ctr_mlp_triton\n"
        "def layers(widths):\n"
        "    dims = [2688, *widths, 1]\n"
        "    return [torch.randn(o, i) for i, o in zip(dims[:-1], dims[1:])], [torch.randn(o) for o in dims[1:]]\n"
        "def launch():\n"
        "    for dtype, widths in ((torch.bfloat16, [1024]), (torch.bfloat16, [1024] * 3), (torch.float32, [1024] * 3)):\n"
        "        ctr_mlp_triton(torch.randn(64, 2688).to(dtype), *layers(widths), activation='gelu')\n")
    assert len(infos) == 3
    for info in infos:
        assert info["shared"] <= SM90_SHARED_LIMIT, info
        if info["constants"]["DOT_T"] == "bf16":
            assert info["stack"] in (0, None), info
