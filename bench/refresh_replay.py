"""Replay or not, measured (docs/refresh.md): MovieLens-100K cut by time into an old period (CURRENT trains
on it) and a new one (`bahe update`'s log). CURRENT is updated without and with replay of older events; each NEXT
and CURRENT are scored on the gate period (the newest events, never trained on) and on the old period's held-out
last 10% (forgetting). One seed; every AUC over the same rows for all versions.

    python -m bench.refresh_replay [--old 0.6] [--replays 0,0.5] [--epochs 2] [--users N] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.serving.scorer import BAHEScorer
from engine.deploy.versions import ScorerVersions
from engine.training.data.example_features import log_categorical_features
from engine.training.data.log import BehaviorLog
from engine.training.loops.ctr_models import BAHECTR
from engine.training.loops.train import TrainConfig, fit, predict
from engine.training.loops.update import GateRule, UpdateConfig, combined_log, update_scorer
from engine.training.studies.experiment import build_scorer, cpu_threads, load_data
from engine.training.studies.metrics import log_loss, paired_auc_difference, roc_auc


def _scores(folder: Path, data: BehaviorLog, rows: np.ndarray) -> np.ndarray:
    scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    return predict(BAHECTR(scorer, data), data, rows, batch_size=256)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="movielens")
    p.add_argument("--model", default="minilm")
    p.add_argument("--lower-layers", type=int, default=5)
    p.add_argument("--old", type=float, default=0.6, help="fraction of events (by time) in the old period")
    p.add_argument("--replays", default="0,0.5", help="replay fractions to compare, joined by ','")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--users", type=int, default=None, help="a random sample of this many users (all: None)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("artifacts/refresh_replay"))
    p.add_argument("--out", type=Path, default=Path("bench/results/refresh_replay.json"))
    args = p.parse_args(argv)
    with cpu_threads(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    log = load_data(args.data).user_sample(args.users, args.seed)
    times = np.sort(log.timestamp)
    cut = int(times[int(args.old * times.size)])
    old, new = log.between(int(times[0]), cut), log.between(cut, int(times[-1]) + 1)
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=args.lower_layers),
                          model=ModelConfig(sequence_names=log.sequence_names,
                                            categorical_features=log_categorical_features("all", log)))
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    scorer, _ = build_scorer(args.model, old, config, work / "tables", device="cpu", progress=False)
    split = old.split()
    bahe = BAHECTR(scorer, old)
    fit(bahe, old, split.train, split.val, TrainConfig(epochs=args.epochs, seed=args.seed, progress=False))
    bahe.store_item_counts(old, split.test_start)
    scorer.save_pretrained(work / "current")
    current_seconds = time.perf_counter() - start
    del bahe, scorer

    data = combined_log(new, old)
    t = data.timestamp[data.examples]
    held_out = data.examples[(t >= split.test_start) & (t < cut)]  # the old period's last 10%: never trained on
    old_rows = old.examples[old.timestamp[old.examples] >= split.test_start]  # the same events, in old's own rows
    assert np.array_equal(old.user[old_rows], data.user[held_out]) and np.array_equal(old.label[old_rows],
                                                                                       data.label[held_out])
    results = {"users": int(np.unique(log.user).size), "old_events": old.num_events, "new_events": new.num_events, "current_train_seconds": current_seconds,
               "updates": []}
    current_scores = {}
    for replay in (float(r) for r in args.replays.split(",")):
        root = work / f"root-replay-{replay}"
        ScorerVersions.create(root, work / "current")
        start = time.perf_counter()
        result = update_scorer(root, new, UpdateConfig(
            train=TrainConfig(epochs=args.epochs, seed=args.seed, norm_batches=0, progress=False), replay=replay,
            gate=GateRule(seed=args.seed), force=True), history=old, device="cpu")
        seconds = time.perf_counter() - start
        folder = result.published.path
        gate = result.published.note["gate"]
        if not current_scores:  # CURRENT's tables hold the old period's texts: scored on the old log itself
            current_scores["held_out"] = _scores(work / "current", old, old_rows)
        held = _scores(folder, data, held_out)
        labels = data.label[held_out].astype(np.float64)
        forgetting = paired_auc_difference(labels, held, current_scores["held_out"], data.user[held_out])
        results["updates"].append({
            "replay": replay, "seconds": seconds, "rows": result.rows, "appended": result.appended,
            "gate": gate, "best_epoch": result.fit.best_epoch,
            "held_out": {"current_auc": roc_auc(labels, current_scores["held_out"]), "next_auc": roc_auc(labels, held),
                         "current_logloss": log_loss(labels, current_scores["held_out"]),
                         "next_logloss": log_loss(labels, held),
                         "difference": [forgetting.value, forgetting.low, forgetting.high]}})
        print(json.dumps(results["updates"][-1]["held_out"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| update | gate AUC: CURRENT -> NEXT (paired diff, 95%) | gate log loss | old held-out AUC: CURRENT -> "
             "NEXT (paired diff, 95%) | update s |", "|---|---|---|---|---|"]
    for u in results["updates"]:
        g, h = u["gate"], u["held_out"]
        d, f = g["auc_difference"], h["difference"]
        lines.append(f"| replay {u['replay']:g} ({u['rows']['train']} new + {u['rows']['replay']} old examples) | "
                     f"{g['current']['auc']:.4f} -> {g['next']['auc']:.4f} ({d['value']:+.4f} [{d['low']:+.4f}, "
                     f"{d['high']:+.4f}]) | {g['current']['logloss']:.4f} -> {g['next']['logloss']:.4f} | "
                     f"{h['current_auc']:.4f} -> {h['next_auc']:.4f} ({f[0]:+.4f} [{f[1]:+.4f}, {f[2]:+.4f}]) | "
                     f"{u['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
