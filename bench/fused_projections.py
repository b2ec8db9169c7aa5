"""CPU scoring time of the upper layers with fused projections (one qkv GEMM, one gate_up GEMM) vs
the separate ones they replaced (q, k, v; gate, up), same weights, interleaved repetitions:

    python -m bench.fused_projections [--model minilm] [--lower 3] [--reps 15]

Prints the median time of each side, the median of the per-repetition ratios separate / fused,
and the largest relative difference of the outputs."""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from engine.backbone.split import UpperEncoder
from kernels import ops
from kernels._jagged import offsets_from_lengths
from weights.checkpoint import Checkpoint
from weights.registry import resolve_model


class SeparateLinears(nn.Module):
    """The unfused projections: one Linear per part, outputs concatenated (as the fused one's)."""

    def __init__(self, fused: nn.Linear, sizes: list[int]) -> None:
        super().__init__()
        self.parts = nn.ModuleList()
        for weight, bias in zip(fused.weight.split(sizes), fused.bias.split(sizes) if fused.bias is not None
                                else [None] * len(sizes)):
            part = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            part.weight.data.copy_(weight)
            if bias is not None:
                part.bias.data.copy_(bias)
            self.parts.append(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def unfused(upper: UpperEncoder) -> UpperEncoder:
    separate = copy.deepcopy(upper)
    for layer in separate.layers:
        attn = layer.attn
        kv = attn.kv_heads * attn.head_dim
        attn.qkv = SeparateLinears(attn.qkv, [attn.heads * attn.head_dim, kv, kv])
        if hasattr(layer, "gate_up"):
            layer.gate_up = SeparateLinears(layer.gate_up, [layer.intermediate, layer.intermediate])
    return separate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--lower", type=int, default=3)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--behaviors", type=int, default=20, help="behaviors per sequence (3 sequences per user)")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    ckpt = Checkpoint(resolve_model(args.model))
    fused = UpperEncoder.from_checkpoint(ckpt, args.lower).eval()
    separate = unfused(fused).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, args.behaviors + 1, (args.users * 3,), generator=gen).tolist() + [1] * args.users
    offsets = offsets_from_lengths(torch.tensor(lengths))
    x = torch.randn(sum(lengths), ckpt.hidden_size, generator=gen)
    max_len = max(lengths)
    times = {"separate": [], "fused": []}
    ratios = []
    with torch.inference_mode(), ops.use_backend("torch"):
        outputs = {name: model.forward_packed(x, offsets, max_len) for name, model in
                   (("separate", separate), ("fused", fused))}  # also the warm-up
        for _ in range(args.reps):
            rep = {}
            for name, model in (("separate", separate), ("fused", fused)):
                start = time.perf_counter()
                model.forward_packed(x, offsets, max_len)
                rep[name] = time.perf_counter() - start
                times[name].append(rep[name])
            ratios.append(rep["separate"] / rep["fused"])
    diff = float((outputs["fused"] - outputs["separate"]).norm() / outputs["separate"].norm())
    print(f"{args.model}: {len(fused.layers)} upper layers, T={sum(lengths)} rows, d={ckpt.hidden_size}, "
          f"{torch.get_num_threads()} threads, {args.reps} interleaved reps")
    for name, values in times.items():
        print(f"  {name:9s} median {statistics.median(values) * 1e3:8.2f} ms")
    print(f"  median ratio separate / fused: {statistics.median(ratios):.3f}   output rel. diff {diff:.2e}")


if __name__ == "__main__":
    main()
