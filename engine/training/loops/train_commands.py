"""The `bahe train` variants that run over more than one process or more than memory: `--distributed` (DDP
under torchrun) and `--stream` (a log laid out as user shards). engine/cli.py calls them from its train command;
they live in the harness because they drive its trainer."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.training.data.example_features import log_categorical_features

def scorer_config(args: argparse.Namespace, log) -> ScorerConfig:
    """The scorer a `bahe train` run builds: its layers and max_behaviors, the log's sequences, the categorical
    features asked for (SystemExit naming a bad --categorical)."""
    try:
        categorical = log_categorical_features(args.categorical, log)
    except ValueError as err:
        raise SystemExit(f"bahe train: --categorical: {err}") from None
    return ScorerConfig(encoder=EncoderConfig(num_lower_layers=args.lower_layers, max_tokens=args.max_tokens),
                        model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=args.max_behaviors,
                                          categorical_features=categorical))

def train_distributed(launch, args: argparse.Namespace, data, split, rows, config) -> None:
    """`bahe train --distributed`: every rank trains its users' share under DDP; rank 0 saves the scorer."""
    from engine import distributed
    from engine.training.loops.ctr_models import BAHECTR
    from engine.training.loops.data_parallel import DataParallel
    from engine.training.studies.experiment import train_and_test
    from engine.training.loops.parallel_setup import parallel_scorer
    from engine.training.loops.train import TrainConfig
    out = Path(args.out)
    try:
        device = launch.device(args.device)
    except distributed.LaunchError as err:
        raise SystemExit(f"bahe train: {err}") from None
    distributed.start(launch, device)
    try:
        scorer, report = parallel_scorer(args.model, data, config, out / "tables", launch, str(device))
        bahe = BAHECTR(scorer, data)
        result = train_and_test(bahe, data, rows, TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr, seed=args.seed,
            progress=launch.is_writer), device=str(device), parallel=DataParallel.from_process_group())
        bahe.store_item_counts(data, split.test_start)
        error = None
        if launch.is_writer:
            try:
                scorer.save_pretrained(out / "scorer")
            except Exception as err:  # noqa: BLE001 - every rank exits non-zero with it
                error = err
        distributed.broadcast_outcome(error)
        if error is not None:
            raise error
    except Exception as err:  # noqa: BLE001
        raise SystemExit(f"bahe train: rank {launch.rank}: {err}") from None
    finally:
        distributed.stop()
    if launch.is_writer:
        seconds = sum(result.fit.epoch_seconds)
        print(f"tables: {report.unique_behaviors} unique rows; {launch.world_size} ranks; test AUC "
              f"{result.test['auc']:.4f}, log loss {result.test['logloss']:.4f}, best epoch {result.fit.best_epoch}, "
              f"{seconds / len(result.fit.epoch_seconds):.1f} s/epoch, "
              f"{len(result.fit.epoch_seconds) * rows['train'].size / max(seconds, 1e-9):.0f} train examples/s; "
              f"scorer saved to {out / 'scorer'}")


def train_streamed(args: argparse.Namespace) -> None:
    """`bahe train --stream WORK`: the log laid out under WORK (engine.training.data.stream), trained shard by
    shard (engine.training.loops.stream_train); memory holds one shard, not the log."""
    from engine.training.loops.ctr_models import BAHECTR
    from engine.training.data.log_schema import LogFormatError
    from engine.training.data.stream import StreamConfig, prepare_stream
    from engine.training.studies.experiment import build_scorer
    from engine.training.loops.stream_train import StreamBudget, catalog_log, evaluate_stream, fit_stream
    from engine.training.loops.train import TrainConfig
    if args.data in ("movielens", "ml1m"):
        raise SystemExit("bahe train: --stream reads a CSV/parquet log file; give its path as --data")
    if (args.train_examples, args.val_examples, args.test_examples) != (None, None, None):
        raise SystemExit("bahe train: --train/--val/--test-examples do not apply to --stream; cap the work with "
                         "--steps-per-shard and --eval-per-shard")
    try:
        stream = prepare_stream(args.data, args.stream, StreamConfig(shards=args.shards, time_buckets=args.shards))
    except (LogFormatError, OSError, ValueError) as err:
        raise SystemExit(f"bahe train: {err}") from None
    print(json.dumps({"events": stream.events, "shards": stream.shards, "largest_shard": max(stream.shard_events),
                      "val_start": stream.val_start, "test_start": stream.test_start}))
    catalog = catalog_log(stream)
    config = scorer_config(args, catalog)
    out = Path(args.out)
    scorer, report = build_scorer(args.model, catalog, config, out / "tables", device=args.device)
    print(f"tables: {report.items} item texts -> {report.unique_behaviors} unique rows in {report.seconds:.1f} s")
    bahe, device = BAHECTR(scorer, catalog), str(scorer.device)
    budget = StreamBudget(args.steps_per_shard, args.eval_per_shard, args.seed)
    result = fit_stream(bahe, stream, TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                                  backbone_lr=args.backbone_lr, seed=args.seed),
                        budget=budget, device=device)
    test = evaluate_stream(bahe, stream, "test", device=device, budget=budget)
    bahe.set_item_counts(stream.item_ids, stream.item_counts_before[stream.test_start], stream.sequence_names)
    scorer.save_pretrained(out / "scorer")
    print(f"test AUC {test['auc']:.4f}, log loss {test['logloss']:.4f} ({test['examples']} examples), best epoch "
          f"{result.best_epoch}, {sum(result.epoch_seconds) / len(result.epoch_seconds):.1f} s/epoch; "
          f"scorer saved to {out / 'scorer'}")
