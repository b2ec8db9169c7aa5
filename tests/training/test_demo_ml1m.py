"""The MovieLens-1M demo (engine.training.studies.demo_ml1m and its report) end to end on the generated fixture
with a tiny checkpoint: every model on every split, GAUC beside every AUC, cold items, top-10 overlap,
calibration, the LightGBM searches, its RESULTS.md section; and the --quick set."""
from dataclasses import replace

import numpy as np
import pytest

from engine.cli import main
from engine.training.studies.demo import DemoConfig
from engine.training.studies.demo_ml1m import ALL_MODELS, QUICK_MODELS, Ml1mConfig
from engine.training.studies.demo_ml1m_report import run_ml1m_demo
from tests.ml1m_fixture import write_ml1m_files


def _config(tiny_checkpoints, tmp_path, **kw):
    folder = write_ml1m_files(tmp_path / "ml-1m")
    demo = DemoConfig(model=str(tiny_checkpoints["bert"]), data=str(folder), out=tmp_path / "demo",
                      results=tmp_path / "RESULTS.md", num_lower_layers=2, max_behaviors=32, id_only_behaviors=5,
                      epochs=1, batch_size=64, raw_train_examples=0, lr_decay=True)  # the ML-1M demo's default
    return Ml1mConfig(demo, held_out_fraction=0.4, overlap_users=4, threads=1, **kw)


def test_full_table_on_the_fixture(tiny_checkpoints, tmp_path, capsys):
    (tmp_path / "RESULTS.md").write_text("# Results\n\nkept text\n")
    run = run_ml1m_demo(_config(tiny_checkpoints, tmp_path), command="test")
    assert [(r.row.split, r.row.name) for r in run.results] == [
        (split, name) for split in ("per-user", "held-out items", "time") for name in ALL_MODELS]
    for r in run.results:
        assert 0 <= r.row.auc.low <= r.row.auc.value <= r.row.auc.high <= 1
        assert np.isfinite(r.row.logloss)
        if r.row.split != "held-out items":  # GAUC is NaN where no test user has both classes (tiny test part)
            assert 0 <= r.gauc.low <= r.gauc.value <= r.gauc.high <= 1 and r.gauc.users > 0
        assert r.wall_seconds > 0 and set(r.cold) == {5, 20}
        assert (r.overlap is not None) == (r.calibration is not None) == (r.row.split == "time")
        assert (r.search is not None) == r.row.name.startswith("LightGBM")
    held = [r for r in run.results if r.row.split == "held-out items"]
    assert run.held_out_items == 12 and all(r.cold[5][0] == r.row.probs.size for r in held)  # all cold
    out = capsys.readouterr().out
    assert out.count("BAHE - ") == 3 * (len(ALL_MODELS) - 1) and "Top-10 overlap" in out and "leakage" in out
    text = (tmp_path / "RESULTS.md").read_text()
    assert "kept text" in text and "<!-- demo:bert:ml1m -->" in text
    assert text.count("| GAUC [95% CI] |") == 1 and "80% and 90% quantiles" in text


