"""`bahe features` on the CI fixture with a tiny Llama: the block's names and metadata, the past-only property (a
later event of a user changes none of an earlier example's features), the stacking-leak refusal (a scorer's
in-sample examples, a scorer without a valid training record: nothing written), the out-of-fold path (each user
from the fold scorer that never saw them), and determinism."""
from pathlib import Path

import numpy as np
import pytest

from engine import cli
from engine.export.block import BLOCK_VERSION, Projection, read_block
from engine.export.record import RECORD_FILE, read_record, scorer_version
from engine.serving.scorer import BAHEScorer
from engine.training.data import load_log
from engine.training.export.features_command import LeakError, choose_scorers, export_block
from engine.training.export.fold_scorers import user_folds
from engine.training.export.log_features import log_block
from tests.synthetic_logs import rewrite_future

FIXTURE = Path(__file__).parents[1] / "fixtures" / "movielens_tiny.parquet"
SMALL = ["--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data():
    return load_log(FIXTURE)


@pytest.fixture(scope="module")
def trained(tiny_checkpoints, tmp_path_factory):
    """A scorer trained by `bahe train` on the fixture's time split (its record: every user, before test start)."""
    out = tmp_path_factory.mktemp("features") / "run"
    cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--train-examples", "100", "--val-examples", "30", "--test-examples", "40", *SMALL])
    return out / "scorer"


def test_train_records_what_the_scorer_was_fitted_on(trained, data):
    record = read_record(trained)
    assert record is not None and record.users is None and record.examples == 130
    assert record.labels_before == data.split().test_start and record.weights == scorer_version(trained)
    saw = record.saw(["1", "1"], np.array([record.labels_before - 1, record.labels_before]))
    assert saw.tolist() == [True, False]


def test_in_sample_examples_are_refused_and_nothing_is_written(trained, tmp_path, capsys):
    out = tmp_path / "block.parquet"
    with pytest.raises(SystemExit) as stop:
        cli.main(["features", "--scorer", str(trained), "--data", str(FIXTURE), "--out", str(out)])
    message = str(stop.value)
    assert "refusing to write in-sample features" in message and "--since" in message and "--folds" in message
    assert not out.exists()


def test_a_record_of_other_weights_is_void_and_refused(trained, data, tmp_path):
    copy = tmp_path / "changed"
    scorer = BAHEScorer.from_pretrained(trained, device="cpu")
    scorer.save_pretrained(copy)
    (copy / RECORD_FILE).write_bytes((trained / RECORD_FILE).read_bytes())
    assert read_record(copy) is not None  # same weights: the copied record still describes them
    with_more_training = scorer.model.head.linears[-1].bias
    with_more_training.data += 0.5
    scorer.save_pretrained(copy)
    assert read_record(copy) is None
    later = data.split().test
    with pytest.raises(LeakError, match="no training record"):
        export_block([copy], data, later)


def test_a_later_period_exports_with_names_and_metadata(trained, data, tmp_path, capsys):
    start = data.split().test_start
    out = tmp_path / "later.parquet"
    cli.main(["features", "--scorer", str(trained), "--data", str(FIXTURE), "--out", str(out), "--since", str(start),
              "--project", "8"])
    frame, meta = read_block(out)
    rows = data.examples[data.timestamp[data.examples] >= start]
    assert frame["row"].tolist() == rows.tolist() and (frame["timestamp"] >= start).all()
    names = meta["feature_names"]
    assert meta["block_version"] == BLOCK_VERSION and meta["width"] == 8 and meta["projection"]["kind"] == "random"
    n = len(data.sequence_names)
    assert names[:2] == [f"bahe_user_{data.sequence_names[0]}_0", f"bahe_user_{data.sequence_names[0]}_1"]
    assert names[-1] == "bahe_logit" and f"bahe_cos_{data.sequence_names[-1]}" in names
    assert len(names) == n * 8 + 8 + n + 2 * n * 3 + 1 and names == list(frame.columns[6:])
    assert [s["scorer_version"] for s in meta["scorers"]] == [scorer_version(trained)]
    assert meta["scorers"][0]["record"]["labels_before"] == start
    assert np.isfinite(frame[names].to_numpy()).all()
    assert frame["label"].tolist() == data.label[rows].tolist()


def test_features_are_past_only(trained, data):
    scorer = BAHEScorer.from_pretrained(trained, device="cpu")
    rng = np.random.default_rng(3)
    rows = data.examples
    projection = Projection.random(scorer.model.upper.hidden_size, 8, seed=1)
    for row in rng.choice(rows[(data.history_length[rows] > 3)], 4, replace=False):
        changed = rewrite_future(data, int(row), rng)
        assert changed.user[row] == data.user[row] and changed.timestamp[row] == data.timestamp[row]
        later = np.flatnonzero((data.user == data.user[row]) & (data.timestamp > data.timestamp[row]))
        assert later.size == 0 or (changed.item[later] != data.item[later]).any() or \
            (changed.label[later] != data.label[later]).any()
        mine = [r for r in rows if data.user[r] == data.user[row]]  # with the user's other targets, as exported
        before = log_block(scorer, data, np.array(mine), projection)[mine.index(row)]
        after = log_block(scorer, changed, np.array(mine), projection)[mine.index(row)]
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_the_export_is_deterministic(trained, data):
    later = data.split().test
    first = export_block([trained], data, later, width=8, seed=2)
    second = export_block([trained], data, later, width=8, seed=2)
    assert np.array_equal(first[1], second[1]) and first[2] == second[2]
    assert first[3]["projection"] == second[3]["projection"]


def test_scorer_choice_prefers_the_user_disjoint_scorer_then_the_earlier_period():
    from engine.export.record import TrainingRecord
    period = TrainingRecord(100, None, "log", 10, "w")
    fold = TrainingRecord(200, ("a",), "log", 10, "w")
    got = choose_scorers([period, fold], ["a", "b", "a", "b"], np.array([50, 50, 150, 250]))
    assert got.tolist() == [-1, 1, 0, 1]


def test_out_of_fold_export_gives_each_user_the_scorer_that_never_saw_them(tiny_checkpoints, data, tmp_path):
    out = tmp_path / "oof.parquet"
    cli.main(["features", "--folds", "2", "--model", str(tiny_checkpoints["llama"]), "--data", str(FIXTURE),
              "--out", str(out), "--work", str(tmp_path / "folds"), "--batch-size", "64", *SMALL])
    frame, meta = read_block(out)
    assert frame["row"].tolist() == data.examples.tolist()  # every example, the training period's included
    fold = user_folds(data, 2, seed=0)
    assert (frame["scorer"].to_numpy() == fold[frame["row"].to_numpy()]).all()
    for s, scorer in enumerate(meta["scorers"]):
        seen = set(scorer["record"]["users"])
        mine = frame[frame["scorer"] == s]
        assert len(mine) and not seen & set(mine["user_id"]), "a fold scorer gave features of a user it trained on"
        assert read_record(scorer["path"]).users == tuple(sorted(seen))
    assert meta["scorers"][0]["scorer_version"] != meta["scorers"][1]["scorer_version"]


def test_the_command_names_what_is_wrong(trained, tmp_path):
    out = str(tmp_path / "x.parquet")
    with pytest.raises(SystemExit, match="--scorer DIR .* or --folds K"):
        cli.main(["features", "--data", str(FIXTURE), "--out", out])
    with pytest.raises(SystemExit, match="--scorer DIR .* or --folds K"):
        cli.main(["features", "--scorer", str(trained), "--folds", "2", "--data", str(FIXTURE), "--out", out])
    with pytest.raises(SystemExit, match="projection width"):
        cli.main(["features", "--scorer", str(trained), "--data", str(FIXTURE), "--out", out, "--since", "9" * 12,
                  "--project", "10000"])
    assert not Path(out).exists()


def test_the_live_block_matches_the_exported_one(trained, data):
    """FeatureProvider on a request carrying an example's history gives the exported columns: the same vectors,
    cosines and similarity counts (the logit differs only through the item counts: the served snapshot online,
    the counts before the example's moment offline)."""
    from engine.export.online import FeatureProvider
    from engine.training.loops.calibrate import serving_inputs
    scorer = BAHEScorer.from_pretrained(trained, device="cpu")
    rows = data.split().test[:25]
    projection = Projection.random(scorer.model.upper.hidden_size, 6, seed=4)
    offline = log_block(scorer, data, rows, projection)
    users, items, side = serving_inputs(data, rows, scorer.config.model.categorical_features)
    online = FeatureProvider(scorer, projection).features(users, items, side_features=side)
    assert online.shape == offline.shape
    np.testing.assert_allclose(online[:, :-1], offline[:, :-1], rtol=1e-5, atol=1e-5)
    assert np.corrcoef(online[:, -1], offline[:, -1])[0, 1] > 0.9
