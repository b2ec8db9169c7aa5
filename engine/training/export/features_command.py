"""`bahe features`: BAHE's feature block (engine.export.block) for every example of a log, written to parquet with
its names, block version, projection and the scorers' versions and training records in the file's metadata.

No stacking leak: each example takes its features from a scorer whose training record (engine.export.record) shows
it never fitted that example's label - a scorer trained only on an earlier period (the example's timestamp is at or
after the record's `labels_before`), or one of K out-of-fold scorers (`--folds K`, engine.training.export.
fold_scorers) whose training users exclude the example's user. Among several, the user-disjoint scorer is taken
first (the out-of-fold rule for every period). An example no scorer qualifies for stops the export before anything
is written (`LeakError`), as does a scorer without a valid record: in-sample logits are never written.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.export.block import Projection, block_metadata, write_block
from engine.export.record import TrainingRecord, read_record, scorer_version
from engine.serving.scorer import BAHEScorer
from engine.training.data.log import BehaviorLog
from engine.training.export.log_features import item_vectors, log_block
from weights.table import UnknownTextError

__all__ = ["LeakError", "choose_scorers", "export_block", "features_command"]


class LeakError(ValueError):
    """The export would write features of an example whose label the scorer was trained on."""


def choose_scorers(records: list[TrainingRecord], user_keys: list[str], timestamps: np.ndarray) -> np.ndarray:
    """(B,) int64: per example, the first scorer that never saw its user's labels, else the first trained only
    before its timestamp, else -1 (in-sample for every scorer)."""
    choice = np.full(len(user_keys), -1, dtype=np.int64)
    for s, record in enumerate(records):  # first: scorers that never saw the user at all (out-of-fold)
        if record.users is not None:
            known = set(record.users)
            free = np.fromiter((u not in known for u in user_keys), dtype=bool, count=len(user_keys))
            choice[(choice < 0) & free] = s
    for s, record in enumerate(records):  # then: scorers trained only before the example's time
        choice[(choice < 0) & ~record.saw(user_keys, timestamps)] = s
    return choice


def _projection(kind: str, width: int | None, seed: int, scorer: BAHEScorer, data: BehaviorLog) -> Projection:
    if not width:
        return Projection()
    if kind == "pca":
        return Projection.pca(item_vectors(scorer, data), width)
    return Projection.random(scorer.model.upper.hidden_size, width, seed)


def export_block(folders: list[str | Path], data: BehaviorLog, rows: np.ndarray, *, projection: str = "random",
                 width: int | None = None, seed: int = 0, batch_size: int = 256, device: str = "cpu",
                 source: str = "") -> tuple[dict[str, np.ndarray], np.ndarray, list[str], dict]:
    """(key columns, (B, F) block, names, metadata) of the log's example `rows` (ascending), each from the scorer
    `choose_scorers` picks; LeakError before any feature is computed when an example has none, or a scorer no
    valid training record."""
    folders = [Path(f) for f in folders]
    records = []
    for folder in folders:
        record = read_record(folder)
        if record is None:
            raise LeakError(f"{folder} has no training record for its weights (training.json, written by `bahe train`"
                            " and `bahe features --folds`): nothing shows which labels it was fitted on, so its "
                            "logits may be in-sample; train it with `bahe train`, or export out-of-fold (--folds K)")
        records.append(record)
    rows = np.asarray(rows, dtype=np.int64)
    users, times = data.user_key(data.user[rows]), data.timestamp[rows]
    choice = choose_scorers(records, users, times)
    leaked = np.flatnonzero(choice < 0)
    if leaked.size:
        first = int(leaked[0])
        earliest = min(r.labels_before for r in records)
        raise LeakError(f"refusing to write in-sample features: {leaked.size:,} of the {rows.size:,} examples have "
                        f"labels the scorer(s) were trained on (e.g. user {users[first]} at {int(times[first])}; "
                        f"{folders[0]}: {records[0].describe()}); export only later examples (--since {earliest}) or "
                        "out-of-fold ones (--folds K)")
    spec, values, versions, started = None, None, [], time.perf_counter()
    for s, folder in enumerate(folders):
        scorer = BAHEScorer.from_pretrained(folder, device=device)
        if spec is None:
            chosen = _projection(projection, width, seed, scorer, data)
        model = scorer.config.model
        mine = block_metadata(model.sequence_names, model.similarity_temperatures, scorer.model.upper.hidden_size,
                              chosen)
        if spec is not None and mine != spec:
            raise ValueError(f"{folder}'s feature block differs from {folders[0]}'s (sequences, hidden size or "
                             "temperatures): one file holds one block")
        spec = mine
        versions.append({"path": str(folder), "scorer_version": scorer_version(folder),
                         "record": asdict(records[s]), "examples": int((choice == s).sum())})
        picked = np.flatnonzero(choice == s)
        if not picked.size:
            continue
        try:
            block = log_block(scorer, data, rows[picked], chosen, batch_size=batch_size)
        except UnknownTextError as err:
            raise ValueError(f"{folder}: its tables lack item texts of the log ({err}); append them with "
                             "`bahe encode TEXTS --out <table>` or export with scorers trained on this log") from None
        if values is None:
            values = np.empty((rows.size, block.shape[1]), dtype=np.float32)
        values[picked] = block
    if values is None:
        values = np.empty((0, len(spec["feature_names"])), dtype=np.float32)
    keys = {"user_id": np.array(users, dtype=object), "item_id": np.array(data.item_key(data.item[rows]), dtype=object),
            "timestamp": times, "label": data.label[rows].astype(np.int8), "row": rows, "scorer": choice}
    meta = {**spec, "scorers": versions, "data": source, "examples": int(rows.size), "logit": "before calibration",
            "past_only": "each example's features from the user's events strictly before its timestamp",
            "seconds": round(time.perf_counter() - started, 1)}
    return keys, values, spec["feature_names"], meta


def features_command(args: argparse.Namespace) -> None:
    """`bahe features`: load the log, train the fold scorers (--folds) or take --scorer, export, write parquet."""
    from engine.training.data.log_schema import LogFormatError
    from engine.training.studies.experiment import load_data
    if bool(args.scorer) == bool(args.folds):
        raise SystemExit("bahe features: give --scorer DIR (one or more) or --folds K, not both nor neither")
    try:
        data = load_data(args.data)
    except (LogFormatError, OSError) as err:
        raise SystemExit(f"bahe features: {err}") from None
    rows = data.examples
    if args.since is not None:
        rows = rows[data.timestamp[rows] >= args.since]
    folders = args.scorer
    if args.folds:
        folders = train_folds(args, data)
    try:
        keys, values, names, meta = export_block(folders, data, rows, projection=args.projection, width=args.project,
                                                 seed=args.seed, batch_size=args.batch_size, device=args.device,
                                                 source=args.data)
    except ValueError as err:  # LeakError included: nothing is written
        raise SystemExit(f"bahe features: {err}") from None
    write_block(args.out, keys, values, names, meta)
    print(json.dumps({"out": str(args.out), "examples": int(rows.size), "features": len(names),
                      "scorers": [{k: v[k] for k in ("path", "scorer_version", "examples")} for v in meta["scorers"]],
                      "seconds": meta["seconds"]}))


def train_folds(args: argparse.Namespace, data: BehaviorLog) -> list[Path]:
    """`--folds K`: the K out-of-fold scorers, trained with `bahe train`'s settings into --work."""
    from engine.training.export.fold_scorers import train_fold_scorers
    from engine.training.loops.train_commands import scorer_config, train_config
    work = Path(args.work) if args.work else Path(args.out).with_suffix("").with_name(Path(args.out).stem + "-folds")
    train = train_config(args)
    try:
        return train_fold_scorers(data, args.folds, work, model=args.model, config=scorer_config(args, data),
                                  train=train, source=args.data, device=args.device, seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"bahe features: {err}") from None
