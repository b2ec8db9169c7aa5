"""Incremental users (engine.serving.incremental): a UserState extended by appends ranks as its whole user does (fp32,
1e-5), across window-start moves and sequences that start empty; an append of k behaviors runs only k rows
through the layers; non-causal layers, stale states and malformed appends are refused."""
import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, InputError, ModelConfig, ScorerConfig
from engine.serving.incremental import UserState, pooled
from tests.serving.test_scorer import BEHAVIORS, ITEMS, make_scorer

M = 8  # max_behaviors of these scorers: the default step S = M // 4 = 2
UNKNOWN = ["a brand new behavior", "never seen latte", "some other unseen thing"]


def _windows_pooled(scorer, user):
    """(n, d) the pooled sequence vectors of the whole user, through the packed upper layers."""
    names, config = scorer.config.model.sequence_names, scorer.config.model
    seqs = [list(user.get(name, [])) for name in names]
    windows = [seq[config.window_start(len(seq)):] for seq in seqs]
    flat = [t for w in windows for t in w]
    rows, extra = scorer.pipeline.lookup("behaviors", flat, "encode")
    extra = None if extra is None else torch.from_numpy(extra)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(w) for w in windows])]), device=scorer.device)
    with torch.inference_mode():
        return scorer.model.user_states(scorer.table_rows("behaviors"), torch.from_numpy(rows).to(scorer.device),
                                        offsets,
                                        max(max(len(w) for w in windows), 1), extra)[0]


def _assert_same(scorer, state, user, rng):
    candidates = [ITEMS[i] for i in rng.integers(0, len(ITEMS), 6)] + ["an item not in the table"]
    got = scorer.rank(state, candidates)
    whole = scorer.rank(user, candidates)
    np.testing.assert_allclose(got.scores, whole.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.scores, scorer.score([user] * len(candidates), candidates), rtol=1e-5, atol=1e-5)
    assert got.order.tolist() == np.argsort(-got.scores, kind="stable").tolist()
    with torch.inference_mode():
        torch.testing.assert_close(pooled(scorer.model, state)[0], _windows_pooled(scorer, user), rtol=1e-5,
                                   atol=1e-5)
    assert state.lengths == {name: len(user.get(name, [])) for name in scorer.config.model.sequence_names}


def test_appends_rank_as_the_whole_user(family_checkpoint, tmp_path):
    """Random appends (0-3 behaviors per sequence and step, unknown texts among them) to a user whose 'buy' and
    'search' start empty, past M and across window-start moves: every step equals the full recompute."""
    scorer = make_scorer(family_checkpoint[1], tmp_path, max_behaviors=M)
    rng = np.random.default_rng(0)
    user = {"click": [BEHAVIORS[i] for i in rng.integers(0, len(BEHAVIORS), 5)], "buy": []}
    state = scorer.user_state(user)
    _assert_same(scorer, state, user, rng)
    moved = 0
    for step in range(14):
        new = {name: [(BEHAVIORS + UNKNOWN)[i] for i in rng.integers(0, len(BEHAVIORS) + 3, int(rng.integers(0, 4)))]
               for name in ("click", "buy", "search") if rng.random() < 0.8}
        before = [s.start for s in state.sequences]
        state = scorer.extend_user(state, new)
        for name, texts in new.items():
            user[name] = list(user.get(name, [])) + texts
        moved += sum(s.start != b for s, b in zip(state.sequences, before))
        _assert_same(scorer, state, user, rng)
    assert moved >= 3 and max(len(v) for v in user.values()) > 2 * M  # windows did move, histories passed M


def test_one_behavior_at_a_time_to_a_long_history(tiny_checkpoints, tmp_path):
    scorer = make_scorer(tiny_checkpoints["qwen2"], tmp_path, max_behaviors=M)
    rng = np.random.default_rng(1)
    user = {"click": [BEHAVIORS[i] for i in rng.integers(0, len(BEHAVIORS), 13)]}
    state = scorer.user_state(user, history_counts={"click": 40})
    for j in range(6):
        text = BEHAVIORS[j]
        state = scorer.extend_user(state, {"click": [text]})
        user["click"].append(text)
        counts = {"click": 41 + j}
        got = scorer.rank(state, ITEMS).scores
        np.testing.assert_allclose(got, scorer.rank(user, ITEMS, history_counts=counts).scores, rtol=1e-5, atol=1e-5)
    assert state.sequences[0].counted == 46 and state.sequences[0].total == 19


