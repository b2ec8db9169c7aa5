"""Scoring and ranking by item id (engine.serving.ranking: ItemCatalog, score_items, rank_items) through the id vocabulary of a scorer folder, by the
API and by `bahe score` lines with "item_id": the same scores as by text; unknown ids named."""
import json

import numpy as np
import pytest

from engine import cli
from engine.serving.ranking import ItemCatalog, rank_items, score_items
from engine.serving.inputs import InputError
from engine.serving.scorer import BAHEScorer
from tests.serving.test_scorer import BEHAVIORS, ITEMS, make_scorer
from weights.id_vocabulary import FILE_NAME, VocabularyFile

IDS = ["SKU-0001", 17, "u-\u00e9", "0017"]  # 17 is stored as "17": the key rule; "0017" is another item


@pytest.fixture(scope="module")
def folder(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    make_scorer(tiny_checkpoints["llama"], root).save_pretrained(root / "scorer")
    VocabularyFile.update(root / "scorer" / FILE_NAME, ["u1"], {str(k): t for k, t in zip(IDS, ITEMS)})
    return root / "scorer"


def test_scores_and_ranks_by_id_equal_those_by_text(folder):
    scorer, catalog = BAHEScorer.from_pretrained(folder, device="cpu"), ItemCatalog.open(folder)
    users = [{"click": BEHAVIORS[:3]}, {"buy": BEHAVIORS[3:5]}, {}, {"click": BEHAVIORS[5:6]}]
    np.testing.assert_array_equal(score_items(scorer, catalog, users, ["SKU-0001", "17", 17, "0017"]),
                                  scorer.score(users, [ITEMS[0], ITEMS[1], ITEMS[1], ITEMS[3]]))
    by_id = rank_items(scorer, catalog, users[0], IDS, top_k=2)
    by_text = scorer.rank(users[0], ITEMS, top_k=2)
    np.testing.assert_array_equal(by_id.scores, by_text.scores)
    np.testing.assert_array_equal(by_id.order, by_text.order)


@pytest.mark.parametrize("ids,want", [(["SKU-0001", "SKU-9"], r"items\[1\]: item id 'SKU-9' is not in the catalog"),
                                      (["SKU-0001", 17.5], r"items\[1\]: an id must be a string or an integer"),
                                      ([""], r"items\[0\]: an id is empty"), ("SKU-0001", "must be a list of item ids")])
def test_unknown_or_bad_ids_are_named(folder, ids, want):
    scorer, catalog = BAHEScorer.from_pretrained(folder, device="cpu"), ItemCatalog.open(folder)
    with pytest.raises(InputError, match=want):
        score_items(scorer, catalog, [{}] * len(ids), ids)


def test_a_folder_without_a_catalog(tiny_checkpoints, tmp_path):
    make_scorer(tiny_checkpoints["llama"], tmp_path).save_pretrained(tmp_path / "scorer")
    with pytest.raises(InputError, match=r"no item catalog \(ids.json\); it is written by `bahe train`"):
        ItemCatalog.open(tmp_path / "scorer")


def _score(folder, tmp_path, lines: list[dict]) -> list[dict] | str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    try:
        cli.main(["score", "--scorer", str(folder), "--input", str(path), "--device", "cpu"])
    except SystemExit as stop:
        return stop.code
    return []


def test_bahe_score_lines_may_give_item_ids(folder, tmp_path, capsys):
    user = {"click": BEHAVIORS[:2]}
    assert _score(folder, tmp_path, [{"user": user, "item_id": 17}, {"user": user, "item": ITEMS[1]},
                                     {"user": user, "item_id": "SKU-0001"}]) == []
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x.get("item_id") for x in out] == [17, None, "SKU-0001"] and out[0]["item"] == ITEMS[1]
    assert out[0]["p_click"] == out[1]["p_click"]
    for lines, want in (([{"user": user, "item": "coffee"}, {"user": user, "item_id": "SKU-9"}],
                         r"line 2: item_id: item id 'SKU-9' is not in the catalog"),
                        ([{"user": user, "item_id": True}], r"line 1: item_id: an id must be a string or an integer"),
                        ([{"user": user, "item": "coffee", "item_id": 17}], r"line 1: both \"item\" and \"item_id\"")):
        code = _score(folder, tmp_path, lines)
        assert isinstance(code, str) and "\n" not in code and code.startswith(f"bahe score: {tmp_path / 'in.jsonl'}: ")
        assert __import__("re").search(want, code), code
        assert capsys.readouterr().out == ""


