"""weights.bounded_json: untrusted JSON is parsed with bounded size, depth and integers, or refused with
one ValueError, whatever the bytes."""
import json

import numpy as np
import pytest

from weights import bounded_json


def test_parses_what_json_parses():
    value = {"a": [1, -2, 3.5, "x ] } [ {", None, True], "b": {"c": {"d": [[]]}}, "e": "\\\" ["}
    assert bounded_json.loads(json.dumps(value).encode(), max_bytes=1 << 10) == value


@pytest.mark.parametrize("raw,reason", [
    (b"[" * 100_000 + b"]" * 100_000, "deeper"),
    (b'{"a": ' * 65 + b"1" + b"}" * 65, "deeper"),
    (b'{"v": ' + b"9" * 5000 + b"}", "out of range"),
    (b'{"v": -' + b"9" * 41 + b"}", "out of range"),
    (b'{"v": Infinity}', "not a JSON number"),
    (b'{"v": -Infinity}', "not a JSON number"),
    (b'{"v": NaN}', "not a JSON number"),
    (b'{"v": 1e999}', "out of range"),
    (b'{"v": "\xff"}', "not UTF-8"),
    (b'{"v": 1', "Expecting"),
    (b" " * 2000, "more than"),
])
def test_refuses_hostile_json_with_one_value_error(raw, reason):
    with pytest.raises(ValueError, match=reason) as err:
        bounded_json.loads(raw, max_bytes=1000 if reason == "more than" else 1 << 20)
    assert type(err.value) in (ValueError, json.JSONDecodeError)


def test_random_bytes_give_a_value_or_a_value_error():
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b'[]{}",:0123456789.-eE \\naNInfity', dtype=np.uint8)
    for _ in range(2000):
        raw = alphabet[rng.integers(0, alphabet.size, int(rng.integers(0, 200)))].tobytes()
        try:
            bounded_json.loads(raw, max_bytes=1 << 10, max_depth=8)
        except ValueError:
            pass
