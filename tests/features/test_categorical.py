"""Categorical side features (engine.features.categorical): stable hashing, the unseen bucket, the log's cat_ columns,
scoring with side_features (schema errors named), training marks what it saw, save/load keeps it."""
import numpy as np
import pandas as pd
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, InputError, ModelConfig, ScorerConfig
from engine.features.categorical import bucket_of, category_buckets, category_rows
from engine.training.loops.ctr_models import BAHECTR, SideOnlyCTR, rows_by_user
from engine.training.data import load_log
from engine.training.data.log import BehaviorLog
from engine.training.data.log_schema import LogFormatError
from engine.training.data.example_features import category_batch
from tests.training.test_timeline import FIXTURE

FEATURES = ("user_id", "gender", "occupation", "age")


@pytest.fixture(scope="module")
def log():
    return load_log(FIXTURE)


def test_buckets_are_stable_and_ints_are_their_digits():
    assert bucket_of("user_id", 196, 65536) == bucket_of("user_id", "196", 65536)
    assert bucket_of("user_id", 196, 65536) != bucket_of("gender", 196, 65536)  # the name is part of the key
    assert bucket_of("g", None, 10) == -1
    assert 0 <= bucket_of("g", "M", 7) < 7
    ids = category_buckets(("a", "b"), [["x", None, "x"], [1, 2, None]], 1000)
    assert ids.shape == (3, 2) and ids[0, 0] == ids[2, 0] and ids[1, 0] == -1 and ids[2, 1] == -1
    seen = np.zeros(1000, dtype=bool)
    seen[ids[0, 0]] = True
    rows = category_rows(ids, seen)
    assert rows[0, 0] == ids[0, 0] and (rows[:, 1] == 1000).all() and rows[1, 0] == 1000


def test_the_log_reads_cat_columns(tmp_path):
    frame = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5], "timestamp": [1, 2, 3], "label": [1, 0, 1],
                          "item_text": ["a", "b", "a"], "cat_city": ["Paris", None, 7], "cat_level": [1.0, 2.0, float("nan")]})
    log = BehaviorLog.from_frame(frame)
    assert log.category_values("city", np.arange(3)) == ["Paris", None, "7"]
    assert log.category_values("level", np.arange(3)) == ["1", "2", None]
    assert log.category_values("user_id", np.arange(3)) == [1, 1, 2]
    with pytest.raises(KeyError, match="no categorical feature 'town'"):
        log.category_values("town", np.arange(3))
    bad = frame.assign(cat_level=[1.5, 2.0, 3.0])
    with pytest.raises(LogFormatError, match="row 0, column 'cat_level': must hold strings or integers, got 1.5"):
        BehaviorLog.from_frame(bad)
    with pytest.raises(LogFormatError, match="cat_<name>"):
        BehaviorLog.from_frame(frame.assign(cat_user_id=1))


def _scorer(folder, tmp_path, log, features=FEATURES):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=50,
                                            categorical_features=features, categorical_buckets=4096))
    torch.manual_seed(0)
    texts = log.item_id_texts
    return BAHEScorer.create(folder, behavior_texts=texts, item_texts=texts, tables_dir=tmp_path / "tables",
                             config=config, device="cpu", progress=False)


def test_training_marks_seen_buckets_and_timeline_uses_them(tiny_checkpoints, tmp_path, log):
    scorer = _scorer(tiny_checkpoints["bert"], tmp_path, log)
    ctr = BAHECTR(scorer, log)
    rows = rows_by_user(log.examples, log, np.random.default_rng(0))[:80]
    assert not scorer.model.side.category_seen.any()
    ctr.eval()
    unseen = category_batch(ctr.model.side, scorer.config.model, log, rows, training=False)
    assert (unseen == 4096).all()  # nothing trained yet: every value takes the unseen row
    ctr.train()
    batch = ctr.prepare(log, rows)
    expected = {bucket_of(name, value, 4096) for name in FEATURES for value in log.category_values(name, rows)}
    assert set(torch.nonzero(scorer.model.side.category_seen).flatten().tolist()) == expected
    assert batch.categories.shape == (rows.size, len(FEATURES)) and (batch.categories < 4096).all()
    ctr.eval()
    logits = ctr(ctr.prepare(log, rows))
    with torch.no_grad():
        scorer.model.side.category.weight[:4096].add_(1.0)  # the seen rows matter ...
    assert not torch.allclose(ctr(ctr.prepare(log, rows)), logits)
    ablation = SideOnlyCTR(scorer.config.model, log).train()
    assert ablation.prepare(log, rows).categories.shape == (rows.size, len(FEATURES))


