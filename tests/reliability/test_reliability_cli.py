"""The `bahe` command line's inputs: `score --input` lines and `encode` text files are refused with one line
on stderr naming the file, the line and what is wrong, a non-zero exit and nothing half-written on stdout;
`BAHE_KERNELS` takes effect in `bahe score`; `train --data` errors are one line too."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import cli
from kernels import ops
from tests.serving.test_scorer import BEHAVIORS, make_scorer

ROOT = Path(__file__).resolve().parents[2]
GOOD = json.dumps({"user": {"click": BEHAVIORS[:2]}, "item": "coffee"})
CLI = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def folder(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_scorer(tiny_checkpoints["llama"], root).save_pretrained(root / "scorer")
    return root / "scorer"


def _score(folder, tmp_path, data: bytes, *extra) -> int | str | None:
    """Run `bahe score` in process on `data`: 0, or the exit code or message it stopped with."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    try:
        cli.main(["score", "--scorer", str(folder), "--input", str(path), "--device", "cpu", *extra])
    except SystemExit as stop:
        return stop.code
    return 0


# ----- bahe score --input ------------------------------------------------------------------------
BAD_LINES = [
    (b'{"user": {"click": ["bought latte"]}, "item": "cof', r"not valid JSON: Unterminated string"),
    (b'{"user": {"click": ["bought latte"]}', r"not valid JSON: Expecting ',' delimiter"),
    (b"null", r"expected a JSON object .*, got null"),
    (b'["coffee"]', r'expected a JSON object .*, got \["coffee"\]'),
    (b'"coffee"', r'expected a JSON object .*, got "coffee"'),
    (b'{"user": {}}', r"missing key\(s\) \['item'\]"),
    (b'{"item": "coffee"}', r"missing key\(s\) \['user'\]"),
    (b"\xef\xbb\xbf" + GOOD.encode(), "starts with a UTF-8 byte order mark"),
    (b"\x00\x01\x02\xff\xfe", r"not UTF-8 text \(byte 0xff at column 4\)"),
    (b"\x00\x01\x02", "not valid JSON: Expecting value at column 1"),
    (GOOD.encode() + b" trailing", "not valid JSON: Extra data at column"),
    (GOOD.encode() + b"}", "not valid JSON: Extra data"),
    (b"[" * 100_000, "(nested too deeply|not valid JSON)"),
    (b'{"user": "bought latte", "item": "coffee"}', r"user must be a dict"),
    (b'{"user": {"click": "bought latte"}, "item": "coffee"}', r"user\['click'\] must be a list of behavior texts, got str"),
    (b'{"user": {"click": ["bought latte", 3]}, "item": "coffee"}', r"user\['click'\] behavior 1 .*must be a str, got int"),
    (b'{"user": {"click": ["\\u0000"]}, "item": "coffee"}', r"user\['click'\] behavior 0 .*no visible content"),
    (b'{"user": {}, "item": "\\u200b"}', r"item: text has no visible content"),
    (b'{"user": {}, "item": null}', r"item: .*must be a str, got NoneType"),
    (b'{"user": {}, "item": ["coffee"]}', r"item: .*must be a str, got list"),
    (b'{"user": {"colour": ["red"]}, "item": "coffee"}', r"user has unknown sequence name\(s\) \['colour'\]"),
]


@pytest.mark.parametrize("bad,why", BAD_LINES)
def test_bad_score_lines_name_the_file_and_line(folder, tmp_path, capsys, bad, why):
    data = GOOD.encode() + b"\n\n" + GOOD.encode() + b"\r\n" + bad + b"\n" + GOOD.encode() + b"\n"
    code = _score(folder, tmp_path, data)
    out = capsys.readouterr().out
    assert isinstance(code, str) and "\n" not in code, code
    assert code.startswith(f"bahe score: {tmp_path / 'in.jsonl'}: line 4: "), code
    assert re.search(why, code), code
    assert out == ""  # the good lines before it were not written


@CLI
@given(cut=st.integers(1, len(GOOD) - 1))
def test_any_truncated_line_is_refused(folder, tmp_path, capsys, cut):
    code = _score(folder, tmp_path, (GOOD + "\n" + GOOD[:cut]).encode())
    assert isinstance(code, str) and ": line 2: not valid JSON" in code
    assert capsys.readouterr().out == ""


@CLI
@given(junk=st.binary(min_size=1, max_size=12).filter(lambda b: b.strip() and b"\n" not in b))
def test_binary_junk_is_refused(folder, tmp_path, capsys, junk):
    code = _score(folder, tmp_path, GOOD.encode() + b"\n" + junk + b"\n")
    assert isinstance(code, str) and ": line 2: " in code and "\n" not in code, code
    assert capsys.readouterr().out == ""


