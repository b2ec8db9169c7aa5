"""The whole demo pipeline on a real-data fixture (8 MovieLens users) in seconds."""
from pathlib import Path

import numpy as np

from engine.training.demo import DemoConfig, run_demo
from engine.scorer import BAHEScorer

FIXTURE = Path(__file__).parent / "fixtures" / "movielens_tiny.parquet"


def test_demo_runs_end_to_end_and_writes_its_section(tiny_checkpoints, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    config = DemoConfig(model=str(tiny_checkpoints["bert"]), data=str(FIXTURE), out=tmp_path / "demo",
                        results=results, num_lower_layers=2, max_behaviors=5, train_examples=120, val_examples=40,
                        test_examples=50, raw_train_examples=40, epochs=1, raw_tokens=64, users_to_show=2,
                        candidates_per_user=10)
    result = run_demo(config)
    names = [row.report.name for row in result.rows]
    assert names == ["BAHE", "BAHE", "raw-token LLM", "id-only"]
    assert [row.train_examples for row in result.rows] == [40, 120, 40, 120]
    for row in result.rows:
        assert 0 <= row.report.test["auc"] <= 1 and np.isfinite(row.report.test["logloss"])
        assert row.report.fit.epoch_seconds and row.score_ms_per_1k > 0
    out = capsys.readouterr().out
    assert "unique rows" in out and "| model | train examples | test AUC" in out and "Top movies" in out
    text = results.read_text()
    assert "kept text" in text and text.count("| raw-token LLM |") == 1
    scorer = BAHEScorer.from_pretrained(tmp_path / "demo" / "scorer")
    assert scorer.score([{"liked": ["Toy Story (1995) | Animation, Children's, Comedy"]}], ["Heat (1995)"]).shape == (1,)
    run_demo(config)  # a second run replaces its section instead of adding one
    assert results.read_text().count("| raw-token LLM |") == 1
