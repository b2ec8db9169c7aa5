"""The demo's headline rows over several seeds (`python -m bench.seeds`): per seed and split, BAHE's
full CTR model, its no-text ablation and gradient boosting (`demo.run_split`; the seed draws the scorer's
new weights, the ablation's, the data order and dropout, and is the boosting's random_state, which its fit
ignores on MovieLens, so that row repeats), each test AUC with its user-bootstrap interval, and the paired
differences BAHE - ablation and BAHE - boosting. Across seeds: mean and sample standard deviation."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from engine.training.data.log import BehaviorLog
from engine.training.studies.demo import (PAIRED_BASELINES, DemoConfig, DemoRow, demo_scorer, demo_splits, initial_weights,
                                  paired_differences, run_split, verdict)
from engine.training.studies.experiment import load_data
from engine.training.studies.metrics import Interval

MODELS = ("BAHE", *PAIRED_BASELINES)


@dataclass
class SeedRun:
    seed: int
    rows: list[DemoRow]                         # per split: BAHE, the ablation, gradient boosting
    paired: list[tuple[str, str, Interval]]     # (split, other, AUC(BAHE) - AUC(other))

    def auc(self, split: str, name: str) -> Interval:
        return next(r.auc for r in self.rows if r.split == split and r.name == name)

    def difference(self, split: str, other: str) -> Interval:
        return next(d for s, o, d in self.paired if s == split and o == other)


@dataclass
class SeedsResult:
    runs: list[SeedRun]
    splits: dict[str, dict[str, int]]           # split -> part -> examples
    elapsed: float


def run_seeds(config: DemoConfig, seeds: Sequence[int]) -> SeedsResult:
    """`run_split` on every split of `config.splits` for each seed, the scorer's new weights drawn from it
    (tables built once in `config.out / 'tables'`)."""
    started = time.perf_counter()
    data = load_data(config.data)
    splits = demo_splits(data, config.splits)
    runs = []
    for seed in seeds:
        seeded = replace(config, seed=seed, extra_baselines=False)
        scorer, _ = demo_scorer(seeded, data)
        initial = initial_weights(scorer)
        rows = [row for name, split in splits.items() for row in run_split(name, data, split, scorer, initial, seeded)]
        runs.append(SeedRun(seed, rows, paired_differences(rows, data, {n: s["test"] for n, s in splits.items()})))
    sizes = {name: {part: int(r.size) for part, r in split.items()} for name, split in splits.items()}
    return SeedsResult(runs, sizes, time.perf_counter() - started)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _pm(values: Sequence[float], signed: bool = False) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:{'+' if signed else ''}.4f} ± " + ("-" if np.isnan(sd) else f"{sd:.4f}")


def _mean_sd_json(values: Sequence[float]) -> dict:
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": None if np.isnan(sd) else sd}


def _cell(i: Interval, signed: bool = False) -> str:
    f = "+.4f" if signed else ".4f"
    return f"{i.value:{f}} [{i.low:{f}}, {i.high:{f}}]"


def table_lines(result: SeedsResult) -> list[str]:
    """Two markdown tables: the test AUCs per seed with mean ± sd, then the paired differences per seed."""
    runs, splits = result.runs, list(result.splits)
    seeds = " | ".join(f"seed {r.seed}" for r in runs)
    rule = "|---" * (len(runs) + 3) + "|"
    lines = [f"| split | model | {seeds} | mean ± sd |", rule]
    for split in splits:
        for name in MODELS:
            aucs = [r.auc(split, name) for r in runs]
            lines.append(f"| {split} | {name} | " + " | ".join(_cell(a) for a in aucs)
                         + f" | {_pm([a.value for a in aucs])} |")
    lines += ["", f"| split | paired difference | {seeds} | mean ± sd | seeds above 0 |", rule + "---|"]
    for split in splits:
        for other in PAIRED_BASELINES:
            diffs = [r.difference(split, other) for r in runs]
            above = sum(verdict(d) == "above 0" for d in diffs)
            lines.append(f"| {split} | AUC(BAHE) - AUC({other}) | " + " | ".join(_cell(d, True) for d in diffs)
                         + f" | {_pm([d.value for d in diffs], True)} | {above} of {len(diffs)} |")
    return lines


def summary(result: SeedsResult, config: DemoConfig, command: str, machine: str) -> dict:
    """Every number of the run, as written to the JSON file."""
    def interval(i: Interval) -> dict:
        return {"value": i.value, "low": i.low, "high": i.high, "users": i.users}

    splits = list(result.splits)
    return {
        "command": command, "machine": machine, "elapsed_s": result.elapsed,
        "config": {"model": config.model, "data": config.data, "lower_layers": config.num_lower_layers,
                   "max_behaviors": config.max_behaviors, "epochs": config.epochs, "batch_size": config.batch_size},
        "splits": result.splits,
        "seeds": [{"seed": r.seed,
                   "rows": [{"split": row.split, "model": row.name, "train_examples": row.train_examples,
                             "auc": interval(row.auc), "logloss": row.logloss, "s_per_epoch": row.train_seconds}
                            for row in r.rows],
                   "paired": [{"split": s, "other": o, "difference": interval(d)} for s, o, d in r.paired]}
                  for r in result.runs],
        "mean_sd": {split: {name: _mean_sd_json([r.auc(split, name).value for r in result.runs]) for name in MODELS}
                    for split in splits},
        "paired_mean_sd": {split: {other: _mean_sd_json([r.difference(split, other).value for r in result.runs])
                                   for other in PAIRED_BASELINES} for split in splits},
    }


def run_ml1m_seeds(config: DemoConfig, seeds: Sequence[int], threads: int | None = None,
                   splits: Sequence[str] = ("time",), data: BehaviorLog | None = None,
                   models: Sequence[str] = ()) -> tuple[list, float]:
    """The ML-1M demo's headline rows (`models`, default its --quick set: BAHE, the sequential id model, both
    LightGBM rows; no top-10 lists) on `splits` once per seed: ([(seed, Ml1mRun)], seconds). The log (`data`, else
    loaded) is read once."""
    from engine.training.studies.demo_ml1m import Ml1mConfig, run_ml1m
    started = time.perf_counter()
    data = load_data(config.data) if data is None else data
    runs = [(seed, run_ml1m(Ml1mConfig(replace(config, seed=seed), quick=True, overlap_users=0, threads=threads,
                                          splits=tuple(splits), models=tuple(models)),
                            data)) for seed in seeds]
    return runs, time.perf_counter() - started


def ml1m_seed_lines(runs: list, labels: np.ndarray, users: np.ndarray, split: str = "time") -> list[str]:
    """On `split`, per model: AUC and GAUC per seed with mean ± sd; then BAHE's paired AUC and GAUC differences to
    each peer per seed."""
    from engine.training.studies.metrics import paired_auc_difference, paired_gauc_difference
    seeds = " | ".join(f"seed {seed}" for seed, _ in runs)
    rule = "|---" * (len(runs) + 3) + "|"
    names = [r.row.name for r in runs[0][1].results if r.row.split == split]
    lines = [f"| model | metric | {seeds} | mean ± sd |", rule]
    for name in names:
        rows = [next(r for r in run.results if r.row.name == name and r.row.split == split) for _, run in runs]
        lines.append(f"| {name} | AUC | " + " | ".join(_cell(r.row.auc) for r in rows)
                     + f" | {_pm([r.row.auc.value for r in rows])} |")
        lines.append(f"| {name} | GAUC | " + " | ".join(_cell(r.gauc) for r in rows)
                     + f" | {_pm([r.gauc.value for r in rows])} |")
    lines += ["", f"| paired difference | {seeds} | mean ± sd | seeds above 0 |", "|---" * (len(runs) + 3) + "|"]
    for metric, paired in (("AUC", paired_auc_difference), ("GAUC", paired_gauc_difference)):
        for other in (n for n in names if n != "BAHE"):
            diffs = []
            for _, run in runs:
                test = run.splits[split]["test"]
                mine = {r.row.name: r.row.probs for r in run.results if r.row.split == split}
                diffs.append(paired(labels[test], mine["BAHE"], mine[other], users[test]))
            above = sum(verdict(d) == "above 0" for d in diffs)
            lines.append(f"| {metric}(BAHE) - {metric}({other}) | " + " | ".join(_cell(d, True) for d in diffs)
                         + f" | {_pm([d.value for d in diffs], True)} | {above} of {len(diffs)} |")
    return lines
