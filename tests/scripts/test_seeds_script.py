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


def test_ml1m_seeds_on_the_generated_fixture(tmp_path, tiny_checkpoints):
    from tests.ml1m_fixture import write_ml1m_files

    folder = write_ml1m_files(tmp_path / "ml-1m")
    results_md, out = tmp_path / "RESULTS.md", tmp_path / "results"
    argv = ["--model", str(tiny_checkpoints["bert"]), "--data", str(folder), "--lower-layers", "2", "--seeds", "0",
            "1", "--epochs", "1", "--batch-size", "64", "--threads", "1", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(out), "--results-md", str(results_md), "--splits", "time", "per-user"]
    numbers = seeds.main(argv)
    models = ["LightGBM, side features", "LightGBM, side + text features", "BAHE", "sequential id"]
    assert [(r["seed"], r["split"], r["model"]) for r in numbers["rows"]] == [
        (s, split, m) for s in (0, 1) for split in ("time", "per-user") for m in models]
    assert all(0 <= r["auc"] <= 1 and 0 <= r["gauc"] <= 1 for r in numbers["rows"])
    bahe = [r["logloss"] for r in numbers["rows"] if r["model"] == "BAHE"]
    assert bahe[0] != bahe[1], "the seed reaches BAHE's training"  # (24 test examples: AUCs may tie)
    text = results_md.read_text()
    assert "<!-- bench:seeds:bert:ml1m -->" in text and "<!-- bench:seeds:bert:ml1m:per-user -->" in text
    assert text.count("| AUC(BAHE) - AUC(") == 6 and text.count("| GAUC(BAHE) - GAUC(") == 6
    assert text.count("| GAUC |") == 8 and "per-user split" in text
    assert text.count("| per-user | BAHE |") == 2 and text.count("| time | sequential id |") == 2, "cold items per seed"
    # another row later (--models): the finished rows come from the work dir's cache, the new one is trained
    more = seeds.main([*argv[:-3], "--splits", "time", "--models", *models, "CTR model without text"])
    rows = {(r["seed"], r["model"]): r for r in more["rows"]}
    assert {m for _, m in rows} == {*models, "CTR model without text"}
    assert all(rows[(r["seed"], r["model"])]["auc"] == r["auc"] for r in numbers["rows"] if r["split"] == "time")
    assert results_md.read_text().count("| AUC(BAHE) - AUC(CTR model without text) |") == 1
