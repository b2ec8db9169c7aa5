"""`bahe score` on hostile JSON values in every field of a request line (user, its sequences and behaviors,
item, side_features): each line is scored, or refused with one stderr line naming the file and line - never a
traceback. Values include what Python's JSON parser itself refuses (integers of more than 4300 digits)."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import cli
from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.serving.scorer import BAHEScorer
from tests.serving.test_scorer import BEHAVIORS, ITEMS

LEAVES = ["null", "true", "false", "0", "-1", "17", "9" * 25, "9" * 4301, "-" + "9" * 5000, "1e999", "-1e999",
          "NaN", "Infinity", "0.5", '"coffee"', '""', '"\\u0000"', '"\\ud800"', '"\\u200b"', json.dumps(BEHAVIORS[0]),
          '"M"', '"x' + "y" * 3000 + '"']
json_text = st.recursive(st.sampled_from(LEAVES), lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
    st.dictionaries(st.sampled_from(['"click"', '"buy"', '"gender"', '"user_id"', '"x"']), inner, max_size=3)
    .map(lambda d: "{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}")), max_leaves=6)


@pytest.fixture(scope="module")
def folder(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("score_lines")
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2), model=ModelConfig(
        sequence_names=("click", "buy"), max_behaviors=4, categorical_features=("user_id", "gender")))
    BAHEScorer.create(tiny_checkpoints["llama"], behavior_texts=BEHAVIORS, item_texts=ITEMS, tables_dir=root / "t",
                      config=config, device="cpu", progress=False).save_pretrained(root / "scorer")
    return root / "scorer"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=json_text, item=json_text, side=json_text, behavior=json_text, shape=st.integers(0, 3))
def test_every_refused_line_is_one_line_naming_file_and_line(folder, tmp_path, capsys, user, item, side, behavior,
                                                            shape):
    user = [user, '{"click": [' + behavior + "]}", '{"buy": ' + behavior + "}", "{}"][shape]
    line = '{"user": ' + user + ', "item": ' + item + ', "side_features": ' + side + "}"
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"user": {}, "item": ITEMS[0]}) + "\n" + line + "\n")
    try:
        cli.main(["score", "--scorer", str(folder), "--input", str(path), "--device", "cpu"])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr().out
    if code == 0:
        assert len(out.splitlines()) == 2
    else:
        assert isinstance(code, str) and "\n" not in code and code.startswith(f"bahe score: {path}: line 2: "), code
        assert out == ""


@pytest.mark.parametrize("field", ["user", "item", "side_features"])
def test_an_integer_python_refuses_to_parse_is_named(folder, tmp_path, field):
    record = {"user": "{}", "item": json.dumps(ITEMS[0]), "side_features": "null", field: "9" * 4301}
    path = tmp_path / "in.jsonl"
    path.write_text("\n" + "{" + ", ".join(f'"{k}": {v}' for k, v in record.items()) + "}\n")
    with pytest.raises(SystemExit, match=rf"^bahe score: {path}: line 2: not valid JSON: Exceeds the limit \(4300 "
                                         r"digits\) for integer string conversion: value has 4301 digits$"):
        cli.main(["score", "--scorer", str(folder), "--input", str(path), "--device", "cpu"])
