"""bench/paired_rows.py on two kept rows of the MovieLens-1M demo (the fixture, a tiny BERT): one model trained with
two settings, compared on the same test examples; rows of different splits or another log are refused."""
from dataclasses import replace

import pytest

from bench import paired_rows
from engine.training.studies.demo import DemoConfig
from engine.training.studies.demo_ml1m import Ml1mConfig
from engine.training.studies.demo_ml1m_report import run_ml1m_demo
from tests.ml1m_fixture import write_ml1m_files


@pytest.mark.slow  # two tiny demo runs end to end
def test_two_settings_of_one_model_compared_pairwise(tiny_checkpoints, tmp_path):
    folder = write_ml1m_files(tmp_path / "ml-1m")
    demo = DemoConfig(model=str(tiny_checkpoints["bert"]), data=str(folder), out=tmp_path / "a", results=None,
                      num_lower_layers=2, max_behaviors=32, epochs=1, batch_size=64, raw_train_examples=0,
                      lr_decay=True, id_rows=True)
    for config in (demo, replace(demo, out=tmp_path / "b", item_id_dropout=0.5)):
        run_ml1m_demo(Ml1mConfig(config, models=("BAHE",), splits=("time", "per-user"), overlap_users=4, threads=1),
                      command="test")
    a, b = (next((tmp_path / d / "rows").glob("time--BAHE--*.npz")) for d in ("a", "b"))
    lines = paired_rows.main([str(a), str(b), "--data", str(folder), "--resamples", "50"])
    assert lines[0].startswith("time split of") and sum(line.startswith("| A | BAHE |") for line in lines) == 1
    assert "item_id_dropout 0.5" in next(line for line in lines if line.startswith("| B |"))
    assert lines[-1].startswith("A - B, paired (same resampled users): AUC ")
    other = next((tmp_path / "b" / "rows").glob("per-user--BAHE--*.npz"))
    with pytest.raises(SystemExit, match="scored on different examples"):
        paired_rows.main([str(a), str(other), "--data", str(folder)])
    with pytest.raises(SystemExit, match="is not the one these rows were scored on"):
        paired_rows.main([str(a), str(b), "--data", str(write_ml1m_files(tmp_path / "other", seed=3))])
