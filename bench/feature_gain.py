"""What BAHE's feature block adds to a ranker a team already runs (issue 23, item 2): LightGBM on its usual side
features, + the plain text-cosine features, + BAHE's feature block (engine.export), on one split of a log.

    python -m bench.feature_gain --data ml1m [--split time|per-user] [--max-users N] [--folds 3] [--project 16]
                                 [--features FILE.parquet] [--work DIR] [--threads 2] [--sequential-id]

The block comes out-of-fold (`bahe features --folds K`'s path: K BAHE scorers trained with the project's loop on
disjoint user folds, each giving its held-out users' features for every period), so no example's BAHE logit or
vector was fitted on its own label; `--features` reuses a block file written by an earlier run (or by `bahe features`
on the same log and user subset). The three LightGBM models are engine.training.baselines.lightgbm_peers's: the
same 6-config search on validation AUC, the same past-only side features; the text row adds the cosine of the
target's frozen ABE row with the user's earlier liked / disliked mean. Test AUC and GAUC with 95% user-bootstrap
intervals, and paired intervals (same resampled users) of each richer row against the plainer ones; a table on
stdout and a section of --results (RESULTS.md). `--sequential-id` adds the project's sequential id model
(engine.training.loops.sequential_id) without and with the block joined to its dense side columns.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.export.block import read_block, write_block
from engine.serving.scorer import BAHEScorer
from engine.training.baselines.lightgbm_peers import SEARCH, fit_lightgbm
from engine.training.data.extra_columns import ExtraColumns
from engine.training.data.example_features import log_categorical_features
from engine.training.data.log import BehaviorLog
from engine.training.data.user_split import per_user_split
from engine.training.export.features_command import export_block
from engine.training.export.fold_scorers import train_fold_scorers
from engine.training.loops.sequential_id import SequentialIdCTR
from engine.training.loops.train import TrainConfig, fit, predict
from engine.training.studies.demo_ml1m import frozen_rows
from engine.training.studies.experiment import cpu_threads, load_data
from engine.training.studies.metrics import (auc_interval, gauc_interval, paired_auc_difference,
                                             paired_gauc_difference, undefined_as_nan)
from engine.training.studies.results_sections import machine, write_section

log = logging.getLogger(__name__)

SIDE, TEXT, BAHE = "LightGBM, side features", "LightGBM, side + text features", "LightGBM, side + BAHE features"
SEQ, SEQ_BAHE = "sequential id, side features", "sequential id, side + BAHE features"
PAIRS = ((TEXT, SIDE), (BAHE, SIDE), (BAHE, TEXT), (SEQ_BAHE, SEQ), (SEQ_BAHE, BAHE))


def split_rows(data: BehaviorLog, split: str) -> dict[str, np.ndarray]:
    return dict((data.split() if split == "time" else per_user_split(data)).items())


def bahe_block(args: argparse.Namespace, data: BehaviorLog, rows: np.ndarray
               ) -> tuple[ExtraColumns, list[Path], dict]:
    """BAHE's out-of-fold feature block of `rows` (ascending), the fold scorers' folders (empty when read from
    --features) and the block's metadata; a new block is also written to work/block.parquet for later runs."""
    if args.features:
        frame, meta = read_block(args.features)
        keys = frame.set_index("row")
        covered = np.isin(rows, keys.index.to_numpy())
        if not covered.all() or (keys.loc[rows, "timestamp"].to_numpy() != data.timestamp[rows]).any():
            raise SystemExit(f"{args.features} does not hold this log's examples (other data or --max-users?)")
        names = meta["feature_names"]
        return ExtraColumns(rows, keys.loc[rows, names].to_numpy(np.float32), names, "BAHE features"), [], meta
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=args.lower_layers),
                          model=ModelConfig(sequence_names=data.sequence_names, max_behaviors=args.max_behaviors,
                                            categorical_features=log_categorical_features("all", data)))
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=False)
    folders = train_fold_scorers(data, args.folds, args.work / "folds", model=args.model, config=config, train=train,
                                 source=args.data, seed=args.seed)
    keys, values, names, meta = export_block(folders, data, rows, projection=args.projection, width=args.project,
                                             seed=args.seed, batch_size=args.batch_size, source=args.data)
    write_block(args.work / "block.parquet", keys, values, names, meta)
    return ExtraColumns(rows, values, names, "BAHE features"), folders, meta


def run(args: argparse.Namespace) -> tuple[list[str], dict]:
    """Fit the three rows, return the report's lines and the figures."""
    started = time.perf_counter()
    data = load_data(args.data).user_sample(args.max_users, args.seed)
    parts = split_rows(data, args.split)
    rows = np.unique(np.concatenate(list(parts.values())))
    block, folders, meta = bahe_block(args, data, rows)
    block_seconds = time.perf_counter() - started
    vectors = frozen_rows(BAHEScorer.from_pretrained(folders[0] if folders else args.text_scorer, device="cpu"), data)
    search = SEARCH[:args.configs]
    test, probs, seconds = parts["test"], {}, {}
    for name, kwargs in ((SIDE, {}), (TEXT, {"vectors": vectors}), (BAHE, {"extra": block})):
        start = time.perf_counter()
        model = fit_lightgbm(data, parts["train"], parts["val"], seed=args.seed, threads=args.threads, search=search,
                             **kwargs)
        probs[name], seconds[name] = model.predict(data, test), time.perf_counter() - start
        log.info("%s: %.0f s", name, seconds[name])
    if args.sequential_id:
        architecture = BAHEScorer.from_pretrained(folders[0] if folders else args.text_scorer, device="cpu")
        for name, extra in ((SEQ, None), (SEQ_BAHE, block)):
            start = time.perf_counter()
            probs[name] = sequential_id_probs(args, data, parts, architecture, extra)
            seconds[name] = time.perf_counter() - start
            log.info("%s: %.0f s", name, seconds[name])
    labels, users = data.label[test], data.user[test]
    stats = {"auc": {n: auc_interval(labels, p, users, resamples=args.resamples, seed=args.seed)
                     for n, p in probs.items()},
             "gauc": {n: undefined_as_nan(gauc_interval, labels, p, users) for n, p in probs.items()},
             "paired": {(a, b): (paired_auc_difference(labels, probs[a], probs[b], users, resamples=args.resamples,
                                                       seed=args.seed),
                                 undefined_as_nan(paired_gauc_difference, labels, probs[a], probs[b], users))
                        for a, b in PAIRS if a in probs and b in probs}}
    lines = report(args, data, parts, stats, seconds, meta, block_seconds, time.perf_counter() - started)
    return lines, stats