def test_good_lines_are_scored_in_order(folder, tmp_path, capsys):
    lines = [GOOD, json.dumps({"user": {}, "item": "red phone"}), "", json.dumps({"user": {"buy": []}, "item": "x"})]
    assert _score(folder, tmp_path, "\r\n".join(lines).encode()) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["item"] for x in out] == ["coffee", "red phone", "x"] and all(0 < x["p_click"] < 1 for x in out)


def test_a_bad_line_is_one_stderr_line_and_a_nonzero_exit(folder, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(GOOD + "\n" + '{"user": {}, "item": "coff')
    done = subprocess.run([sys.executable, "-m", "engine.cli", "score", "--scorer", str(folder), "--input", str(path),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"bahe score: {path}: line 2: not valid JSON")


def test_a_missing_input_file(folder, tmp_path):
    with pytest.raises(SystemExit, match=r"bahe score: .*nope.jsonl: No such file"):
        cli.main(["score", "--scorer", str(folder), "--input", str(tmp_path / "nope.jsonl")])


# ----- BAHE_KERNELS ------------------------------------------------------------------------------
@pytest.mark.parametrize("env,flag,want", [("torch", None, "torch"), ("triton", None, "triton"),
                                          ("triton", "torch", "torch"), (None, None, "auto")])
def test_bahe_kernels_takes_effect_in_bahe_score(folder, tmp_path, capsys, monkeypatch, env, flag, want):
    """Before, `bahe score` always ran under use_backend('auto'), which overrode $BAHE_KERNELS."""
    if env is None:
        monkeypatch.delenv("BAHE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("BAHE_KERNELS", env)
    seen = []
    asked = ops.current_backend
    monkeypatch.setattr(ops, "current_backend", lambda: seen.append(asked()) or seen[-1])
    code = _score(folder, tmp_path, (GOOD + "\n").encode(), *(["--kernels", flag] if flag else []))
    assert code == 0 and len(capsys.readouterr().out.splitlines()) == 1
    assert seen and set(seen) == {want}


def test_a_bad_bahe_kernels_is_named(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("BAHE_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"\$BAHE_KERNELS must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        _score(folder, tmp_path, (GOOD + "\n").encode())


# ----- bahe encode, bahe train -------------------------------------------------------------------
@pytest.mark.parametrize("data,why", [
    (b"bought latte\n\x00\n", r"line 2: text has no visible content"),
    (b"bought latte\n\n\xe2\x80\x8b\xe2\x80\x8d\n", r"line 3: text has no visible content"),
    (b"bought latte\nbad \xff byte\n", r"line 2: not UTF-8 text \(byte 0xff at column 5\)"),
    (b"bought latte\n\xed\xa0\x80\n", r"line 2: not UTF-8 text"),
])
def test_encode_refuses_bad_text_lines(tiny_checkpoints, tmp_path, data, why):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(data)
    args = ["encode", str(texts), "--model", str(tiny_checkpoints["qwen2"]), "--lower-layers", "2",
            "--out", str(tmp_path / "t.safetensors")]
    with pytest.raises(SystemExit, match=rf"bahe encode: {texts}: {why}"):
        cli.main(args)
    assert not (tmp_path / "t.safetensors").exists()


def test_encode_refuses_empty_and_invisible_column_cells(tiny_checkpoints, tmp_path):
    table = tmp_path / "texts.csv"
    for cells, why in ((["bought latte", ""], "line 3, column 'text': text is empty"),
                       (["\u2060", "ok"], "line 2, column 'text': text has no visible")):
        table.write_text("text,n\n" + "".join(f"{c},1\n" for c in cells))
        with pytest.raises(SystemExit, match=rf"texts.csv: {why}"):
            cli.main(["encode", str(table), "--column", "text", "--model", str(tiny_checkpoints["qwen2"]),
                      "--lower-layers", "2", "--out", str(tmp_path / "t.safetensors")])


@pytest.mark.parametrize("data,why", [
    (b'text,n\nbought latte,1\n"Heat" (1995),2\n', r"line 3: a quoted field goes on after its closing quote"),
    (b"text,n\nbought latte,1\n\nHeat,2,3\n", r"line 4 has 3 fields, but the header has 2"),
    (b'text,n\n"two\nlines",1\n,2\n', r"line 4, column 'text': text is empty"),  # a row spanning lines 2-3 above
    (b"text,n\nbought latte,1\nbad \xff,2\n", r"line 3 is not UTF-8 text \(byte 0xff at column 5\)"),
    (b'text,n\n"never closed,1\n', r"line 2: a quoted field is never closed"),
    (b"name,n\nbought latte,1\n", r"column 'text' not in the file \(columns: \['name', 'n'\]\)"),
])
def test_encode_column_reads_csv_as_logs_are_read_naming_the_file_line(tiny_checkpoints, tmp_path, data, why):
    """`--column` goes through the project's one strict CSV reader: pandas rewrote `"Heat" (1995)` to `Heat (1995)`
    and named data rows, not the file line a user opens in an editor."""
    table = tmp_path / "texts.csv"
    table.write_bytes(data)
    with pytest.raises(SystemExit) as stop:
        cli.main(["encode", str(table), "--column", "text", "--model", str(tiny_checkpoints["qwen2"]),
                  "--lower-layers", "2", "--out", str(tmp_path / "t.safetensors")])
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code
    assert re.fullmatch(rf"bahe encode: {re.escape(str(table))}: {why}.*", stop.value.code), stop.value.code
    assert not (tmp_path / "t.safetensors").exists()


def test_encode_column_of_csv_and_parquet_without_pandas(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = ['"The ""Heat"" (1995)"', "He said \"hi\"", '"a, b"', "bought latte"]
    (tmp_path / "t.csv").write_text("n,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    from engine.encoding.text_files import read_texts
    want = ['The "Heat" (1995)', 'He said "hi"', "a, b", "bought latte"]
    assert read_texts(tmp_path / "t.csv", "text") == want
    pq.write_table(pa.table({"text": want, "n": [1, 2, 3, 4]}), tmp_path / "t.parquet")
    assert read_texts(tmp_path / "t.parquet", "text") == want
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "null.parquet")
    with pytest.raises(ValueError, match=r"null.parquet: row 1, column 'text': text must be a str"):
        read_texts(tmp_path / "null.parquet", "text")
    probe = ("import sys\n"
             "class NoPandas:  # as if pandas were not installed\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'pandas': raise ModuleNotFoundError(name)\n"
             "sys.meta_path.insert(0, NoPandas())\n"
             "from engine.encoding.text_files import read_texts\n"
             f"assert len(read_texts({str(tmp_path / 't.csv')!r}, 'text')) == 4\n"
             "assert 'pandas' not in sys.modules\n"
             f"assert len(read_texts({str(tmp_path / 't.parquet')!r}, 'text')) == 4\n")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)


@pytest.mark.parametrize("layers", ["5", "9", "-1"])
def test_encode_with_a_split_the_checkpoint_has_not_is_one_line_naming_both_numbers(tiny_checkpoints, tmp_path,
                                                                                     layers):
    texts = tmp_path / "texts.txt"
    texts.write_text("bought latte\n")
    with pytest.raises(SystemExit) as stop:
        cli.main(["encode", str(texts), "--model", str(tiny_checkpoints["llama"]), "--lower-layers", layers,
                  "--out", str(tmp_path / "t.safetensors")])
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code
    assert stop.value.code.startswith("bahe encode: ") and stop.value.code.endswith(
        f"num_lower_layers must be in [0, 4] for the 4 layers config.json names (num_hidden_layers), got {layers}")
    assert not (tmp_path / "t.safetensors").exists()


def test_encode_with_no_lower_layer_builds_a_table_of_token_embeddings(tiny_checkpoints, tmp_path, capsys):
    """0 is a split the config allows (EncoderConfig.num_lower_layers >= 0; every layer above is trained), so
    encode takes it: the rows are the pooled token embeddings."""
    texts = tmp_path / "texts.txt"
    texts.write_text("bought latte\nhello\n")
    cli.main(["encode", str(texts), "--model", str(tiny_checkpoints["bert"]), "--lower-layers", "0",
              "--out", str(tmp_path / "t.safetensors")])
    assert "2 texts -> 2 unique rows" in capsys.readouterr().out


def test_encode_drops_a_leading_byte_order_mark(tiny_checkpoints, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"\xef\xbb\xbfbought latte\r\nbought latte\r\n")
    cli.main(["encode", str(texts), "--model", str(tiny_checkpoints["qwen2"]), "--lower-layers", "2",
              "--out", str(tmp_path / "t.safetensors")])
    assert "2 texts -> 1 unique rows" in capsys.readouterr().out


def test_train_on_a_broken_log_is_one_line(tmp_path):
    log = tmp_path / "log.csv"
    log.write_bytes(b"user_id,item_id,timestamp,label,item_text\n1,10,100,1,a\n1,11,9223372036854775808,0,b\n")
    with pytest.raises(SystemExit, match=r"bahe train: .*log.csv: line 3, column 'timestamp': "
                                         r"9223372036854775808 is outside the int64 range"):
        cli.main(["train", "--data", str(log), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=r"bahe train: .*No such file"):
        cli.main(["train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "run")])