def test_the_catalog_fills_item_features_the_caller_left_out(folder, tmp_path):
    path = tmp_path / FILE_NAME
    VocabularyFile.update(path, [], {"a": "toy story", "b": "coffee"},
                          item_features={"genre": {"a": "Animation"}, "shop": {"b": "cafe"}})
    catalog = ItemCatalog.open(tmp_path)
    names = ("genre", "user_id")  # what the model was trained with: "shop" is not among them
    assert catalog.with_features(["a", "b", None], None, names) == [{"genre": "Animation"}, None, None]
    assert catalog.with_features(["a", "a"], [{"genre": "Drama", "user_id": 3}, {"user_id": 4}], names) == [
        {"genre": "Drama", "user_id": 3}, {"genre": "Animation", "user_id": 4}]
    assert catalog.with_features(["a"], "bad", names) == "bad"  # left for score to refuse
    scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    np.testing.assert_array_equal(score_items(scorer, catalog, [{}, {}], ["a", "b"]),
                                  scorer.score([{}, {}], ["toy story", "coffee"]))


GENRES = {"SKU-0001": "Animation", "17": "Books", "u-\u00e9": None, "0017": "Drinks"}  # u-é: genre unknown


@pytest.fixture(scope="module")
def genre_folder(tiny_checkpoints, tmp_path_factory):
    """A scorer trained with an item-level feature (genre, from a training catalog) and every bucket seen, its
    ids.json holding each item's genre."""
    import torch
    from engine import EncoderConfig, ModelConfig, ScorerConfig
    root = tmp_path_factory.mktemp("genre")
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=("click", "buy", "search"), max_behaviors=6,
                                            categorical_features=("user_id", "genre"), categorical_buckets=32))
    torch.manual_seed(0)
    scorer = BAHEScorer.create(tiny_checkpoints["llama"], behavior_texts=BEHAVIORS, item_texts=ITEMS,
                               tables_dir=root / "tables", config=config, device="cpu", progress=False)
    with torch.no_grad():
        for p in scorer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        scorer.model.side.category_seen[:] = True
    scorer.save_pretrained(root / "scorer")
    VocabularyFile.update(root / "scorer" / FILE_NAME, ["u1"], {str(k): t for k, t in zip(IDS, ITEMS)},
                          item_features={"genre": {k: g for k, g in GENRES.items() if g is not None}})
    return root / "scorer"


def test_rank_by_id_fills_each_candidates_catalog_features(genre_folder):
    """Before, rank_items dropped the items' catalog features (rank took one dict for all candidates): a ranking
    by id scored other probabilities than the same request carrying the items' texts and genres."""
    scorer, catalog = BAHEScorer.from_pretrained(genre_folder, device="cpu"), ItemCatalog.open(genre_folder)
    user = {"click": BEHAVIORS[:3], "buy": BEHAVIORS[3:4]}
    genres = [GENRES["SKU-0001"], GENRES["17"], None, GENRES["0017"]]
    own = [None if g is None else {"genre": g} for g in genres]
    by_id = rank_items(scorer, catalog, user, IDS, top_k=3, side_features={"user_id": "u1"})
    by_text = scorer.rank(user, ITEMS, top_k=3, side_features={"user_id": "u1"}, candidate_features=own)
    np.testing.assert_array_equal(by_id.scores, by_text.scores)
    np.testing.assert_array_equal(by_id.order, by_text.order)
    pairs = scorer.score([user] * len(ITEMS), ITEMS, side_features=[{"user_id": "u1", "genre": g} for g in genres])
    np.testing.assert_allclose(by_id.scores, pairs, rtol=0, atol=1e-6)  # rank and score: the same probabilities
    np.testing.assert_allclose(score_items(scorer, catalog, [user] * len(IDS), IDS,
                                           side_features=[{"user_id": "u1"}] * len(IDS)), pairs, rtol=0, atol=1e-6)
    state = scorer.user_state(user)  # a kept UserState ranks with its candidates' features too
    np.testing.assert_allclose(rank_items(scorer, catalog, state, IDS, side_features={"user_id": "u1"}).scores,
                               by_id.scores, rtol=0, atol=1e-6)
    without = scorer.rank(user, ITEMS, side_features={"user_id": "u1"})  # what rank_items gave before
    assert np.abs(without.scores - by_id.scores).max() > 1e-4
    mine = rank_items(scorer, catalog, user, IDS, side_features={"user_id": "u1", "genre": "Drinks"})
    np.testing.assert_array_equal(mine.scores, scorer.rank(user, ITEMS, side_features={"user_id": "u1",
                                                                                       "genre": "Drinks"}).scores)


