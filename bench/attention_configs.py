"""Sweep of the varlen attention kernel's tile configs on CUDA: which (block_m, block_n, warps, stages)
is fastest per head shape, dtype and mask, beside the named config kernels/varlen_attention.py uses.

    python -m bench.attention_configs [--dtype bfloat16|float32] [--reps N] [--csv results.csv]

The same ragged batch and head shapes as bench.kernels (ATTENTION_HEADS); medians of --reps calls timed
with CUDA events, TFLOP/s from the useful FLOPs (4 H Dh x attended pairs). A config that fails to compile
(shared memory) is printed as such. Update ATTN_CONFIGS from the "fastest" rows.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from bench.kernels import CUDA_SHAPES, Shapes, attention_cases, ragged, timings
from engine.training.studies.results_sections import append_csv, machine
from kernels.varlen_attention import AttentionConfig, attention_config

# Candidates (block_m, block_n, warps, stages), after the Triton tutorials' Hopper configs.
SWEEP_CONFIGS = tuple(AttentionConfig(*c) for c in ((64, 32, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3),
                                                    (128, 64, 4, 2), (128, 128, 8, 2)))


def sweep_attention_configs(shapes: Shapes, device: torch.device, reps: int) -> list[dict]:
    """Time the Triton attention under every SWEEP_CONFIGS config (and the named default) per head shape and
    mask; print one line each, the fastest marked. -> rows for --csv."""
    gen = torch.Generator().manual_seed(0)
    a_off = ragged(shapes.attn_sequences, shapes.attn_mean_length, device, gen)
    rows, label = [], machine()
    for h, hkv, dh in shapes.attn_heads:
        named = attention_config(shapes.dtype, dh)
        timed = {}
        for config in (named, *(c for c in SWEEP_CONFIGS if c != named)):
            for case in attention_cases(a_off, h, hkv, dh, shapes.dtype, device, config=config):
                try:
                    ms = timings(case.providers["triton"], device, reps)[1] * 1e3
                except Exception as err:  # noqa: BLE001 - a config that does not compile (shared memory) is a row
                    print(f"  {case.op} {case.shape} {config}: failed ({type(err).__name__}: {str(err)[:80]})")
                    continue
                timed[(case.op, config)] = (ms, case)
        for op in ("varlen_attention causal", "varlen_attention bidir"):
            results = sorted((ms, config, case) for (o, config), (ms, case) in timed.items() if o == op)
            for ms, config, case in results:
                best = "fastest" if (ms, config) == results[0][:2] else ""
                tflops = case.flops / ms / 1e9
                print(f"{op:<24} bm={config.block_m:<3} bn={config.block_n:<3} warps={config.num_warps} "
                      f"stages={config.num_stages} {ms:>8.3f} ms {tflops:>6.1f} TFLOP/s "
                      f"{'(named)' if config == named else '':<7} {best}  {case.shape}")
                rows.append({"kernel": op, "provider": f"triton {config}", "shape": case.shape, "p50_ms": ms,
                             "achieved": tflops, "unit": "TFLOP/s", "machine": label})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=None, help="append one row per (op, config) to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.attention_configs times Triton kernels: it needs a CUDA device")
    print(f"machine: {machine()}")
    shapes = dataclasses.replace(CUDA_SHAPES, dtype=getattr(torch, args.dtype))
    rows = sweep_attention_configs(shapes, torch.device("cuda"), args.reps)
    if args.csv and rows:
        append_csv(args.csv, list(rows[0]), rows)


if __name__ == "__main__":
    main()
