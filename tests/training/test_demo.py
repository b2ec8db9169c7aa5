"""The whole demo pipeline on a real-data fixture (8 MovieLens users) in seconds."""
from pathlib import Path

import numpy as np
import pytest

from engine.serving.scorer import BAHEScorer
from engine.training.studies.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow  # end to end: the whole demo on a tiny model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"
SPLIT_MODELS = ["BAHE", "CTR model without text", "gradient boosting (classic)", "logistic regression (classic)",
                "id-only"]


def test_demo_runs_end_to_end_and_writes_its_section(tiny_checkpoints, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    config = DemoConfig(model=str(tiny_checkpoints["bert"]), data=str(FIXTURE), out=tmp_path / "demo",
                        results=results, num_lower_layers=2, max_behaviors=64, id_only_behaviors=5, epochs=1,
                        raw_train_examples=40, raw_test_examples=30, raw_behaviors=3, raw_tokens=64,
                        users_to_show=2, batch_size=64)
    rows = run_demo(config)
    assert [(r.split, r.name) for r in rows] == [
        *(("per-user", name) for name in SPLIT_MODELS), *(("time", name) for name in SPLIT_MODELS),
        ("time (subset)", "raw-token LLM"), ("time (subset)", "BAHE (text only)")]
    for row in rows:
        assert 0 <= row.auc.low <= row.auc.value <= row.auc.high <= 1 and np.isfinite(row.logloss)
        assert row.train_seconds > 0 and row.auc.users > 0
    assert [r.train_examples for r in rows][-2:] == [40, 40]
    out = capsys.readouterr().out
    assert "unique rows" in out and "| split | model | train examples | test AUC" in out and "Top movies" in out
    assert "ranked against all" in out
    assert out.count("AUC(BAHE) - AUC(") == 4
    text = results.read_text()
    assert "kept text" in text and text.count("| raw-token LLM |") == 1
    scorer = BAHEScorer.from_pretrained(tmp_path / "demo" / "scorer")
    assert scorer.score([{"liked": ["Toy Story (1995) | Animation, Children's, Comedy"]}], ["Heat (1995)"]).shape == (1,)
    run_demo(config)  # a second run replaces its section instead of adding one
    assert results.read_text().count("| raw-token LLM |") == 1
