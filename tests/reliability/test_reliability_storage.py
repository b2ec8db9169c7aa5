"""Storage reliability (issue 13): out-of-date scorers saving over a folder, live scorers whose folder is
replaced, scorer.json of every wrong type and shape, checkpoints without (or with a hostile) tokenizer or
a config that does not fit the weights, symbolic links out of a scorer folder. Only documented errors."""
import json
import resource
import shutil

import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, ModelConfig, ScorerConfig, ScoringConfig
from engine.backbone.split import split_checkpoint
from engine.config import HEAD_ACTIVATIONS, TABLE_DTYPES
from engine.serving.scorer_folder import PARTS, ScorerFormatError
from tests.serving.test_scorer import BEHAVIORS, ITEMS
from weights.checkpoint import Checkpoint, CheckpointError
from kernels.ctr_mlp import ACTIVATIONS
from weights.table import ROW_DTYPES, BehaviorTable, TableChangedError, TableMismatchError

PROBE_USERS = [{"click": BEHAVIORS[:3], "buy": BEHAVIORS[5:7]}, {"search": BEHAVIORS[2:9]}, {}]
PROBE_ITEMS = ["coffee", "toy story", "red phone"]


def _scorer(checkpoint, tables, lower, seed, items=ITEMS, **scoring):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=lower), model=ModelConfig(max_behaviors=6),
                          scoring=ScoringConfig(**scoring))
    torch.manual_seed(seed)
    scorer = BAHEScorer.create(checkpoint, behavior_texts=BEHAVIORS, item_texts=items, tables_dir=tables,
                               config=config, device="cpu", progress=False)
    with torch.no_grad():
        for p in scorer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return scorer


@pytest.fixture(scope="module")
def saved(tiny_checkpoints, tmp_path_factory):
    """Three scorer folders: two splits of one model, and the first split again with other weights and
    its items in another order (so item rows differ)."""
    root = tmp_path_factory.mktemp("saved")
    llama = tiny_checkpoints["llama"]
    for name, lower, seed, items in (("two", 2, 0, ITEMS), ("three", 3, 1, ITEMS), ("two_b", 2, 2, ITEMS[::-1])):
        _scorer(llama, root / f"{name}_tables", lower, seed, items).save_pretrained(root / name)
    return root


def _load(folder, **kwargs):
    return BAHEScorer.from_pretrained(folder, device="cpu", **kwargs)


def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ----- 1. an out-of-date scorer saving over a folder ---------------------------------------------
def test_an_out_of_date_scorer_saves_itself_whole(saved, tmp_path):
    """The issue's case, then random sequences of saves by fresh and out-of-date scorers: after each
    save the folder loads as exactly the scorer that saved last."""
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    a = _load(folder)
    _load(saved / "three").save_pretrained(folder)
    a.save_pretrained(folder)
    np.testing.assert_array_equal(_load(folder).score(PROBE_USERS, PROBE_ITEMS), a.score(PROBE_USERS, PROBE_ITEMS))

    rng = np.random.default_rng(0)
    objects = [_load(saved / name) for name in ("two", "three", "two_b")]
    for step in range(10):
        if rng.random() < 0.3:
            objects.append(_load(folder))  # it goes out of date as soon as another object saves here
        saver = objects[int(rng.integers(len(objects)))]
        saver.save_pretrained(folder)
        loaded = _load(folder)
        np.testing.assert_array_equal(loaded.score(PROBE_USERS, PROBE_ITEMS), saver.score(PROBE_USERS, PROBE_ITEMS),
                                      err_msg=f"step {step}")
        assert loaded.config.encoder.num_lower_layers == saver.config.encoder.num_lower_layers
        names = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))
        assert len(names) == len(PARTS) + 1 and "scorer.json" in names, names  # one name per part


