"""Ranking and scoring by ids (engine.serving.by_id.id_ranker): appends then rank equal the text path on the same
history and candidates (fp32, 1e-5), across window moves, items the tables lack and user ids as a categorical
feature; an append costs its new rows only and a warm rank looks no text up; unknown ids refused by name;
threads appending and ranking stay consistent; a reloaded snapshot serves the same ranks."""
import threading

import numpy as np
import pytest
import torch

from engine import ScoringConfig
from engine.encoding.text_checks import InputError
from engine.serving.by_id.history_store import MemoryHistoryStore, UnknownUserError
from engine.serving.by_id.id_ranker import IdRanker
from engine.serving.ranking import ItemCatalog
from tests.serving.test_incremental import _count_layer_rows
from tests.serving.test_scorer import BEHAVIORS, ITEMS, make_scorer
from weights.id_vocabulary import FILE_NAME, VocabularyFile

M = 8  # max_behaviors: window step 2, so appends move window starts
NEW = ["a gadget in no table", "another unseen thing"]  # catalog items whose text neither table holds
TEXTS = BEHAVIORS + ITEMS + NEW
IDS = [f"SKU-{k}" for k in range(len(TEXTS) - 1)] + [17]  # 17: an integer id, stored as "17"
NAMES = ("click", "buy", "search")


def _catalog(folder):
    VocabularyFile.update(folder / FILE_NAME, ["u1"], {str(k): t for k, t in zip(IDS, TEXTS)})
    return ItemCatalog.open(folder)


def _setup(checkpoint, tmp_path, **options):
    scorer = make_scorer(checkpoint, tmp_path, max_behaviors=M, **options)
    tmp_path.joinpath("scorer").mkdir()
    catalog = _catalog(tmp_path / "scorer")
    return scorer, catalog, IdRanker(scorer, MemoryHistoryStore(NAMES, catalog.vocabulary.items), catalog)


KEYS = [str(i) for i in IDS]


def _text(ids):
    return [TEXTS[KEYS.index(str(i))] for i in ids]


def _assert_same(scorer, ranker, user_id, history, candidates, side=None):
    """history: sequence name -> item ids (the whole user); candidates: item ids."""
    user = {name: _text(ids) for name, ids in history.items()}
    got = ranker.rank(user_id, candidates, top_k=3, side_features=side)
    want = scorer.rank(user, _text(candidates), top_k=3, side_features=side)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
    assert got.order.tolist() == np.argsort(-got.scores, kind="stable")[:3].tolist()
    pairs = ranker.score([user_id] * len(candidates), candidates)
    np.testing.assert_allclose(pairs, scorer.score([user] * len(candidates), _text(candidates)), rtol=1e-5, atol=1e-5)


def test_appends_then_rank_equal_the_text_path(family_checkpoint, tmp_path):
    """Random appends (items the behavior table lacks among them) to two users, past M and across window moves;
    candidates include items the item table lacks: every step equals the text path."""
    scorer, _, ranker = _setup(family_checkpoint[1], tmp_path)
    rng = np.random.default_rng(0)
    histories = {"u1": {name: [] for name in NAMES}, 42: {name: [] for name in NAMES}}
    for step in range(14):
        for user_id, history in histories.items():
            events = {name: [IDS[i] for i in rng.integers(0, len(IDS), int(rng.integers(0, 4)))]
                      for name in NAMES if rng.random() < 0.7}
            if step == 0:
                events["click"] = [IDS[0]]
            ranker.append(user_id, events)
            for name, ids in events.items():
                history[name] += [str(i) for i in ids]
            candidates = [IDS[i] for i in rng.choice(len(IDS), 6, replace=False)]
            _assert_same(scorer, ranker, user_id, history, candidates)
    assert max(len(ids) for h in histories.values() for ids in h.values()) > 2 * M
    assert ranker.kept("42") == tuple(len(histories[42][name]) for name in NAMES)


def test_an_append_costs_its_new_rows_and_a_warm_rank_looks_no_text_up(tiny_checkpoints, tmp_path, monkeypatch):
    scorer, _, ranker = _setup(tiny_checkpoints["llama"], tmp_path)
    layers = len(scorer.model.upper.layers)
    ranker.append("u1", {"click": IDS[:5], "buy": IDS[:2]})
    ranker.rank("u1", IDS[10:14])  # builds the state
    rows, scores = _count_layer_rows(scorer, monkeypatch)
    ranker.append("u1", {"click": [IDS[7]]})  # 5 -> 6: the kept state is extended by one row at once
    assert rows == [1] * layers and scores == [(1, 6)] * layers and ranker.kept("u1") == (6, 2, 0)
    rows.clear(), scores.clear()
    lookups = []
    real = scorer.pipeline.lookup
    monkeypatch.setattr(scorer.pipeline, "lookup", lambda *a, **k: lookups.append(a[0]) or real(*a, **k))
    ranked = ranker.rank("u1", IDS[10:14])
    assert rows == [] and scores == [] and lookups == []  # no upper layer, no text lookup
    monkeypatch.undo()
    user = {"click": _text(IDS[:5] + [IDS[7]]), "buy": _text(IDS[:2])}
    np.testing.assert_allclose(ranked.scores, scorer.rank(user, _text(IDS[10:14])).scores, rtol=1e-5, atol=1e-5)


