"""bench/feature_gain.py end to end on a generated MovieLens-1M-format fixture with a tiny Llama (so the script
cannot rot): out-of-fold BAHE scorers, the block, three LightGBM rows, paired intervals, the RESULTS section; a
second run reusing the written block (--features) gives the same BAHE row; the sequential id model without and
with the block (--sequential-id)."""
import numpy as np
import pytest

from bench import feature_gain
from tests.ml1m_fixture import write_ml1m_files


@pytest.mark.slow  # trains two tiny fold scorers and three LightGBM models
def test_feature_gain_runs_end_to_end_and_reuses_its_block(tiny_checkpoints, tmp_path, capsys):
    data = write_ml1m_files(tmp_path / "ml-1m", seed=1)
    results, work = tmp_path / "RESULTS.md", tmp_path / "work"
    common = ["--data", str(data), "--model", str(tiny_checkpoints["llama"]), "--lower-layers", "2",
              "--max-behaviors", "8", "--epochs", "1", "--configs", "1", "--resamples", "50", "--project", "4",
              "--results", str(results)]
    first = feature_gain.main([*common, "--folds", "2", "--work", str(work)])
    printed = capsys.readouterr().out
    for name in (feature_gain.SIDE, feature_gain.TEXT, feature_gain.BAHE):
        assert f"| {name} |" in printed and 0 <= first["auc"][name].value <= 1
    assert f"| {feature_gain.BAHE} - {feature_gain.TEXT} |" in printed
    bahe, text = first["auc"][feature_gain.BAHE].value, first["auc"][feature_gain.TEXT].value
    assert first["paired"][(feature_gain.BAHE, feature_gain.TEXT)][0].value == pytest.approx(bahe - text)
    section = results.read_text()
    assert "<!-- feature-gain:time -->" in section and "--folds 2" in section and "BAHE block: 38 columns" in section
    assert (work / "block.parquet").is_file() and (work / "folds" / "fold-1" / "training.json").is_file()

    again = feature_gain.main([*common, "--features", str(work / "block.parquet"),
                               "--text-scorer", str(work / "folds" / "fold-0")])
    for name in first["auc"]:
        assert np.isclose(again["auc"][name].value, first["auc"][name].value, atol=1e-12), name
    assert results.read_text().count("<!-- feature-gain:time -->") == 1

    per_user = feature_gain.main([*common, "--split", "per-user", "--features", str(work / "block.parquet"),
                                  "--text-scorer", str(work / "folds" / "fold-0"), "--sequential-id"])
    assert set(per_user["auc"]) == {*first["auc"], feature_gain.SEQ, feature_gain.SEQ_BAHE}
    assert (feature_gain.SEQ_BAHE, feature_gain.SEQ) in per_user["paired"]
    assert 0 <= per_user["auc"][feature_gain.SEQ_BAHE].value <= 1
    text = results.read_text()
    assert "<!-- feature-gain:per-user -->" in text and "<!-- feature-gain:time -->" in text
