"""`bahe calibrate`: fit a scorer's probability calibration on the validation part of a log's time split, through
the serving path (`BAHEScorer.score` on the examples' histories as texts, as requests would come), report log
loss, ECE and AUC on the test part before and after, and save the calibration into the scorer folder (scorer.json,
crash-safe like every save). Platt is the default: strictly increasing, so rankings and AUC are unchanged.
`newest=N` fits on the log's newest N labeled examples instead - the periodic refit that follows a drifting click
rate (`rolling_calibration` measures it past-only); its report is in-sample, on that window."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import CalibrationConfig
from engine.model.calibration import calibrate, fit_calibration
from engine.serving.scorer import BAHEScorer
from engine.training.data.log import BehaviorLog
from engine.training.studies.calibration_metrics import expected_calibration_error
from engine.training.studies.metrics import log_loss, roc_auc


def serving_inputs(data: BehaviorLog, rows: np.ndarray, categorical: tuple[str, ...]) -> tuple[list, list, list]:
    """The requests of the log's example `rows`: each target's whole history as texts, its item text and its
    categorical side features - what `BAHEScorer.score` takes."""
    values = {name: data.category_values(name, rows) for name in categorical}
    side = [{name: values[name][i] for name in categorical} for i in range(rows.size)]
    return data.sequence_texts(rows, None), data.target_texts(rows), side


def served(scorer: BAHEScorer, data: BehaviorLog, rows: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, float]:
    """Probabilities of the log's example `rows` through `score`, `chunk` pairs per call (their requests built per
    call: memory holds one chunk's histories, not the whole split's), and the seconds spent scoring."""
    seconds, out = 0.0, []
    for lo in range(0, rows.size, chunk):
        users, items, side = serving_inputs(data, rows[lo:lo + chunk], scorer.config.model.categorical_features)
        start = time.perf_counter()
        out.append(scorer.score(users, items, side_features=side))
        seconds += time.perf_counter() - start
    return (np.concatenate(out) if out else np.empty(0, np.float32)), seconds


@dataclass(frozen=True)
class ServedSplit:
    """A scorer's raw served probabilities on the validation and test examples of a log's time split, with the
    examples' timestamps (validation first, then test, each ascending by time as the split's rows are)."""
    val_labels: np.ndarray
    val_probs: np.ndarray
    test_labels: np.ndarray
    test_probs: np.ndarray
    test_users: np.ndarray
    val_times: np.ndarray
    test_times: np.ndarray

    @classmethod
    def of(cls, scorer: BAHEScorer, data: BehaviorLog, chunk: int = 256, *, users: int | None = None,
           seed: int = 0) -> ServedSplit:
        """Scored through `served` with any calibration of the scorer's switched off (raw probabilities).
        `users`: only the validation and test examples of that many users drawn with `seed` (None: all), the split
        still cut on the whole log (the one the scorer trained on), so a sampled example is one the split holds."""
        scorer.set_calibration(CalibrationConfig())
        split = data.split()
        val, test = split.val, split.test
        if users is not None:
            if users < 1:
                raise ValueError(f"users must be >= 1 or None (all), got {users}")
            held = np.unique(data.user[np.concatenate([val, test])])
            chosen = np.random.default_rng(seed).choice(held, min(users, held.size), replace=False)
            val, test = val[np.isin(data.user[val], chosen)], test[np.isin(data.user[test], chosen)]
        if val.size == 0 or test.size == 0:
            raise ValueError(f"the log's time split has {val.size} validation and {test.size} test examples"
                             f"{'' if users is None else f' among {users} sampled users'}; calibration needs both")
        return cls(data.label[val], served(scorer, data, val, chunk)[0], data.label[test],
                   served(scorer, data, test, chunk)[0], data.user[test], data.timestamp[val], data.timestamp[test])


def rolling_calibration(s: ServedSplit, kind: str = "platt", *, periods: int = 20, window: int = 20_000
                        ) -> np.ndarray:
    """(test,) probabilities calibrated as a map refitted every period would serve them: the test examples cut by
    time into `periods` parts of about equal count; each part mapped by `kind` fitted on the newest `window`
    labeled examples (validation, then earlier test parts) of strictly earlier timestamps - labels a CTR system
    has logged by then. What a daily `bahe calibrate` on the newest log would give, measured past-only. A window
    that gives no increasing map keeps the last good one (the raw scores before any), as a failed refit would."""
    times = np.concatenate([s.val_times, s.test_times])
    labels = np.concatenate([s.val_labels, s.test_labels])
    probs = np.concatenate([s.val_probs, s.test_probs])
    order = np.argsort(times, kind="stable")
    times, labels, probs = times[order], labels[order], probs[order]
    out = np.empty_like(s.test_probs)
    fitted = CalibrationConfig()
    test_order = np.argsort(s.test_times, kind="stable")
    for part in np.array_split(test_order, periods):
        if not part.size:
            continue
        known = int(np.searchsorted(times, s.test_times[part].min(), side="left"))  # strictly earlier
        lo = max(0, known - window)
        try:
            fitted = fit_calibration(labels[lo:known], probs[lo:known], kind)
        except ValueError:  # one class only, or scores that do not rank the window's labels
            pass
        out[part] = calibrate(fitted, s.test_probs[part])
    return out


@dataclass(frozen=True)
class CalibrationReport:
    calibration: CalibrationConfig
    fitted_examples: int
    measured_examples: int
    before: dict[str, float]   # log loss, ECE, AUC of the measured examples with the scorer's raw probabilities
    after: dict[str, float]    # the same, calibrated
    measured_on: str = "test"  # which examples `before` / `after` describe

    @classmethod
    def fit(cls, kind: str, served_split: ServedSplit) -> CalibrationReport:
        """Fit `kind` ('platt' or 'isotonic') on the validation probabilities; measure on the test ones."""
        s = served_split
        fitted = fit_calibration(s.val_labels, s.val_probs, kind)
        return cls(fitted, int(s.val_labels.size), int(s.test_labels.size), _metrics(s.test_labels, s.test_probs),
                   _metrics(s.test_labels, calibrate(fitted, s.test_probs)))

    @classmethod
    def fit_window(cls, kind: str, labels: np.ndarray, probs: np.ndarray) -> CalibrationReport:
        """Fit `kind` on one window of labeled examples and measure on the same window (in-sample)."""
        fitted = fit_calibration(labels, probs, kind)
        return cls(fitted, int(labels.size), int(labels.size), _metrics(labels, probs),
                   _metrics(labels, calibrate(fitted, probs)), measured_on="fit window (in-sample)")

    def lines(self) -> list[str]:
        rows = [f"| {self.measured_on} metric | before | after |", "|---|---|---|"]
        rows += [f"| {name} | {self.before[name]:.4f} | {self.after[name]:.4f} |" for name in self.before]
        return rows


def _metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"log loss": log_loss(labels, probs), "ECE": expected_calibration_error(labels, probs),
            "AUC": roc_auc(labels, probs)}


def newest_rows(data: BehaviorLog, newest: int) -> np.ndarray:
    """The rows of the log's `newest` latest examples (by timestamp, ties by row order), oldest first."""
    if not 2 <= newest <= data.num_events:
        raise ValueError(f"newest must be between 2 and the log's {data.num_events:,} examples, got {newest}")
    return np.argsort(data.timestamp, kind="stable")[-newest:]


def calibrate_scorer(folder: str | Path, data: BehaviorLog, kind: str = "platt", *, newest: int | None = None,
                     save: bool = True, chunk: int = 256) -> CalibrationReport:
    """Fit `kind` on the validation examples of `data.split()`, measure on its test examples - or (`newest`) fit
    on the log's newest examples and report that window - and (if `save`) write the calibration into the scorer
    folder. Any calibration already there is replaced, not stacked."""
    scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    if newest is None:
        report = CalibrationReport.fit(kind, ServedSplit.of(scorer, data, chunk))
    else:
        rows = newest_rows(data, newest)
        scorer.set_calibration(CalibrationConfig())
        report = CalibrationReport.fit_window(kind, data.label[rows], served(scorer, data, rows, chunk)[0])
    if save:
        scorer.set_calibration(report.calibration)
        scorer.save_pretrained(folder)
    return report
