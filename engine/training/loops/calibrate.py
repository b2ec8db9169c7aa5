"""`bahe calibrate`: fit a scorer's probability calibration on the validation part of a log's time split, through
the serving path (`BAHEScorer.score` on the examples' histories as texts, as requests would come), report log
loss, ECE and AUC on the test part before and after, and save the calibration into the scorer folder (scorer.json,
crash-safe like every save). Platt is the default: strictly increasing, so rankings and AUC are unchanged."""
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
    """Probabilities of the log's example `rows` through `score`, `chunk` pairs per call, and the seconds taken."""
    users, items, side = serving_inputs(data, rows, scorer.config.model.categorical_features)
    start, out = time.perf_counter(), []
    for lo in range(0, len(items), chunk):
        out.append(scorer.score(users[lo:lo + chunk], items[lo:lo + chunk], side_features=side[lo:lo + chunk]))
    return (np.concatenate(out) if out else np.empty(0, np.float32)), time.perf_counter() - start


@dataclass(frozen=True)
class CalibrationReport:
    calibration: CalibrationConfig
    validation_examples: int
    test_examples: int
    before: dict[str, float]   # test log loss, ECE, AUC with the scorer's raw probabilities
    after: dict[str, float]    # the same, calibrated

    def lines(self) -> list[str]:
        rows = ["| test metric | before | after |", "|---|---|---|"]
        rows += [f"| {name} | {self.before[name]:.4f} | {self.after[name]:.4f} |" for name in self.before]
        return rows


def _metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"log loss": log_loss(labels, probs), "ECE": expected_calibration_error(labels, probs),
            "AUC": roc_auc(labels, probs)}


def calibrate_scorer(folder: str | Path, data: BehaviorLog, kind: str = "platt", *, save: bool = True,
                     chunk: int = 256) -> CalibrationReport:
    """Fit `kind` on the validation examples of `data.split()`, measure on its test examples, and (if `save`)
    write the calibration into the scorer folder. Any calibration already there is replaced, not stacked."""
    scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    scorer.set_calibration(CalibrationConfig())
    split = data.split()
    if split.val.size == 0 or split.test.size == 0:
        raise ValueError(f"the log's time split has {split.val.size} validation and {split.test.size} test examples; "
                         "calibration needs both")
    val_probs, _ = served(scorer, data, split.val, chunk)
    fitted = fit_calibration(data.label[split.val], val_probs, kind)
    test_probs, _ = served(scorer, data, split.test, chunk)
    labels = data.label[split.test]
    report = CalibrationReport(fitted, int(split.val.size), int(split.test.size), _metrics(labels, test_probs),
                               _metrics(labels, calibrate(fitted, test_probs)))
    if save:
        scorer.set_calibration(fitted)
        scorer.save_pretrained(folder)
    return report
