"""BAHE vs the raw-token LLM on the same backbone and head: scoring time and peak memory as the
behaviors per sequence M grow, training time and memory, and the offline ABE cost and its break-even.

    python -m bench.compare                # default: under 10 minutes on 2 CPU cores
    python -m bench.compare --large        # more users, repetitions and training examples
    python -m bench.compare --threads 1    # one torch thread (steadier when other jobs share the CPU)
    bahe bench [the same flags]

Scoring. Synthetic users over the data set's behavior texts (MovieLens-100K: 1,682 movie texts), the
same users for both sides: n sequences (MovieLens: liked, disliked, watched) of M behaviors each,
drawn uniformly with a fixed seed, and one candidate item per user. Both sides go texts in ->
probabilities out:
- BAHE: `BAHEScorer.score` (table lookup -> gather -> upper layers over n*M + 1 behavior positions per
  user -> pooling -> head);
- raw-token: the forward of `RawTokenCTR.from_scorer`, the scorer's own modules (lower layers, upper
  layers, empty-sequence vectors, head): each sequence's texts concatenated (most recent first, ' ; ') and
  tokenized (inside the timed region, as BAHE's lookup is), then ALL layers over M x t tokens.
The sides alternate repetition by repetition in one process (BAHE first on even repetitions, raw
first on odd ones); ratios are raw / BAHE of medians from that run. The raw side stops at the first
M whose longest sequence needs more tokens than the model has positions (BERT: 512), or once a
repetition takes longer than --raw-budget seconds; BAHE goes on to 10,000 behaviors per sequence.
Users per batch shrink as M grows (at most --users, about --positions behavior positions per batch). The
measurements live in engine.training.studies.scaling; this script runs them and writes bench/report.py's outputs.

Memory: engine.training.studies.memory.PeakMemory, as in the demo: peak RSS during the call on the CPU
(tightened by the kernel's exact high-water mark where /proc/self/clear_refs allows resetting it;
freed heap is returned to the OS with malloc_trim before each measurement);
torch.cuda.max_memory_allocated on CUDA. 'added'
is the peak minus the level before the call (the working memory of the call): ratios use it.

Offline cost: ABE encoding of every unique behavior text, its throughput, the dedup (behavior events
in the log vs unique table rows) and the break-even: after how many scored users the one-off ABE
cost is repaid by the per-user saving (raw - BAHE) at each common M.

Training: one epoch of `engine.training.loops.train.fit` for BAHE and the raw-token baseline on the same fixed
subset of the data set's train examples (the paper's own table compares training time and memory).

Outputs (under --out-dir, default bench/results): compare.json (every number of the run),
compare.csv (one row per (side, M), appended, labeled with the machine and time, so runs on
different machines sit side by side), scaling-<model>.png (log-log time and memory vs M); and the section
of --results-md (bench/RESULTS.md) between `<!-- bench:compare:<model> -->` and `<!-- /bench -->`. Another
--data than MovieLens-100K adds its name: compare-<data>.json, scaling-<model>-<data>.png and
`bench:compare:<model>:<data>`.
Kernel-level timings: `python -m bench.kernels`; latency suites: `pytest bench/ --benchmark-only`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.report import plot, report_lines, summary, write_csv
from engine.serving.scorer import resolve_device
from engine.training.studies.experiment import ScorerSetup, load_data
from engine.training.studies.results_sections import machine as machine_label, write_section
from engine.training.studies.scaling import (RawTokenSide, ScalingConfig, break_even_users, compare_training, offline_cost,
                                     slopes, sweep)

log = logging.getLogger(__name__)

MARKER = "bench:compare:{model}"  # <!-- bench:compare:<model>[:<data>] --> ... <!-- /bench --> of RESULTS.md


@dataclass
class CompareConfig(ScalingConfig):
    """One benchmark run (engine.training.studies.scaling.ScalingConfig) and where its outputs go."""
    out_dir: Path = Path("bench/results")
    results_md: Path | None = Path("bench/RESULTS.md")
    large: bool = False


LARGE = dict(users=64, positions=24576, reps=5, point_budget=300.0, raw_budget=600.0, train_examples=1024,
             val_examples=128, train_reps=2)


def run(config: CompareConfig, command: str = "python -m bench.compare") -> dict:
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    load = os.getloadavg()[0]
    machine = f"{machine_label()}, load average {load:.1f} at start"
    print(f"machine: {machine}", flush=True)
    oversubscribed = device.type == "cpu" and torch.get_num_threads() > 1 and load >= 1
    if oversubscribed:
        log.warning("load average %.1f: other jobs share the CPU, and %d torch threads will be oversubscribed "
                    "(several-fold slower, noisier); consider --threads 1", load, torch.get_num_threads())
    data = load_data(config.data)
    texts = data.item_id_texts
    scorer = config.bahe_scorer(data)
    ckpt = scorer.checkpoint
    raw = RawTokenSide(scorer, config.max_tokens)
    n = len(scorer.config.model.sequence_names)
    print(f"model {config.model}: {ckpt.num_layers} layers ({config.lower_layers} lower), hidden {ckpt.hidden_size}, "
          f"raw side limited to {raw.positions} positions per sequence; {n} sequences per user", flush=True)
    cost = offline_cost(scorer, data, texts)
    print(f"ABE: {cost.unique_behaviors:,} unique behaviors in {cost.seconds:.1f} s ({cost.per_second:,.0f}/s); "
          f"{cost.behavior_events:,} behavior events -> {cost.dedup_ratio:,.0f}x dedup", flush=True)
    points = sweep(config, scorer, raw, texts)
    fitted = slopes(points)
    for name, value in fitted.items():
        print(f"log-log slope, {name}: {value:.2f}")
    for p in points:
        if p.common:
            print(f"break-even at M={p.m}: {break_even_users(cost.seconds, p):,.0f} users")
    training, train_examples = None, 0
    if config.train:
        del raw
        training, train_examples = compare_training(config, data, ckpt, device)
    elapsed = time.perf_counter() - started
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    model_name = Path(config.model).name  # an embedded name (no slash) is its own name
    on = "" if config.data == "movielens" else f"-{Path(config.data).stem}"  # the default data set: no suffix
    png = config.out_dir / f"scaling-{model_name}{on}.png"
    plot(points, png, f"BAHE vs raw-token LLM ({config.model}) - {machine}")
    write_csv(config.out_dir / "compare.csv", points, machine, run_id, torch.get_num_threads())
    result = summary(config, command, machine, run_id, elapsed, points, fitted, cost, training, train_examples)
    (config.out_dir / f"compare{on}.json").write_text(json.dumps(result, indent=1, default=float))
    if config.results_md is not None:
        link = os.path.relpath(png, config.results_md.resolve().parent if config.results_md.is_absolute()
                               else config.results_md.parent)
        marker = MARKER.format(model=model_name) + on.replace("-", ":", 1)
        write_section(config.results_md, marker, report_lines(config, command, machine, points, fitted, cost,
                                                              training, train_examples, elapsed, link, n,
                                                              oversubscribed))
        print(f"wrote {config.results_md} (section <!-- {marker} -->)")
    print(f"wrote {png}, {config.out_dir / f'compare{on}.json'}, {config.out_dir / 'compare.csv'}; "
          f"{elapsed / 60:.1f} min in all")
    return result


def build_parser() -> argparse.ArgumentParser:
    d = CompareConfig()
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ScorerSetup.add_arguments(p, d)
    p.add_argument("--ms", type=int, nargs="+", default=list(d.ms), help="behaviors per sequence to sweep")
    p.add_argument("--users", type=int, default=None, help=f"most users per batch (default {d.users}; "
                   f"--large: {LARGE['users']})")
    p.add_argument("--positions", type=int, default=None, help="behavior positions per BAHE batch, about")
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions per side and M (default {d.reps})")
    p.add_argument("--point-budget", type=float, default=None, help="seconds per M before repetitions stop")
    p.add_argument("--raw-budget", type=float, default=None, help="raw side stops after a repetition this long")
    p.add_argument("--no-train", action="store_true", help="skip the training comparison")
    p.add_argument("--train-examples", type=int, default=None)
    p.add_argument("--val-examples", type=int, default=None)
    p.add_argument("--train-behaviors", type=int, default=d.train_behaviors)
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    p.add_argument("--large", action="store_true",
                   help="bigger sizes: " + ", ".join(f"{k}={v}" for k, v in LARGE.items()))
    p.add_argument("--out-dir", type=Path, default=d.out_dir)
    p.add_argument("--results-md", default=str(d.results_md), help="markdown file to update ('' to skip)")
    return p


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    config = CompareConfig(**ScorerSetup.options(args), ms=tuple(sorted(set(args.ms))), train=not args.no_train,
                           train_behaviors=args.train_behaviors, train_batch_size=args.train_batch_size,
                           out_dir=args.out_dir, results_md=Path(args.results_md) if args.results_md else None,
                           large=args.large)
    if args.large:
        config = replace(config, **LARGE)
    given = {"users": args.users, "positions": args.positions, "reps": args.reps, "point_budget": args.point_budget,
             "raw_budget": args.raw_budget, "train_examples": args.train_examples, "val_examples": args.val_examples}
    return replace(config, **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING)
    config = config_from_args(build_parser().parse_args(argv))
    return run(config, " ".join(["python -m bench.compare", *argv]))


if __name__ == "__main__":
    main()
