"""`bahe demo --data ml1m [--quick]`: MovieLens-1M, BAHE against its strongest peers, on all the training data.

Splits (full run; `--quick`: the time split alone):
- time: one global cut at the 80% and 90% quantiles of event timestamps (train / validation / test); an event's
  history is the same user's events of strictly earlier seconds (engine.training.data.log);
- per-user: each user's last 10% of examples test, the 10% before validation (engine.training.data.user_split);
- held-out items: 10% of the items drawn with the seed, none of their examples in train or validation; test is
  their time-split test examples; every id model scores them with its unseen item-id bucket
  (engine.training.loops.unseen_items); their count features are past-only like every item's.
Models (full run; `--quick`: BAHE, the sequential id model and both LightGBM rows): BAHE's full CTR model, the
same model without its LLM part, gradient boosting and logistic regression (engine.training.baselines.classic),
the id-only model, the sequential id model (engine.training.loops.sequential_id), LightGBM on the side features
and on side + text features (engine.training.baselines.lightgbm_peers).
Per model and split: AUC and GAUC with 95% user-bootstrap intervals, paired intervals against BAHE, log loss, AUC
and GAUC on cold items (< 5 and < 20 training examples), wall time; on the time split also the top-10 overlap
across test users (engine.training.studies.top_lists) and a calibration curve. The report is
engine.training.studies.demo_ml1m_report. Finished rows are kept under <out>/rows (RowCache) and reused by a later
run with the same settings, so a long run stopped part-way resumes, and rows of separate runs join one table.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.training.baselines.classic import fit_classic
from engine.training.baselines.lightgbm_peers import fit_lightgbm
from engine.training.data.cold_items import COLD_THRESHOLDS, cold_subsets, held_out_items_split
from engine.training.data.log import BehaviorLog
from engine.training.data.user_split import per_user_split
from engine.training.loops.ctr_models import BAHECTR, IdOnlyCTR, SideOnlyCTR
from engine.training.loops.sequential_id import SequentialIdCTR
from engine.training.loops.train import fit, predict
from engine.training.loops.unseen_items import give_unseen_bucket
from engine.training.studies.demo import DemoConfig, DemoRow, demo_scorer, initial_weights
from engine.serving.scorer import BAHEScorer
from engine.training.studies.experiment import TableReport, load_data
from engine.training.studies.metrics import (Interval, auc_interval, calibration_bins, gauc, gauc_interval, log_loss,
                                             roc_auc, undefined_as_nan)
from engine.training.studies.top_lists import (TopListOverlap, anchor_rows, model_top_overlap, neural_scores,
                                               probe_log)
from weights.atomic import atomic_write

log = logging.getLogger(__name__)

# The ML-1M demo's training settings over DemoConfig's (`bahe demo --data ml1m`, `bench.seeds --data ml1m`): two
# epochs, no raw-token subset, learning rates decaying linearly to 0 (validation AUC 0.8062 vs 0.8008 constant, seed 0),
# BAHE reading learned id rows beside its ABE rows (test AUC 0.8034-0.8053 vs 0.7994-0.8014 without, seeds 0-2:
# docs/results-movielens-1m.md)
ML1M_TRAINING = {"epochs": 2, "raw_train_examples": 0, "lr_decay": True, "id_rows": True}
LIGHTGBM_SIDE, LIGHTGBM_TEXT = "LightGBM, side features", "LightGBM, side + text features"
ALL_MODELS = ("BAHE", "CTR model without text", "gradient boosting (classic)", "logistic regression (classic)",
              "id-only", "sequential id", LIGHTGBM_SIDE, LIGHTGBM_TEXT)
QUICK_MODELS = (LIGHTGBM_SIDE, LIGHTGBM_TEXT, "BAHE", "sequential id")  # the cheap rows first: figures sooner
ALL_SPLITS, QUICK_SPLITS = ("per-user", "held-out items", "time"), ("time",)
NOTES = {
    "BAHE": "text vectors (MiniLM upper layer over whole histories of ABE rows, + learned id rows where "
            "ModelConfig.id_rows, the ML-1M default) + counts + similarity counts + item id + categorical; timeline "
            "training",
    "CTR model without text": "the same CTR model without the LLM part (ablation)",
    "gradient boosting (classic)": "past-only statistics, genres, year",
    "logistic regression (classic)": "same features",
    "id-only": "learned item-id embeddings, mean-pooled (100 most recent)",
    "sequential id": "BAHE's upper-layer architecture, fresh weights, over learned item-id rows; BAHE's side "
                     "features and head",
    LIGHTGBM_SIDE: "past counts and rates, genres, year, gender, age, occupation; 6-config search on validation AUC",
    LIGHTGBM_TEXT: "the same + cosine of the target's frozen ABE row with the user's earlier liked / disliked mean",
}


@dataclass
class Ml1mConfig:
    """The ML-1M demo's options on top of the demo's (`demo`: model, tables, epochs, seed, RESULTS.md)."""
    demo: DemoConfig
    quick: bool = False
    held_out_fraction: float = 0.1
    overlap_users: int = 100          # test users whose top-10 lists are compared (time split)
    threads: int | None = None        # LightGBM threads (None: its default)
    models: tuple[str, ...] = field(default=())
    splits: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self.models = self.models or (QUICK_MODELS if self.quick else ALL_MODELS)
        self.splits = self.splits or (QUICK_SPLITS if self.quick else ALL_SPLITS)
        unknown = [m for m in self.models if m not in ALL_MODELS] + [s for s in self.splits if s not in ALL_SPLITS]
        if unknown:
            raise ValueError(f"unknown models or splits {unknown}; models are {list(ALL_MODELS)}, splits "
                             f"{list(ALL_SPLITS)}")
        if "BAHE" not in self.models:
            raise ValueError("the demo compares every model with BAHE; keep 'BAHE' in models")

    def probe_users(self, split: str) -> int:
        """Test users of `split` whose top-10 lists are compared: the probe runs on the time split only."""
        return self.overlap_users if split == "time" else 0


@dataclass
class PeerResult:
    """One model on one split. cold: threshold k -> (test examples, AUC, GAUC) on the examples whose item had
    fewer than k training examples (None where a metric is undefined)."""
    row: DemoRow
    gauc: Interval
    wall_seconds: float
    cold: dict[int, tuple[int, float | None, float | None]]
    overlap: TopListOverlap | None = None
    calibration: list[tuple[float, float, int]] | None = None
    search: list[dict] | None = None


@dataclass
class Ml1mRun:
    results: list[PeerResult]
    splits: dict[str, dict[str, np.ndarray]]
    held_out_items: int
    tables: TableReport
    elapsed: float
    data_summary: str


def ml1m_splits(data: BehaviorLog, names: tuple[str, ...], fraction: float, seed: int
                ) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
    """split name -> {'train', 'val', 'test'} example rows, and the held-out item ids (empty without that split)."""
    time_split = dict(data.split().items())
    out, held = {}, np.zeros(0, dtype=np.int64)
    for name in names:
        if name == "time":
            out[name] = time_split
        elif name == "per-user":
            out[name] = dict(per_user_split(data).items())
        else:
            out[name], held = held_out_items_split(data, time_split, fraction, seed)
    return out, held


def frozen_rows(scorer: BAHEScorer, data: BehaviorLog) -> np.ndarray:
    """(I, D) float32: BAHE's frozen ABE behavior rows of the log's items, aligned with data.item_ids."""
    table = scorer.table_rows("behaviors")
    return table[scorer.behaviors.lookup(data.item_id_texts)].float().cpu().numpy()


def _neural(name: str, data: BehaviorLog, rows: dict, ctx: dict) -> tuple[nn.Module, float]:
    """(model, seconds per epoch) of a neural row, trained with the demo's settings."""
    config: DemoConfig = ctx["config"]
    scorer, seed = ctx["scorer"], config.seed
    model_config = scorer.config.model
    if name == "BAHE":
        scorer.model.load_state_dict(ctx["initial"])
        model = BAHECTR(scorer, data)
    else:
        torch.manual_seed(seed)
        if name == "CTR model without text":
            model = SideOnlyCTR(model_config, data)
        elif name == "id-only":
            model = IdOnlyCTR(replace(model_config, max_behaviors=config.id_only_behaviors, window_step=1), data)
        else:
            model = SequentialIdCTR.from_scorer(scorer, data, rows["train"])
    result = fit(model, data, rows["train"], rows["val"], config.train())
    return model, float(np.mean(result.epoch_seconds))


