"""int8 behavior tables: the row codec, build/open/append with a per-row scale, old tables, format errors."""
import json
import struct

import pytest
import torch
from safetensors import safe_open

from tests.storage.test_table import TEXTS, HashEncoder
from weights.row_codec import INT8_LIMIT, dequantize_rows, quantize_rows
from weights.table import BehaviorTable, NonFiniteRowError, TableFormatError

UNIQUE = ["bought latte", "searched running shoes", "watched Toy Story", "clicked ad"]


def _rewrite_header(path, edit):
    """Apply `edit` to the parsed safetensors header of `path` and write it back (data unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("seed", range(4))
def test_quantize_rows_is_symmetric_absmax_within_half_a_step(seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(13, 37, generator=gen) * torch.rand(13, 1, generator=gen) * 10 ** seed
    rows[3] = 0.0  # an all-zero row: scale 0, values 0
    values, scale = quantize_rows(rows)
    assert values.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (13,)
    assert int(values.abs().max()) == INT8_LIMIT and not bool((values == -128).any())
    torch.testing.assert_close(scale, rows.abs().amax(dim=1) / INT8_LIMIT, rtol=0, atol=0)
    assert float(scale[3]) == 0.0 and not bool(values[3].any())
    back = dequantize_rows(values, scale)
    assert bool(((back - rows).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())


def test_quantize_rows_refuses_what_is_not_float_rows():
    with pytest.raises(ValueError, match="floating \\(n, d\\)"):
        quantize_rows(torch.zeros(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="floating \\(n, d\\)"):
        quantize_rows(torch.zeros(3, 4, dtype=torch.int64))


@pytest.mark.parametrize("dim", [16, 7])  # 4 * 7 = 28 bytes of int8: row_scale sits unaligned in the file
def test_int8_table_stores_values_and_scales_and_reads_float_rows(tmp_path, dim):
    enc = HashEncoder(dim=dim)
    table = BehaviorTable.build(tmp_path / "t.safetensors", TEXTS, enc, dtype="int8")
    assert table.dtype == "int8" and table.embeddings.dtype == torch.int8 and table.embeddings.shape == (4, dim)
    assert table.row_scale.dtype == torch.float32 and table.row_scale.shape == (4,)
    assert table.row_scale.data_ptr() % 4 == 0
    expected_values, expected_scale = quantize_rows(enc.encode(UNIQUE))
    assert torch.equal(table.embeddings, expected_values) and torch.equal(table.row_scale, expected_scale)
    ids = torch.tensor([3, 0, 0])
    float_rows = table.float_rows(ids)
    assert float_rows.dtype == torch.float32
    torch.testing.assert_close(float_rows, dequantize_rows(expected_values[ids], expected_scale[ids]), rtol=0, atol=0)
    exact = enc.encode([UNIQUE[i] for i in ids.tolist()])
    assert bool(((float_rows - exact).abs() <= expected_scale[ids, None] / 2 * (1 + 1e-6)).all())
    reopened = BehaviorTable.open(tmp_path / "t.safetensors", enc, verify=True)
    assert reopened.lookup(TEXTS).tolist() == [0, 1, 0, 2, 3, 0] and torch.equal(reopened.row_scale, expected_scale)


def test_int8_table_file_is_standard_safetensors_of_format_version_2(tmp_path):
    BehaviorTable.build(tmp_path / "q.safetensors", TEXTS, HashEncoder(), dtype="int8")
    BehaviorTable.build(tmp_path / "f.safetensors", TEXTS, HashEncoder())
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("embeddings").dtype == torch.int8 and handle.get_tensor("row_scale").shape == (4,)
    assert meta["dtype"] == "int8" and meta["format_version"] == "2"
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as handle:  # float tables stay version 1
        assert handle.metadata()["format_version"] == "1" and "row_scale" not in handle.keys()


def test_bytes_per_row_int8_against_float32(tmp_path):
    dim = 384
    texts = [f"text {i}" for i in range(64)]
    for dtype in ("float32", "bfloat16", "int8"):
        BehaviorTable.build(tmp_path / f"{dtype}.safetensors", texts, HashEncoder(dim=dim), dtype=dtype)
    sizes = {dtype: BehaviorTable.open(tmp_path / f"{dtype}.safetensors") for dtype in ("float32", "bfloat16", "int8")}
    assert {d: t.bytes_per_row for d, t in sizes.items()} == {"float32": 1536, "bfloat16": 768, "int8": 388}


def test_int8_append_quantizes_new_rows_only_old_bytes_unchanged(tmp_path):
    path = tmp_path / "t.safetensors"
    enc = HashEncoder(dim=7)
    table = BehaviorTable.build(path, TEXTS[:3], enc, dtype="int8")
    old = path.read_bytes()
    header = table._snap.header
    old_values = old[header.data_start + header.tensors["embeddings"].begin:header.data_start
                     + header.tensors["embeddings"].end]
    old_scale = old[header.data_start + header.tensors["row_scale"].begin:header.data_start
                    + header.tensors["row_scale"].end]
    assert table.append(TEXTS) == 2
    assert enc.calls[-1] == ["watched Toy Story", "clicked ad"]
    new, header = path.read_bytes(), table._snap.header
    values = new[header.data_start + header.tensors["embeddings"].begin:header.data_start
                 + header.tensors["embeddings"].end]
    scale = new[header.data_start + header.tensors["row_scale"].begin:header.data_start
                + header.tensors["row_scale"].end]
    assert values[:len(old_values)] == old_values and scale[:len(old_scale)] == old_scale
    once = BehaviorTable.build(tmp_path / "once.safetensors", TEXTS, HashEncoder(dim=7), dtype="int8")
    assert torch.equal(table.embeddings, once.embeddings) and torch.equal(table.row_scale, once.row_scale)
    assert BehaviorTable.open(path).lookup(TEXTS).tolist() == once.lookup(TEXTS).tolist()
    assert table.save_copy(tmp_path / "copy.safetensors") is None
    assert (tmp_path / "copy.safetensors").read_bytes() == path.read_bytes()


def test_old_tables_without_row_scale_open_as_before(tmp_path):
    path = tmp_path / "t.safetensors"
    BehaviorTable.build(path, TEXTS, HashEncoder(), dtype="bfloat16")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format_version"] == "1" and "row_scale" not in header
    table = BehaviorTable.open(path, verify=True)
    assert table.dtype == "bfloat16" and table.row_scale is None
    torch.testing.assert_close(table.float_rows(torch.tensor([1])), table.embeddings[1:2].float(), rtol=0, atol=0)


def test_int8_format_errors_name_what_is_wrong(tmp_path):
    path = tmp_path / "t.safetensors"
    BehaviorTable.build(path, TEXTS, HashEncoder(), dtype="int8")
    good = path.read_bytes()
    _rewrite_header(path, lambda h: h.pop("row_scale"))
    with pytest.raises(TableFormatError, match="missing tensors \\['row_scale'\\]"):
        BehaviorTable.open(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["row_scale"].update(shape=[2, 2]))
    with pytest.raises(TableFormatError, match="'row_scale' is F32 \\[2, 2\\], expected F32 \\[4\\]"):
        BehaviorTable.open(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["__metadata__"].update(dtype="float32"))
    with pytest.raises(TableFormatError, match="a float32 table has no row_scale"):
        BehaviorTable.open(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda h: h["__metadata__"].update(dtype="int4"))
    with pytest.raises(TableFormatError, match="dtype 'int4' is not one of"):
        BehaviorTable.open(path)
    with pytest.raises(ValueError, match="table dtype must be one of .*'int8'.*got 'int4'"):
        BehaviorTable.build(tmp_path / "u.safetensors", TEXTS, HashEncoder(), dtype="int4")
    assert not (tmp_path / "u.safetensors").exists()


@pytest.mark.parametrize("value, error, match", [(float("nan"), NonFiniteRowError, "row 1"),
                                                 (-1.0, TableFormatError, "row 1 has a negative int8 scale")])
def test_verify_detects_bad_scales_written_to_disk(tmp_path, value, error, match):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, TEXTS, HashEncoder(), dtype="int8")
    header = table._snap.header
    start = header.data_start + header.tensors["row_scale"].begin + 4
    raw = bytearray(path.read_bytes())
    raw[start:start + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    BehaviorTable.open(path)  # a plain open reads no rows
    with pytest.raises(error, match=match):
        BehaviorTable.open(path, verify=True)


def test_int8_build_refuses_non_finite_rows_and_writes_nothing(tmp_path):
    class NanEncoder(HashEncoder):
        def encode(self, texts):
            rows = super().encode(texts)
            rows[-1, 0] = float("inf")
            return rows

    with pytest.raises(NonFiniteRowError, match="gave NaN or Inf"):
        BehaviorTable.build(tmp_path / "t.safetensors", TEXTS, NanEncoder(), dtype="int8")
    assert not (tmp_path / "t.safetensors").exists()
