"""Behavior tables: build, open (mmapped), lookup, append, and every documented error."""
import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from weights import table as table_module
from weights.atomic import FileLockTimeout, file_lock
from weights.table import (BehaviorTable, HashCollisionError, ModelSignature, NonFiniteRowError, TableChangedError,
                           TableFormatError, TableMismatchError, UnknownTextError)


class HashEncoder:
    """Deterministic stand-in model: a text's row is a function of the text alone (mechanics tests)."""

    def __init__(self, dim=16, fingerprint="f" * 32, num_lower_layers=2):
        self.signature = ModelSignature(fingerprint, "bert", dim, num_lower_layers, "mean", 32)
        self.calls = []

    def encode(self, texts):
        self.calls.append(list(texts))
        rows = [np.random.default_rng(int.from_bytes(hashlib.md5(t.encode()).digest()[:4], "little"))
                .standard_normal(self.signature.hidden_size) for t in texts]
        return torch.tensor(np.array(rows), dtype=torch.float32).reshape(len(texts), self.signature.hidden_size)


TEXTS = ["bought latte", "searched running shoes", "  bought   latte ", "watched Toy Story", "clicked ad", "bought latte"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_build_lookup_rows_and_dtypes(tmp_path, dtype):
    enc = HashEncoder()
    table = BehaviorTable.build(tmp_path / "t.safetensors", TEXTS, enc, dtype=dtype)
    assert len(table) == 4 and table.dim == 16 and table.embeddings.dtype == getattr(torch, dtype)
    rows = table.lookup(TEXTS)
    assert rows.tolist() == [0, 1, 0, 2, 3, 0]  # first appearance order; whitespace-normalized duplicates merge
    assert table.text(2) == "watched Toy Story"
    expected = enc.encode(["bought latte", "searched running shoes", "watched Toy Story", "clicked ad"])
    torch.testing.assert_close(table.embeddings.float(), expected.to(getattr(torch, dtype)).float())
    reopened = BehaviorTable.open(tmp_path / "t.safetensors", enc)
    assert reopened.lookup(["clicked ad"]).tolist() == [3]


def test_file_is_standard_safetensors_with_metadata(tmp_path):
    BehaviorTable.build(tmp_path / "t.safetensors", TEXTS, HashEncoder())
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("embeddings").shape == (4, 16)
    for key in ("fingerprint", "num_lower_layers", "pooling", "max_tokens", "dtype", "format_version", "hidden_size"):
        assert key in meta


def test_build_then_append_equals_build_at_once(tmp_path):
    first, second = TEXTS[:3], TEXTS[3:] + ["new one", "bought latte"]
    once = BehaviorTable.build(tmp_path / "once.safetensors", first + second, HashEncoder())
    enc = HashEncoder()
    stepwise = BehaviorTable.build(tmp_path / "steps.safetensors", first, enc)
    assert stepwise.append(second) == 3
    assert enc.calls[-1] == ["watched Toy Story", "clicked ad", "new one"]  # only new texts are encoded
    assert [stepwise.text(i) for i in range(len(stepwise))] == [once.text(i) for i in range(len(once))]
    assert torch.equal(stepwise.embeddings, once.embeddings)
    assert stepwise.append(first) == 0
    assert BehaviorTable.open(tmp_path / "steps.safetensors").lookup(first + second).tolist() == \
        once.lookup(first + second).tolist()


def test_unknown_texts(tmp_path):
    table = BehaviorTable.build(tmp_path / "t.safetensors", TEXTS, HashEncoder())
    with pytest.raises(UnknownTextError, match="not in"):
        table.lookup(["bought latte", "never seen"])
    assert table.lookup(["never seen", "clicked ad"], on_missing="mark").tolist() == [-1, 3]
    assert table.lookup(["never seen", "clicked ad"], on_missing="encode").tolist() == [4, 3]
    assert len(BehaviorTable.open(tmp_path / "t.safetensors")) == 5


def test_appending_without_a_model_is_refused(tmp_path):
    BehaviorTable.build(tmp_path / "t.safetensors", TEXTS, HashEncoder())
    with pytest.raises(table_module.TableError, match="needs the model"):
        BehaviorTable.open(tmp_path / "t.safetensors").append(["x"])


def test_collisions_are_detected_not_merged(tmp_path, monkeypatch):
    monkeypatch.setattr(table_module, "text_keys", lambda texts: np.zeros(len(texts), dtype=np.int64))
    with pytest.raises(HashCollisionError, match="share the 64-bit key"):
        BehaviorTable.build(tmp_path / "a.safetensors", ["one", "two"], HashEncoder())
    table = BehaviorTable.build(tmp_path / "b.safetensors", ["one"], HashEncoder())
    with pytest.raises(HashCollisionError, match="shares its 64-bit key"):
        table.lookup(["two"])
    with pytest.raises(HashCollisionError):
        table.append(["two"])
    assert len(BehaviorTable.open(tmp_path / "b.safetensors")) == 1


@pytest.mark.parametrize("field,other,expected", [
    ("hidden_size", 32, "hidden_size 16 does not match the model's hidden_size 32"),
    ("num_lower_layers", 3, "num_lower_layers 2 does not match the model's num_lower_layers 3"),
    ("fingerprint", "0" * 32, "fingerprint ffff"),
])
def test_model_mismatch_names_both_sides(tmp_path, field, other, expected):
    BehaviorTable.build(tmp_path / "t.safetensors", TEXTS, HashEncoder())
    kwargs = {"dim": 16, "fingerprint": "f" * 32, "num_lower_layers": 2}
    kwargs[{"hidden_size": "dim"}.get(field, field)] = other
    with pytest.raises(TableMismatchError, match=expected) as err:
        BehaviorTable.open(tmp_path / "t.safetensors", HashEncoder(**kwargs))
    assert str(other) in str(err.value)


def test_non_finite_rows_refused_at_build_and_append(tmp_path):
    class NaNEncoder(HashEncoder):
        def encode(self, texts):
            rows = super().encode(texts)
            rows[[i for i, t in enumerate(texts) if "bad" in t]] = float("nan")
            return rows
    with pytest.raises(NonFiniteRowError, match="'a bad one'"):
        BehaviorTable.build(tmp_path / "t.safetensors", ["good", "a bad one"], NaNEncoder())
    assert not (tmp_path / "t.safetensors").exists()
    table = BehaviorTable.build(tmp_path / "t.safetensors", ["good"], NaNEncoder())
    before = (tmp_path / "t.safetensors").read_bytes()
    with pytest.raises(NonFiniteRowError):
        table.append(["another bad one"])
    assert (tmp_path / "t.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_failed_append_leaves_the_old_table_intact(tmp_path):
    class Exploding(HashEncoder):
        def encode(self, texts):
            if any("boom" in t for t in texts):
                raise RuntimeError("model crashed mid-append")
            return super().encode(texts)
    table = BehaviorTable.build(tmp_path / "t.safetensors", TEXTS, Exploding())
    before = (tmp_path / "t.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="mid-append"):
        table.append(["boom"])
    assert (tmp_path / "t.safetensors").read_bytes() == before
    assert table.lookup(["clicked ad"]).tolist() == [3]


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_format_errors(tmp_path):
    path = tmp_path / "t.safetensors"
    BehaviorTable.build(path, TEXTS, HashEncoder())
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(TableFormatError, match="truncated|outside"):
        BehaviorTable.open(path)
    path.write_bytes(good[:4])
    with pytest.raises(TableFormatError, match="too short"):
        BehaviorTable.open(path)
    path.write_bytes(good[:8] + b"{not json" + good[17:])
    with pytest.raises(TableFormatError, match="not valid JSON"):
        BehaviorTable.open(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["__metadata__"].update(format_version="99"))
    with pytest.raises(TableFormatError, match="version 99 is newer"):
        BehaviorTable.open(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["keys"].update(shape=[2, 2]))
    with pytest.raises(TableFormatError, match="'keys' is I64 \\[2, 2\\], expected I64 \\[4\\]"):
        BehaviorTable.open(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["embeddings"].update(dtype="F16"))
    with pytest.raises(TableFormatError):
        BehaviorTable.open(path)


def test_verify_detects_nan_rows_written_to_disk(tmp_path):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, TEXTS, HashEncoder())
    header = table._snap.header
    start = header.data_start + header.tensors["embeddings"].begin
    raw = bytearray(path.read_bytes())
    raw[start:start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    BehaviorTable.open(path)  # a plain open reads no rows
    with pytest.raises(NonFiniteRowError, match="row 0"):
        BehaviorTable.open(path, verify=True)


def test_concurrent_appender_waits_or_fails_clearly(tmp_path):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, TEXTS, HashEncoder())
    with file_lock(path):
        with pytest.raises(FileLockTimeout, match="locked by another process"):
            table.append(["x"], lock_timeout=0.1)
    assert table.append(["x"], lock_timeout=1) == 1


@pytest.mark.parametrize("timeout", [float("nan"), -1, -0.5, float("-inf")])
def test_bad_lock_timeout_is_refused(tmp_path, timeout):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, TEXTS, HashEncoder())
    with pytest.raises(ValueError, match=f"got {timeout!r}"):
        table.append(["x"], lock_timeout=timeout)
    assert len(BehaviorTable.open(path)) == 4


def test_open_does_not_read_a_large_table(tmp_path):
    """A ~300 MB table opens and answers a lookup with a small RSS increase: rows are mmapped."""
    path = tmp_path / "big.safetensors"
    n, dim = 200_000, 384
    BehaviorTable.build(path, (f"behavior number {i}" for i in range(n)), FastEncoder(dim))
    assert path.stat().st_size > 300e6
    script = f"""
import resource, sys
from weights.table import BehaviorTable
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
before = rss()
t = BehaviorTable.open({str(path)!r})
rows = t.lookup(['behavior number 7', 'behavior number 199999'])
x = t.embeddings[rows].sum()
print(rss() - before, len(t))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    grown, rows = map(int, out.stdout.split())
    assert rows == n
    assert grown < 40e6, f"opening a {path.stat().st_size / 1e6:.0f} MB table grew RSS by {grown / 1e6:.1f} MB"


class FastEncoder(HashEncoder):
    def encode(self, texts):
        return torch.ones(len(texts), self.signature.hidden_size)


# ----- out-of-date objects, hostile headers, bad arguments ---------------------------------------
def _remove(path):
    path.unlink()


@pytest.mark.parametrize("replace,error", [
    (lambda p: BehaviorTable.build(p, TEXTS, HashEncoder(num_lower_layers=3), overwrite=True), TableMismatchError),
    (lambda p: BehaviorTable.build(p, TEXTS, HashEncoder(fingerprint="0" * 32), overwrite=True), TableMismatchError),
    (lambda p: BehaviorTable.build(p, TEXTS[::-1], HashEncoder(), overwrite=True), TableChangedError),
    (lambda p: BehaviorTable.build(p, TEXTS[:2], HashEncoder(), overwrite=True), TableChangedError),
    (lambda p: BehaviorTable.build(p, TEXTS, HashEncoder(), dtype="float16", overwrite=True), TableChangedError),
    (_remove, TableChangedError),
])
def test_an_out_of_date_table_object_never_writes_into_another_table(tmp_path, replace, error):
    """Whatever replaced the file since the object opened it, the object's writes are refused (under the
    lock, from what is on disk), the file is left as it is, and the object keeps answering from its own rows."""
    path = tmp_path / "t.safetensors"
    stale = BehaviorTable.build(path, TEXTS, HashEncoder())
    replace(path)
    before = path.read_bytes() if path.exists() else None
    for write in (lambda: stale.append(["x"]), lambda: stale.lookup(["y"], on_missing="encode")):
        with pytest.raises(error, match="does not match|replaced|removed"):
            write()
    assert (path.read_bytes() if path.exists() else None) == before
    assert stale.lookup(TEXTS).tolist() == [0, 1, 0, 2, 3, 0] and stale.signature.num_lower_layers == 2
    if before is not None:
        BehaviorTable.open(path, verify=True)


def test_an_out_of_date_object_appends_after_other_writers_appended(tmp_path):
    path = tmp_path / "t.safetensors"
    first, second = BehaviorTable.build(path, TEXTS, HashEncoder()), BehaviorTable.open(path, HashEncoder())
    assert second.append(["from the second"]) == 1
    assert first.append(["from the first"]) == 1  # the file grew by appends: still this table
    assert first.lookup(["from the second", "from the first"]).tolist() == [4, 5]
    BehaviorTable.open(path, verify=True)


@pytest.mark.parametrize("edit", [
    lambda h: h.replace(b'"keys":{', b'"junk":' + b"[" * 5000 + b"]" * 5000 + b',"keys":{'),
    lambda h: h.replace(b'"shape":[4]', b'"shape":[' + b"9" * 5000 + b"]", 1),
    lambda h: h.replace(b'"shape":[4]', b'"shape":[Infinity]', 1),
    lambda h: h.replace(b'"shape":[4]', b'"shape":[1e999]', 1),
    lambda h: h.replace(b'"shape":[4]', b'"shape":[NaN]', 1),
    lambda h: h.replace(b'"format_version":"1"', b'"format_version":"' + b"9" * 5000 + b'"'),
    lambda h: h.replace(b'"format_version":"1"', b'"format_version":"Infinity"'),
    lambda h: h.replace(b'"hidden_size":"16"', b'"hidden_size":"' + b"9" * 5000 + b'"'),
])
def test_hostile_headers_are_table_format_errors(tmp_path, edit):
    path = tmp_path / "t.safetensors"
    BehaviorTable.build(path, TEXTS, HashEncoder())
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(raw[8:8 + n].rstrip())
    assert header != raw[8:8 + n].rstrip()
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    with pytest.raises(TableFormatError):
        BehaviorTable.open(path, HashEncoder())


def test_a_single_str_is_refused_where_texts_are_expected(tmp_path):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, TEXTS, HashEncoder())
    for call in (lambda: table.append("hello"), lambda: table.lookup("hello", on_missing="encode"),
                 lambda: BehaviorTable.build(tmp_path / "b.safetensors", "hello", HashEncoder())):
        with pytest.raises(TypeError, match="texts must be a list .* got a single str: 'hello'"):
            call()
    assert len(BehaviorTable.open(path)) == 4 and not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("timeout", ["5", True, [1], float("nan"), -1e-9])
def test_a_lock_timeout_that_is_not_seconds_is_refused_naming_it(tmp_path, timeout):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, TEXTS, HashEncoder())
    with pytest.raises(ValueError, match="lock_timeout must be a number of seconds"):
        table.append(["x"], lock_timeout=timeout)
    assert len(BehaviorTable.open(path)) == 4
