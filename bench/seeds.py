"""The demo's headline rows over several seeds: BAHE's full model, its no-text ablation and gradient
boosting on the time and per-user splits, per seed with 95% user-bootstrap intervals, mean ± sd over
seeds and the paired differences per seed (engine.training.studies.seed_runs).

    python -m bench.seeds                            # minilm, seeds 0 1 2, both splits, 3 epochs
    python -m bench.seeds --splits time --seeds 0 1 2 3 4 --threads 2
    python -m bench.seeds --data ml1m                # MovieLens-1M: the demo's --quick rows (BAHE, sequential
                                                     # id, both LightGBM rows; time split), AUC and GAUC, 2 epochs
    python -m bench.seeds --data ml1m --splits per-user --seeds 1 2   # the same rows on the per-user split
    python -m bench.seeds --data ml1m --models BAHE 'sequential id' 'LightGBM, side features' \
        'LightGBM, side + text features' 'CTR model without text'     # + the no-LLM ablation (finished rows reused)

Outputs: the section `<!-- bench:seeds:<model> -->` of --results-md (bench/RESULTS.md) and seeds-<model>.json
(every number) under --out-dir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from engine.training.studies.demo import DemoConfig
from engine.training.studies.experiment import cpu_threads, is_movielens_1m
from engine.training.studies.results_sections import machine as machine_label, write_section
from engine.training.studies.seed_runs import ml1m_seed_lines, run_ml1m_seeds, run_seeds, summary, table_lines
from weights.registry import EMBEDDED

MARKER = "bench:seeds:{model}"  # the section <!-- bench:seeds:<model> --> ... <!-- /bench --> of RESULTS.md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    DemoConfig.add_arguments(p, epochs=DemoConfig.epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--splits", nargs="+", choices=["time", "per-user"], default=list(DemoConfig.splits))
    p.add_argument("--models", nargs="+", default=[], help="with --data ml1m: these rows (names as in the demo's "
                   "table; default its --quick set: BAHE, 'sequential id' and both LightGBM rows)")
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    command = "python -m bench.seeds " + shlex.join(argv)  # quoted: model names hold spaces
    if is_movielens_1m(args.data):
        return ml1m_main(args, command)
    config = DemoConfig.from_args(args, splits=tuple(args.splits))
    with cpu_threads(args.threads):
        machine = machine_label()  # with the threads the run uses
        result = run_seeds(config, args.seeds)
    name = Path(config.model).name
    js = args.out_dir / f"seeds-{name}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    numbers = summary(result, config, command, machine)
    js.write_text(json.dumps(numbers, indent=1))
    table = table_lines(result)
    print("\n".join(table))
    if config.results is not None:
        sizes = "; ".join(f"{split}: " + ", ".join(f"{part} {n:,}" for part, n in parts.items())
                          for split, parts in result.splits.items())
        write_section(config.results, MARKER.format(model=name), [
            f"### Headline rows over seeds {', '.join(map(str, args.seeds))}: "
            f"{EMBEDDED.get(config.model, f'local checkpoint {config.model}')}", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {machine}; {result.elapsed / 60:.1f} min in all.",
            f"Data: {config.data}, all examples ({sizes}); {config.num_lower_layers} lower layers frozen, "
            f"M = {config.max_behaviors:,}, {config.epochs} epoch(s) (early stopping on validation AUC). Each seed "
            "draws BAHE's new weights, the ablation's, the data order and dropout; gradient boosting gets it as "
            "random_state, which its fit does not use when given a validation set and fewer than 200,000 rows (so "
            "its AUC repeats across seeds). "
            "Cells: test AUC [95% bootstrap interval over test users]; mean ± sample sd over seeds.", "", *table])
        print(f"wrote {config.results} (section <!-- {MARKER.format(model=name)} -->)")
    print(f"wrote {js}; {result.elapsed / 60:.1f} min in all")
    return numbers


def ml1m_main(args: argparse.Namespace, command: str) -> dict:
    """`--data ml1m`: the ML-1M demo's headline rows over the seeds (engine.training.studies.seed_runs), on the time
    split unless --splits names others; one RESULTS.md section per split."""
    from engine.training.studies.experiment import load_data
    from engine.training.studies.demo_ml1m import ML1M_TRAINING
    from engine.training.studies.demo_ml1m_report import cold_table
    epochs = args.epochs if "--epochs" in command else ML1M_TRAINING["epochs"]
    splits = args.splits if "--splits" in command else ["time"]
    config = replace(DemoConfig.from_args(args), **{**ML1M_TRAINING, "epochs": epochs},
                     out=args.work_dir or Path("artifacts/demo") / f"ml1m-{Path(args.model).name}")
    data = load_data(config.data)
    with cpu_threads(args.threads):
        machine = machine_label()
        runs, elapsed = run_ml1m_seeds(config, args.seeds, args.threads, splits, data, args.models)
    numbers = {"command": command, "machine": machine, "elapsed_s": elapsed,
               "rows": [{"seed": seed, "split": r.row.split, "model": r.row.name, "auc": r.row.auc.value,
                         "gauc": r.gauc.value, "logloss": r.row.logloss, "s_per_epoch": r.row.train_seconds,
                         "wall_s": r.wall_seconds} for seed, run in runs for r in run.results]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"seeds-ml1m-{Path(config.model).name}.json").write_text(json.dumps(numbers, indent=1))
    for split in splits:
        table = ml1m_seed_lines(runs, data.label, data.user, split)
        print(f"{split} split:\n" + "\n".join(table))
        if config.results is None:
            continue
        marker = MARKER.format(model=Path(config.model).name) + ":ml1m" + ("" if split == "time" else f":{split}")
        rule = ("Time split (cuts at the 80% and 90% quantiles of event timestamps; history: strictly earlier seconds)"
                if split == "time" else "Per-user split (each user's last 10% of examples test, the 10% before "
                "validation; history: strictly earlier seconds)")
        write_section(config.results, marker, [
            f"### MovieLens-1M headline rows over seeds {', '.join(map(str, args.seeds))}, {split} split", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {machine}; {elapsed / 60:.1f} min in all.",
            f"{rule}, all training examples, {config.epochs} epoch(s) for the neural models; each seed draws new "
            "weights, data order and LightGBM's seed. Cells: test AUC or GAUC [95% bootstrap interval over test "
            "users].", "", *table, "", "Cold items: the test examples whose item had few training examples.",
            *(line for seed, run in runs for line in ["", f"Seed {seed}:", "", *cold_table(run, split)])])
        print(f"wrote {config.results} (section <!-- {marker} -->)")
    return numbers


if __name__ == "__main__":
    main()
