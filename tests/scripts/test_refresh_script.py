"""bench/refresh.py (the walk-forward simulation of issue 24): its slices, its served-path scoring (equal to
`BAHEScorer.score`), and the script end to end on the tests' generated MovieLens-style fixture: the table's shape,
the pooled figures consistent with the per-step ones, the plot, and one published version per step."""
from pathlib import Path

import numpy as np
import pytest

from bench import refresh
from engine import BAHEScorer
from engine.deploy.versions import VERSIONS_DIR, ScorerVersions
from engine.training.data.log_files import load_log
from engine.training.studies.metrics import roc_auc

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"


def test_slices_are_equal_in_events_and_a_short_log_is_refused():
    log = load_log(FIXTURE)
    cuts = refresh.boundaries(log, 3, 100)
    assert len(cuts) == 5 and cuts == sorted(cuts) and cuts[-1] == int(log.timestamp.max()) + 1
    sizes = [int(((log.timestamp >= lo) & (log.timestamp < hi)).sum()) for lo, hi in zip(cuts, cuts[1:])]
    assert sizes == [100, 100, 100, 100]  # the fixture's timestamps are distinct: exact slices
    assert (log.timestamp < cuts[0]).sum() == log.num_events - 400
    with pytest.raises(ValueError, match="need 4 slices of 200 events"):
        refresh.boundaries(log, 3, 200)
    with pytest.raises(ValueError, match="--steps and --slice must be >= 1"):
        refresh.boundaries(log, 0, 100)


@pytest.mark.slow  # trains three tiny scorers and runs the script end to end
def test_refresh_walks_forward_and_writes_the_table(tiny_checkpoints, tmp_path):
    work, results_md, png = tmp_path / "work", tmp_path / "RESULTS.md", tmp_path / "results" / "refresh.png"
    figures = refresh.main(["--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--lower-layers", "2",
                            "--max-behaviors", "8", "--steps", "2", "--slice", "120", "--epochs", "1",
                            "--work-dir", str(work), "--out", str(tmp_path / "refresh.json"), "--plot", str(png),
                            "--results-md", str(results_md), "--threads", "1"])
    steps = figures["steps"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["new_events"] == 120 for s in steps)
    assert [s["trained_events"] for s in steps] == [figures["events"] - 240, figures["events"] - 120]
    assert figures["pooled_examples"] == sum(s["next_examples"] for s in steps) > 0
    for s in steps:
        assert set(s["metrics"]) == {"a", "b", "c", "d"} and all(0 <= m["auc"] <= 1 for m in s["metrics"].values())
        assert s["seconds"]["a"] > 0 and s["seconds"]["b"] > 0 and s["update_rows"]["replay"] > 0
    for key, d in figures["differences"].items():  # paired over users: the point estimate is the pooled difference
        a, b = figures["pooled"]["a"]["auc"], figures["pooled"][key[2]]["auc"]
        assert d["auc"][0] == pytest.approx(a - b) and d["auc"][1] <= d["auc"][0] <= d["auc"][2]
    assert figures["seconds"]["a"] == pytest.approx(sum(s["seconds"]["a"] for s in steps))
    text = results_md.read_text()
    assert "<!-- bench:refresh:movielens_tiny -->" in text and "python -m bench.refresh --data" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| step |") and table[0].count("|") == 15
    assert [line.split(" | ")[0] for line in table[1:4]] == ["| 1", "| 2", "| pooled"]
    assert all(line.count("|") == 15 for line in table[:4])
    assert sum(line.startswith("| (a) - (") for line in table) == 3 and "Goal (issue 24)" in text
    assert png.stat().st_size > 1000 and "![next-period AUC per step](results/refresh.png)" in text
    root = work / "updated"  # one update published per step, no work folder left
    assert [v.name for v in ScorerVersions(root).history()] == ["v000001", "v000002", "v000003"]
    assert not [p for p in root.rglob(".update-work-*")] and sorted(p.name for p in (root / VERSIONS_DIR).iterdir()) \
        == ["v000001", "v000002", "v000003"]

    # the bench scores a version as it serves: BAHEScorer.score on whole histories with its stored item counts
    log = load_log(FIXTURE)
    cuts = refresh.boundaries(log, 2, 120)
    rows = log.examples[log.timestamp[log.examples] >= cuts[2]][:40]
    folder = ScorerVersions(root).current().path
    scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    names = scorer.config.model.categorical_features
    values = {name: log.category_values(name, rows) for name in names}
    served = scorer.score(log.sequence_texts(rows, None), log.target_texts(rows),
                          side_features=[{n: values[n][i] for n in names} for i in range(rows.size)])
    bench = refresh.served_scores(folder, log, rows)
    np.testing.assert_allclose(bench, served, rtol=1e-4, atol=1e-5)
    labels = log.label[rows].astype(np.float64)
    assert roc_auc(labels, bench) == pytest.approx(roc_auc(labels, served), abs=1e-9)