def test_saving_over_itself_keeps_rows_other_processes_appended(saved, tmp_path):
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    a, other = _load(folder), _load(folder, scoring=ScoringConfig(append_unknown=True))
    other.score([{"click": ["a behavior appended meanwhile"]}], ["coffee"])
    a.save_pretrained(folder)
    assert len(_load(folder).behaviors) == len(BEHAVIORS) + 1


# ----- 3. a live scorer whose folder is replaced --------------------------------------------------
@pytest.mark.parametrize("saves", [1, 2])  # 1: its table files are gone; 2: another split's tables under their names
def test_a_live_scorer_never_mixes_with_the_scorer_saved_over_its_folder(saved, tmp_path, saves):
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    live = _load(folder, scoring=ScoringConfig(append_unknown=True))
    known = live.score(PROBE_USERS, PROBE_ITEMS)
    for _ in range(saves):
        _load(saved / "three").save_pretrained(folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises((TableChangedError, TableMismatchError)):
        live.score([{"click": ["a behavior never seen"]}], ["coffee"])
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == files
    np.testing.assert_array_equal(live.score(PROBE_USERS, PROBE_ITEMS), known)  # still its own rows
    np.testing.assert_array_equal(_load(folder).score(PROBE_USERS, PROBE_ITEMS),
                                  _load(saved / "three").score(PROBE_USERS, PROBE_ITEMS))


def test_a_load_racing_a_save_gives_one_whole_scorer(saved, tmp_path, monkeypatch):
    """Another scorer saved over the folder while it is being read (here: between reading scorer.json
    and opening the tables): the load starts again and returns the new scorer whole, never a mix."""
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    three, real_open, saves = _load(saved / "three"), BehaviorTable.open.__func__, []

    def open_during_a_save(cls, path, *args, **kwargs):
        if not saves:
            saves.append(three.save_pretrained(folder))
        return real_open(cls, path, *args, **kwargs)
    monkeypatch.setattr(BehaviorTable, "open", classmethod(open_during_a_save))
    loaded = _load(folder)
    assert saves and loaded.config.encoder.num_lower_layers == 3
    np.testing.assert_array_equal(loaded.score(PROBE_USERS, PROBE_ITEMS), three.score(PROBE_USERS, PROBE_ITEMS))


# ----- 5. configuration: every field's type and range, allocations bounded by the data -----------
BAD_FIELDS = [
    ("scoring", "append_unknown", "false"), ("scoring", "append_unknown", 1), ("scoring", "batch_size", "8"),
    ("scoring", "batch_size", 0), ("scoring", "batch_size", 2.0), ("scoring", "unknown_item", None),
    ("encoder", "token_budget", "8"), ("encoder", "token_budget", 0), ("encoder", "max_tokens", 1.5),
    ("encoder", "num_lower_layers", -1), ("encoder", "num_lower_layers", 99), ("encoder", "pooling", "max"),
    ("encoder", "table_dtype", "int4"), ("model", "sequence_names", 5), ("model", "sequence_names", ["click", 3]),
    ("model", "sequence_names", ["click", ""]), ("model", "max_behaviors", "6"), ("model", "max_behaviors", True),
    ("model", "head_hidden", [64, 0]), ("model", "head_hidden", "64"), ("model", "dropout", 1.0),
    ("model", "dropout", "0.1"), ("model", "head_activation", "tanh"), ("model", "similarity_features", "yes"),
    ("model", "recent_events", -1), ("model", "item_id_dim", 16.5),
]


@pytest.mark.parametrize("section,name,value", BAD_FIELDS)
def test_every_config_field_is_checked_when_the_scorer_is_opened(saved, tmp_path, section, name, value):
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    _edit_json(folder / "scorer.json", lambda m: m["config"][section].update({name: value}))
    with pytest.raises(ScorerFormatError, match=f"{section}.{name}|{name} "):
        _load(folder)


def test_configs_made_in_code_are_checked_too():
    with pytest.raises(ValueError, match="batch_size must be int, got str"):
        ScoringConfig(batch_size="8")
    with pytest.raises(ValueError, match="append_unknown must be bool"):
        ScoringConfig(append_unknown="false")
    config = ModelConfig(max_behaviors=np.int64(7), head_hidden=[8, 4], dropout=0)
    assert type(config.max_behaviors) is int and config.head_hidden == (8, 4) and config.dropout == 0.0
    assert set(HEAD_ACTIVATIONS) == set(ACTIVATIONS)
    assert set(TABLE_DTYPES) == set(ROW_DTYPES)


def test_an_absurd_max_behaviors_is_refused_before_allocating_for_it(saved, tmp_path):
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    _edit_json(folder / "scorer.json", lambda m: m["config"]["model"].update(max_behaviors=20_000_000))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ScorerFormatError, match="behavior_pos"):
        _load(folder)  # 20M x 64 float32 positions would be 5 GB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # KiB


