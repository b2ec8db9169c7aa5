"""`bahe train`: the command itself (`train_command`, called by engine/cli.py) and its variants that run over more
than one process or more than memory: `--distributed` (DDP under torchrun) and `--stream` (a log laid out as user
shards). They live in the harness because they drive its trainer."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.distributed import Launch
from engine.training.data.example_features import log_categorical_features
from engine.training.data.item_features import item_level_features
from engine.training.loops.train import TrainConfig

def scorer_config(args: argparse.Namespace, log, id_rows: bool = False, item_id_dropout: float = 0.0) -> ScorerConfig:
    """The scorer a `bahe train` run builds: its layers and max_behaviors, the log's sequences, the categorical
    features asked for, id rows and item-id dropout (SystemExit naming a bad --categorical or item_id_dropout)."""
    try:
        categorical = log_categorical_features(args.categorical, log)
    except ValueError as err:
        raise SystemExit(f"bahe train: --categorical: {err}") from None
    try:
        model = ModelConfig(sequence_names=log.sequence_names, max_behaviors=args.max_behaviors,
                            categorical_features=categorical, id_rows=id_rows,
                            item_id_dropout=item_id_dropout)
    except ValueError as err:
        raise SystemExit(f"bahe train: {err}") from None
    return ScorerConfig(encoder=EncoderConfig(num_lower_layers=args.lower_layers, max_tokens=args.max_tokens),
                        model=model)

def id_vocabulary(log, folder: Path, write: bool = True, users: list[str] | None = None,
                  item_features: dict[str, dict[str, str]] | None = None):
    """Extend the append-only id vocabulary of the scorer `folder` (weights.id_vocabulary, `ids.json`) with the
    log's user ids (or `users`), item ids and texts and item-level features (or `item_features`: a streamed log's,
    gathered batch by batch); `write=False` checks only (run it before training, so a
    conflict stops the run before anything is saved). SystemExit naming the item whose stored text differs."""
    from weights.id_vocabulary import FILE_NAME, IdError, VocabularyFile
    items = dict(zip(log.item_key(log.item_ids), log.item_id_texts))
    users = log.user_key(np.unique(log.user)) if users is None else users
    try:
        return VocabularyFile.update(folder / FILE_NAME, users, items, write=write,
                                     item_features=item_level_features(log) if item_features is None else item_features)
    except IdError as err:
        raise SystemExit(f"bahe train: {err}") from None


def record_training(folder: Path, test_start: int, data: str, rows: dict[str, np.ndarray] | None) -> None:
    """The saved scorer's training record (engine.export.record): every label it trained or early-stopped on lies
    before the time split's test start, whatever the subsample; `bahe features` reads it to refuse stacking leaks."""
    from engine.export.record import write_record
    examples = -1 if rows is None else int(rows["train"].size + rows["val"].size)  # -1: not counted (streamed)
    write_record(folder, labels_before=test_start, users=None, data=str(data), examples=examples)


def bucket_report(log, config: ScorerConfig) -> dict[str, dict]:
    """Per categorical feature trained with: its distinct values in the log, the hash buckets they use and the
    collision rate (engine.features.categorical.bucket_collisions)."""
    from engine.features.categorical import bucket_collisions
    rows = np.arange(log.num_events)
    return {name: bucket_collisions(name, log.category_values(name, rows), config.model.categorical_buckets)
            for name in config.model.categorical_features}


def train_config(args: argparse.Namespace, **overrides) -> TrainConfig:
    """The optimization settings of `bahe train`'s flags (also `bahe features --folds`'s fold scorers)."""
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr,
                       seed=args.seed, lr_decay=args.lr_decay, **overrides)


