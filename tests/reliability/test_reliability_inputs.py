"""Bad input gets a clear, documented error naming the field (what tests/serving/test_scorer.py, test_table.py
and test_checkpoint.py do not cover already): texts the tokenizer turns into nothing, lone surrogates,
texts far over max_tokens, odd containers, score_ids layouts, broken tables, scorer folders, checkpoints."""
import json
import shutil
import struct

import numpy as np
import pytest
import torch

from engine import BAHEScorer, InputError, ScorerFormatError, ScoringConfig
from tests.reliability.test_reliability_crash import StubEncoder
from tests.serving.test_scorer import BEHAVIORS, ITEMS, make_scorer
from tests.storage.test_table import HashEncoder, _rewrite_header
from weights.checkpoint import Checkpoint, CheckpointError
from weights.table import (BehaviorTable, ModelSignature, NonFiniteRowError, TableError, TableFormatError,
                           TableMismatchError)


@pytest.fixture(scope="module")
def saved(tiny_checkpoints, tmp_path_factory):
    """A saved llama scorer folder (max_behaviors 6, max_tokens 32) and its scorer."""
    root = tmp_path_factory.mktemp("saved")
    scorer = make_scorer(tiny_checkpoints["llama"], root)
    scorer.save_pretrained(root / "scorer")
    return root / "scorer", BAHEScorer.from_pretrained(root / "scorer", device="cpu")


@pytest.fixture
def scorer(saved):
    return saved[1]


# ----- texts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_texts_far_over_max_tokens_are_truncated(tiny_checkpoints, tmp_path, family):
    scorer = make_scorer(tiny_checkpoints[family], tmp_path)
    specials = len(scorer.encoder.tokenizer("latte")["input_ids"]) - 1
    words = scorer.config.encoder.max_tokens - specials  # one token per "latte"
    long, prefix = "latte " * 20_000, "latte " * words
    torch.testing.assert_close(scorer.encoder.encode([long]), scorer.encoder.encode([prefix]), rtol=0, atol=0)
    got = scorer.score([{"click": [long, "bought latte"]}, {"buy": ["bought latte"]}], ["coffee", long])
    want = scorer.score([{"click": [prefix, "bought latte"]}, {"buy": ["bought latte"]}], ["coffee", prefix])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("text", ["\x00", "\u0301", "\u200b\x01"])
def test_texts_that_tokenize_to_nothing_are_named(scorer, text):
    """The tiny llama tokenizer drops control characters and lone combining marks (no BOS either)."""
    assert scorer.encoder.tokenizer(text)["input_ids"] == []
    nothing = "(tokenizes to no tokens|has no visible content)"  # the first for '\u0301', the second for the others
    with pytest.raises(InputError, match=rf"users\[1\]\['search'\] behavior 1 .*{nothing}"):
        scorer.score([{}, {"search": ["bought latte", text]}], ["coffee", "coffee"])
    with pytest.raises(InputError, match=rf"items\[1\]: .*{nothing}"):
        scorer.score([{}, {}], ["coffee", text])


def test_texts_that_tokenize_to_nothing_are_not_appended(tiny_checkpoints, tmp_path):
    scorer = make_scorer(tiny_checkpoints["llama"], tmp_path, append_unknown=True)
    with pytest.raises(InputError, match=r"users\[0\]\['click'\] behavior 0 .*no visible content"):
        scorer.score([{"click": ["\x00", "a fresh one"]}], ["coffee"])
    with pytest.raises(InputError, match=r"users\[0\]\['click'\] behavior 0 .*no tokens"):
        scorer.score([{"click": ["\u0301", "a fresh one"]}], ["coffee"])
    assert len(BehaviorTable.open(scorer.behaviors.path, verify=True)) == len(BEHAVIORS)


def test_lone_surrogates_are_named(scorer):
    with pytest.raises(InputError, match=r"users\[0\]\['buy'\] behavior 0 .*lone surrogate"):
        scorer.score([{"buy": ["bad \ud800 text"]}], ["coffee"])
    with pytest.raises(InputError, match=r"items\[0\]: .*lone surrogate"):
        scorer.score([{}], ["\udfff"])


