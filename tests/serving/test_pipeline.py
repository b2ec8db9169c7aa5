"""ScoringPipeline (engine.serving.pipeline): the one packed transfer per request and its round trip, the one
read back, versions on states and cache entries, host mirrors that follow the weights, score_ids with the
side inputs a scorer was trained with, and (on CUDA) warm serving calls that never synchronize but to read
their result."""
import dataclasses

import numpy as np
import pytest
import torch

import engine.serving.pipeline as pipeline_module
from engine import BAHEScorer, EncoderConfig, InputError, ModelConfig, ScorerConfig
from engine.serving.pipeline import PipelineVersion
from engine.serving.transfer import ALIGN, pack, to_device, unpack
from engine.serving.user_cache import UserStateCache
from kernels import ops
from tests.serving.test_scorer import BEHAVIORS, ITEMS, random_users

NAMES = ("click", "buy", "search")
CATEGORIES = ("user_id", "gender")


def categorical_scorer(folder, tmp_path, family_seed=0) -> BAHEScorer:
    """A scorer trained-like with categorical features: weights spread, half the buckets seen, item counts set."""
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=NAMES, max_behaviors=6, categorical_features=CATEGORIES,
                                            categorical_buckets=32))
    torch.manual_seed(family_seed)
    scorer = BAHEScorer.create(folder, behavior_texts=BEHAVIORS, item_texts=ITEMS, tables_dir=tmp_path / "tables",
                               config=config, device="cpu", progress=False)
    with torch.no_grad():
        for p in scorer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        scorer.model.item_counts.copy_(torch.randint(0, 20, scorer.model.item_counts.shape))
        scorer.model.side.category_seen[::2] = True
    return scorer


def side_features(rng, count):
    return [{"user_id": int(rng.integers(0, 8)), "gender": ["f", "m", None][int(rng.integers(0, 3))]}
            for _ in range(count)]


@pytest.fixture
def scorer(tiny_checkpoints, tmp_path):
    return categorical_scorer(tiny_checkpoints["llama"], tmp_path)


# ----- the transfer -----------------------------------------------------------------------------
def test_pack_round_trips_every_dtype_and_shape():
    rng = np.random.default_rng(0)
    for _ in range(20):
        arrays = {}
        for i in range(int(rng.integers(1, 7))):
            kind = rng.integers(0, 4)
            shape = tuple(int(x) for x in rng.integers(0, 6, int(rng.integers(1, 3))))
            if kind == 0:
                arrays[f"a{i}"] = rng.integers(-50, 50, shape).astype(np.int64)
            elif kind == 1:
                arrays[f"a{i}"] = rng.standard_normal(shape).astype(np.float32)
            elif kind == 2:
                arrays[f"a{i}"] = rng.standard_normal(shape)  # float64
            else:
                arrays[f"a{i}"] = rng.integers(0, 2, shape).astype(bool)
        buffer, layout = pack(arrays)
        assert buffer.dtype == np.uint8 and all(offset % ALIGN == 0 for offset, _, _ in layout.values())
        back = unpack(torch.from_numpy(buffer), layout)
        for name, array in arrays.items():
            assert back[name].shape == array.shape and back[name].numpy().dtype == array.dtype
            np.testing.assert_array_equal(back[name].numpy(), array)


def test_to_device_on_the_cpu_wraps_without_copying_and_keeps_none():
    rows = np.arange(5, dtype=np.int64)
    out = to_device({"rows": rows, "extra": None, "dense": np.ones((2, 3), np.float32)}, torch.device("cpu"))
    assert out["extra"] is None and out["rows"].data_ptr() == rows.__array_interface__["data"][0]
    assert out["dense"].shape == (2, 3) and out["dense"].dtype == torch.float32


def test_every_request_makes_one_transfer_and_one_read(scorer, monkeypatch):
    transfers, reads = [], []
    real_to_device, real_read = pipeline_module.to_device, pipeline_module.read_back
    monkeypatch.setattr(pipeline_module, "to_device", lambda arrays, device: transfers.append(sorted(
        k for k, v in arrays.items() if v is not None)) or real_to_device(arrays, device))
    monkeypatch.setattr(pipeline_module, "read_back", lambda t: reads.append(t.shape) or real_read(t))
    rng = np.random.default_rng(1)
    users, features = random_users(rng, 4), side_features(rng, 4)
    scorer.score(users, ITEMS, side_features=features)
    scorer.rank(users[0], ITEMS + ["a brand new gadget"], side_features=features[0])
    scorer.rank_many(users, [ITEMS, ITEMS[:2], [], ["coffee", "big book"]], side_features=features)
    assert len(transfers) == 3 and len(reads) == 3
    assert {"behavior_rows", "item_rows", "dense", "categories"} <= set(transfers[0])
    assert {"item_extra", "fresh_pairs", "slot"} <= set(transfers[1])