@pytest.mark.parametrize("features,want", [
    ([{"genre": "a"}], r"candidate_features must be a list with one dict \(or None\) per candidate \(4\)"),
    ([None, {"shop": "x"}, None, None], r"candidate_features\[1\] has unknown feature\(s\) \['shop'\]"),
    ([None, None, {"genre": 1.5}, None], r"candidate_features\[2\]\['genre'\] must be a str, an int or None"),
])
def test_candidate_features_are_checked_naming_the_candidate(genre_folder, features, want):
    scorer = BAHEScorer.from_pretrained(genre_folder, device="cpu")
    with pytest.raises(InputError, match=want):
        scorer.rank({"click": BEHAVIORS[:2]}, ITEMS, candidate_features=features)


def test_id_ranker_ranks_with_each_candidates_catalog_features(genre_folder):
    """IdRanker.rank fills the candidates' catalog features (from their catalog numbers) as rank_items does."""
    from engine.serving.by_id.history_store import MemoryHistoryStore
    from engine.serving.by_id.id_ranker import IdRanker
    scorer, catalog = BAHEScorer.from_pretrained(genre_folder, device="cpu"), ItemCatalog.open(genre_folder)
    ranker = IdRanker(scorer, MemoryHistoryStore(scorer.config.model.sequence_names, catalog.vocabulary.items),
                      catalog)
    ranker.append("u1", {"click": ["SKU-0001", 17]})
    by_id = ranker.rank("u1", IDS, side_features={"user_id": "u1"})
    want = rank_items(scorer, catalog, {"click": ITEMS[:2]}, IDS, side_features={"user_id": "u1"})
    np.testing.assert_allclose(by_id.scores, want.scores, rtol=0, atol=1e-5)
    plain = scorer.rank({"click": ITEMS[:2]}, ITEMS, side_features={"user_id": "u1"})  # no catalog features
    assert np.abs(plain.scores - by_id.scores).max() > 1e-4
    numbers = catalog.numbers(IDS)
    assert catalog.features_of_numbers(numbers, ("user_id",)) is None  # no stored feature among the names
    assert catalog.features_of_numbers(numbers, ("genre",)) == catalog.with_features(IDS, None, ("genre",))