def test_extending_leaves_the_old_state_valid(tiny_checkpoints, tmp_path):
    scorer = make_scorer(tiny_checkpoints["llama"], tmp_path, max_behaviors=M)
    user = {"click": BEHAVIORS[:4], "buy": BEHAVIORS[4:6]}
    state = scorer.user_state(user)
    before = scorer.rank(state, ITEMS).scores
    longer = scorer.extend_user(state, {"click": BEHAVIORS[6:8]})
    assert longer.sequences[1] is state.sequences[1]  # an untouched sequence is shared, not recomputed
    np.testing.assert_array_equal(scorer.rank(state, ITEMS).scores, before)
    assert not np.allclose(scorer.rank(longer, ITEMS).scores, before)


def _count_layer_rows(scorer, monkeypatch):
    """Rows through each upper layer's q/k/v projection, per call, and the (queries, keys) of each cached
    attention; the packed path must not run at all."""
    rows, scores = [], []
    for layer in scorer.model.upper.layers:
        layer.attn.qkv.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    import engine.serving.incremental as incremental
    attention = incremental.cached_attention

    def counted(q, keys, values, scale):
        scores.append((q.shape[0], keys.shape[0]))
        return attention(q, keys, values, scale)
    monkeypatch.setattr(incremental, "cached_attention", counted)

    def refuse(*args):
        raise AssertionError("the packed upper layers ran")
    monkeypatch.setattr(scorer.model.upper, "forward_packed", refuse)
    return rows, scores


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_an_append_costs_k_rows_per_layer(tiny_checkpoints, tmp_path, monkeypatch, family):
    scorer = make_scorer(tiny_checkpoints[family], tmp_path, max_behaviors=M)
    layers = len(scorer.model.upper.layers)
    state = scorer.user_state({"click": BEHAVIORS[:5], "buy": BEHAVIORS[:2]})
    scorer.rank(state, ITEMS)  # item vectors computed here, before counting
    rows, scores = _count_layer_rows(scorer, monkeypatch)
    state = scorer.extend_user(state, {"click": [BEHAVIORS[7]]})  # 5 -> 6 behaviors: the window start stays 0
    assert rows == [1] * layers and scores == [(1, 6)] * layers
    rows.clear(), scores.clear()
    state = scorer.extend_user(state, {"click": BEHAVIORS[:2], "buy": [BEHAVIORS[3]]})  # 6 -> 8, 2 -> 3
    assert sorted(rows) == [1] * layers + [2] * layers and sorted(scores) == [(1, 3)] * layers + [(2, 8)] * layers
    rows.clear(), scores.clear()
    state = scorer.extend_user(state, {"click": [BEHAVIORS[4]]})  # 9 > M: the start moves to 2, window of 7 rebuilt
    assert state.sequences[0].start == 2 and rows == [7] * layers and scores == [(7, 7)] * layers
    rows.clear(), scores.clear()
    scorer.rank(state, ITEMS)
    assert rows == [] and scores == []  # ranking a state runs no upper layer


def test_memory_is_two_values_per_head_dimension_per_layer_and_behavior(tiny_checkpoints, tmp_path):
    for family in ("bert", "llama"):
        scorer = make_scorer(tiny_checkpoints[family], tmp_path / family, max_behaviors=M)
        state = scorer.user_state({"click": BEHAVIORS[:5], "buy": BEHAVIORS + BEHAVIORS[:1]})  # windows 5, 7, 0
        attn, d = scorer.model.upper.layers[0].attn, scorer.model.upper.hidden_size
        layers, per_value = len(scorer.model.upper.layers), 4
        assert [len(s.window) for s in state.sequences] == [5, 7, 0]
        kv = attn.kv_heads * attn.head_dim
        assert kv == (d if family == "bert" else d // 2)  # the tiny decoders: 4 heads, 2 key/value heads
        assert state.nbytes == layers * 2 * (5 + 7 + 0) * kv * per_value + 3 * d * 8


def test_bidirectional_layers_are_refused(tiny_checkpoints, tmp_path):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=("click", "buy", "search"), max_behaviors=M,
                                            attention="family"))
    scorer = BAHEScorer.create(tiny_checkpoints["bert"], behavior_texts=BEHAVIORS, item_texts=ITEMS,
                               tables_dir=tmp_path / "tables", config=config, device="cpu", progress=False)
    with pytest.raises(ValueError, match="causal upper layers.*bert.*attention='family'"):
        scorer.user_state({"click": BEHAVIORS[:3]})