# ----- 8. scorer.json parsed with bounded depth and size -------------------------------------------
@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,
    '{"format": "bahe-scorer", "format_version": 3, "config": ' + '{"a": ' * 1000 + "1" + "}" * 1001,
    '{"format": "bahe-scorer", "format_version": ' + "9" * 5000 + "}",
    '{"format": "bahe-scorer", "format_version": Infinity}',
    '{"format": "bahe-scorer", "format_version": NaN}',
    '{"format": "bahe-scorer", "format_version": 1e999}',
    '{"format": "bahe-scorer", "format_version": 3.5}',
    '{"format": "bahe-scorer", "format_version": "3"}',
    '{"format": "bahe-scorer", "format_version": true}',
    '{"format": "bahe-scorer", "format_version": 3, "config": []}',
    '{"format": "bahe-scorer", "format_version": 3, "config": {"model": []}}',
    '{"format": "bahe-scorer", "format_version": 3, "config": {"colour": {}}}',
    '{"format": "bahe-scorer", "format_version": 3, "config": {}, "files": [1]}',
    '{"format": "bahe-scorer", "format_version": 3, "config": {}, "files": {"model": ["x"]}}',
    " " * (2 << 20),
])
def test_hostile_scorer_json_is_a_scorer_format_error(saved, tmp_path, text):
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    (folder / "scorer.json").write_text(text)
    with pytest.raises(ScorerFormatError, match="scorer.json"):
        _load(folder)


HOSTILE = [None, [], {}, "", "x", -1, 0, 2**64, 1.5, True, [[[[]]]], {"a": {"b": 1}}]


def test_mutated_scorer_json_only_raises_documented_errors(saved, tmp_path):
    """Seeded edits of one value anywhere in scorer.json: the scorer loads or raises ScorerFormatError (or
    TableMismatchError, where the edit makes the tables another split's); nothing else leaks."""
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    good = json.loads((folder / "scorer.json").read_text())
    outcomes = {}
    for seed in range(40):
        rng = np.random.default_rng(seed)
        meta, path = json.loads(json.dumps(good)), []
        node = meta
        while isinstance(node, dict) and node and (not path or rng.random() < 0.7):
            key = sorted(node)[int(rng.integers(len(node)))]
            path.append(key)
            parent, node = node, node[key]
        parent[path[-1]] = HOSTILE[int(rng.integers(len(HOSTILE)))]
        (folder / "scorer.json").write_text(json.dumps(meta))
        try:
            _load(folder)
            outcome = "loaded"
        except (ScorerFormatError, TableMismatchError) as err:
            outcome = type(err).__name__
        except Exception as err:  # noqa: BLE001 - turned into a failure naming the case
            raise AssertionError(f"seed {seed} ({'.'.join(path)} = {parent[path[-1]]!r}): "
                                 f"{type(err).__name__}: {err}") from err
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("ScorerFormatError", 0) >= 10, outcomes


# ----- 6. checkpoints: vocabulary, tokenizer, config against weights ------------------------------
def _copy(tiny_checkpoints, tmp_path, family="bert"):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints[family], folder)
    return folder