def train_distributed(launch, args: argparse.Namespace, data, split, rows, config) -> None:
    """`bahe train --distributed`: every rank trains its users' share under DDP; rank 0 saves the scorer."""
    from engine import distributed
    from engine.training.loops.ctr_models import BAHECTR
    from engine.training.loops.data_parallel import DataParallel
    from engine.training.studies.experiment import train_and_test
    from engine.training.loops.parallel_setup import parallel_scorer
    out = Path(args.out)
    try:
        device = launch.device(args.device)
    except distributed.LaunchError as err:
        raise SystemExit(f"bahe train: {err}") from None
    distributed.start(launch, device)
    try:
        scorer, report = parallel_scorer(args.model, data, config, out / "tables", launch, str(device))
        bahe = BAHECTR(scorer, data)
        result = train_and_test(bahe, data, rows, train_config(args, progress=launch.is_writer), device=str(device),
                                parallel=DataParallel.from_process_group())
        bahe.store_item_counts(data, split.test_start)
        error = None
        if launch.is_writer:
            try:
                scorer.save_pretrained(out / "scorer")
                record_training(out / "scorer", split.test_start, args.data, rows)
                id_vocabulary(data, out / "scorer")
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
    """`bahe train --stream WORK`: the log laid out under WORK (engine.training.streaming.stream), trained shard by
    shard (engine.training.streaming.stream_train); memory holds one shard, not the log."""
    from engine.training.loops.ctr_models import BAHECTR
    from engine.training.data.log_schema import LogFormatError
    from engine.training.streaming.stream import StreamConfig, prepare_stream
    from engine.training.studies.experiment import build_scorer, is_dataset
    from engine.training.streaming.stream_train import StreamBudget, catalog_log, evaluate_stream, fit_stream
    if is_dataset(args.data):
        raise SystemExit("bahe train: --stream reads a CSV/parquet log file; give its path as --data")
    if (args.train_examples, args.val_examples, args.test_examples) != (None, None, None):
        raise SystemExit("bahe train: --train/--val/--test-examples do not apply to --stream; cap the work with "
                         "--steps-per-shard and --eval-per-shard")
    try:
        stream = prepare_stream(args.data, args.stream, StreamConfig(shards=args.shards, time_buckets=args.shards),
                                catalog=args.catalog, timestamps=args.timestamps)
    except (LogFormatError, OSError, ValueError) as err:
        raise SystemExit(f"bahe train: {err}") from None
    print(json.dumps({"events": stream.events, "shards": stream.shards, "largest_shard": max(stream.shard_events),
                      "val_start": stream.val_start, "test_start": stream.test_start}))
    catalog = catalog_log(stream)
    config = scorer_config(args, catalog, args.id_rows, args.item_id_dropout)
    out = Path(args.out)
    id_vocabulary(catalog, out / "scorer", write=False, users=[], item_features=stream.item_features)
    scorer, report = build_scorer(args.model, catalog, config, out / "tables", device=args.device)
    print(f"tables: {report.items} item texts -> {report.unique_behaviors} unique rows in {report.seconds:.1f} s")
    bahe, device = BAHECTR(scorer, catalog), str(scorer.device)
    budget = StreamBudget(args.steps_per_shard, args.eval_per_shard, args.seed)
    result = fit_stream(bahe, stream, train_config(args),
                        budget=budget, device=device)
    test = evaluate_stream(bahe, stream, "test", device=device, budget=budget)
    bahe.set_item_counts(stream.item_ids, stream.item_counts_before[stream.test_start], stream.sequence_names)
    scorer.save_pretrained(out / "scorer")
    record_training(out / "scorer", stream.test_start, args.data, None)
    id_vocabulary(catalog, out / "scorer", users=stream.user_ids(), item_features=stream.item_features)
    print(f"test AUC {test['auc']:.4f}, log loss {test['logloss']:.4f} ({test['examples']} examples), best epoch "
          f"{result.best_epoch}, {sum(result.epoch_seconds) / len(result.epoch_seconds):.1f} s/epoch; "
          f"scorer saved to {out / 'scorer'}")


def train_command(args: argparse.Namespace, launch: Launch | None) -> None:
    """`bahe train`: load the log, build the tables, train (in one process, --distributed or --stream), save the
    scorer with its id vocabulary; errors in the log end the command with one line."""
    from engine.training.data.log_schema import LogFormatError
    from engine.training.loops.ctr_models import BAHECTR
    from engine.training.studies.experiment import SampleConfig, build_scorer, load_data, sample_split, train_and_test
    torch.manual_seed(args.seed)  # the new weights too, not only the data order: one --seed, one run
    if args.stream:
        if args.distributed:
            raise SystemExit("bahe train: --stream runs in one process; --distributed with it is not built yet")
        return train_streamed(args)
    try:
        data = load_data(args.data, catalog=args.catalog, timestamps=args.timestamps)
    except (LogFormatError, OSError, ValueError) as err:
        raise SystemExit(f"bahe train: {err}") from None
    split = data.split()
    rows = sample_split(split, SampleConfig(args.train_examples, args.val_examples, args.test_examples, args.seed))
    say = print if launch is None or launch.is_writer else (lambda *a, **k: None)
    say(json.dumps({k: {"examples": int(v.size), "positive_rate": round(float(data.label[v].mean()), 4)}
                    for k, v in rows.items()}))
    config = scorer_config(args, data, args.id_rows, args.item_id_dropout)
    out = Path(args.out)
    id_vocabulary(data, out / "scorer", write=False)  # an item id whose stored text differs stops the run here
    say(json.dumps({"hashed_buckets": bucket_report(data, config)}))
    if launch is not None:
        train_distributed(launch, args, data, split, rows, config)
        return
    scorer, report = build_scorer(args.model, data, config, out / "tables", device=args.device)
    print(f"tables: {report.behavior_events} behavior events -> {report.unique_behaviors} unique rows "
          f"({report.dedup_ratio:.0f}x dedup) in {report.seconds:.1f} s")
    bahe = BAHECTR(scorer, data)
    result = train_and_test(bahe, data, rows, train_config(args),
        device=str(scorer.device))
    bahe.store_item_counts(data, split.test_start)  # the item statistics served: the training period's
    scorer.save_pretrained(out / "scorer")
    record_training(out / "scorer", split.test_start, args.data, rows)
    vocabulary = id_vocabulary(data, out / "scorer")
    print(f"test AUC {result.test['auc']:.4f}, log loss {result.test['logloss']:.4f}, best epoch "
          f"{result.fit.best_epoch}, {sum(result.fit.epoch_seconds) / len(result.fit.epoch_seconds):.1f} s/epoch, "
          f"{len(result.fit.epoch_seconds) * rows['train'].size / max(sum(result.fit.epoch_seconds), 1e-9):.0f} "
          "train examples/s; "
          f"scorer saved to {out / 'scorer'} (ids.json: {len(vocabulary.users)} user ids, {len(vocabulary.items)} "
          "item ids)")