def test_rank_many_takes_each_users_candidate_features(genre_folder):
    """rank_many with candidate_features[u][j]: each user's ranking equals its own rank with them; errors name the
    user and the candidate."""
    scorer = BAHEScorer.from_pretrained(genre_folder, device="cpu")
    users = [{"click": BEHAVIORS[:3]}, {"click": BEHAVIORS[2:4], "buy": BEHAVIORS[:1]}]
    lists = [ITEMS, ITEMS[1:3]]
    own = [[{"genre": "Drinks"}, None, {"genre": "Snacks"}, None], None]
    many = scorer.rank_many(users, lists, side_features=[{"user_id": "u1"}, None], candidate_features=own)
    one = scorer.rank(users[0], ITEMS, side_features={"user_id": "u1"}, candidate_features=own[0])
    np.testing.assert_allclose(many[0].scores, one.scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(many[1].scores, scorer.rank(users[1], ITEMS[1:3]).scores, rtol=0, atol=1e-6)
    assert np.abs(many[0].scores - scorer.rank(users[0], ITEMS, side_features={"user_id": "u1"}).scores).max() > 1e-4
    with pytest.raises(InputError, match=r"candidate_features\[1\] must be a list with one dict \(or None\) per "
                                         r"candidate \(2\)"):
        scorer.rank_many(users, lists, candidate_features=[None, [None]])
    with pytest.raises(InputError, match=r"candidate_features\[0\]\[1\] has unknown feature\(s\) \['shop'\]"):
        scorer.rank_many(users, lists, candidate_features=[[None, {"shop": "x"}, None, None], None])
    with pytest.raises(InputError, match="one entry \\(a list or None\\) per user, 2 here"):
        scorer.rank_many(users, lists, candidate_features=[None])


def test_save_pretrained_to_another_folder_carries_the_id_vocabulary(folder, tmp_path):
    """Before, ids.json stayed behind: a scorer saved elsewhere could no longer score by item id."""
    scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    user = [{"click": BEHAVIORS[:2]}]
    scorer.save_pretrained(tmp_path / "moved")
    assert (tmp_path / "moved" / FILE_NAME).read_bytes() == (folder / FILE_NAME).read_bytes()
    moved = BAHEScorer.from_pretrained(tmp_path / "moved", device="cpu")
    np.testing.assert_array_equal(score_items(moved, ItemCatalog.open(tmp_path / "moved"), user, ["SKU-0001"]),
                                  scorer.score(user, [ITEMS[0]]))
    assert not list((tmp_path / "moved").glob("*.tmp*"))  # written by temp file + rename
    # a folder with a vocabulary of its own: merged append-only, its ids kept
    VocabularyFile.update(tmp_path / "other" / FILE_NAME, ["u9"], {"X-1": "big book"})
    scorer.save_pretrained(tmp_path / "other")
    merged = VocabularyFile.read(tmp_path / "other" / FILE_NAME)
    assert merged.users.keys == ["u9", "u1"] and merged.items.keys == ["X-1", *map(str, IDS)]
    # one whose id has another text: refused before anything is written
    VocabularyFile.update(tmp_path / "clash" / FILE_NAME, [], {"17": "coffee"})
    before = sorted(p.name for p in (tmp_path / "clash").iterdir() if not p.name.endswith(".lock"))
    with pytest.raises(ValueError, match=r"item '17' has the text 'coffee' in the vocabulary and 'big book' now"):
        scorer.save_pretrained(tmp_path / "clash")
    assert sorted(p.name for p in (tmp_path / "clash").iterdir() if not p.name.endswith(".lock")) == before
    # the scorer carries the vocabulary it was opened with, whatever its folder holds since
    (folder / FILE_NAME).rename(tmp_path / "kept.json")
    try:
        scorer.save_pretrained(tmp_path / "later")
    finally:
        (tmp_path / "kept.json").rename(folder / FILE_NAME)
    assert VocabularyFile.read(tmp_path / "later" / FILE_NAME).text_of("17") == ITEMS[1]
    scorer.save_pretrained(folder)  # its own folder: the file there is left as it is
    assert VocabularyFile.read(folder / FILE_NAME).items.keys == list(map(str, IDS))


def test_a_scorer_without_a_vocabulary_saves_none(tiny_checkpoints, tmp_path):
    make_scorer(tiny_checkpoints["llama"], tmp_path).save_pretrained(tmp_path / "a")
    BAHEScorer.from_pretrained(tmp_path / "a", device="cpu").save_pretrained(tmp_path / "b")
    assert not (tmp_path / "a" / FILE_NAME).exists() and not (tmp_path / "b" / FILE_NAME).exists()


def test_the_id_ranker_fills_each_candidates_catalog_features_too(genre_folder):
    """IdRanker (ids from a history store) ranks and scores as rank_items does: each candidate's catalog genre
    under the user's features, the same probabilities as the request carrying texts and genres."""
    from engine.serving.by_id.history_store import MemoryHistoryStore
    from engine.serving.by_id.id_ranker import IdRanker
    scorer, catalog = BAHEScorer.from_pretrained(genre_folder, device="cpu"), ItemCatalog.open(genre_folder)
    store = MemoryHistoryStore(("click", "buy", "search"), catalog.vocabulary.items)
    store.append("u1", {"click": ["SKU-0001", 17]})
    ranker = IdRanker(scorer, store, catalog)
    user = {"click": [ITEMS[0], ITEMS[1]]}
    own = [None if GENRES[str(i)] is None else {"genre": GENRES[str(i)]} for i in IDS]
    want = scorer.rank(user, ITEMS, side_features={"user_id": "u1"}, candidate_features=own)
    np.testing.assert_allclose(ranker.rank("u1", IDS).scores, want.scores, rtol=0, atol=1e-5)
    pairs = scorer.score([user] * len(ITEMS), ITEMS, side_features=[{"user_id": "u1", "genre": GENRES[str(i)]}
                                                                    for i in IDS])
    np.testing.assert_allclose(ranker.score(["u1"] * len(IDS), IDS), pairs, rtol=0, atol=1e-5)
