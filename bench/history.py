"""Test AUC vs the behaviors per sequence M on the time split: BAHE's full model on every training
example at each M, and the raw-token LLM beside BAHE's text part on a fixed subset while M behaviors'
tokens fit the backbone's positions (engine.training.studies.length_sweep).

    python -m bench.history                          # minilm, M in 5 10 20 50 100 200 all, 2 epochs
    python -m bench.history --model smollm2 --ms 5 20 all --threads 2
    python -m bench.history --data ml1m --ms 5 20 100 all --raw-train-examples 0 --threads 1
                                                     # MovieLens-1M with its demo's training (ML1M_TRAINING)

Outputs: the section `<!-- bench:history:<model> -->` (MovieLens-1M: `<model>-ml1m`) of --results-md
(bench/RESULTS.md), the plot history-<model>.png (AUC vs M, log x, 95% interval bands) and history-<model>.json
(every number) under --out-dir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from engine.training.studies.demo import DemoConfig
from engine.training.studies.experiment import cpu_threads, is_movielens_1m, ml1m_suffix
from engine.training.studies.length_sweep import (DEFAULT_MS, parse_m, plot, raw_stop_line, run_history, summary,
                                                  table_lines)
from engine.training.studies.results_sections import machine as machine_label, write_section
from weights.registry import EMBEDDED

MARKER = "bench:history:{model}"  # the section <!-- bench:history:<model> --> ... <!-- /bench --> of RESULTS.md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    DemoConfig.add_arguments(p, epochs=2)
    p.add_argument("--ms", nargs="+", default=list(DEFAULT_MS), help="behaviors per sequence ('all': 1024)")
    p.add_argument("--raw-train-examples", type=int, default=None,
                   help="raw-token subset, training examples (None: the model's preset, minilm 600; 0: skip)")
    p.add_argument("--raw-test-examples", type=int, default=None,
                   help="raw-token subset, validation and test examples each (None: the preset, minilm 1000)")
    return p


def output_name(model: str, data: str) -> str:
    """The name of a sweep's section and files: the model's, with '-ml1m' for MovieLens-1M (its own section)."""
    return Path(model).name + ml1m_suffix(data)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    raw = {k: v for k, v in (("raw_train_examples", args.raw_train_examples),
                             ("raw_test_examples", args.raw_test_examples)) if v is not None}
    if is_movielens_1m(args.data):  # the ML-1M demo's learning-rate decay and id rows; the raw subset as asked
        from engine.training.studies.demo_ml1m import ML1M_TRAINING
        raw = {"lr_decay": ML1M_TRAINING["lr_decay"], "id_rows": ML1M_TRAINING["id_rows"], **raw}
    config = DemoConfig.from_args(args, **raw)
    ms = [parse_m(m) for m in args.ms]
    command = "python -m bench.history " + shlex.join(argv)
    with cpu_threads(args.threads):
        machine = machine_label()  # with the threads the run uses
        result = run_history(config, ms)
    name = output_name(config.model, args.data)
    png, js = args.out_dir / f"history-{name}.png", args.out_dir / f"history-{name}.json"
    model_desc = EMBEDDED.get(config.model, f"local checkpoint {config.model}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(result, png, f"Test AUC vs M, time split ({config.model})")
    numbers = summary(result, config, command, machine)
    js.write_text(json.dumps(numbers, indent=1))
    table = table_lines(result)
    print("\n".join(table) + "\n\n" + raw_stop_line(result))
    if config.results is not None:
        results_md = config.results
        link = os.path.relpath(png.resolve(), results_md.resolve().parent)
        sizes = result.subset_sizes
        write_section(results_md, MARKER.format(model=name), [
            f"### AUC vs behaviors per sequence M: {model_desc}", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {machine}; {result.elapsed / 60:.1f} min in all, "
            f"seed {config.seed}, {config.epochs} epoch(s) (early stopping on validation AUC).",
            f"Time split of {config.data}: BAHE's full model on all {result.train_examples:,} training examples, "
            f"tested on all {result.test_examples:,} test examples; the raw-token LLM and BAHE's text part "
            f"(no side features, same M) on the same subset ({sizes['train']:,} train / {sizes['val']:,} validation "
            f"/ {sizes['test']:,} test examples). M = all: {result.all_behaviors:,} behaviors per sequence, every "
            "user's whole history. AUC and GAUC intervals: 95% bootstrap over test users (1,000 resamples).", "",
            *table, "", raw_stop_line(result), "", f"![AUC vs M]({link})"])
        print(f"wrote {results_md} (section <!-- {MARKER.format(model=name)} -->)")
    print(f"wrote {png}, {js}; {result.elapsed / 60:.1f} min in all")
    return numbers


if __name__ == "__main__":
    main()
