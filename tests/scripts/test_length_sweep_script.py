"""Smoke test of `python -m bench.history` on a tiny random BERT (128 positions, so the raw-token side
stops within a few behaviors) and the MovieLens fixture."""
import json
from pathlib import Path

import numpy as np
import pytest

from bench import history

pytestmark = pytest.mark.slow  # end to end: the whole script on a tiny model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


def test_history_sweep_writes_table_plot_and_json(tmp_path, tiny_checkpoints):
    model = str(tiny_checkpoints["bert"])
    results_md, out = tmp_path / "RESULTS.md", tmp_path / "results"
    results_md.write_text("# Results\n\n<!-- demo:minilm:default -->\ndemo table\n<!-- /demo -->\n")
    argv = ["--model", model, "--data", str(FIXTURE), "--lower-layers", "2", "--ms", "2", "4", "all", "--epochs", "1",
            "--batch-size", "64", "--raw-train-examples", "40", "--raw-test-examples", "30", "--threads", "1",
            "--work-dir", str(tmp_path / "work"), "--out-dir", str(out), "--results-md", str(results_md)]
    summary = history.main(argv)

    name = Path(model).name
    assert (out / f"history-{name}.png").stat().st_size > 0
    assert json.loads((out / f"history-{name}.json").read_text()) == json.loads(json.dumps(summary))
    for row in summary["rows"]:
        assert 0 <= row["auc_low"] <= row["auc"] <= row["auc_high"] <= 1 and row["test_users"] > 0
        assert 0 <= row["gauc_low"] <= row["gauc"] <= row["gauc_high"] <= 1
        assert row["s_per_epoch"] > 0
    full = [r for r in summary["rows"] if r["model"] == "BAHE"]
    assert [r["m"] for r in full] == ["2", "4", "all"] and full[-1]["max_behaviors"] == 1024
    assert all(r["train_examples"] == summary["train_examples"] for r in full)

    order, positions, longest = ["2", "4", "all"], summary["raw_positions"], summary["raw_longest_tokens"]
    assert positions == 128 and longest["2"] <= positions, "2 behaviors fit 128 positions"
    stop = order.index(summary["raw_stop"])  # the first M that does not fit: 1024 behaviors never do
    assert all(longest[m] <= positions for m in order[:stop]) and longest[order[stop]] > positions
    assert set(longest) == set(order[:stop + 1]), "no M is checked after the raw side stops"
    for i, m in enumerate(order):
        pair = {r["model"] for r in summary["rows"] if r["m"] == m and r["subset"]}
        assert pair == ({"raw-token LLM", "BAHE (text only)"} if i < stop else set()), m
    assert all(r["train_examples"] == 40 for r in summary["rows"] if r["subset"])

    text = results_md.read_text()
    assert "demo table" in text and text.count(f"<!-- bench:history:{name} -->") == 1
    assert f"](results/history-{name}.png)" in text and "| 4 | BAHE |" in text
    assert "| 2 | raw-token LLM, subset | 40 |" in text and f"stops at M = {summary['raw_stop']}" in text
    history.main(argv)  # a second run replaces its section
    assert results_md.read_text().count(f"<!-- bench:history:{name} -->") == 1


def test_all_is_the_longest_history_where_that_exceeds_the_default():
    from types import SimpleNamespace

    from engine.training.studies.length_sweep import ALL_BEHAVIORS, whole_history
    short = SimpleNamespace(user=np.repeat([3, 7], [5, 40]))
    long = SimpleNamespace(user=np.repeat([3, 7], [5, ALL_BEHAVIORS + 290]))
    assert whole_history(short) == ALL_BEHAVIORS and whole_history(long) == ALL_BEHAVIORS + 290


def test_movielens_1m_sweeps_train_as_its_demo_and_write_a_section_of_their_own(tmp_path, tiny_checkpoints,
                                                                                monkeypatch):
    from engine.training.studies import length_sweep
    from tests.ml1m_fixture import write_ml1m_files
    assert history.output_name("minilm", "movielens") == "minilm"
    assert history.output_name("minilm", "ml1m") == "minilm-ml1m"
    folder = str(write_ml1m_files(tmp_path / "ml-1m"))
    model = str(tiny_checkpoints["bert"])
    results_md, out = tmp_path / "RESULTS.md", tmp_path / "results"
    argv = ["--model", model, "--data", folder, "--lower-layers", "2", "--ms", "3", "--epochs", "1", "--batch-size",
            "64", "--raw-train-examples", "0", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir",
            str(out), "--results-md", str(results_md)]
    summary = history.main(argv)
    name = history.output_name(model, folder)
    assert name.endswith("-ml1m") and (out / f"history-{name}.json").exists()
    assert f"<!-- bench:history:{name} -->" in results_md.read_text()
    assert [r["m"] for r in summary["rows"]] == ["3"] and 0 <= summary["rows"][0]["auc"] <= 1
    assert summary["config"]["id_rows"] and summary["config"]["lr_decay"], "the ML-1M demo's training"

    def refit(*args, **kw):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(length_sweep, "neural_row", refit)  # a rerun (or a resumed sweep) reuses finished points
    again = history.main(argv)
    assert again["rows"][0]["auc"] == summary["rows"][0]["auc"]
    with pytest.raises(AssertionError, match="trained again"):
        history.main([*argv[:-2], "--seed", "1", *argv[-2:]])  # other settings train afresh