def fit_and_score(name: str, data: BehaviorLog, rows: dict, ctx: dict, held: np.ndarray
                  ) -> tuple[np.ndarray, float, Callable, list[dict] | None]:
    """(test probabilities, train seconds (per epoch, or the fit), the model's probe scorer, LightGBM's search)."""
    config: DemoConfig = ctx["config"]
    start, search = time.perf_counter(), None
    if name in (LIGHTGBM_SIDE, LIGHTGBM_TEXT):
        model = fit_lightgbm(data, rows["train"], rows["val"], seed=config.seed, threads=ctx["threads"],
                             vectors=ctx["vectors"] if name == LIGHTGBM_TEXT else None)
        seconds, score, search = time.perf_counter() - start, model.predict, model.search
    elif name.endswith("(classic)"):
        model = fit_classic("gbdt" if name.startswith("gradient") else "logistic", data, rows["train"], rows["val"],
                            config.seed)
        seconds, score = time.perf_counter() - start, model.predict
    else:
        model, seconds = _neural(name, data, rows, ctx)
        if held.size:
            give_unseen_bucket(model, held)
        score = neural_scores(model)
    return score(data, rows["test"]), seconds, score, search


def _maybe(metric: Callable, *args) -> float | None:
    try:
        return metric(*args)
    except ValueError:  # one class only in a small subset
        return None


