"""pytest-benchmark of every fused op on its dispatch path (kernels/ops.py): the Triton kernel on
CUDA, the PyTorch reference on the CPU. Small shapes, so a CPU run takes seconds:

    pytest bench/test_bench_kernels.py --benchmark-only
"""
import math

import pytest
import torch

from kernels import ops
from kernels._jagged import offsets_from_lengths
from kernels.rope import rope_tables

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _randn(gen, *size):
    return torch.randn(*size, generator=gen).to(device=DEVICE, dtype=DTYPE)


@pytest.fixture(scope="module")
def ragged():
    """64 sequences of 0..64 rows into a (5000, 384) table."""
    gen = torch.Generator().manual_seed(0)
    offsets = offsets_from_lengths(torch.randint(0, 65, (64,), generator=gen)).to(DEVICE)
    total = int(offsets[-1])
    rows = torch.randint(0, 5000, (total,), generator=gen).to(DEVICE)
    return {"gen": gen, "offsets": offsets, "rows": rows, "table": _randn(gen, 5000, 384),
            "values": _randn(gen, total, 384), "pos": _randn(gen, 64, 384)}


@pytest.fixture(scope="module")
def attention():
    """SmolLM2-135M heads (9 / 3, Dh 64) over 8 sequences of 0..128 tokens."""
    gen = torch.Generator().manual_seed(1)
    offsets = offsets_from_lengths(torch.randint(0, 129, (8,), generator=gen)).to(DEVICE)
    total = int(offsets[-1])
    cos, sin = rope_tables(128, 64)
    return {"offsets": offsets, "q": _randn(gen, total, 9, 64), "k": _randn(gen, total, 3, 64),
            "v": _randn(gen, total, 3, 64), "cos": cos.to(DEVICE), "sin": sin.to(DEVICE)}


def _run(benchmark, fn):
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)


def test_jagged_gather(benchmark, ragged):
    _run(benchmark, lambda: ops.jagged_gather(ragged["table"], ragged["rows"], offsets=ragged["offsets"],
                                              pos=ragged["pos"], max_len=64))  # lengths are drawn in 0..64


def test_jagged_mean(benchmark, ragged):
    _run(benchmark, lambda: ops.jagged_mean(ragged["values"], ragged["offsets"]))


def test_gather_mean(benchmark, ragged):
    _run(benchmark, lambda: ops.gather_mean(ragged["table"], ragged["rows"], ragged["offsets"]))


def test_rope(benchmark, attention):
    a = attention
    _run(benchmark, lambda: ops.rope(a["q"], a["k"], a["offsets"], a["cos"], a["sin"], max_len=128))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_varlen_attention(benchmark, attention, causal):
    a = attention
    _run(benchmark, lambda: ops.varlen_attention(a["q"], a["k"], a["v"], a["offsets"], causal=causal, max_len=128))


def test_ctr_mlp(benchmark):
    gen = torch.Generator().manual_seed(2)
    widths = [768, 256, 128, 1]
    x = _randn(gen, 256, widths[0])
    weights = [_randn(gen, o, i) / math.sqrt(i) for i, o in zip(widths[:-1], widths[1:])]
    biases = [_randn(gen, o) for o in widths[1:]]
    _run(benchmark, lambda: ops.ctr_mlp(x, weights, biases, activation="gelu", sigmoid=True))
