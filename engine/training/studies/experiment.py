"""Shared steps of `bahe train`, `bahe demo` and the benchmarks: load a log, cut it by time, subsample,
build the scorer's tables (reporting the dedup), and train + evaluate a model; `ScorerSetup` holds the
model, data and run options the benchmark scripts share (and their command-line flags)."""
from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from engine.config import EncoderConfig, ModelConfig, ScorerConfig, ScoringConfig
from engine.training.data.log import BehaviorLog, TimeSplit
from engine.training.data.log_files import load_log
from engine.training.data.movielens import load_movielens
from engine.training.data.movielens_1m import is_movielens_1m_dir, load_movielens_1m
from engine.serving.scorer import BAHEScorer
from engine.training.loops.data_parallel import DataParallel
from engine.training.loops.train import FitResult, TrainConfig, evaluate, fit
from weights.registry import resolve_model

log = logging.getLogger(__name__)


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Inside the block, torch and the OpenMP/BLAS pools (scikit-learn's, through threadpoolctl when it is
    installed) use at most `threads` CPU threads; None leaves them as they are. Restored on exit."""
    if not threads:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads) if threadpool_limits else nullcontext():
            yield
    finally:
        torch.set_num_threads(before)


@dataclass
class SampleConfig:
    """How many examples of each split to use (None: all), drawn at random with `seed`."""
    train: int | None = None
    val: int | None = None
    test: int | None = None
    seed: int = 0


DATA_SOURCES = "'movielens' (MovieLens-100K), 'ml1m' (MovieLens-1M), a folder of MovieLens-1M's .dat files, or a " \
               "CSV/parquet log file"


def is_dataset(source: str) -> bool:
    """Whether `--data` names a packaged data set (MovieLens-100K, -1M or a folder of -1M's .dat files), not a log."""
    return source in ("movielens", "ml1m") or is_movielens_1m_dir(source)


def is_movielens_1m(source: str) -> bool:
    """Whether `--data` names MovieLens-1M ('ml1m' or a folder of its .dat files): its studies train with
    ML1M_TRAINING (engine.training.studies.demo_ml1m)."""
    return source == "ml1m" or is_movielens_1m_dir(source)


def data_name(source: str) -> str:
    """What `--data` names, for a report's title: MovieLens-100K, MovieLens-1M, or the log file's name."""
    if source == "movielens":
        return "MovieLens-100K"
    return "MovieLens-1M" if is_movielens_1m(source) else Path(source).name


def ml1m_suffix(source: str) -> str:
    """'-ml1m' where `--data` names MovieLens-1M, else '': in a bench's section and file names, so that each data
    set keeps its own."""
    return "-ml1m" if is_movielens_1m(source) else ""


def load_data(source: str, *, catalog: str | None = None, timestamps: str = "auto") -> BehaviorLog:
    """The log that `--data` names: the embedded MovieLens-100K or -1M, a folder of -1M's files, or a log file
    (with an item `catalog` file and its `timestamps` format, load_log's; a data set has its own)."""
    if is_dataset(source) and (catalog or timestamps != "auto"):
        raise ValueError(f"--catalog and --timestamps apply to a log file; {source!r} is a packaged data set")
    if source == "movielens":
        return load_movielens()
    if source == "ml1m":
        return load_movielens_1m()
    if is_movielens_1m_dir(source):
        return load_movielens_1m(source)
    return load_log(source, catalog=catalog, timestamps=timestamps)


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
                 device: str = "auto", progress: bool = True) -> tuple[BAHEScorer, TableReport]:
    """A fresh scorer whose tables hold every item text of the log (behaviors are items here)."""
    texts = data.item_id_texts
    start = time.perf_counter()
    scorer = BAHEScorer.create(model, behavior_texts=texts, item_texts=texts, tables_dir=tables_dir, config=config,
                               device=device, progress=progress)
    report = TableReport(behavior_events=int(data.membership.sum()), unique_behaviors=len(scorer.behaviors),
                         items=len(scorer.items), seconds=time.perf_counter() - start)
    log.info("behavior table: %d behavior events in the log -> %d unique rows (%.0fx dedup), built in %.1f s",
             report.behavior_events, report.unique_behaviors, report.dedup_ratio, report.seconds)
    return scorer, report


@dataclass
class ScorerSetup:
    """The model, data and run options shared by the benchmark scripts (python -m bench.compare,
    bench.profile, the pytest-benchmark suites); the defaults work out of the box."""
    model: str = "minilm"
    data: str = "movielens"
    lower_layers: int = 3
    max_tokens: int = 32                       # per behavior (ABE) and per item text (raw side)
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    work_dir: Path = Path("artifacts/bench")   # cached behavior tables

    def tables_dir(self) -> Path:
        """Cached tables, one folder per (model folder, lower layers, max tokens)."""
        folder = resolve_model(self.model).resolve()
        tag = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
        return self.work_dir / f"tables-{folder.name}-{tag}-L{self.lower_layers}-T{self.max_tokens}"

    def scorer(self, data: BehaviorLog, max_behaviors: int, batch_size: int) -> BAHEScorer:
        """The BAHE scorer's text part (the scaling benchmarks compare it with the raw-token LLM) over every
        item text of `data` (tables built once, then reused from the work dir), keeping `max_behaviors` per
        sequence and scoring `batch_size` users per batch."""
        config = ScorerConfig(
            encoder=EncoderConfig(num_lower_layers=self.lower_layers, max_tokens=self.max_tokens),
            model=ModelConfig(sequence_names=data.sequence_names, max_behaviors=max_behaviors).text_only(),
            scoring=ScoringConfig(batch_size=max(batch_size, 1)))
        scorer, _ = build_scorer(self.model, data, config, self.tables_dir(), device=self.device, progress=False)
        return scorer

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser, d: ScorerSetup) -> None:
        """The command-line flags of these options, defaulting to `d`'s (their dests are the field names)."""
        p.add_argument("--model", default=d.model, help="'minilm', 'smollm2' or a local checkpoint folder")
        p.add_argument("--data", default=d.data, help=DATA_SOURCES)
        p.add_argument("--lower-layers", type=int, default=d.lower_layers)
        p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per behavior / item text")
        p.add_argument("--device", default=d.device)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--work-dir", type=Path, default=d.work_dir, help="cached behavior tables")

    @staticmethod
    def options(args: argparse.Namespace) -> dict:
        """The parsed flags of `add_arguments`, as keyword arguments of ScorerSetup or a subclass."""
        return {f.name: getattr(args, f.name) for f in fields(ScorerSetup)}


@dataclass
class ModelReport:
    name: str
    fit: FitResult
    test: dict[str, float]


def train_and_test(model, data: BehaviorLog, rows: dict[str, np.ndarray], config: TrainConfig,
                   device: str = "cpu", parallel: DataParallel | None = None) -> ModelReport:
    """Fit on rows['train'] (early stopping on rows['val']), then test; `parallel`: this rank's part of a
    data-parallel run (engine.training.loops.data_parallel)."""
    result = fit(model, data, rows["train"], rows["val"], config, device=device, parallel=parallel)
    test = evaluate(model, data, rows["test"], batch_size=config.eval_batch_size, device=device, parallel=parallel)
    log.info("%s: test AUC %.4f, log loss %.4f", model.name, test["auc"], test["logloss"])
    return ModelReport(model.name, result, test)