def evaluate_row(name: str, split: str, data: BehaviorLog, rows: dict, probs: np.ndarray, seconds: float,
                 wall: float) -> PeerResult:
    """The metrics of one model's test probabilities `probs` (PeerResult)."""
    test = rows["test"]
    labels, users = data.label[test], data.user[test]
    row = DemoRow(name, split, rows["train"].size, auc_interval(labels, probs, users), log_loss(labels, probs),
                  seconds, NOTES[name], probs)
    cold = {}
    for k, positions in cold_subsets(data, rows["train"], test, COLD_THRESHOLDS).items():
        sub = (labels[positions], probs[positions])
        cold[k] = (int(positions.size), _maybe(roc_auc, *sub), _maybe(gauc, *sub, users[positions]))
    result = PeerResult(row, undefined_as_nan(gauc_interval, labels, probs, users), wall, cold)
    log.info("%s / %s: test AUC %s, GAUC %s", split, name, row.auc, result.gauc)
    return result


class RowCache:
    """Finished rows of the demo kept under `folder` (one .npz each: test probabilities, timings, the LightGBM
    search, the top-10 overlap), so that a run stopped part-way, or a later run with more rows or splits, reuses
    them: a 3-hour table need not start over. A row is reused only when its fingerprint matches: the model, the
    split, the seed and training settings, and the split's exact example rows (and, on the time split only, where
    the top-10 overlap is measured, its number of probe users)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def fingerprint(name: str, split: str, config: Ml1mConfig, rows: dict[str, np.ndarray]) -> dict:
        demo = config.demo
        return {"model": name, "split": split, "seed": demo.seed, "epochs": demo.epochs, "batch_size": demo.batch_size,
                "lower_layers": demo.num_lower_layers, "max_behaviors": demo.max_behaviors, "lr_decay": demo.lr_decay,
                "id_rows": demo.id_rows, **({"item_id_dropout": demo.item_id_dropout} if demo.item_id_dropout else {}),
                "held_out_fraction": config.held_out_fraction, "overlap_users": config.probe_users(split),
                "rows": RowCache.rows_key(rows)}

    @staticmethod
    def rows_key(rows: dict[str, np.ndarray]) -> dict:
        """A split's exact example rows as a fingerprint field: part -> [size, sha256 of the rows]."""
        return {part: [int(r.size), hashlib.sha256(np.ascontiguousarray(r, np.int64).tobytes()).hexdigest()]
                for part, r in sorted(rows.items())}

    def _path(self, fingerprint: dict) -> Path:
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        slug = f"{fingerprint['split']}--{fingerprint['model']}".replace(" ", "_").replace(",", "").replace("+", "and")
        return self.folder / f"{slug}--{key}.npz"

    def load(self, fingerprint: dict) -> tuple[np.ndarray, dict] | None:
        """(test probabilities, {seconds, wall, search, overlap}) of a finished row, or None."""
        path = self._path(fingerprint)
        if not path.is_file():
            return None
        probs, meta = self.read(path)
        return (probs, meta) if meta["fingerprint"] == fingerprint else None

    @staticmethod
    def read(path: Path) -> tuple[np.ndarray, dict]:
        """(test probabilities, meta with its 'fingerprint') of one kept row file."""
        with np.load(path) as saved:
            return saved["probs"], json.loads(str(saved["meta"]))

    def store(self, fingerprint: dict, probs: np.ndarray, meta: dict) -> None:
        """Keep a finished row (written atomically: a killed run leaves the old file or none)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, probs=np.asarray(probs, np.float64), meta=json.dumps({**meta, "fingerprint": fingerprint}))
        with atomic_write(self._path(fingerprint)) as f:
            f.write(buffer.getvalue())


def fit_or_reuse(name: str, split: str, data: BehaviorLog, rows: dict, ctx: dict, held: np.ndarray, probe
                 ) -> PeerResult:
    """The row `name` on `split`: from the run's RowCache when it holds it, else trained, scored and stored."""
    cache: RowCache = ctx["cache"]
    key = RowCache.fingerprint(name, split, ctx["ml1m"], rows)
    cached = cache.load(key)
    if cached is not None:
        probs, meta = cached
        log.info("%s / %s: reused from %s", split, name, cache.folder)
        overlap = TopListOverlap(**meta["overlap"]) if meta["overlap"] else None
    else:
        start = time.perf_counter()
        probs, seconds, score, search = fit_and_score(name, data, rows, ctx, held)
        overlap = model_top_overlap(score, *probe) if probe is not None else None
        meta = {"seconds": seconds, "wall": time.perf_counter() - start, "search": search,
                "overlap": asdict(overlap) if overlap else None}
        cache.store(key, probs, meta)
    result = evaluate_row(name, split, data, rows, probs, meta["seconds"], meta["wall"])
    result.search, result.overlap = meta["search"], overlap
    if split == "time":
        result.calibration = calibration_bins(data.label[rows["test"]], probs)
    return result