def test_score_takes_side_features_and_names_bad_ones(tiny_checkpoints, tmp_path, log):
    scorer = _scorer(tiny_checkpoints["llama"], tmp_path, log)
    with torch.no_grad():
        scorer.model.side.category.weight.normal_(0, 1.0)
        scorer.model.side.category_seen[bucket_of("gender", "F", 4096)] = True
    user, item = {"liked": [log.item_id_texts[0]]}, log.item_id_texts[1]
    plain = scorer.score([user], [item])
    assert np.array_equal(scorer.score([user], [item], side_features=[None]), plain)
    assert np.array_equal(scorer.score([user], [item], side_features=[{"gender": None}]), plain)
    assert np.array_equal(scorer.score([user], [item], side_features=[{"gender": "X"}]), plain)  # unseen: unknown
    female = scorer.score([user], [item], side_features=[{"gender": "F"}])
    assert not np.array_equal(female, plain)
    ranked = scorer.rank(user, [item, log.item_id_texts[2]], side_features={"gender": "F"})
    np.testing.assert_allclose(ranked.scores[0], female[0], rtol=1e-5)
    folder = tmp_path / "saved"
    scorer.save_pretrained(folder)
    again = BAHEScorer.from_pretrained(folder)
    np.testing.assert_allclose(again.score([user], [item], side_features=[{"gender": "F"}]), female, rtol=1e-6)
    for side, match in [({"gender": 1.5}, r"side_features\[0\]\['gender'\] must be a str, an int or None, got float"),
                        ({"gender": True}, "got bool"), ({"city": "Paris"}, r"unknown feature\(s\) \['city'\]"),
                        ("F", "must be a dict"), ]:
        with pytest.raises(InputError, match=match):
            scorer.score([user], [item], side_features=[side])
    with pytest.raises(InputError, match=r"one dict \(or None\) per pair \(1\), got list of 2"):
        scorer.score([user], [item], side_features=[None, None])
    with pytest.raises(InputError, match=r"per user \(1\)"):
        scorer.rank_many([user], [[item]], side_features=[None, None])


def test_a_model_without_categorical_features_refuses_them(tiny_checkpoints, tmp_path, log):
    scorer = _scorer(tiny_checkpoints["llama"], tmp_path, log, features=())
    user, item = {"liked": [log.item_id_texts[0]]}, log.item_id_texts[1]
    with pytest.raises(InputError, match=r"unknown feature\(s\) \['gender'\]; this model takes \[\]"):
        scorer.score([user], [item], side_features=[{"gender": "F"}])


def test_log_categorical_features_by_name(log):
    from engine.training.data.example_features import log_categorical_features
    assert log_categorical_features("all", log) == ("user_id", "gender", "occupation", "age")
    assert log_categorical_features("none", log) == ()
    assert log_categorical_features("user_id, age", log) == ("user_id", "age")
    with pytest.raises(ValueError, match=r"\['city'\] are not in the log"):
        log_categorical_features("city", log)


def test_score_lines_carry_side_features():
    from engine.serving.inputs import at_line, read_requests
    users, items, sides, lines = read_requests(b'{"user": {}, "item": "a", "side_features": {"gender": "F"}}\n\n'
                                               b'{"user": {}, "item": "b"}\n', "in.jsonl")
    assert sides == [{"gender": "F"}, None] and lines == [1, 3]
    assert at_line("side_features[1]['gender'] must be a str", lines) == "line 3: side_features['gender'] must be a str"