def _without_vocabulary(folder):
    """The case of the issue: a slow tokenizer class with its vocabulary files gone loads with 5 tokens."""
    _edit_json(folder / "tokenizer_config.json", lambda c: c.update(tokenizer_class="BertTokenizer"))
    (folder / "tokenizer.json").unlink()


@pytest.mark.parametrize("breakage,match", [
    (_without_vocabulary, "no vocabulary file"),
    (lambda f: _edit_json(f / "tokenizer.json", lambda t: t["model"].update(vocab={"[UNK]": 0, "[PAD]": 1})),
     r"only its \d+ special tokens"),
    (lambda f: _edit_json(f / "config.json", lambda c: c.update(vocab_size=40)), "more than the model's vocab_size 40"),
    (lambda f: (f / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000), "cannot load the tokenizer"),
    (lambda f: (f / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000), "cannot load the tokenizer"),
])
def test_a_checkpoint_without_a_usable_tokenizer_is_refused(tiny_checkpoints, tmp_path, breakage, match):
    folder = _copy(tiny_checkpoints, tmp_path)
    breakage(folder)
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(folder)


@pytest.mark.parametrize("family,edit", [
    ("bert", {"hidden_size": 32}), ("bert", {"intermediate_size": 100}), ("bert", {"max_position_embeddings": 7}),
    ("llama", {"num_key_value_heads": 4}), ("llama", {"hidden_size": 128, "head_dim": 32}),
    ("qwen2", {"intermediate_size": 8}), ("llama", {"rope_parameters": {"rope_type": "yarn"}}),
])
def test_a_config_that_does_not_fit_its_weights_is_a_checkpoint_error(tiny_checkpoints, tmp_path, family, edit):
    folder = _copy(tiny_checkpoints, tmp_path, family)
    _edit_json(folder / "config.json", lambda c: c.update(edit))
    with pytest.raises(CheckpointError):
        split_checkpoint(Checkpoint(folder), 2)


def test_a_scorer_backbone_whose_config_does_not_fit_is_a_checkpoint_error(saved, tmp_path):
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    _edit_json(folder / "backbone" / "config.json", lambda c: c.update(intermediate_size=100))
    with pytest.raises(CheckpointError, match="does not fit the weights"):
        _load(folder)


# ----- 10. symbolic links out of the folder; a str where texts are expected ----------------------
@pytest.mark.parametrize("part", ["items.safetensors", "backbone/tokenizer.json", "backbone"])
def test_parts_linked_from_outside_the_folder_are_refused(saved, tmp_path, part):
    folder, outside = tmp_path / "F", tmp_path / "outside"
    shutil.copytree(saved / "two", folder)
    outside.mkdir()
    shutil.move(folder / part, outside / "moved")
    (folder / part).symlink_to(outside / "moved")
    with pytest.raises(ScorerFormatError, match="symbolic link .* outside the scorer folder"):
        _load(folder)


def test_links_inside_the_folder_are_followed(saved, tmp_path):
    folder = tmp_path / "F"
    shutil.copytree(saved / "two", folder)
    (folder / "items.safetensors").rename(folder / "items.real")
    (folder / "items.safetensors").symlink_to("items.real")
    np.testing.assert_array_equal(_load(folder).score(PROBE_USERS, PROBE_ITEMS),
                                  _load(saved / "two").score(PROBE_USERS, PROBE_ITEMS))


def test_a_single_str_is_refused_where_texts_are_expected(tiny_checkpoints, tmp_path):
    for kwargs in ({"behavior_texts": "hello", "item_texts": ITEMS}, {"behavior_texts": BEHAVIORS, "item_texts": "x"}):
        with pytest.raises(TypeError, match="_texts must be a list of texts, got a bare str"):
            BAHEScorer.create(tiny_checkpoints["llama"], tables_dir=tmp_path, device="cpu", progress=False, **kwargs)
    assert not list(tmp_path.iterdir())