def run_ml1m(config: Ml1mConfig, data: BehaviorLog | None = None, say: Callable[[str], None] = print) -> Ml1mRun:
    """Every model of `config` on every split of it (module docstring); `say` gets the progress lines."""
    started = time.perf_counter()
    demo = config.demo
    data = load_data(demo.data) if data is None else data
    splits, held = ml1m_splits(data, config.splits, config.held_out_fraction, demo.seed)
    summary = (f"{data.num_events:,} events, {np.unique(data.user).size:,} users, {data.item_ids.size:,} items, "
               f"positive rate {data.label.mean():.3f}")
    say(f"data: {summary}")
    for name, rows in splits.items():
        say(f"  {name} split: " + ", ".join(f"{part} {r.size:,}" for part, r in rows.items()))
    scorer, tables = demo_scorer(demo, data)
    ctx = {"config": demo, "ml1m": config, "scorer": scorer, "initial": initial_weights(scorer),
           "threads": config.threads, "vectors": frozen_rows(scorer, data), "cache": RowCache(demo.out / "rows")}
    results = []
    for split, rows in splits.items():
        probe, probe_users = None, config.probe_users(split)
        if probe_users:
            anchors = anchor_rows(data, rows["test"], probe_users, demo.seed)
            probe = probe_log(data, anchors, int(data.timestamp[rows["test"]].min()))
        for name in config.models:
            result = fit_or_reuse(name, split, data, rows, ctx, held if split == "held-out items"
                                  else np.zeros(0, dtype=np.int64), probe)
            results.append(result)
            say(f"{split} / {name}: AUC {result.row.auc}, GAUC {result.gauc}, log loss {result.row.logloss:.4f}, "
                f"{result.wall_seconds:.0f} s" + (f"; top-10: {result.overlap}" if result.overlap else ""))
    return Ml1mRun(results, splits, int(held.size), tables, time.perf_counter() - started, summary)
