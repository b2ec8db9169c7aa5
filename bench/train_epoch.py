"""Seconds per training epoch of BAHE's full model, extrapolated from its first batches, phase by phase.

    python -m bench.train_epoch --data ml1m --lower-layers 5 [--batches 200] [--threads 2] [--profile 30]

The run `bahe train` makes (the same scorer config: whole histories up to --max-behaviors, every categorical
feature; the same time split, batch size, optimizer and epoch order), cut to the first --batches batches of the
first epoch: each batch's time is split into prepare (the timeline batch on the host), forward, backward and
the optimizer step, and the epoch's seconds are the batches' mean times the epoch's batch count (the epoch
order is users in random order, so the first batches are a random sample of them). The heads' BatchNorm is
calibrated on --norm-batches batches first, as `fit` does (not counted). --profile K: cProfile's K most
expensive functions (cumulative) over the timed batches. Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.training.data.example_features import log_categorical_features
from engine.training.loops.ctr_models import BAHECTR
from engine.training.loops.train import TrainConfig, calibrate_norms, make_optimizer
from engine.training.studies.experiment import build_scorer, cpu_threads, load_data
from engine.training.studies.memory import PeakMemory
from engine.training.studies.results_sections import machine

PHASES = ("prepare", "forward", "backward", "step")


def timed_batches(model: BAHECTR, data, chunks: list[np.ndarray], config: TrainConfig) -> dict[str, list[float]]:
    """Train on `chunks` as `fit` does; [wall, CPU] seconds spent in each phase (PHASES), summed over the chunks."""
    optimizer, trainable = make_optimizer(model, config)
    model.train()
    spent = {phase: [0.0, 0.0] for phase in PHASES}
    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731
    for chunk in chunks:
        marks = [clock()]
        batch = model.prepare(data, chunk)
        labels = torch.from_numpy(data.label[chunk].astype(np.float32))
        marks.append(clock())
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch), labels)
        loss.item()
        marks.append(clock())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(clock())
        nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        marks.append(clock())
        for phase, before, after in zip(PHASES, marks, marks[1:]):
            spent[phase][0] += after[0] - before[0]
            spent[phase][1] += after[1] - before[1]
    return spent


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench.train_epoch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="ml1m", help="'movielens', 'ml1m' or a log file (engine.training.studies."
                   "experiment.load_data)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--lower-layers", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-behaviors", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=200, help="timed batches of the first epoch")
    p.add_argument("--norm-batches", type=int, default=8, help="BatchNorm calibration batches first (not timed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", type=int, default=0, help="print cProfile's K most expensive functions")
    p.add_argument("--work-dir", type=Path, default=Path("artifacts/bench"), help="cached behavior tables")
    args = p.parse_args(argv)
    with cpu_threads(args.threads):
        data = load_data(args.data)
        config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=args.lower_layers, max_tokens=args.max_tokens),
                              model=ModelConfig(sequence_names=data.sequence_names, max_behaviors=args.max_behaviors,
                                                categorical_features=log_categorical_features("all", data)))
        tables = args.work_dir / f"tables-{Path(args.data).name}-{Path(args.model).name}-L{args.lower_layers}"
        torch.manual_seed(args.seed)
        scorer, _ = build_scorer(args.model, data, config, tables, device="cpu", progress=False)
        model = BAHECTR(scorer, data)
        train = dict(data.split().items())["train"]
        train_config = TrainConfig(batch_size=args.batch_size, seed=args.seed)
        order = model.epoch_order(train, data, np.random.default_rng(args.seed))
        chunks = [order[i:i + args.batch_size] for i in range(0, order.size, args.batch_size)]
        calibrate_norms(model, data, chunks[:args.norm_batches], torch.device("cpu"))
        timed = chunks[:args.batches]
        profiler = cProfile.Profile() if args.profile else None
        with PeakMemory(torch.device("cpu")) as peak:
            start, cpu_start = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            spent = timed_batches(model, data, timed, train_config)
            if profiler:
                profiler.disable()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    scale = len(chunks) / len(timed)
    result = {"data": args.data, "train_examples": int(train.size), "batches_per_epoch": len(chunks),
              "timed_batches": len(timed), "timed_examples": int(sum(c.size for c in timed)),
              "timed_seconds": round(seconds, 2), "epoch_seconds_extrapolated": round(seconds * scale, 1),
              "cpu_seconds_extrapolated": round(cpu_seconds * scale, 1),
              "phase_epoch_seconds": {k: round(v[0] * scale, 1) for k, v in spent.items()},
              "phase_cpu_seconds": {k: round(v[1] * scale, 1) for k, v in spent.items()},
              "peak_rss_gb": round(peak.bytes / 2 ** 30, 2), "added_gb": round(peak.added / 2 ** 30, 2),
              "threads": args.threads, "machine": machine()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
