"""Shared steps of `bahe train` and `bahe demo`: load a log, cut it by time, subsample, build the
scorer's tables (reporting the dedup), and train + evaluate a model."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import ScorerConfig
from engine.training.data.log import BehaviorLog, TimeSplit
from engine.training.data.log_files import load_log
from engine.training.data.movielens import load_movielens
from engine.scorer import BAHEScorer
from engine.training.train import FitResult, TrainConfig, evaluate, fit

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """How many examples of each split to use (None: all), drawn at random with `seed`."""
    train: int | None = None
    val: int | None = None
    test: int | None = None
    seed: int = 0


def load_data(source: str) -> BehaviorLog:
    """'movielens' (the embedded MovieLens-100K) or a CSV/parquet log file."""
    return load_movielens() if source == "movielens" else load_log(source)


def sample_split(split: TimeSplit, sample: SampleConfig) -> dict[str, np.ndarray]:
    """The split's example rows, each subsampled to the configured size (sorted, reproducible)."""
    rng = np.random.default_rng(sample.seed)
    out = {}
    for name, rows in split.items():
        limit = getattr(sample, name)
        if limit is not None and limit < rows.size:
            rows = np.sort(rng.choice(rows, limit, replace=False))
        out[name] = rows
    return out


@dataclass
class TableReport:
    behavior_events: int   # behaviors referenced by the log (events in any sequence)
    unique_behaviors: int  # rows of the behavior table
    items: int
    seconds: float

    @property
    def dedup_ratio(self) -> float:
        return self.behavior_events / max(self.unique_behaviors, 1)


def build_scorer(model: str, data: BehaviorLog, config: ScorerConfig, tables_dir: str | Path,
                 device: str = "auto") -> tuple[BAHEScorer, TableReport]:
    """A fresh scorer whose tables hold every item text of the log (behaviors are items here)."""
    texts = data.item_id_texts
    start = time.perf_counter()
    scorer = BAHEScorer.create(model, behavior_texts=texts, item_texts=texts, tables_dir=tables_dir, config=config,
                               device=device)
    report = TableReport(behavior_events=int(data.membership.sum()), unique_behaviors=len(scorer.behaviors),
                         items=len(scorer.items), seconds=time.perf_counter() - start)
    log.info("behavior table: %d behavior events in the log -> %d unique rows (%.0fx dedup), built in %.1f s",
             report.behavior_events, report.unique_behaviors, report.dedup_ratio, report.seconds)
    return scorer, report


@dataclass
class ModelReport:
    name: str
    fit: FitResult
    test: dict[str, float]


def train_and_test(model, data: BehaviorLog, rows: dict[str, np.ndarray], config: TrainConfig,
                   device: str = "cpu") -> ModelReport:
    result = fit(model, data, rows["train"], rows["val"], config, device=device)
    test = evaluate(model, data, rows["test"], batch_size=config.eval_batch_size, device=device)
    log.info("%s: test AUC %.4f, log loss %.4f", model.name, test["auc"], test["logloss"])
    return ModelReport(model.name, result, test)
