"""LightGBM peers of BAHE, tuned on the validation split by a stated small search.

Two feature sets, every column past-only (events with timestamp strictly before the target's):
- side: the classic baselines' features (engine.training.baselines.classic: past counts and rates, genres, year)
  plus the log's categorical columns (MovieLens: gender, age, occupation) as LightGBM categoricals - every side
  input BAHE's full model gets except the learned user and item ids;
- side + text: the same plus text features from BAHE's frozen LLM rows (the ABE behavior table): for each named
  sequence (liked, disliked), the cosine of the target item's row with the mean row of the user's earlier items
  in that sequence (NaN without one).

The search (SEARCH): num_leaves {31, 127} x min_child_samples {20, 100, 500} at learning rate 0.1, 6 configs;
each boosts up to MAX_ROUNDS rounds and stops when the validation AUC has not improved for PATIENCE rounds; the
config with the best validation AUC is kept (its best round). Cost on MovieLens-1M's 786,801 training examples
(39 side features), 2 cores shared with other jobs (load ~11): 451 s for one config at num_leaves 15, learning
rate 0.05 (465 rounds); hence one learning rate, 0.1.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.training.baselines.classic import classic_features
from engine.training.data.extra_columns import ExtraColumns
from engine.training.data.log import BehaviorLog

__all__ = ["SEARCH", "TEXT_SEQUENCES", "text_features", "peer_features", "LightGBMPeer",
           "fit_lightgbm"]

logger = logging.getLogger(__name__)

SEARCH = tuple({"num_leaves": leaves, "learning_rate": 0.1, "min_child_samples": child}
               for leaves, child in itertools.product((31, 127), (20, 100, 500)))
MAX_ROUNDS, PATIENCE = 1000, 30
TEXT_SEQUENCES = ("liked", "disliked")


def text_features(log: BehaviorLog, rows: np.ndarray, vectors: np.ndarray,
                  sequences: Sequence[str] = TEXT_SEQUENCES) -> tuple[np.ndarray, list[str]]:
    """((B, len(sequences)) float32, names): for each example at `rows` and each sequence, the cosine of the
    target's vector with the mean of the unit vectors of the user's events in that sequence strictly before the
    target's timestamp (NaN when there is none). vectors: (I, D) rows aligned with log.item_ids (BAHE's frozen
    ABE rows). One pass per user: prefix sums of the user's unit vectors, read at each target's moment."""
    rows = np.asarray(rows, dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != log.item_ids.size:
        raise ValueError(f"vectors must be (I, D) with I = {log.item_ids.size} rows aligned with the log's item "
                         f"ids, got shape {vectors.shape}")
    missing = [s for s in sequences if s not in log.sequence_names]
    if missing:
        raise ValueError(f"the log has no sequence {missing}; it has {list(log.sequence_names)}")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    item_row = np.searchsorted(log.item_ids, log.item)
    columns = [log.sequence_names.index(s) for s in sequences]
    out = np.full((rows.size, len(sequences)), np.nan, dtype=np.float32)
    order = np.argsort(log.user[rows], kind="stable")
    users = log.user[rows][order]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    for g in range(bounds.size - 1):
        queries = order[bounds[g]:bounds[g + 1]]
        lo, hi = np.searchsorted(log.user, users[bounds[g]], "left"), np.searchsorted(log.user, users[bounds[g]],
                                                                                       "right")
        times, target = log.timestamp[rows[queries]], unit[item_row[rows[queries]]]
        for k, s in enumerate(columns):
            events = lo + np.flatnonzero(log.membership[lo:hi, s])
            sums = np.zeros((events.size + 1, unit.shape[1]))
            np.cumsum(unit[item_row[events]], axis=0, out=sums[1:])
            before = np.searchsorted(log.timestamp[events], times, side="left")  # events sorted by time
            total = sums[before]
            norm = np.linalg.norm(total, axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[queries, k] = np.where(before > 0, (total * target).sum(axis=1) / norm, np.nan)
    return out, [f"text_cos_{s}" for s in sequences]


def _category_codes(log: BehaviorLog) -> dict[str, dict]:
    """feature -> {value: code}, codes by sorted value over the whole log (None stays missing)."""
    return {name: {v: i for i, v in enumerate(sorted({v for v in values if v is not None}, key=str))}
            for name, values in log.categorical.items()}


def peer_features(log: BehaviorLog, rows: np.ndarray, vectors: np.ndarray | None = None,
                  codes: dict[str, dict] | None = None,
                  extra: ExtraColumns | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """(X (B, F) float32, names, categorical names) of the examples at `rows`: the classic features, the log's
    categorical columns as codes (`codes`: value -> code per feature, default from the log; unknown values NaN),
    given `vectors` the text features, given `extra` its columns."""
    rows = np.asarray(rows, dtype=np.int64)
    x, names = classic_features(log, rows)
    codes = _category_codes(log) if codes is None else codes
    categorical = [f"cat_{name}" for name in codes]
    cat = np.array([[codes[name].get(v, np.nan) if v is not None else np.nan for v in log.category_values(name, rows)]
                    for name in codes], dtype=np.float32).reshape(len(codes), rows.size).T
    parts, names = [x, cat], [*names, *categorical]
    if vectors is not None:
        text, text_names = text_features(log, rows, vectors)
        parts.append(text)
        names += text_names
    if extra is not None:
        parts.append(extra.take(rows))
        names += list(extra.names)
    return np.concatenate(parts, axis=1).astype(np.float32), names, categorical


@dataclass
class LightGBMPeer:
    """A fitted peer: `predict(log, rows)` recomputes the past-only features and returns click probabilities."""
    name: str
    booster: object
    names: list[str]
    codes: dict[str, dict]
    vectors: np.ndarray | None
    search: list[dict] = field(default_factory=list)  # per config: params, best round, validation AUC, seconds
    extra: ExtraColumns | None = None

    def predict(self, log: BehaviorLog, rows: np.ndarray) -> np.ndarray:
        """(B,) float64 click probabilities of the examples at `rows`."""
        x, names, _ = peer_features(log, rows, self.vectors, self.codes, self.extra)
        if names != self.names:
            raise ValueError(f"the features differ from the ones the model was trained on: {names} vs {self.names}")
        return np.asarray(self.booster.predict(x, num_iteration=self.booster.best_iteration), dtype=np.float64)


def fit_lightgbm(log: BehaviorLog, train_rows: np.ndarray, val_rows: np.ndarray, *,
                 vectors: np.ndarray | None = None, seed: int = 0, threads: int | None = None,
                 search: Sequence[dict] = SEARCH, extra: ExtraColumns | None = None) -> LightGBMPeer:
    """The best of `search`'s configs by validation AUC (module docstring), trained on `train_rows`; with
    `vectors` (I, D) the text features join the side features, with `extra` its columns (BAHE's feature block)."""
    import lightgbm as lgb

    if np.asarray(val_rows).size == 0:
        raise ValueError("the LightGBM search needs validation rows, got none")
    codes = _category_codes(log)
    x, names, categorical = peer_features(log, train_rows, vectors, codes, extra)
    xv, _, _ = peer_features(log, val_rows, vectors, codes, extra)
    dataset_params = {"feature_pre_filter": False, "verbose": -1, "force_col_wise": True}
    train = lgb.Dataset(x, log.label[train_rows], feature_name=names, categorical_feature=categorical,
                        params=dataset_params, free_raw_data=False)
    valid = lgb.Dataset(xv, log.label[val_rows], reference=train, params=dataset_params)
    best, results = None, []
    for config in search:
        params = {"objective": "binary", "metric": "auc", "seed": seed, "deterministic": True, "verbose": -1,
                  "num_threads": threads or 0, **config}
        start = time.perf_counter()
        booster = lgb.train(params, train, num_boost_round=MAX_ROUNDS, valid_sets=[valid],
                            callbacks=[lgb.early_stopping(PATIENCE, verbose=False)])
        auc = float(booster.best_score["valid_0"]["auc"])
        results.append({**config, "best_round": int(booster.best_iteration), "val_auc": auc,
                        "seconds": time.perf_counter() - start})
        logger.info("lightgbm %s: best round %d, validation AUC %.4f", config, booster.best_iteration, auc)
        if best is None or auc > best[0]:
            best = (auc, booster)
    name = "LightGBM, side + text features" if vectors is not None else "LightGBM, side features"
    if extra is not None:
        name = f"{name[:-len(' features')]} + {extra.label}"
    return LightGBMPeer(name, best[1], names, codes, None if vectors is None else np.asarray(vectors), results,
                        extra)
