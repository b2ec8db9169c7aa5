"""Smoke test of `python -m bench.seeds` on a tiny random BERT and the MovieLens fixture: 2 seeds, both splits."""
import json
from pathlib import Path

import pytest

from bench import seeds

pytestmark = pytest.mark.slow  # end to end: the whole script on a tiny model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"
MODELS = ["BAHE", "CTR model without text", "gradient boosting (classic)"]


def test_seeds_write_per_seed_rows_mean_sd_and_paired_differences(tmp_path, tiny_checkpoints):
    model = str(tiny_checkpoints["bert"])
    results_md, out = tmp_path / "RESULTS.md", tmp_path / "results"
    results_md.write_text("# Results\n\n<!-- bench:history:bert -->\nhistory table\n<!-- /bench -->\n")
    argv = ["--model", model, "--data", str(FIXTURE), "--lower-layers", "2", "--seeds", "0", "1", "--epochs", "1",
            "--batch-size", "64", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(out),
            "--results-md", str(results_md)]
    summary = seeds.main(argv)

    name = Path(model).name
    assert json.loads((out / f"seeds-{name}.json").read_text()) == json.loads(json.dumps(summary))
    assert [s["seed"] for s in summary["seeds"]] == [0, 1]
    for run in summary["seeds"]:
        assert [(r["split"], r["model"]) for r in run["rows"]] == [(s, m) for s in ("time", "per-user") for m in MODELS]
        for row in run["rows"]:
            auc = row["auc"]
            assert 0 <= auc["low"] <= auc["value"] <= auc["high"] <= 1 and auc["users"] > 0
        assert len(run["paired"]) == 4
        for p in run["paired"]:
            d = p["difference"]
            assert -1 <= d["low"] <= d["value"] <= d["high"] <= 1
    for split in ("time", "per-user"):
        bahe = [r["auc"]["value"] for run in summary["seeds"] for r in run["rows"] if r["split"] == split
                and r["model"] == "BAHE"]
        stats = summary["mean_sd"][split]["BAHE"]
        assert abs(stats["mean"] - sum(bahe) / 2) < 1e-12 and stats["sd"] >= 0
    bahe_time = [run["rows"][0]["auc"]["value"] for run in summary["seeds"]]
    assert bahe_time[0] != bahe_time[1], "the seed reaches BAHE's training"

    text = results_md.read_text()
    assert "history table" in text and text.count(f"<!-- bench:seeds:{name} -->") == 1
    assert "| seed 0 | seed 1 | mean ± sd |" in text and text.count("| AUC(BAHE) - AUC(") == 4