def test_stale_states_and_malformed_appends_are_refused(tiny_checkpoints, tmp_path):
    scorer = make_scorer(tiny_checkpoints["llama"], tmp_path, max_behaviors=M)
    state = scorer.user_state({"click": BEHAVIORS[:3]})
    bad = [("not a dict", "behaviors must be a dict"),
           ({"click": "bought latte"}, r"behaviors\['click'\] must be a list of behavior texts, got str"),
           ({"click": ["ok text", 7]}, r"behaviors\['click'\]\[1\]: behavior text must be a str, got int"),
           ({"click": ["   "]}, r"behaviors\['click'\]\[0\]: behavior text is empty"),
           ({"click": ["\u200b"]}, r"behaviors\['click'\]\[0\]"),
           ({"likes": ["bought latte"]}, r"unknown sequence name\(s\) \['likes'\]")]
    for behaviors, message in bad:
        with pytest.raises(InputError, match=message):
            scorer.extend_user(state, behaviors)
    with pytest.raises(InputError, match="expected a UserState"):
        scorer.extend_user({"click": BEHAVIORS[:3]}, {"click": BEHAVIORS[:1]})
    with pytest.raises(InputError, match="carries its counts"):
        scorer.rank(state, ITEMS, history_counts={"click": 9})
    with pytest.raises(InputError, match=r"users\[0\]\['buy'\] must be a list"):
        scorer.user_state({"buy": "bought latte"})
    assert isinstance(scorer.extend_user(state, {}), UserState)
    with torch.no_grad():
        scorer.model.upper.layers[0].attn.o.weight.add_(0.01)  # the weights changed (e.g. training went on)
    for use in (lambda: scorer.rank(state, ITEMS), lambda: scorer.extend_user(state, {"click": BEHAVIORS[:1]})):
        with pytest.raises(ValueError, match="computed with other weights"):
            use()


def test_recent_counts_read_the_longest_whole_sequence(tiny_checkpoints, tmp_path):
    """A state keeps only its sequences' last behaviors; the recent counts still pick the widest sequence by
    its whole length (here 'buy', 20 behaviors, though 'click' comes first and both keep their last 10)."""
    scorer = make_scorer(tiny_checkpoints["llama"], tmp_path, max_behaviors=M)
    user = {"click": (BEHAVIORS[:6] * 2)[:12], "buy": (BEHAVIORS[4:] * 4)[:20]}
    state = scorer.user_state(user)
    assert [len(s.texts) for s in state.sequences] == [10, 10, 0]
    np.testing.assert_allclose(scorer.rank(state, ITEMS).scores, scorer.rank(user, ITEMS).scores, rtol=1e-5,
                               atol=1e-5)


def test_the_benchmark_runs(tiny_checkpoints, tmp_path):
    from bench.extend_user import measure
    scorer = make_scorer(tiny_checkpoints["llama"], tmp_path, max_behaviors=M)
    figures = measure(scorer, 6, repeats=1)  # checks the appended state against the recompute itself
    assert figures["bytes"] > 0 and all(figures[key] > 0 for key in ("recompute", "append", "rank_state", "build"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_appends_on_cuda_agree_with_the_kernel_path(tiny_checkpoints, tmp_path, family):
    """On CUDA the whole user runs through the Triton kernels and a state through the reference attention
    (plain PyTorch): the two agree, fp32, across window-start moves."""
    make_scorer(tiny_checkpoints[family], tmp_path, max_behaviors=M).save_pretrained(tmp_path / "saved")
    scorer = BAHEScorer.from_pretrained(tmp_path / "saved", device="cuda")
    rng = np.random.default_rng(2)
    user = {"click": [BEHAVIORS[i] for i in rng.integers(0, len(BEHAVIORS), 3)]}
    state = scorer.user_state(user)
    for step in range(8):
        new = {name: [BEHAVIORS[i] for i in rng.integers(0, len(BEHAVIORS), int(rng.integers(0, 4)))]
               for name in ("click", "buy")}
        state = scorer.extend_user(state, new)
        for name, texts in new.items():
            user[name] = list(user.get(name, [])) + texts
        _assert_same(scorer, state, user, rng)
    assert state.sequences[0].start > 0 and state.sequences[0].keys[0].is_cuda