def test_unknown_ids_are_refused_by_name(tiny_checkpoints, tmp_path):
    scorer, _, ranker = _setup(tiny_checkpoints["llama"], tmp_path)
    ranker.append("u1", {"click": IDS[:3]})
    with pytest.raises(InputError, match=r"events\['buy'\]\[1\]: item id 'SKU-999' is not a known item"):
        ranker.append("u1", {"click": [IDS[4]], "buy": [IDS[5], "SKU-999"]})
    assert ranker.store.read("u1").totals == (3, 0, 0)  # nothing of the refused append stored
    with pytest.raises(InputError, match=r"candidates\[1\]: item id 'SKU-999' is not in the catalog"):
        ranker.rank("u1", [IDS[0], "SKU-999"])
    with pytest.raises(InputError, match=r"items\[0\]: an id must be a string or an integer"):
        ranker.score(["u1"], [1.5])
    with pytest.raises(UnknownUserError, match=r"user id 'u2' has no history in the store"):
        ranker.rank("u2", IDS[:2])
    with pytest.raises(InputError, match=r"user_ids\[1\]: an id is empty"):
        ranker.score(["u1", ""], IDS[:2])
    with pytest.raises(InputError, match=r"item_ids has 1 entries but user_ids has 2"):
        ranker.score(["u1", "u1"], IDS[:1])


def test_unknown_behavior_error_refuses_items_the_behavior_table_lacks(tiny_checkpoints, tmp_path):
    scorer, _, ranker = _setup(tiny_checkpoints["llama"], tmp_path, unknown_behavior="error")
    with pytest.raises(InputError, match=r"events\['click'\]\[1\]: item 'SKU-10''s text is not in the behavior table"):
        ranker.append("u1", {"click": [IDS[0], IDS[len(BEHAVIORS)]]})  # IDS[10]: an item text, not a behavior row
    assert "u1" not in ranker.store


def test_the_user_id_feature_is_filled_from_the_request(tiny_checkpoints, tmp_path):
    from engine import BAHEScorer, EncoderConfig, ModelConfig, ScorerConfig
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=NAMES, max_behaviors=M, categorical_features=("user_id",)))
    torch.manual_seed(0)
    scorer = BAHEScorer.create(tiny_checkpoints["llama"], behavior_texts=BEHAVIORS, item_texts=ITEMS,
                               tables_dir=tmp_path / "tables", config=config, device="cpu", progress=False)
    with torch.no_grad():
        scorer.model.side.category_seen.fill_(True)  # every bucket seen: a user's id moves its scores
        for p in scorer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tmp_path.joinpath("scorer").mkdir()
    catalog = _catalog(tmp_path / "scorer")
    ranker = IdRanker(scorer, MemoryHistoryStore(NAMES, catalog.vocabulary.items), catalog)
    ranker.append(7, {"click": IDS[:4]})
    user, candidates = {"click": _text(IDS[:4])}, IDS[10:14]
    got = ranker.rank(7, candidates).scores
    np.testing.assert_allclose(got, scorer.rank(user, _text(candidates), side_features={"user_id": 7}).scores,
                               rtol=1e-5, atol=1e-5)
    assert np.abs(got - scorer.rank(user, _text(candidates)).scores).max() > 1e-4
    np.testing.assert_allclose(ranker.score([7, "7"], candidates[:2]),
                               scorer.score([user] * 2, _text(candidates[:2]), side_features=[{"user_id": "7"}] * 2),
                               rtol=1e-5, atol=1e-5)


def test_bidirectional_scorers_serve_by_ids_through_the_text_path(tiny_checkpoints, tmp_path):
    from engine import BAHEScorer, EncoderConfig, ModelConfig, ScorerConfig
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=NAMES, max_behaviors=M, attention="family"))
    scorer = BAHEScorer.create(tiny_checkpoints["bert"], behavior_texts=BEHAVIORS, item_texts=ITEMS,
                               tables_dir=tmp_path / "tables", config=config, device="cpu", progress=False)
    tmp_path.joinpath("scorer").mkdir()
    catalog = _catalog(tmp_path / "scorer")
    ranker = IdRanker(scorer, MemoryHistoryStore(NAMES, catalog.vocabulary.items), catalog)
    assert not ranker.incremental
    ranker.append("u1", {"click": IDS[:5], "search": IDS[3:4]})
    _assert_same(scorer, ranker, "u1", {"click": IDS[:5], "search": IDS[3:4]}, IDS[8:14])
    assert ranker.kept("u1") is None


