"""bench/reliability.py end to end on a scorer trained on the MovieLens fixture: the maps are fitted on validation
and measured on test as `bahe calibrate` does, the figures agree with the metrics recomputed from the JSON's curves,
the plot and the results section are written, and the scorer folder is left as it was."""
import hashlib
import json
from pathlib import Path

import pytest

from bench import reliability
from engine import cli
from engine.training.loops.calibrate import calibrate_scorer
from engine.training.studies.experiment import load_data

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


def _shas(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow  # trains a scorer, then scores the fixture's validation and test parts through `score`
def test_calibration_bench_reports_every_map_and_leaves_the_scorer(tiny_checkpoints, tmp_path):
    out = tmp_path / "run"
    cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--device", "cpu"])
    scorer = out / "scorer"
    before = _shas(scorer)
    results = tmp_path / "RESULTS.md"
    got = reliability.main(["--scorer", str(scorer), "--data", str(FIXTURE), "--resamples", "50", "--periods", "3",
                            "--window", "100", "--out-dir",
                            str(tmp_path / "figures"), "--results-md", str(results)])
    assert _shas(scorer) == before
    assert set(got["rows"]) == {"raw", "platt", "isotonic", "rolling platt"}
    platt = calibrate_scorer(scorer, load_data(str(FIXTURE)), "platt", save=False)
    assert got["rows"]["platt"]["ece"] == pytest.approx(platt.after["ECE"])
    assert got["rows"]["raw"]["logloss"] == pytest.approx(platt.before["log loss"])
    assert got["rows"]["raw"]["auc"] == got["rows"]["platt"]["auc"]  # Platt keeps the order
    for row in got["rows"].values():
        curve = row["curve"]
        ece = sum(n * abs(o - p) for p, o, n in zip(curve["predicted"], curve["observed"], curve["count"]))
        assert ece / sum(curve["count"]) == pytest.approx(row["ece"])
        assert row["ece_low"] <= row["ece_high"] and 0 < row["floor"] <= row["floor95"]
        assert sum(curve["count"]) == got["test_examples"]
    text = results.read_text()
    assert "<!-- bench:calibration:movielens_tiny -->" in text and "| platt (a = " in text
    assert (tmp_path / "figures" / "calibration-movielens_tiny.png").stat().st_size > 1000
    assert json.loads((tmp_path / "figures" / "calibration-movielens_tiny.json").read_text())["rows"]["raw"]["ece"] \
        == got["rows"]["raw"]["ece"]
