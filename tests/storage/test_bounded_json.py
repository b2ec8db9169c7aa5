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


def _depth_reference(raw: bytes) -> int:
    """Byte-by-byte bracket depth, strings skipped; a quote after an odd run of backslashes does not open or
    close one (in JSON a backslash is only valid inside a string, so on valid JSON this is its nesting)."""
    depth = deepest = run = 0
    inside = False
    for byte in raw:
        if byte == ord('"') and run % 2 == 0:
            inside = not inside
        elif not inside and byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif not inside and byte in b"]}":
            depth -= 1
        run = run + 1 if byte == ord("\\") else 0
    return deepest


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 18])
def test_depth_scan_matches_a_byte_by_byte_scan_across_chunk_borders(chunk, monkeypatch):
    monkeypatch.setattr(bounded_json, "SCAN_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    alphabet = np.frombuffer(b'[]{}"\\\\\\ab,', dtype=np.uint8)
    for _ in range(300):
        raw = alphabet[rng.integers(0, alphabet.size, int(rng.integers(0, 60)))].tobytes()
        assert bounded_json._depth(raw) == _depth_reference(raw), raw
    escaped = json.dumps({"a": ['x\\"]]]', "\\\\", {"b": "[[[\\\\\\\"[["}]}).encode()
    assert bounded_json._depth(escaped) == 3


def test_a_long_string_costs_a_small_multiple_of_its_size():
    """A 20 MB string in a header once took 115 bytes of memory per byte (a regex over it)."""
    import tracemalloc
    size = 8 << 20
    raw = b'{"__metadata__": {"x": "' + b"a\\\\" * (size // 3) + b'"}, "t": [[[1]]]}'
    tracemalloc.start()
    try:
        value = bounded_json.loads(raw, max_bytes=100 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(value["__metadata__"]["x"]) == 2 * (size // 3) and value["t"] == [[[1]]]
    assert peak < 4 * len(raw), f"peak {peak / len(raw):.1f} bytes per header byte"


def test_depth_of_valid_json_is_its_nesting():
    rng = np.random.default_rng(1)

    def nested(level: int) -> object:
        text = "".join(rng.choice(list('[]{}"\\\\ab')) for _ in range(int(rng.integers(0, 6))))
        if level == 0 or rng.random() < 0.3:
            return text
        return [nested(level - 1), text] if rng.random() < 0.5 else {text: nested(level - 1)}

    def depth(value: object) -> int:
        children = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else None
        return 0 if children is None else 1 + max((depth(c) for c in children), default=0)

    for _ in range(200):
        value = nested(int(rng.integers(0, 8)))
        assert bounded_json._depth(json.dumps(value).encode()) == depth(value)


def test_opening_a_table_with_a_huge_header_string_takes_a_small_multiple_of_it(tmp_path):
    """`bahe info` / BehaviorTable.open on a table whose header holds one 16 MB string: refused (not a table
    of this engine) with a peak of a few bytes per header byte."""
    import tracemalloc

    from weights.safetensors_io import write_safetensors
    from weights.table import BehaviorTable, TableFormatError
    path = tmp_path / "big_header.safetensors"
    with open(path, "wb") as handle:
        write_safetensors(handle, [], {"format": "bahe-table", "format_version": "1", "note": "\u00e9" * (8 << 20)})
    header_bytes = path.stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(TableFormatError, match="metadata lacks"):
            BehaviorTable.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * header_bytes, f"peak {peak / header_bytes:.1f} bytes per header byte"