def test_threads_appending_and_ranking_stay_consistent(tiny_checkpoints, tmp_path):
    """Two appenders per user and two rankers, concurrently: no append lost or reordered within a thread, no
    error, every rank a valid ranking; afterwards the kept states cover the whole store and rank as the text path."""
    scorer, _, ranker = _setup(tiny_checkpoints["qwen2"], tmp_path)
    users = ["a", "b", "c"]
    for user in users:
        ranker.append(user, {"click": IDS[:2]})
    errors, done = [], threading.Event()

    def appender(offset):
        try:
            for step in range(10):
                for user in users:
                    ranker.append(user, {"click": [IDS[(offset + step) % len(IDS)]], "buy": [IDS[offset]]})
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def ranker_thread():
        try:
            while not done.is_set():
                for user in users:
                    ranked = ranker.rank(user, IDS[8:14], top_k=2)
                    assert ranked.scores.shape == (6,) and np.isfinite(ranked.scores).all()
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    appenders = [threading.Thread(target=appender, args=(k,)) for k in (1, 2)]
    rankers = [threading.Thread(target=ranker_thread) for _ in range(2)]
    for t in appenders + rankers:
        t.start()
    for t in appenders:
        t.join(120)
    done.set()
    for t in rankers:
        t.join(120)
    assert not errors, errors
    for user in users:
        history = ranker.store.read(user)
        assert history.totals == (22, 20, 0)
        clicks = history.items[0][2:]
        for offset in (1, 2):  # each appender's clicks in its own order
            mine = [i for i in clicks if i in {str(IDS[(offset + s) % len(IDS)]) for s in range(10)}]
            assert len(mine) >= 10
        _assert_same(scorer, ranker, user, dict(zip(NAMES, map(list, history.items))), IDS[8:14])
        assert ranker.kept(user) == history.totals


def test_a_reloaded_snapshot_ranks_the_same(tiny_checkpoints, tmp_path):
    scorer, catalog, ranker = _setup(tiny_checkpoints["llama"], tmp_path)
    ranker.append("u1", {"click": IDS[:6], "buy": IDS[2:3]})
    ranker.append(5, {"search": IDS[1:4]})
    before = {u: ranker.rank(u, IDS[9:15]).scores for u in ("u1", 5)}
    ranker.store.snapshot(tmp_path / "histories.json")
    store = MemoryHistoryStore.load(tmp_path / "histories.json", catalog.vocabulary.items, NAMES)
    again = IdRanker(scorer, store, catalog)
    for user, scores in before.items():
        np.testing.assert_array_equal(again.rank(user, IDS[9:15]).scores, scores)
    ranker.store = store  # another generation: the kept states are rebuilt, not extended
    store.append("u1", {"click": IDS[6:7]})
    user = {"click": _text(IDS[:7]), "buy": _text(IDS[2:3])}
    np.testing.assert_allclose(ranker.rank("u1", IDS[9:15]).scores, scorer.rank(user, _text(IDS[9:15])).scores,
                               rtol=1e-5, atol=1e-5)


def test_kept_states_of_other_weights_are_built_again(tiny_checkpoints, tmp_path):
    scorer, _, ranker = _setup(tiny_checkpoints["llama"], tmp_path)
    ranker.append("u1", {"click": IDS[:5]})
    before = ranker.rank("u1", IDS[9:15]).scores
    with torch.no_grad():
        for p in scorer.model.upper.parameters():
            p.mul_(1.5)  # new weights: the kept state no longer serves
    after = ranker.rank("u1", IDS[9:15]).scores
    np.testing.assert_allclose(after, scorer.rank({"click": _text(IDS[:5])}, _text(IDS[9:15])).scores, rtol=1e-5,
                               atol=1e-5)
    assert np.abs(after - before).max() > 1e-4
    assert scorer.pipeline.version().serves(ranker.user_state("u1").version)


def test_sequence_names_must_match(tiny_checkpoints, tmp_path):
    scorer, catalog, _ = _setup(tiny_checkpoints["llama"], tmp_path)
    with pytest.raises(ValueError, match=r"the store's sequences \['click'\] are not the scorer's"):
        IdRanker(scorer, MemoryHistoryStore(("click",)), catalog)
    assert ScoringConfig().unknown_behavior == "encode"