@pytest.mark.parametrize("users,items,match", [
    ((u for u in [{}]), ["coffee"], "users must be a list of dicts, got generator"),
    ({"click": ["bought latte"]}, ["coffee"], "users must be a list of dicts, got dict"),
    ([None], ["coffee"], r"users\[0\] must be a dict .* got NoneType"),
    ([{"click": None}], ["coffee"], r"users\[0\]\['click'\] must be a list of behavior texts, got NoneType"),
    ([{"click": np.array(["bought latte"])}], ["coffee"], r"users\[0\]\['click'\] must be a list .* got ndarray"),
    ([{"click": {"bought latte"}}], ["coffee"], r"users\[0\]\['click'\] must be a list .* got set"),
    ([{"click": [b"bought latte"]}], ["coffee"], r"users\[0\]\['click'\] behavior 0.*must be a str, got bytes"),
    ([{"click": ["bought latte", 3.5]}], ["coffee"], r"users\[0\]\['click'\] behavior 1.*got float"),
    ([{}, {}], [None, "coffee"], r"items\[0\].*must be a str, got NoneType"),
    ([{}], [" \t\n"], r"items\[0\].*whitespace-only"),
    ([{}], ("coffee" for _ in range(1)), "items must be a list of item texts, got generator"),
    ([], ["coffee"], "items has 1 entries but users has 0"),
    ([{7: ["bought latte"]}], ["coffee"], r"unknown sequence name\(s\) \['7'\]"),
])
def test_malformed_containers_are_named(scorer, users, items, match):
    with pytest.raises(InputError, match=match):
        scorer.score(users, items)


def test_bad_texts_past_the_truncation_window_are_never_read(scorer):
    """Only the window (the most recent max_behaviors, 6) and the last recent_events (10) behaviors are read,
    by design; older ones are not looked at (they count only in the history length the count features see)."""
    recent = BEHAVIORS[:10]
    np.testing.assert_array_equal(scorer.score([{"click": [None, "  ", *recent]}], ["coffee"]),
                                  scorer.score([{"click": [BEHAVIORS[7], BEHAVIORS[8], *recent]}], ["coffee"]))


def test_junk_sequence_names_are_ignored_when_asked(saved):
    lenient = BAHEScorer.from_pretrained(saved[0], device="cpu", scoring=ScoringConfig(unknown_sequence="ignore"))
    junk = {"click": ["bought latte"], 7: [None], ("x",): "not even a list", "": []}
    np.testing.assert_array_equal(lenient.score([junk], ["coffee"]),
                                  lenient.score([{"click": ["bought latte"]}], ["coffee"]))


# ----- score_ids --------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,offsets,items,error,match", [
    (torch.tensor([0]), torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([0]), TypeError, "offsets must be int64"),
    (torch.tensor([0]), [0, 1, 1, 1], torch.tensor([0]), TypeError, "offsets must be a torch.Tensor"),
    ([0], torch.tensor([0, 1, 1, 1]), torch.tensor([0]), TypeError, "behavior_rows must be a torch.Tensor"),
    (torch.tensor([0]), torch.tensor([0, 1, 1, 1]), torch.tensor([0], dtype=torch.int32), TypeError,
     "item_rows must be int64"),
    (torch.tensor([[0]]), torch.tensor([0, 1, 1, 1]), torch.tensor([0]), ValueError, "must be 1-D"),
    (torch.tensor([0, 1]), torch.tensor([1, 2, 2, 2]), torch.tensor([0]), ValueError, r"offsets\[0\] must be 0"),
    (torch.tensor([0] * 7), torch.tensor([0, 7, 7, 7]), torch.tensor([0]), ValueError,
     "7 behaviors, more than max_behaviors 6"),
    (torch.tensor([0]), torch.tensor([0, 1, 1, 1]), torch.tensor([4]), IndexError, "outside the table's 4 rows"),
])
def test_score_ids_layout_errors(scorer, rows, offsets, items, error, match):
    with pytest.raises(error, match=match):
        scorer.score_ids(rows, offsets, items)


def test_score_ids_with_zero_users(scorer):
    empty = torch.zeros(0, dtype=torch.int64)
    assert scorer.score_ids(empty, torch.zeros(1, dtype=torch.int64), empty).shape == (0,)


# ----- tables -----------------------------------------------------------------------------------
def _poke(path, table, row, value, dtype):
    """Overwrite element 0 of embedding row `row` on disk with `value` in the table's dtype."""
    header = table._snap.header
    start = header.data_start + header.tensors["embeddings"].begin + row * table.dim * dtype.itemsize
    raw = bytearray(path.read_bytes())
    raw[start:start + dtype.itemsize] = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_on_disk_are_found_by_verify(tmp_path, dtype, value):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, [f"text {i}" for i in range(40)], HashEncoder(), dtype=dtype)
    _poke(path, table, 29, value, getattr(torch, dtype))
    BehaviorTable.open(path)  # a plain open reads no rows
    with pytest.raises(NonFiniteRowError, match="row 29 holds NaN or Inf"):
        BehaviorTable.open(path, verify=True)


