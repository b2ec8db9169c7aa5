"""`bahe calibrate` end to end on the CI fixture: a trained scorer gets a Platt map fitted on the validation split,
saved in scorer.json; the reopened scorer's scores are exactly the map of its raw scores, rankings unchanged;
`--newest N` refits it on the log's latest labels. The
rolling recalibration study is past-only and follows a drifting click rate."""
from pathlib import Path

import numpy as np
import pytest

from engine import BAHEScorer, cli
from engine.config import CalibrationConfig
from engine.model.calibration import calibrate, fit_calibration
from engine.training.data import load_log
from engine.training.loops.calibrate import ServedSplit, newest_rows, rolling_calibration, served
from engine.training.studies.calibration_metrics import expected_calibration_error

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


@pytest.mark.slow
def test_calibrate_fits_saves_and_scores_through_the_map(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--train-examples", "100",
              "--val-examples", "30", "--test-examples", "40", "--device", "cpu"])
    folder = out / "scorer"
    raw_scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    assert raw_scorer.config.calibration == CalibrationConfig()
    capsys.readouterr()

    cli.main(["calibrate", "--scorer", str(folder), "--data", str(FIXTURE), "--dry-run"])
    assert "not saved" in capsys.readouterr().out
    assert BAHEScorer.from_pretrained(folder, device="cpu").config.calibration == CalibrationConfig()

    cli.main(["calibrate", "--scorer", str(folder), "--data", str(FIXTURE)])
    printed = capsys.readouterr().out
    assert "platt calibration" in printed and "| ECE |" in printed and "| AUC |" in printed
    calibrated = BAHEScorer.from_pretrained(folder, device="cpu")
    fitted = calibrated.config.calibration
    assert fitted.kind == "platt" and fitted.a > 0

    data = load_log(FIXTURE)
    rows = data.split().test[:60]
    raw, _ = served(raw_scorer, data, rows)
    mapped, _ = served(calibrated, data, rows)
    np.testing.assert_array_equal(mapped, calibrate(fitted, raw))
    assert np.array_equal(np.argsort(mapped, kind="stable"), np.argsort(raw, kind="stable"))
    users = data.sequence_texts(rows[:1], None)
    candidates = data.target_texts(rows[:20])
    assert np.array_equal(calibrated.rank(users[0], candidates).order, raw_scorer.rank(users[0], candidates).order)

    # --newest N: the periodic refit on the log's latest labels replaces the map (not stacked on it)
    window = newest_rows(data, 150)
    assert window.size == 150 and data.timestamp[window].min() >= np.sort(data.timestamp)[-150]
    cli.main(["calibrate", "--scorer", str(folder), "--data", str(FIXTURE), "--newest", "150"])
    assert "150 newest examples; fit window (in-sample), 150:" in capsys.readouterr().out
    refitted = BAHEScorer.from_pretrained(folder, device="cpu").config.calibration
    expected = fit_calibration(data.label[window], served(raw_scorer, data, window)[0], "platt")
    assert refitted != fitted and (refitted.a, refitted.b) == pytest.approx((expected.a, expected.b), rel=1e-5)
    with pytest.raises(ValueError, match="newest must be between 2 and the log's"):
        newest_rows(data, data.num_events + 1)


@pytest.mark.slow
def test_served_split_of_a_user_sample_is_the_whole_splits_rows_of_those_users(tiny_checkpoints, tmp_path):
    out = tmp_path / "run"
    cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--device", "cpu"])
    scorer, data = BAHEScorer.from_pretrained(out / "scorer", device="cpu"), load_log(FIXTURE)
    whole = ServedSplit.of(scorer, data)
    sampled = ServedSplit.of(scorer, data, users=2, seed=1)
    held = np.unique(np.concatenate([data.user[data.split().val], whole.test_users]))
    assert held.size > 2 and 0 < np.unique(sampled.test_users).size <= 2
    kept = np.isin(whole.test_users, sampled.test_users)
    assert kept.sum() == sampled.test_labels.size < whole.test_labels.size
    np.testing.assert_allclose(sampled.test_probs, whole.test_probs[kept], atol=1e-6)
    np.testing.assert_array_equal(sampled.test_times, whole.test_times[kept])
    assert sampled.val_labels.size < whole.val_labels.size
    with pytest.raises(ValueError, match="users must be >= 1"):
        ServedSplit.of(scorer, data, users=0)


def _drifting(seed: int = 0, n: int = 6000) -> ServedSplit:
    """A scorer whose probabilities are right on validation but whose test click rate falls with time."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.1, 0.9, 2 * n)
    times = np.arange(2 * n)
    shift = np.where(times < n, 0.0, -0.25 * (times - n) / n)  # the test period drifts down
    truth = np.clip(q + shift, 0.01, 0.99)
    labels = (rng.random(2 * n) < truth).astype(np.int64)
    users = rng.integers(0, 300, 2 * n)
    return ServedSplit(labels[:n], q[:n], labels[n:], q[n:], users[n:], times[:n], times[n:])


def test_rolling_recalibration_is_past_only_and_follows_the_drift():
    s = _drifting()
    rolling = rolling_calibration(s, periods=10, window=1500)
    assert expected_calibration_error(s.test_labels, rolling) < 0.5 * expected_calibration_error(s.test_labels,
                                                                                                   s.test_probs)
    future = ServedSplit(s.val_labels, s.val_probs, np.r_[s.test_labels[:3000], 1 - s.test_labels[3000:]],
                         s.test_probs, s.test_users, s.val_times, s.test_times)
    changed = rolling_calibration(future, periods=10, window=1500)
    np.testing.assert_array_equal(changed[:3000], rolling[:3000])  # labels after a period never reach its map
    assert not np.array_equal(changed[3600:], rolling[3600:])
