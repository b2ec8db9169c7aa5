"""Smoke test of the benchmarks: `python -m bench.compare` and `bahe profile` end to end on a tiny
random BERT (128 positions, so the raw-token side stops early) and the MovieLens fixture."""
import json
from pathlib import Path

import pytest

from bench import compare
from engine import cli

pytestmark = pytest.mark.slow  # end to end: the whole script on a tiny model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


def test_compare_and_profile_end_to_end(tmp_path, tiny_checkpoints):
    model = str(tiny_checkpoints["bert"])
    results_md, out = tmp_path / "RESULTS.md", tmp_path / "results"
    results_md.write_text("# Results\n\n<!-- demo:minilm:default -->\ndemo table\n<!-- /demo -->\n")
    common = ["--model", model, "--data", str(FIXTURE), "--lower-layers", "2", "--work-dir", str(tmp_path / "work")]
    summary = compare.main([*common, "--ms", "1", "2", "8", "--users", "2", "--reps", "2", "--train-examples", "8",
                            "--val-examples", "16", "--train-behaviors", "2", "--train-batch-size", "4",
                            "--out-dir", str(out), "--results-md", str(results_md)])

    plot = f"scaling-{Path(model).name}-movielens_tiny.png"  # another data set than MovieLens-100K: named
    for name in (plot, "compare-movielens_tiny.json", "compare.csv"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "compare-movielens_tiny.json").read_text())["run"] == summary["run"]
    ran = [p for p in summary["points"] if p["time_ratio"] is not None]
    assert ran, "the raw-token side ran at no M"
    assert all(p["time_ratio"] > 0 and p["memory_ratio"] > 0 and p["break_even_users"] > 0 for p in ran)
    assert summary["points"][-1]["raw"]["status"].startswith("stopped"), "8 behaviors exceed 128 positions"
    assert all(p["bahe"]["s_per_1k_users"] > 0 for p in summary["points"])
    assert summary["abe"]["per_second"] > 0 and summary["abe"]["dedup_ratio"] >= 1
    assert summary["training"]["time_ratio"] > 0 and summary["training"]["added_memory_ratio"] > 0
    text = results_md.read_text()
    marker = f"<!-- bench:compare:{Path(model).name}:movielens_tiny -->"
    assert "demo table" in text and text.count(marker) == 1 and "<!-- /bench -->" in text
    assert f"](results/{plot})" in text

    trace = tmp_path / "trace.json"
    cli.main(["profile", *common, "--users", "2", "--m", "4", "--out", str(trace)])
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"bahe.lookup", "bahe.gather", "bahe.upper_layers", "bahe.pooling", "bahe.head"} <= names


def test_rank_bench_end_to_end(tmp_path, tiny_checkpoints):
    from bench import rank
    results_md = tmp_path / "RESULTS.md"
    rows = rank.main(["--model", str(tiny_checkpoints["llama"]), "--data", str(FIXTURE), "--lower-layers", "2",
                      "--work-dir", str(tmp_path / "work"), "--ks", "2", "5", "--ms", "3", "--repeats", "2",
                      "--results", str(results_md)])
    assert [(r.m, r.k) for r in rows] == [(3, 2), (3, 5)]
    assert all(r.p50_ms > 0 and r.per_pair_ms > 0 and r.bf16_max_diff < 0.05 for r in rows)
    text = results_md.read_text()
    assert text.count("<!-- bench:rank:") == 1 and "| 3 | 5 |" in text


def test_queue_bench_end_to_end(tmp_path, tiny_checkpoints):
    from bench import queue
    from tests.serving.test_scorer import make_scorer
    make_scorer(tiny_checkpoints["llama"], tmp_path).save_pretrained(tmp_path / "scorer")
    results_md = tmp_path / "RESULTS.md"
    cells = queue.main(["--scorer", str(tmp_path / "scorer"), "--data", str(FIXTURE), "--clients", "1", "2",
                        "--seconds", "0.4", "--m", "3", "--k", "2", "--results", str(results_md)])
    assert sorted((c.kind, c.clients, c.workers) for c in cells) == [
        (kind, clients, workers) for kind in ("rank", "score") for clients in (1, 2) for workers in (0, 1, 2)]
    assert all(c.requests > 0 and c.rps > 0 and c.per_cpu_second > 0 and c.per_call >= 1 for c in cells)
    text = results_md.read_text()
    assert text.count("<!-- bench:queue:") == 1 and "| rank | 2 |" in text and "| score | 1 |" in text