def test_a_non_finite_row_never_becomes_a_silent_nan_score(saved, tmp_path):
    folder = tmp_path / "scorer"
    shutil.copytree(saved[0], folder)
    path = folder / "behaviors.safetensors"
    _poke(path, BehaviorTable.open(path), 0, float("nan"), torch.float32)
    scorer = BAHEScorer.from_pretrained(folder, device="cpu")
    assert np.isfinite(scorer.score([{"click": [BEHAVIORS[1]]}], ["coffee"])).all()
    with pytest.raises(FloatingPointError, match="non-finite score"):
        scorer.score([{"click": [BEHAVIORS[0]]}], ["coffee"])


def test_encoder_output_that_is_not_a_table_row(tmp_path):
    class WrongShape(HashEncoder):
        def encode(self, texts):
            return super().encode(texts)[:, :8]

    class Huge(HashEncoder):
        def encode(self, texts):
            return super().encode(texts) * 1e6
    with pytest.raises(TableError, match=r"encoder returned shape \(2, 8\) for 2 texts, expected \(2, 16\)"):
        BehaviorTable.build(tmp_path / "a.safetensors", ["one", "two"], WrongShape())
    with pytest.raises(NonFiniteRowError, match="overflows torch.float16"):
        BehaviorTable.build(tmp_path / "b.safetensors", ["one", "two"], Huge(), dtype="float16")
    assert not list(tmp_path.iterdir()) or all(p.suffix == ".lock" for p in tmp_path.iterdir())


@pytest.mark.parametrize("edit,match", [
    (lambda h: h["text_bytes"].update(shape=[1, h["text_bytes"]["shape"][0]]), "text_bytes must be a 1-D U8"),
    (lambda h: h.pop("key_order"), r"missing tensors \['key_order'\]"),
    (lambda h: h["__metadata__"].update(format="pt"), "not a BAHE table"),
    (lambda h: h["__metadata__"].update(num_lower_layers="two"), "num_lower_layers='two' is not an integer"),
    (lambda h: h["__metadata__"].pop("fingerprint"), "metadata lacks 'fingerprint'"),
    (lambda h: h["__metadata__"].update(dtype="int4"), "dtype 'int4' is not one of"),
    (lambda h: h["__metadata__"].update(dtype="int8"), r"missing tensors \['row_scale'\]"),  # int8 rows need scales
    (lambda h: h["embeddings"].update(shape=[4, 8, 2]), r"embeddings must be \(N, d\)"),
])
def test_tables_with_wrong_tensors_or_metadata(tmp_path, edit, match):
    path = tmp_path / "t.safetensors"
    BehaviorTable.build(path, ["one", "two", "three", "four"], HashEncoder())
    _rewrite_header(path, edit)
    with pytest.raises(TableFormatError, match=match):
        BehaviorTable.open(path)


def test_corrupt_text_offsets_are_a_format_error(tmp_path):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, ["one", "two", "three"], HashEncoder())
    header = table._snap.header
    start = header.data_start + header.tensors["text_offsets"].begin
    raw = bytearray(path.read_bytes())
    raw[start + 8:start + 16] = struct.pack("<q", -5)  # row 0 ends before it starts
    path.write_bytes(bytes(raw))
    table = BehaviorTable.open(path)
    with pytest.raises(TableFormatError, match="text of row 0 spans bytes"):
        table.lookup(["one"])
    with pytest.raises(TableFormatError):
        BehaviorTable.open(path, verify=True)


def test_scorer_refuses_a_table_of_another_split(saved, tmp_path):
    folder = tmp_path / "scorer"
    shutil.copytree(saved[0], folder)
    signature = saved[1].encoder.signature
    other = ModelSignature(signature.fingerprint, signature.family, signature.hidden_size, 1, signature.pooling,
                           signature.max_tokens)
    BehaviorTable.build(folder / "items.safetensors", ITEMS, StubEncoder(other), overwrite=True)
    with pytest.raises(TableMismatchError, match="num_lower_layers 1 does not match the model's num_lower_layers 2"):
        BAHEScorer.from_pretrained(folder, device="cpu")