def test_quick_set_and_the_command_line(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    config = _config(tiny_checkpoints, tmp_path, quick=True)
    assert config.models == QUICK_MODELS and config.splits == ("time",)
    with pytest.raises(ValueError, match="keep 'BAHE'"):
        Ml1mConfig(config.demo, models=("id-only",))
    with pytest.raises(SystemExit, match="--quick is the MovieLens-1M demo's short run"):
        main(["demo", "--quick"])
    monkeypatch.chdir(tmp_path)
    main(["demo", "--data", str(tmp_path / "ml-1m"), "--quick", "--model", config.demo.model, "--epochs", "1", "--lower-layers", "2",
          "--results", str(tmp_path / "R.md")])
    text = (tmp_path / "R.md").read_text()
    assert text.count("| time | ") == 2 * len(QUICK_MODELS) and "(--quick)" in text  # main and cold-item tables


def test_a_chosen_subset_writes_its_own_section(tiny_checkpoints, tmp_path, monkeypatch):
    """--models / --splits run only those rows and name the RESULTS.md section after them, leaving the full and
    quick tables in place."""
    config = _config(tiny_checkpoints, tmp_path)
    results = tmp_path / "R.md"
    results.write_text("<!-- demo:bert:ml1m-quick -->\nquick table\n<!-- /demo -->\n")
    monkeypatch.chdir(tmp_path)
    main(["demo", "--data", str(tmp_path / "ml-1m"), "--model", config.demo.model, "--epochs", "1",
          "--lower-layers", "2", "--results", str(results), "--splits", "time",
          "--models", "BAHE", "LightGBM, side + text features"])
    text = results.read_text()
    assert "quick table" in text and "<!-- demo:bert:ml1m-time/BAHE+LightGBM-side_+_text_features -->" in text
    assert text.count("| time | ") == 4 and "sequential id" not in text  # main and cold tables, 2 rows each
    main(["demo", "--data", str(tmp_path / "ml-1m"), "--model", config.demo.model, "--epochs", "1",
          "--lower-layers", "2", "--results", str(results), "--splits", "time", "--models", "BAHE",
          "--item-id-dropout", "0.25"])
    text = results.read_text()
    assert "<!-- demo:bert:ml1m-time/BAHE-item-id-dropout-0.25 -->" in text and "25% of its targets" in text
    with pytest.raises(ValueError, match="unknown models or splits"):
        Ml1mConfig(config.demo, splits=("tme",))


def test_a_second_run_reuses_the_finished_rows(tiny_checkpoints, tmp_path, monkeypatch):
    """Rows are kept under the output folder and reused by a later run with the same settings (nothing refitted,
    the same figures); other settings (another seed) train afresh."""
    from engine.training.studies import demo_ml1m
    config = _config(tiny_checkpoints, tmp_path, quick=True, models=("BAHE", "LightGBM, side features"))
    first = run_ml1m_demo(config, command="test")
    assert len(list((config.demo.out / "rows").glob("time--*.npz"))) == 2

    def refit(*args, **kw):
        raise AssertionError("a finished row was fitted again")

    monkeypatch.setattr(demo_ml1m, "fit_and_score", refit)
    second = run_ml1m_demo(config, command="test")
    for a, b in zip(first.results, second.results):
        assert np.array_equal(a.row.probs, b.row.probs) and a.row.auc == b.row.auc and a.gauc == b.gauc
        assert a.overlap == b.overlap and a.search == b.search and a.row.train_seconds == b.row.train_seconds
    for other in (replace(config.demo, seed=1), replace(config.demo, lr_decay=False),
                  replace(config.demo, item_id_dropout=0.1)):
        with pytest.raises(AssertionError, match="fitted again"):
            run_ml1m_demo(Ml1mConfig(other, quick=True, models=config.models, overlap_users=4, threads=1),
                          command="test")


def test_a_row_key_names_the_overlap_probe_only_where_it_is_measured(tiny_checkpoints, tmp_path):
    """The top-10 overlap probe runs on the time split only, so on the other splits a row trained by `bahe demo`
    (probe users 100) and one trained by bench.seeds (none) are the same row and share a key."""
    from engine.training.studies.demo_ml1m import RowCache
    config = _config(tiny_checkpoints, tmp_path)
    rows = {"train": np.arange(5), "val": np.arange(5, 7), "test": np.arange(7, 9)}
    without = replace(config, overlap_users=0)
    for split in ("per-user", "held-out items"):
        assert RowCache.fingerprint("BAHE", split, config, rows) == RowCache.fingerprint("BAHE", split, without, rows)
    assert RowCache.fingerprint("BAHE", "time", config, rows) != RowCache.fingerprint("BAHE", "time", without, rows)


def test_another_seed_writes_its_own_section(tiny_checkpoints, tmp_path):
    """A run at seed 1 names its seed in its RESULTS.md section, so it never overwrites seed 0's."""
    from engine.training.studies.demo_ml1m_report import section_name
    config = _config(tiny_checkpoints, tmp_path, models=("BAHE",), splits=("held-out items",))
    assert section_name(config) == "ml1m-held-out_items/BAHE"
    assert section_name(replace(config, demo=replace(config.demo, seed=1, item_id_dropout=0.1))) == \
        "ml1m-held-out_items/BAHE-item-id-dropout-0.1-seed-1"