def test_similarity_groups_split_by_the_block_give_the_same_scores(scorer, monkeypatch):
    """rank_many's pair similarity runs one product per group of users under SIMILARITY_BLOCK cosines; a block
    of one forces a group per user (and a score of many users, pairs in any order) with the same result."""
    rng = np.random.default_rng(5)
    users, features = random_users(rng, 6), side_features(rng, 6)
    lists = [[ITEMS[i] for i in rng.integers(0, len(ITEMS), k)] for k in (3, 0, 5, 1, 4, 2)]
    items = [ITEMS[i] for i in rng.integers(0, len(ITEMS), 6)]
    together = [r.scores for r in scorer.rank_many(users, lists, side_features=features)]
    pairs = scorer.score(users[::-1] + users, items + items[::-1], side_features=features[::-1] + features)
    monkeypatch.setattr(pipeline_module, "SIMILARITY_BLOCK", 1)
    for got, want in zip(scorer.rank_many(users, lists, side_features=features), together):
        np.testing.assert_allclose(got.scores, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scorer.score(users[::-1] + users, items + items[::-1],
                                            side_features=features[::-1] + features), pairs, rtol=1e-6, atol=1e-7)


# ----- versions ---------------------------------------------------------------------------------
def test_a_version_serves_older_state_of_the_same_weights_and_shorter_tables():
    v = PipelineVersion(pipeline=1, weights=(1, 2), behaviors=10, items=4)
    assert v.serves(v) and v.serves(dataclasses.replace(v, behaviors=8, items=3))
    assert not v.serves(dataclasses.replace(v, behaviors=11))
    assert not v.serves(dataclasses.replace(v, weights=(1, 3)))
    assert not v.serves(dataclasses.replace(v, pipeline=2))  # another scorer's, even at equal tensor ids


def test_two_pipelines_never_serve_each_others_state(scorer):
    """Tensor ids and data pointers can be reused once a swapped-out scorer is collected: the serial tells them apart."""
    other = BAHEScorer(config=scorer.config, checkpoint=scorer.checkpoint, encoder=scorer.encoder, model=scorer.model,
                       behaviors=scorer.behaviors, items=scorer.items, device="cpu")
    assert other.pipeline.version().weights == scorer.pipeline.version().weights
    assert not other.pipeline.version().serves(scorer.pipeline.version())


def test_the_pipeline_version_follows_weights_and_tables(scorer):
    before = scorer.pipeline.version()
    scorer.behaviors.append(["a behavior appended later"])
    grown = scorer.pipeline.version()
    assert grown.behaviors == before.behaviors + 1 and grown.serves(before) and not before.serves(grown)
    with torch.no_grad():
        scorer.model.side.item_id.weight.mul_(1.01)  # a head weight: the version changes too
    assert not scorer.pipeline.version().serves(grown)


def test_a_user_state_from_another_version_is_refused(scorer):
    user = {"click": BEHAVIORS[:4], "buy": BEHAVIORS[4:6]}
    state = scorer.user_state(user)
    assert state.version == scorer.pipeline.version() and state.names == NAMES
    before = scorer.rank(state, ITEMS).scores
    scorer.behaviors.append(["a behavior appended later"])  # tables only grew: the state still serves
    np.testing.assert_array_equal(scorer.rank(state, ITEMS).scores, before)
    longer_table = dataclasses.replace(state.version, behaviors=len(scorer.behaviors) + 1)
    shorter = dataclasses.replace(state, version=longer_table)  # made when the table was longer than it is now
    with pytest.raises(ValueError, match="other weights, dtype, tables"):
        scorer.rank(shorter, ITEMS)
    with torch.no_grad():
        scorer.model.empty_sequence.mul_(1.5)  # outside the upper layers, but the pooled vectors read it
    with pytest.raises(ValueError, match="build it again"):
        scorer.rank(state, ITEMS)
    with pytest.raises(ValueError, match="build it again"):
        scorer.extend_user(state, {"click": ["bought latte"]})
    np.testing.assert_allclose(scorer.rank(scorer.user_state(user), ITEMS).scores, scorer.rank(user, ITEMS).scores,
                               rtol=1e-5, atol=1e-5)


def test_cache_entries_carry_their_version():
    cache = UserStateCache(1 << 20)
    v1 = PipelineVersion(1, (1,), 10, 4)
    cache.get_many([b"a"], v1)
    cache.put_many([b"a"], [torch.ones(3, 2)], v1)
    assert cache.get_many([b"a"], dataclasses.replace(v1, behaviors=12))[0] is not None  # tables grew: served
    assert cache.get_many([b"a"], dataclasses.replace(v1, behaviors=9))[0] is None  # a shorter table: dropped
    cache.put_many([b"a"], [torch.ones(3, 2)], v1)  # computed at a version the cache has left: not kept
    assert cache.stats().entries == 0
    cache.put_many([b"b"], [torch.ones(3, 2)], dataclasses.replace(v1, behaviors=9))
    assert cache.get_many([b"b"], PipelineVersion(1, (2,), 9, 4))[0] is None and cache.stats().entries == 0