def sequential_id_probs(args: argparse.Namespace, data: BehaviorLog, parts: dict[str, np.ndarray],
                        architecture: BAHEScorer, extra: ExtraColumns | None) -> np.ndarray:
    """Test probabilities of the sequential id model (BAHE's upper-layer architecture over learned item ids, its
    side features and head), with `extra` joined to its dense side columns; the ML-1M demo's training
    (timeline batches, linearly decaying rates, early stopping on validation AUC)."""
    torch.manual_seed(args.seed)
    model = SequentialIdCTR.from_scorer(architecture, data, parts["train"], extra)
    fit(model, data, parts["train"], parts["val"], TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                                               seed=args.seed, lr_decay=True, progress=False))
    return predict(model, data, parts["test"], batch_size=512)


def report(args, data, parts, stats, seconds, meta, block_seconds, total) -> list[str]:
    test = parts["test"]
    source = f"--features {args.features}" if args.features else f"--folds {args.folds}"
    lines = [f"{args.split} split of {args.data}: {np.unique(data.user).size:,} users, "
             + ", ".join(f"{k} {v.size:,}" for k, v in parts.items())
             + f" examples; {np.unique(data.user[test]).size:,} test users. BAHE block: {len(meta['feature_names'])} "
             f"columns ({source}, projection {meta['projection']['kind']}, vectors of width {meta['width']}), "
             f"{block_seconds:.0f} s; "
             f"LightGBM search: {args.configs} of {len(SEARCH)} configs; {total / 60:.1f} min in all.", "",
             "| model | test AUC [95%] | test GAUC [95%] | fit s |", "|---|---|---|---|"]
    for name in stats["auc"]:
        a, g = stats["auc"][name], stats["gauc"][name]
        lines.append(f"| {name} | {a.value:.4f} [{a.low:.4f}, {a.high:.4f}] | {g.value:.4f} [{g.low:.4f}, "
                     f"{g.high:.4f}] | {seconds[name]:.0f} |")
    lines += ["", "| paired difference (same resampled users) | AUC [95%] | GAUC [95%] |", "|---|---|---|"]
    for (a, b), (auc, g) in stats["paired"].items():
        lines.append(f"| {a} - {b} | {auc.value:+.4f} [{auc.low:+.4f}, {auc.high:+.4f}] "
                     f"| {g.value:+.4f} [{g.low:+.4f}, {g.high:+.4f}] |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; -> the figures (auc, gauc: model -> Interval; paired: (a, b) -> (AUC, GAUC) Intervals)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="ml1m", help="'ml1m', 'movielens', a folder of MovieLens-1M's files or a log")
    p.add_argument("--split", default="time", choices=["time", "per-user"])
    p.add_argument("--max-users", type=int, help="a random subset of this many users (all: not given)")
    p.add_argument("--folds", type=int, default=3, help="out-of-fold BAHE scorers (each trains on (K-1)/K users)")
    p.add_argument("--features", help="a block file of this log (work/block.parquet of an earlier run): no training")
    p.add_argument("--text-scorer", help="with --features: a scorer folder whose ABE rows give the text features")
    p.add_argument("--project", type=int, default=16, help="the block's vector width (0: the model's)")
    p.add_argument("--projection", default="pca", choices=["random", "pca"])
    p.add_argument("--model", default="minilm")
    p.add_argument("--lower-layers", type=int, default=5)
    p.add_argument("--max-behaviors", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--configs", type=int, default=len(SEARCH), help="LightGBM configs searched (of the 6)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch and LightGBM threads")
    p.add_argument("--sequential-id", action="store_true", help="also the sequential id model without and with the "
                   "block (two more neural trainings)")
    p.add_argument("--work", type=Path, default=Path("artifacts/feature_gain"))
    p.add_argument("--results", default="bench/RESULTS.md", help="markdown file for the section ('' : none)")
    args = p.parse_args(argv)
    if args.features and not args.text_scorer:
        p.error("--features needs --text-scorer (a scorer folder of the same model and lower layers)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with cpu_threads(args.threads):
        label = machine()  # with the threads the run uses
        lines, stats = run(args)
    print("\n".join(lines))
    if args.results:
        command = "python -m bench.feature_gain " + shlex.join(sys.argv[1:] if argv is None else argv)
        write_section(args.results, f"feature-gain:{args.split}", [
            f"## LightGBM + BAHE's feature block ({args.split} split)", "",
            f"`{command.strip()}` on {label}, {datetime.date.today().isoformat()}.",
            "", *lines])
    return stats


if __name__ == "__main__":
    main()