# ----- scorer folders ---------------------------------------------------------------------------
def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("breakage,error,match", [
    (lambda f: (f / "scorer.json").unlink(), ScorerFormatError, "not a scorer folder: scorer.json is missing"),
    (lambda f: (f / "scorer.json").write_text("{oops"), ScorerFormatError, "unreadable"),
    (lambda f: (f / "scorer.json").write_text("[1, 2]"), ScorerFormatError, "expected 'bahe-scorer'"),
    (lambda f: _edit_json(f / "scorer.json", lambda m: m.update(format_version=99)), ScorerFormatError,
     "format version 99 is newer than this engine's"),
    (lambda f: _edit_json(f / "scorer.json", lambda m: m.pop("format_version")), ScorerFormatError, "unreadable"),
    (lambda f: _edit_json(f / "scorer.json", lambda m: m["config"]["model"].update(colour="red")), ScorerFormatError,
     "unknown keys \\['colour'\\]"),
    (lambda f: _edit_json(f / "scorer.json", lambda m: m["files"].update(model="../elsewhere.safetensors")),
     ScorerFormatError, "must name each of"),
    (lambda f: (f / "model.safetensors").unlink(), ScorerFormatError, r"\['model.safetensors'\] .* are missing"),
    (lambda f: (f / "items.safetensors").unlink(), ScorerFormatError, r"\['items.safetensors'\] .* are missing"),
    (lambda f: shutil.rmtree(f / "backbone"), ScorerFormatError, r"\['backbone'\] .* are missing"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
     ScorerFormatError, "not the weights of this scorer's model"),
    (lambda f: _edit_json(f / "scorer.json", lambda m: m["config"]["model"].update(max_behaviors=9)),
     ScorerFormatError, "not the weights of this scorer's model"),
    (lambda f: (f / "backbone" / "config.json").unlink(), CheckpointError, "missing config.json"),
    (lambda f: (f / "backbone" / "tokenizer.json").unlink(), CheckpointError, "cannot load the tokenizer"),
])
def test_broken_scorer_folders(saved, tmp_path, breakage, error, match):
    folder = tmp_path / "scorer"
    shutil.copytree(saved[0], folder)
    breakage(folder)
    with pytest.raises(error, match=match):
        BAHEScorer.from_pretrained(folder, device="cpu")


def test_version_1_folders_still_load(saved, tmp_path):
    """Before format 2, scorer.json named no files: the first names are used."""
    folder = tmp_path / "scorer"
    shutil.copytree(saved[0], folder)
    _edit_json(folder / "scorer.json", lambda m: (m.pop("files"), m.update(format_version=1)))
    users, items = [{"click": BEHAVIORS[:3]}], ["coffee"]
    np.testing.assert_array_equal(BAHEScorer.from_pretrained(folder, device="cpu").score(users, items),
                                  saved[1].score(users, items))


def test_saving_over_a_scorer_alternates_names_and_keeps_one_copy(saved, tmp_path):
    folder = tmp_path / "scorer"
    shutil.copytree(saved[0], folder)
    saved[1].save_pretrained(folder)  # a scorer from elsewhere: its parts go under the second names
    names = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))
    assert names == ["backbone.1", "behaviors.1.safetensors", "item_vectors.1.safetensors", "items.1.safetensors",
                     "model.1.safetensors", "scorer.json"]
    reloaded = BAHEScorer.from_pretrained(folder, device="cpu")
    reloaded.save_pretrained(folder)  # saved over itself: tables and backbone kept, weights (in memory) rewritten
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == \
        sorted(n.replace("model.1.", "model.").replace("item_vectors.1.", "item_vectors.") for n in names)
    users, items = [{"buy": BEHAVIORS[3:6]}], ["red phone"]
    np.testing.assert_array_equal(BAHEScorer.from_pretrained(folder).score(users, items), saved[1].score(users, items))


# ----- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("breakage,match", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
     "model.safetensors: not a readable safetensors file"),
    (lambda f: (f / "config.json").write_text("{not json"), "cannot read config.json"),
    (lambda f: _edit_json(f / "config.json", lambda c: c.update(hidden_size="wide")), "cannot read config.json"),
])
def test_broken_checkpoints(tiny_checkpoints, tmp_path, breakage, match):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["bert"], folder)
    breakage(folder)
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(folder)
