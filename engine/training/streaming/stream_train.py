"""Training over a streamed log (engine.training.streaming.stream), one user shard in memory at a time.

A shard is a BehaviorLog of whole users, so the models' `prepare` (histories, timeline batches, features) runs
unchanged on it; only the item counts come from the streamed pass (`ShardCounts`), because they count every
user's events. An epoch visits the shards in a random order and, inside a shard, the model's own order
(users shuffled, a user's targets together): the unit of work is a batch of examples user by user, as in the
in-memory loop (engine.training.loops.train.fit), whose steps, calibration and early stopping this loop repeats.
With one shard it IS the in-memory loop: the same batches in the same order, the same result (tested). With P
shards the order differs (users shuffled within a shard, shards shuffled), not the examples nor their features.

Peak memory: the model plus the largest shard (its log, counts, one batch), not the log.

Data-parallel training fits the same unit: a rank can take the shards p with p % world_size == rank (whole
users each, so no user's timeline is split across ranks) and feed its batches to a DDP-wrapped model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from engine.training.data.log import BehaviorLog
from engine.training.streaming.stream import Shard, StreamedLog
from engine.training.data.example_features import PastCounts, counts_before, recent_counts
from engine.training.studies.memory import PeakMemory
from engine.training.studies.metrics import log_loss, roc_auc
from engine.training.loops.train import (BestEpoch, FitResult, Optimization, TrainConfig, calibrate_norms, end_epoch,
                                         epoch_order, predict, row_batches)

__all__ = ["ShardCounts", "StreamBudget", "catalog_log", "use_shard", "evaluate_stream", "fit_stream"]

log = logging.getLogger(__name__)


class ShardCounts(PastCounts):
    """PastCounts of one shard: user and recent counts from the shard's log (it holds whole users, so they
    are exact), item counts over all users from the streamed pass."""

    def __init__(self, shard: Shard, window: int = 0) -> None:
        self.log, self.window = shard.log, window
        member = shard.log.membership.astype(np.int64)
        self.user = counts_before(shard.log.user, shard.log.timestamp, member, shard.log.user, shard.log.timestamp)
        self.item = shard.item_counts
        every = np.arange(shard.log.num_events)
        self.recent = recent_counts(shard.log, every, window) if window else None


@dataclass
class StreamBudget:
    """Caps for a log too big to train on whole in the time at hand (None: no cap): optimizer steps per shard
    per epoch, and validation / test examples per shard (a random sample of the shard's, fixed by `seed`)."""
    steps_per_shard: int | None = None
    eval_per_shard: int | None = None
    seed: int = 0


def catalog_log(stream: StreamedLog) -> BehaviorLog:
    """A BehaviorLog with one event per catalog item (user 0, time 0, in no sequence): what the models'
    constructors read from a log (item ids and texts, sequence names, categorical feature names)."""
    ids = stream.item_ids
    return BehaviorLog(np.zeros(ids.size, np.int64), ids, np.zeros(ids.size, np.int64), np.zeros(ids.size, np.int8),
                       np.zeros((ids.size, len(stream.sequence_names)), bool), stream.item_texts,
                       stream.sequence_names, stream.min_history,
                       {name: np.full(ids.size, None, dtype=object) for name in stream.categorical},
                       None if stream.user_keys is None or not stream.user_keys.size else stream.user_keys,
                       stream.item_keys)


def use_shard(model: nn.Module, shard: Shard) -> None:
    """Point the model's count features at the shard (models with past-count features hold a `counts`)."""
    if hasattr(model, "counts"):
        model.counts = ShardCounts(shard, model.counts.window)


def _part(shard: Shard, name: str, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    rows = getattr(shard.split, name)
    if cap is not None and rows.size > cap:
        rows = np.sort(rng.choice(rows, cap, replace=False))
    return rows


def evaluate_stream(model: nn.Module, stream: StreamedLog, part: str, *, batch_size: int = 256,
                    device: torch.device | str = "cpu", budget: StreamBudget = StreamBudget()) -> dict[str, float]:
    """AUC and log loss over every shard's `part` ('val' or 'test') examples (or the budget's sample)."""
    rng = np.random.default_rng(budget.seed)
    probs, labels, seconds = [], [], 0.0
    for shard in stream:
        rows = _part(shard, part, budget.eval_per_shard, rng)
        if rows.size:
            use_shard(model, shard)
            start = time.perf_counter()
            probs.append(predict(model, shard.log, rows, batch_size=batch_size, device=device))
            seconds += time.perf_counter() - start
            labels.append(shard.log.label[rows])
    probs, labels = (np.concatenate(x) if x else np.zeros(0) for x in (probs, labels))
    return {"auc": roc_auc(labels, probs), "logloss": log_loss(labels, probs), "examples": int(labels.size),
            "seconds_per_1k": 1000 * seconds / max(labels.size, 1)}


def planned_steps(stream: StreamedLog, config: TrainConfig, budget: StreamBudget) -> int:
    """The optimizer steps of one `fit_stream` epoch: per shard, its train batches up to the budget's cap (a pass
    over the shards, made only for config.lr_decay's schedule)."""
    batches = [-(-shard.split.train.size // config.batch_size) for shard in stream]  # row_batches' count
    cap = budget.steps_per_shard
    return sum(batches if cap is None else (min(b, cap) for b in batches))


def fit_stream(model: nn.Module, stream: StreamedLog, config: TrainConfig, *, budget: StreamBudget = StreamBudget(),
               device: torch.device | str = "cpu") -> FitResult:
    """`fit` over the streamed log's train examples, validated on its val examples after each epoch; the best
    epoch's parameters and buffers restored. `result.history` also records the examples trained per epoch."""
    device = torch.device(device)
    model.to(device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    optimization = Optimization(model, config, config.epochs * planned_steps(stream, config, budget)
                                if config.lr_decay else 0)
    loss_fn = nn.BCEWithLogitsLoss()
    result = FitResult(best_val_auc=-1.0, best_epoch=-1)
    best = BestEpoch(model, result, config.patience)
    with PeakMemory(device) as peak:
        for shard in stream:  # the heads' norms: calibrated on the first shard with train examples
            if shard.split.train.size:
                use_shard(model, shard)
                calibration = epoch_order(model, shard.log, shard.split.train, np.random.default_rng(config.seed + 1))
                batches = list(row_batches(calibration, config.batch_size))[:config.norm_batches]
                calibrate_norms(model, shard.log, batches, device)
                break
        for epoch in range(config.epochs):
            model.train()
            start, total_loss, trained = time.perf_counter(), 0.0, 0
            shards = rng.permutation(stream.shards) if stream.shards > 1 else range(1)
            bar = tqdm(total=None, desc=f"{model.name} epoch {epoch + 1}", disable=not config.progress, leave=False)
            for p in shards:
                shard = stream.load(int(p))
                use_shard(model, shard)
                order = epoch_order(model, shard.log, shard.split.train, rng)
                for chunk in list(row_batches(order, config.batch_size))[:budget.steps_per_shard]:
                    batch = model.prepare(shard.log, chunk).to(device)
                    labels = torch.from_numpy(shard.log.label[chunk].astype(np.float32)).to(device)
                    loss = loss_fn(model(batch), labels)
                    optimization.step(loss)
                    total_loss += loss.item() * chunk.size
                    trained += chunk.size
                    bar.update(1)
                del shard
            bar.close()
            seconds = time.perf_counter() - start
            val = evaluate_stream(model, stream, "val", batch_size=config.eval_batch_size, device=device, budget=budget)
            if end_epoch(model, result, best, seconds, total_loss / max(trained, 1), val, examples=trained):
                break
    result.peak_memory_bytes, result.added_memory_bytes = peak.bytes, peak.added
    best.restore()
    model.eval()
    return result
