"""Out-of-fold BAHE scorers for stacking: the log's users in K disjoint folds (drawn with a seed); scorer k is
trained with the project's loop (`fit`, timeline batches, early stopping) on the time split's training and
validation examples of the users outside fold k, saved with a training record that lists those users
(engine.export.record), and gives the features of fold k's users only - for every one of their examples, test
period included, so a stacked ranker's training and test features come from the same kind of scorer (one that
never saw the user's labels). What it did see: other users' labels up to the test start, items' later reactions
included (docs/feature-export.md weighs that against the period-based alternative, `--since`)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from engine.config import ScorerConfig
from engine.export.record import write_record
from engine.training.data.log import BehaviorLog
from engine.training.loops.ctr_models import BAHECTR
from engine.training.loops.train import TrainConfig, fit
from engine.training.studies.experiment import build_scorer

__all__ = ["user_folds", "train_fold_scorers"]

log = logging.getLogger(__name__)


def user_folds(data: BehaviorLog, folds: int, seed: int = 0) -> np.ndarray:
    """(N,) int64 fold of each event's user: the distinct users in a random order (`seed`), dealt round-robin
    into `folds` folds of sizes differing by at most one."""
    if folds < 2:
        raise ValueError(f"out-of-fold features need at least 2 folds, got {folds}")
    users = np.unique(data.user)
    if users.size < folds:
        raise ValueError(f"{folds} folds need at least {folds} users, the log has {users.size}")
    fold_of = np.empty(users.size, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(users.size)] = np.arange(users.size) % folds
    return fold_of[np.searchsorted(users, data.user)]


def train_fold_scorers(data: BehaviorLog, folds: int, work: str | Path, *, model: str, config: ScorerConfig,
                       train: TrainConfig, source: str, device: str = "auto", seed: int = 0) -> list[Path]:
    """Train the K fold scorers into work/fold-<k> (module docstring), the behavior tables built once in
    work/tables; -> their folders, fold order. Each starts from the same initial weights (`train.seed`)."""
    work = Path(work)
    fold = user_folds(data, folds, seed)
    split = data.split()
    out = []
    for k in range(folds):
        rows = {name: r[fold[r] != k] for name, r in (("train", split.train), ("val", split.val))}
        if rows["train"].size == 0 or rows["val"].size == 0:
            raise ValueError(f"fold {k}'s scorer has {rows['train'].size} training and {rows['val'].size} validation "
                             "examples; the log is too small for this many folds")
        torch.manual_seed(train.seed)
        scorer, _ = build_scorer(model, data, config, work / "tables", device=device, progress=False)
        bahe = BAHECTR(scorer, data)
        result = fit(bahe, data, rows["train"], rows["val"], train, device=str(scorer.device))
        bahe.store_item_counts(data, split.test_start)
        folder = work / f"fold-{k}"
        scorer.save_pretrained(folder)
        seen = np.unique(data.user[np.concatenate([rows["train"], rows["val"]])])
        write_record(folder, labels_before=split.test_start, users=data.user_key(seen), data=source,
                     examples=int(rows["train"].size + rows["val"].size), written_by=f"bahe features --folds {folds}")
        log.info("fold %d/%d: %d training examples, validation AUC %.4f", k + 1, folds, rows["train"].size,
                 result.best_val_auc)
        out.append(folder)
    return out
