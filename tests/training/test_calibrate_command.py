"""`bahe calibrate` end to end on the CI fixture: a trained scorer gets a Platt map fitted on the validation split,
saved in scorer.json; the reopened scorer's scores are exactly the map of its raw scores, rankings unchanged."""
from pathlib import Path

import numpy as np
import pytest

from engine import BAHEScorer, cli
from engine.config import CalibrationConfig
from engine.model.calibration import calibrate
from engine.training.data import load_log
from engine.training.loops.calibrate import served

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
