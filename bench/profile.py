"""One BAHE scoring batch under torch.profiler, stage by stage.

    python -m bench.profile [--users 64] [--m 128] [--threads N] [--out bench/results/profile_trace.json]
    bahe profile [the same flags]

Builds the same scorer and synthetic users as `python -m bench.compare` (tables cached in the work
dir), warms up, then profiles `BAHEScorer.score` on one batch of --users users with --m behaviors in
each sequence. The engine wraps every stage in a named range (engine/model/stages.py: a
torch.profiler.record_function, plus an NVTX range on CUDA for Nsight): bahe.lookup, bahe.gather,
bahe.upper_layers, bahe.pooling, bahe.head. Writes a Chrome trace (open in chrome://tracing or
https://ui.perfetto.dev; not committed) and prints each stage's share of the scoring call.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from engine.training.studies.experiment import ScorerSetup, load_data
from engine.training.studies.results_sections import machine
from engine.training.studies.scaling import synthetic_users
from engine.model.stages import PREFIX, STAGES

TOTAL = PREFIX + "score"


@dataclass
class StageTime:
    name: str
    cpu_ms: float     # wall time of the range on the host
    device_ms: float  # kernel time attributed to the range (CUDA only)


def stage_times(prof: profile) -> dict[str, StageTime]:
    """Total time of each named range (summed over its calls), by name without the prefix."""
    wanted = {PREFIX + s for s in STAGES} | {TOTAL}
    out = {}
    for event in prof.key_averages():
        if event.key in wanted:
            device_us = getattr(event, "device_time_total", 0.0) or 0.0
            out[event.key.removeprefix(PREFIX)] = StageTime(event.key.removeprefix(PREFIX),
                                                            event.cpu_time_total / 1e3, device_us / 1e3)
    return out


def main(argv: list[str] | None = None) -> dict[str, StageTime]:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ScorerSetup.add_arguments(p, ScorerSetup())
    p.add_argument("--users", type=int, default=64, help="users in the profiled batch")
    p.add_argument("--m", type=int, default=128, help="behaviors per sequence")
    p.add_argument("--out", type=Path, default=Path("bench/results/profile_trace.json"), help="Chrome trace")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    setup = ScorerSetup(**ScorerSetup.options(args))
    data = load_data(setup.data)
    texts = data.item_id_texts
    scorer = setup.scorer(data, max_behaviors=args.m, batch_size=args.users)
    users, items = synthetic_users(texts, scorer.config.model.sequence_names, args.m, args.users, args.seed)
    scorer.score(users, items)  # warm-up (and, on CUDA, kernel compilation)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if scorer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function(TOTAL):
            scorer.score(users, items)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out))

    times = stage_times(prof)
    total = times[TOTAL.removeprefix(PREFIX)].cpu_ms
    on_cuda = scorer.device.type == "cuda"
    n = len(scorer.config.model.sequence_names)
    print(f"machine: {machine()}")
    print(f"profiled BAHEScorer.score: {args.users} users x {n} sequences x {args.m} behaviors on "
          f"{scorer.device.type}, {total:.1f} ms in all")
    print(f"{'stage':<14} {'ms':>9} {'share':>7}" + (f" {'GPU ms':>9}" if on_cuda else ""))
    for name in STAGES:
        t = times.get(name, StageTime(name, 0.0, 0.0))
        print(f"{name:<14} {t.cpu_ms:>9.2f} {t.cpu_ms / total:>7.1%}" + (f" {t.device_ms:>9.2f}" if on_cuda else ""))
    rest = total - sum(times[s].cpu_ms for s in STAGES if s in times)
    print(f"{'other':<14} {rest:>9.2f} {rest / total:>7.1%}  (parsing texts, batching, sigmoid, copies out)")
    if on_cuda:
        print("on CUDA the host ranges end at launch; the GPU column is the kernel time inside each range")
    print(f"Chrome trace: {args.out} (chrome://tracing or https://ui.perfetto.dev)")
    return times


if __name__ == "__main__":
    main()
