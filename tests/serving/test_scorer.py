"""BAHEScorer: scores, batch independence, save/load, unknown texts, and input errors."""
import threading

import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, InputError, ModelConfig, ScorerConfig, ScoringConfig
from weights.table import BehaviorTable, UnknownTextError

BEHAVIORS = ["bought latte", "searched running shoes", "watched toy story", "liked star wars", "clicked red phone",
             "bought big book", "searched blue film", "watched old movie", "liked new music", "clicked small coffee"]
ITEMS = ["toy story", "big book", "red phone", "coffee"]


def make_scorer(folder, tmp_path, max_behaviors=6, count_features=True, **scoring):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=("click", "buy", "search"), max_behaviors=max_behaviors,
                                            count_features=count_features),
                          scoring=ScoringConfig(**scoring))
    torch.manual_seed(0)
    scorer = BAHEScorer.create(folder, behavior_texts=BEHAVIORS, item_texts=ITEMS, tables_dir=tmp_path / "tables",
                               config=config, device="cpu", progress=False)
    with torch.no_grad():  # an untrained head is near 0.5 everywhere: spread it (without saturating) so differences show
        for p in scorer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return scorer


def random_users(rng, count):
    users = []
    for _ in range(count):
        user = {}
        for name in ("click", "buy", "search"):
            k = int(rng.integers(0, 9))
            if k or rng.random() < 0.5:
                user[name] = [BEHAVIORS[i] for i in rng.integers(0, len(BEHAVIORS), k)]
        users.append(user)
    return users


@pytest.fixture
def scorer(tiny_checkpoints, tmp_path):
    return make_scorer(tiny_checkpoints["llama"], tmp_path)