def test_host_mirrors_follow_the_weights(scorer):
    user, item = random_users(np.random.default_rng(2), 1)[0], ["coffee"]
    before = scorer.score([user], item)
    counts, seen = scorer.pipeline.mirrors()
    np.testing.assert_array_equal(counts, scorer.model.item_counts.numpy())
    with torch.no_grad():
        scorer.model.item_counts.mul_(7).add_(3)
    np.testing.assert_array_equal(scorer.pipeline.mirrors()[0], scorer.model.item_counts.numpy())
    assert not np.array_equal(scorer.score([user], item), before)
    assert seen.sum() == 16


# ----- score_ids with side inputs ---------------------------------------------------------------
def _ids(scorer, users):
    texts = [t for u in users for name in NAMES for t in u.get(name, [])]
    lengths = [len(u.get(name, [])) for u in users for name in NAMES]
    rows = torch.from_numpy(scorer.behaviors.lookup(texts).astype(np.int64))
    return rows, torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_score_ids_takes_the_categorical_features_score_takes(tiny_checkpoints, tmp_path, family):
    scorer = categorical_scorer(tiny_checkpoints[family], tmp_path)
    rng = np.random.default_rng(3)
    users = [{name: seq[-6:] for name, seq in u.items()} for u in random_users(rng, 6)]
    items = [ITEMS[i] for i in rng.integers(0, len(ITEMS), 6)]
    features = side_features(rng, 6)
    rows, offsets = _ids(scorer, users)
    item_rows = torch.from_numpy(scorer.items.lookup(items).astype(np.int64))
    by_ids = scorer.score_ids(rows, offsets, item_rows, side_features=features)
    np.testing.assert_allclose(by_ids, scorer.score(users, items, side_features=features), rtol=1e-5, atol=1e-6)
    unknown = scorer.score_ids(rows, offsets, item_rows)  # left out: every value unknown, as score takes it
    np.testing.assert_allclose(unknown, scorer.score(users, items), rtol=1e-5, atol=1e-6)
    assert not np.allclose(unknown, by_ids, atol=1e-4)


def test_score_ids_side_feature_errors_name_the_entry(scorer):
    rows, offsets = _ids(scorer, [{"click": BEHAVIORS[:2]}, {}])
    items = torch.tensor([0, 1])
    with pytest.raises(InputError, match=r"side_features\[1\]\['gender'\] must be a str, an int or None"):
        scorer.score_ids(rows, offsets, items, side_features=[{}, {"gender": 1.5}])
    with pytest.raises(InputError, match="side_features"):
        scorer.score_ids(rows, offsets, items, side_features=[{}])


# ----- CUDA: no synchronization but the read of the result --------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available() or not ops.triton_available(), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_warm_serving_calls_never_synchronize_but_to_read_the_result(tiny_checkpoints, tmp_path, family,
                                                                      monkeypatch):
    cpu = categorical_scorer(tiny_checkpoints[family], tmp_path)
    cpu.save_pretrained(tmp_path / "saved")
    gpu = BAHEScorer.from_pretrained(tmp_path / "saved", device="cuda", kernels="triton")
    rng = np.random.default_rng(4)
    users, features = random_users(rng, 4), side_features(rng, 4)
    lists = [ITEMS, ITEMS[:2], ITEMS[1:], ["coffee"]]

    def calls():
        return (gpu.score(users, ITEMS, side_features=features), gpu.rank(users[0], ITEMS, side_features=features[0]),
                gpu.rank_many(users, lists, side_features=features))
    calls()  # warm-up: kernels compiled, tables placed, item vectors and host mirrors made
    reads, real = [], pipeline_module.read_back

    def lifted(probabilities):  # the one read of the result, allowed
        reads.append(probabilities.shape)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(probabilities)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    monkeypatch.setattr(pipeline_module, "read_back", lifted)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        score, rank, many = calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(reads) == 3
    np.testing.assert_allclose(score, cpu.score(users, ITEMS, side_features=features), atol=2e-3)
    np.testing.assert_allclose(rank.scores, cpu.rank(users[0], ITEMS, side_features=features[0]).scores, atol=2e-3)
    for got, want in zip(many, cpu.rank_many(users, lists, side_features=features)):
        np.testing.assert_allclose(got.scores, want.scores, atol=2e-3)
