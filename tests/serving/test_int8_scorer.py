"""A scorer over int8 tables: rows gathered through the dequantizing ops, placed as one, scores close to
the float32 scorer's with the same weights, and saved/loaded whole."""
import logging
import os

import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, ModelConfig, ScorerConfig
from engine.serving import placement
from engine.serving.placement import place_table, stored_rows
from kernels import ops
from kernels.dequant_gather import QuantizedRows
from tests.serving.test_scorer import BEHAVIORS, ITEMS, random_users
from weights.row_codec import quantize_rows

# Largest |p_int8 - p_float32| over the probe pairs below on the tiny llama scorer: 0.0018 measured (see
# docs/design.md "int8 behavior tables"); the bound leaves a margin and still fails if dequantization is wrong.
MAX_PROB_DIFF = 0.005


def _create(folder, tmp_path, table_dtype):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2, table_dtype=table_dtype),
                          model=ModelConfig(sequence_names=("click", "buy", "search"), max_behaviors=6))
    torch.manual_seed(0)
    return BAHEScorer.create(folder, behavior_texts=BEHAVIORS, item_texts=ITEMS, tables_dir=tmp_path / table_dtype,
                             config=config, device="cpu", progress=False)


@pytest.fixture
def pair(tiny_checkpoints, tmp_path):
    """(float32 scorer, int8 scorer) with the same weights, spread so probabilities differ."""
    exact = _create(tiny_checkpoints["llama"], tmp_path, "float32")
    with torch.no_grad():
        for p in exact.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    quantized = _create(tiny_checkpoints["llama"], tmp_path, "int8")
    quantized.model.load_state_dict(exact.model.state_dict())
    return exact, quantized


def test_int8_scorer_reads_quantized_rows_and_scores_close_to_float32(pair):
    exact, quantized = pair
    rows = quantized.table_rows("behaviors")
    assert isinstance(rows, QuantizedRows) and rows.shape == exact.table_rows("behaviors").shape
    assert isinstance(exact.table_rows("behaviors"), torch.Tensor)
    bytes_int8 = rows.nbytes() / rows.shape[0]
    bytes_fp32 = exact.table_rows("behaviors").element_size() * rows.shape[1]
    assert bytes_int8 == rows.shape[1] + 4 and bytes_fp32 == 4 * rows.shape[1]
    rng = np.random.default_rng(0)
    users, items = random_users(rng, 24), [ITEMS[i] for i in rng.integers(0, len(ITEMS), 24)]
    p_exact, p_int8 = exact.score(users, items), quantized.score(users, items)
    diff = float(np.abs(p_exact - p_int8).max())
    assert 0 < diff < MAX_PROB_DIFF, diff  # > 0: the int8 rows were really read
    assert p_exact.std() > 1e-3
    ranked = quantized.rank(users[0], ITEMS)
    np.testing.assert_allclose(ranked.scores, exact.rank(users[0], ITEMS).scores, atol=MAX_PROB_DIFF)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels on CPU tensors need the interpreter")
def test_int8_scorer_on_the_kernel_path_matches_its_cpu_path(pair):
    _, quantized = pair
    users = random_users(np.random.default_rng(1), 6)
    items = ITEMS[:3] + ITEMS[:3]
    cpu = quantized.score(users, items)
    with ops.use_backend("triton"):
        kernel = quantized.score(users, items)
    np.testing.assert_allclose(kernel, cpu, rtol=1e-5, atol=1e-6)


def test_int8_scorer_saves_and_loads_with_its_int8_tables(pair, tmp_path):
    _, quantized = pair
    users, items = random_users(np.random.default_rng(2), 5), ITEMS + ITEMS[:1]
    quantized.save_pretrained(tmp_path / "saved")
    loaded = BAHEScorer.from_pretrained(tmp_path / "saved", device="cpu")
    assert loaded.behaviors.dtype == "int8" and isinstance(loaded.table_rows("items"), QuantizedRows)
    np.testing.assert_array_equal(loaded.score(users, items), quantized.score(users, items))


def test_stored_rows_are_the_float_tensor_or_quantized_rows(pair):
    exact, quantized = pair
    assert stored_rows(exact.behaviors) is exact.behaviors.embeddings
    rows = stored_rows(quantized.behaviors)
    assert rows.values is quantized.behaviors.embeddings and rows.scale is quantized.behaviors.row_scale


@pytest.fixture
def fake_cuda(monkeypatch):
    """place_table's CUDA steps replaced by recorders (part dtype, where), to test the decision on the CPU."""
    calls = []
    monkeypatch.setattr(placement, "_free_bytes", lambda device: 1000)
    monkeypatch.setattr(placement, "_to_device", lambda t, d: calls.append((t.dtype, "device")) or t)
    monkeypatch.setattr(placement, "_pin_for_device", lambda t, d: calls.append((t.dtype, "pinned")) or t)
    return calls


@pytest.mark.parametrize("rows, where", [(18, "device"), (19, "pinned")])
def test_quantized_rows_are_placed_as_one_counting_both_parts(fake_cuda, caplog, rows, where):
    table = QuantizedRows(torch.zeros(rows, 40, dtype=torch.int8), torch.ones(rows))  # 44 bytes per row
    with caplog.at_level(logging.INFO, logger="engine.serving.placement"):
        placed, found = place_table(table, "cuda")  # 18 * 44 = 792 <= 800 < 19 * 44 = 836
    assert found == where and isinstance(placed, QuantizedRows) and placed.shape == (rows, 40)
    assert fake_cuda == [(torch.int8, where), (torch.float32, where)]
    assert f"placed: {where}" in caplog.text


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_int8_scorer_on_cuda_matches_the_cpu(pair, tmp_path):
    """On CUDA the int8 tables are placed (device) and read by the Triton dequantizing gathers: the
    scores equal the CPU scorer's (fp32, to rounding)."""
    _, quantized = pair
    quantized.save_pretrained(tmp_path / "saved")
    on_cuda = BAHEScorer.from_pretrained(tmp_path / "saved", device="cuda")
    rows = on_cuda.table_rows("behaviors")
    assert isinstance(rows, QuantizedRows) and rows.is_cuda and rows.scale.is_cuda
    users, items = random_users(np.random.default_rng(3), 8), ITEMS * 2
    np.testing.assert_allclose(on_cuda.score(users, items), quantized.score(users, items), rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.parametrize("free_bytes", [None, 0])  # fits on the device / pinned host memory read zero-copy
def test_quantized_rows_on_cuda_gather_like_the_cpu(free_bytes):
    gen = torch.Generator().manual_seed(4)
    values, scale = quantize_rows(torch.randn(300, 96, generator=gen))
    placed, where = place_table(QuantizedRows(values, scale), torch.device("cuda"), free_bytes=free_bytes)
    assert where == ("pinned" if free_bytes == 0 else "device") and placed.is_cuda and placed.scale.is_cuda
    rows = torch.randint(0, 300, (50,), generator=gen)
    offsets = torch.tensor([0, 0, 7, 50])
    pos = torch.randn(43, 96, generator=gen)
    cpu = ops.jagged_gather(QuantizedRows(values, scale), rows, offsets=offsets, pos=pos, max_len=43)
    gpu = ops.jagged_gather(placed, rows.cuda(), offsets=offsets.cuda(), pos=pos.cuda(), max_len=43)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    mean = ops.gather_mean(placed, rows.cuda(), offsets.cuda(), out_dtype=torch.bfloat16)
    torch.testing.assert_close(mean.float().cpu(), ops.gather_mean(QuantizedRows(values, scale), rows, offsets).float(),
                               rtol=1e-2, atol=1e-2)
