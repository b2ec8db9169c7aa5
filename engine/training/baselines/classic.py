"""Classic CTR baselines the LLM models are compared against: logistic regression and gradient-boosted trees
(scikit-learn's HistGradientBoostingClassifier) on hand-made features of the log.

Every feature of an example uses only events with timestamp strictly before the target's (the log's history
rule), so the baselines see exactly the information an LLM model sees in its histories:
- count features: engine.features.side_features.count_features of the user's and the item's past counts per sequence;
- the user's positive rate over their last RECENT past events;
- the user's positive rate on the target's genres (past events whose item shares a genre with the target, an
  event counted once per shared genre);
- the item's positive rate over all users;
- the target's genres (multi-hot) and release year (NaN when its title has none), from item texts of the form
  "Title (1995) | Animation, Children's, Comedy".
Rates are Laplace-smoothed, (positives + 1) / (events + 2), so a user or item without past events gets 1/2.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from engine.features.side_features import count_feature_names, count_features
from engine.training.data.log import BehaviorLog
from engine.training.data.example_features import counts_before, past_counts

__all__ = ["RECENT", "parse_item_text", "classic_features", "ClassicModel", "fit_classic"]

RECENT = 10  # past events in the user's recent positive rate
GENRE_SEPARATOR, TEXT_SEPARATOR = ", ", " | "
_YEAR = re.compile(r"\((\d{4})\)")


def parse_item_text(text: str) -> tuple[list[str], float]:
    """(genres, year) of "Title (1995) | Genre, Genre": the genres after ' | ' (none without it) and the last
    4-digit year in parentheses in the title (NaN without one)."""
    title, _, genres = text.partition(TEXT_SEPARATOR)
    years = _YEAR.findall(title)
    return [g for g in genres.split(GENRE_SEPARATOR) if g], float(years[-1]) if years else float("nan")


def _smoothed_rate(sums: np.ndarray) -> np.ndarray:
    """(B,) (positives + 1) / (events + 2) from (B, 2) sums of [label, 1]."""
    return (sums[:, 0] + 1.0) / (sums[:, 1] + 2.0)


def _recent_rate(log: BehaviorLog, rows: np.ndarray) -> np.ndarray:
    """(B,) smoothed positive rate of the user's last RECENT events strictly before each target: rows are
    sorted by (user, timestamp), so those events end at the user's first row + history_length."""
    user_start = np.searchsorted(log.user, log.user[rows], side="left")
    end = user_start + log.history_length[rows]
    start = np.maximum(end - RECENT, user_start)
    positives = np.r_[0, np.cumsum(log.label, dtype=np.int64)]
    return _smoothed_rate(np.stack([positives[end] - positives[start], end - start], axis=1))


def _genre_rate(log: BehaviorLog, rows: np.ndarray, item_genres: np.ndarray) -> np.ndarray:
    """(B,) smoothed positive rate of the user's past events on the target's genres: counts per (user, genre)
    strictly before the target (counts_before over the events expanded to one entry per genre), summed over
    the target's genres. item_genres: (I, G) bool, rows aligned with log.item_ids."""
    num_genres = item_genres.shape[1]
    _, user_rank = np.unique(log.user, return_inverse=True)
    event_genres = item_genres[np.searchsorted(log.item_ids, log.item)]
    event, genre = np.nonzero(event_genres)
    query, query_genre = np.nonzero(event_genres[rows])
    sums = counts_before(user_rank[event] * num_genres + genre, log.timestamp[event],
                         np.stack([log.label[event], np.ones(event.size, np.int8)], axis=1),
                         user_rank[rows][query] * num_genres + query_genre, log.timestamp[rows][query])
    per_row = np.zeros((rows.size, 2), dtype=np.int64)
    np.add.at(per_row, query, sums)
    return _smoothed_rate(per_row)


def classic_features(log: BehaviorLog, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(X (B, F) float32, the F column names) for the examples at `rows` (module docstring). The genre columns
    cover the genres of all the log's item texts, sorted."""
    rows = np.asarray(rows, dtype=np.int64)
    parsed = [parse_item_text(text) for text in log.item_id_texts]
    vocabulary = sorted({g for genres, _ in parsed for g in genres})
    item_genres = np.array([[g in genres for g in vocabulary] for genres, _ in parsed], dtype=bool)
    target = np.searchsorted(log.item_ids, log.item[rows])
    labels_and_ones = np.stack([log.label, np.ones(log.num_events, np.int8)], axis=1)
    item_sums = counts_before(log.item, log.timestamp, labels_and_ones, log.item[rows], log.timestamp[rows])
    columns = [
        count_features(*past_counts(log, rows)),
        np.stack([_recent_rate(log, rows), _genre_rate(log, rows, item_genres), _smoothed_rate(item_sums),
                  np.array([year for _, year in parsed])[target]], axis=1),
        item_genres[target],
    ]
    names = [*count_feature_names(log.sequence_names), f"user_recent{RECENT}_rate", "user_genre_rate",
             "item_rate", "year", *(f"genre={g}" for g in vocabulary)]
    return np.concatenate(columns, axis=1).astype(np.float32), names


@dataclass
class ClassicModel:
    """A fitted baseline: `predict(log, rows)` recomputes the features and returns click probabilities."""

    kind: str
    estimator: Any
    names: list[str]  # the feature columns it was trained on

    def select(self, x: np.ndarray, names: list[str]) -> np.ndarray:
        """The model's columns of features `x` named `names`, or ValueError naming the ones that are absent."""
        missing = [n for n in self.names if n not in names]
        if missing:
            raise ValueError(f"the features lack {len(missing)} columns the model was trained on, e.g. {missing[:3]}")
        return x[:, [names.index(n) for n in self.names]]

    def predict(self, log: BehaviorLog, rows: np.ndarray) -> np.ndarray:
        """(B,) float64 click probabilities of the examples at `rows`."""
        return self.estimator.predict_proba(self.select(*classic_features(log, rows)))[:, 1].astype(np.float64)


def fit_classic(kind: Literal["gbdt", "logistic"], log: BehaviorLog, train_rows: np.ndarray,
                val_rows: np.ndarray, seed: int = 0, *, counts_only: bool = False) -> ClassicModel:
    """Fit a baseline on the examples at `train_rows`. gbdt: up to 500 boosting rounds, stopped when the
    validation log loss (on `val_rows`) has not improved for 20 rounds; logistic: standardized features
    (year's NaN imputed by the median plus a missing flag), L2 with C = 1, `val_rows` unused. `counts_only`
    keeps the count features alone. Seeds are fixed by `seed`."""
    x, names = classic_features(log, train_rows)
    model = ClassicModel(kind, None, count_feature_names(log.sequence_names) if counts_only else names)
    x, y = model.select(x, names), log.label[train_rows]
    if kind == "gbdt":
        if np.asarray(val_rows).size == 0:
            raise ValueError("gbdt needs validation rows for early stopping, got none")
        model.estimator = HistGradientBoostingClassifier(
            learning_rate=0.05, max_iter=500, early_stopping=True, n_iter_no_change=20, random_state=seed
        ).fit(x, y, X_val=model.select(*classic_features(log, val_rows)), y_val=log.label[val_rows])
    elif kind == "logistic":
        model.estimator = make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler(),
                                        LogisticRegression(max_iter=1000, random_state=seed)).fit(x, y)
    else:
        raise ValueError(f"kind must be 'gbdt' or 'logistic', got {kind!r}")
    return model