def test_scores_are_probabilities_independent_of_the_batch(family_checkpoint, tmp_path):
    scorer = make_scorer(family_checkpoint[1], tmp_path)
    rng = np.random.default_rng(0)
    users = random_users(rng, 12)
    items = [ITEMS[i] for i in rng.integers(0, len(ITEMS), 12)]
    together = scorer.score(users, items)
    assert together.shape == (12,) and together.dtype == np.float32
    assert ((together > 0) & (together < 1)).all() and together.std() > 1e-3
    alone = np.array([scorer.score([u], [i])[0] for u, i in zip(users, items)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    scorer.config.scoring.batch_size = 5
    np.testing.assert_allclose(scorer.score(users[::-1], items[::-1])[::-1], together, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_is_identical(scorer, tmp_path):
    users, items = random_users(np.random.default_rng(1), 6), ITEMS[:3] * 2
    before = scorer.score(users, items)
    scorer.save_pretrained(tmp_path / "saved")
    loaded = BAHEScorer.from_pretrained(tmp_path / "saved", device="cpu")
    np.testing.assert_array_equal(loaded.score(users, items), before)
    loaded.save_pretrained(tmp_path / "saved")  # saving over itself keeps it loadable
    np.testing.assert_array_equal(BAHEScorer.from_pretrained(tmp_path / "saved").score(users, items), before)


def test_unknown_behaviors_are_encoded_on_the_fly(scorer, tmp_path):
    user = {"click": ["bought latte", "a brand new behavior"], "buy": ["new unseen item"]}
    on_the_fly = scorer.score([user], ["brand new item"])
    assert len(scorer.behaviors) == len(BEHAVIORS)  # nothing appended by default
    scorer.behaviors.append(["a brand new behavior", "new unseen item"])
    scorer.items.append(["brand new item"])
    np.testing.assert_allclose(scorer.score([user], ["brand new item"]), on_the_fly, rtol=1e-5, atol=1e-6)


def test_unknown_texts_appended_or_refused(tiny_checkpoints, tmp_path):
    appending = make_scorer(tiny_checkpoints["bert"], tmp_path / "a", append_unknown=True)
    appending.score([{"click": ["fresh behavior"]}], ["fresh item"])
    assert BehaviorTable.open(tmp_path / "a" / "tables" / "behaviors.safetensors").lookup(["fresh behavior"]).tolist() \
        == [len(BEHAVIORS)]
    strict = make_scorer(tiny_checkpoints["bert"], tmp_path / "b", unknown_behavior="error", unknown_item="error")
    with pytest.raises(UnknownTextError, match="behavior"):
        strict.score([{"click": ["fresh behavior"]}], ["toy story"])
    with pytest.raises(UnknownTextError, match="item"):
        strict.score([{"click": ["bought latte"]}], ["fresh item"])


def test_long_sequences_keep_the_most_recent(scorer):
    """The text part reads the most recent max_behaviors (6) behaviors; the count features read the whole
    history's length: older behaviors change nothing but the count."""
    long = [BEHAVIORS[i % len(BEHAVIORS)] for i in range(20)]
    other_past = [BEHAVIORS[(3 * i + 1) % len(BEHAVIORS)] for i in range(14)] + long[-6:]
    np.testing.assert_allclose(scorer.score([{"click": long}], ["coffee"]),
                               scorer.score([{"click": other_past}], ["coffee"]), rtol=1e-6, atol=1e-7)
    assert not np.allclose(scorer.score([{"click": long}], ["coffee"]), scorer.score([{"click": long[-6:]}], ["coffee"]))


def test_long_sequences_keep_the_most_recent_without_counts(tiny_checkpoints, tmp_path):
    scorer = make_scorer(tiny_checkpoints["llama"], tmp_path, count_features=False)
    long = [BEHAVIORS[i % len(BEHAVIORS)] for i in range(20)]
    np.testing.assert_allclose(scorer.score([{"click": long}], ["coffee"]),
                               scorer.score([{"click": long[-6:]}], ["coffee"]), rtol=1e-6, atol=1e-7)


def test_empty_sequences_use_their_learned_vector(scorer):
    empty_buy = {"click": ["bought latte"], "search": ["searched blue film"]}
    full = {"click": ["bought latte"], "buy": ["bought big book"], "search": ["searched blue film"]}
    before = scorer.score([empty_buy, full, {}], ["coffee"] * 3)
    np.testing.assert_allclose(scorer.score([{**empty_buy, "buy": []}], ["coffee"]), before[:1], rtol=1e-5)
    with torch.no_grad():
        scorer.model.empty_sequence[1] += 1.0
    after = scorer.score([empty_buy, full, {}], ["coffee"] * 3)
    assert abs(after[0] - before[0]) > 1e-4 and abs(after[2] - before[2]) > 1e-4
    assert after[1] == before[1]


def test_score_ids_matches_score(scorer):
    users = [{"click": ["bought latte", "liked star wars"], "search": ["searched blue film"]}, {}]
    rows = scorer.behaviors.lookup(["bought latte", "liked star wars", "searched blue film"])
    got = scorer.score_ids(torch.from_numpy(rows), torch.tensor([0, 2, 2, 3, 3, 3, 3]),
                           torch.from_numpy(scorer.items.lookup(["coffee", "toy story"])))
    np.testing.assert_array_equal(got, scorer.score(users, ["coffee", "toy story"]))


@pytest.mark.parametrize("rows,offsets,items,error,match", [
    ([-1], [0, 1, 1, 1], [0], IndexError, "behavior_rows holds id -1"),
    ([99], [0, 1, 1, 1], [0], IndexError, "outside the table's 10 rows"),
    ([0], [0, 1, 1, 1], [7], IndexError, "item_rows holds id 7"),
    ([0, 1], [0, 2, 1, 2], [0], ValueError, "non-decreasing"),
    ([0, 1], [0, 1, 1, 1], [0], ValueError, "must equal the number of packed elements 2"),
    ([0], [0, 1, 1], [0], ValueError, "U\\*n\\+1"),
])
def test_score_ids_errors(scorer, rows, offsets, items, error, match):
    with pytest.raises(error, match=match):
        scorer.score_ids(torch.tensor(rows), torch.tensor(offsets), torch.tensor(items))
    with pytest.raises(TypeError, match="int64"):
        scorer.score_ids(torch.tensor([0], dtype=torch.int32), torch.tensor([0, 1, 1, 1]), torch.tensor([0]))


@pytest.mark.parametrize("users,items,match", [
    ("not a list", [], "users must be a list of dicts, got str"),
    ([["click"]], ["coffee"], r"users\[0\] must be a dict"),
    ([{"clicks": ["bought latte"]}], ["coffee"], r"unknown sequence name\(s\) \['clicks'\]"),
    ([{"click": "bought latte"}], ["coffee"], r"users\[0\]\['click'\] must be a list"),
    ([{}, {"buy": ["ok", 5]}], ["coffee", "coffee"], r"users\[1\]\['buy'\] behavior 1.*must be a str"),
    ([{"search": ["   "]}], ["coffee"], r"users\[0\]\['search'\] behavior 0.*whitespace-only"),
    ([{"click": [""]}], ["coffee"], "empty"),
    ([{}], ["coffee", "toy story"], "items has 2 entries but users has 1"),
    ([{}], "coffee", "items must be a list"),
    ([{}], [None], r"items\[0\].*must be a str"),
])
def test_bad_input_is_named(scorer, users, items, match):
    with pytest.raises(InputError, match=match):
        scorer.score(users, items)


def test_unknown_sequences_can_be_ignored(tiny_checkpoints, tmp_path):
    scorer = make_scorer(tiny_checkpoints["qwen2"], tmp_path, unknown_sequence="ignore")
    np.testing.assert_array_equal(scorer.score([{"click": ["bought latte"], "other": ["x"]}], ["coffee"]),
                                  scorer.score([{"click": ["bought latte"]}], ["coffee"]))


def test_zero_users(scorer):
    assert scorer.score([], []).shape == (0,)


def test_threads_give_bit_identical_scores(scorer):
    users = random_users(np.random.default_rng(3), 16)
    items = ITEMS * 4
    expected = scorer.score(users, items)
    results, errors = [None] * 8, []

    def work(k):
        try:
            results[k] = scorer.score(users, items)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for got in results:
        np.testing.assert_array_equal(got, expected)


def test_bert_scorer_takes_2000_behaviors(tiny_checkpoints, tmp_path):
    scorer = make_scorer(tiny_checkpoints["bert"], tmp_path, max_behaviors=2000)
    user = {"click": [BEHAVIORS[i % len(BEHAVIORS)] for i in range(2000)]}
    p = scorer.score([user, {"click": user["click"][:10]}], ["coffee", "coffee"])
    assert np.isfinite(p).all() and p[0] != p[1]


def test_head_folds_its_norm_exactly():
    from engine.model.head import CTRHead
    head = CTRHead(12, (8, 4), "gelu", 0.0)
    head.train()
    for _ in range(3):
        head(torch.randn(32, 12) * 5 + 3)
    head.eval()
    x = torch.randn(5, 12) * 5 + 3
    with torch.no_grad():
        h = head.norm(x)
        for linear in head.linears[:-1]:
            h = torch.nn.functional.gelu(linear(h))
        expected = head.linears[-1](h)[:, 0]
        torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


class _SeparateLinears(torch.nn.Module):
    """The computation before the projections were fused: one GEMM per part, outputs concatenated."""

    def __init__(self, weights, biases):
        super().__init__()
        self.parts = list(zip(weights, biases))

    def forward(self, x):
        return torch.cat([torch.nn.functional.linear(x, w, b) for w, b in self.parts], dim=-1)


def _legacy_state(model):
    """model.state_dict() with every fused qkv / gate_up split back into the separate q/k/v and
    gate/up keys that scorers saved before the fusion hold."""
    state = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module.endswith("attn.qkv"):
            attn = model.get_submodule(module.removesuffix(".qkv"))
            sizes = [attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim, attn.kv_heads * attn.head_dim]
            base = module.removesuffix("qkv")
            state.update({f"{base}{part}.{leaf}": t for part, t in zip("qkv", value.split(sizes))})
        elif module.endswith("gate_up"):
            base = module.removesuffix("gate_up")
            state.update({f"{base}{part}.{leaf}": t for part, t in zip(("gate", "up"), value.chunk(2))})
        else:
            state[key] = value
    return state


def test_scorer_saved_with_separate_projections_loads_and_scores_the_same(family_checkpoint, tmp_path):
    """A scorer whose model.safetensors predates the fused qkv / gate_up projections loads (its
    separate tensors are concatenated at load time) and gives the scores of the unfused
    computation within 1e-6 relative, in fp32."""
    from safetensors.torch import load_file, save_file
    scorer = make_scorer(family_checkpoint[1], tmp_path)
    rng = np.random.default_rng(3)
    users = random_users(rng, 8)
    items = [ITEMS[i] for i in rng.integers(0, len(ITEMS), 8)]
    fused = scorer.score(users, items)
    scorer.save_pretrained(tmp_path / "saved")
    model_file = tmp_path / "saved" / "model.safetensors"
    saved = load_file(str(model_file))
    legacy = _legacy_state(scorer.model)
    assert any(k.endswith("attn.q.weight") for k in legacy) and not any("qkv" in k for k in legacy)
    assert {k for k in saved if "qkv" not in k and "gate_up" not in k} <= set(legacy)
    save_file({k: v.float().contiguous() for k, v in legacy.items()}, str(model_file), metadata={"format": "pt"})

    loaded = BAHEScorer.from_pretrained(tmp_path / "saved", device="cpu")
    for key, value in scorer.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0, check_dtype=False)
    np.testing.assert_allclose(loaded.score(users, items), fused, rtol=1e-6, atol=0)

    # The unfused computation itself: three q/k/v GEMMs (two gate/up GEMMs) from the legacy tensors.
    for j, layer in enumerate(loaded.model.upper.layers):
        def parts(*names):
            prefix = f"upper.layers.{j}."
            return ([legacy[f"{prefix}{n}.weight"] for n in names],
                    [legacy.get(f"{prefix}{n}.bias") for n in names])
        layer.attn.qkv = _SeparateLinears(*parts("attn.q", "attn.k", "attn.v"))
        if hasattr(layer, "gate_up"):
            layer.gate_up = _SeparateLinears(*parts("gate", "up"))
    np.testing.assert_allclose(loaded.score(users, items), fused, rtol=1e-6, atol=0)


def test_history_counts_stand_for_behaviors_not_sent(scorer):
    """A caller sending only the most recent behaviors (the window, 6, and the last recent_events, 10) states the
    user's totals: the score equals sending them all."""
    long = [BEHAVIORS[i % len(BEHAVIORS)] for i in range(20)]
    whole = scorer.score([{"click": long, "buy": long[:3]}], ["coffee"])
    recent = scorer.score([{"click": long[-10:], "buy": long[:3]}], ["coffee"], history_counts=[{"click": 20}])
    np.testing.assert_allclose(recent, whole, rtol=1e-6, atol=1e-7)
    same = scorer.score([{"click": long[-6:]}], ["coffee"], history_counts=[{"click": 6, "buy": 0}])
    np.testing.assert_array_equal(same, scorer.score([{"click": long[-6:]}], ["coffee"]))


@pytest.mark.parametrize("counts, match", [
    ([{"click": 1}, None], "one dict"), ({"click": 3}, "list"), (["x"], r"history_counts\[0\] must be a dict"),
    ([{"like": 3}], "unknown sequence"), ([{"click": True}], "must be an int"), ([{"click": 2.0}], "must be an int"),
    ([{"click": 1}], "cannot be smaller"), ([{"click": -1}], "cannot be smaller")])
def test_bad_history_counts_are_named(scorer, counts, match):
    with pytest.raises(InputError, match=match):
        scorer.score([{"click": BEHAVIORS[:2]}], ["coffee"], history_counts=counts)
