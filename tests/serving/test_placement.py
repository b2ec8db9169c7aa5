"""engine/serving/placement.py: the device-or-pinned decision (CPU) and the CUDA placement (GPU only)."""
import logging

import pytest
import torch

from engine.serving import placement
from engine.serving.placement import choose_placement, place_table

GIB = 2 ** 30


@pytest.mark.parametrize("table,free,headroom,expected", [
    (0, 0, 0.2, "device"),
    (8 * GIB, 10 * GIB, 0.2, "device"),  # exactly 80% of free
    (8 * GIB + 1, 10 * GIB, 0.2, "pinned"),
    (9 * GIB, 10 * GIB, 0.0, "device"),
    (9 * GIB, 10 * GIB, 0.5, "pinned"),
    (1, 0, 0.2, "pinned"),
])
def test_choose_placement(table, free, headroom, expected):
    assert choose_placement(table, free, headroom) == expected


def test_choose_placement_reserve_bytes():
    assert choose_placement(7 * GIB, 10 * GIB, 0.2, reserve_bytes=GIB) == "device"
    assert choose_placement(7 * GIB + 1, 10 * GIB, 0.2, reserve_bytes=GIB) == "pinned"


@pytest.mark.parametrize("kwargs", [{"headroom": 1.0}, {"headroom": -0.1}, {"reserve_bytes": -1}])
def test_choose_placement_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        choose_placement(1, 10, **kwargs)
    with pytest.raises(ValueError, match=">= 0"):
        choose_placement(-1, 10)


def test_cpu_device_keeps_the_table(caplog):
    table = torch.randn(10, 4)
    with caplog.at_level(logging.INFO, logger="engine.serving.placement"):
        placed, where = place_table(table, torch.device("cpu"))
    assert placed is table and where == "host"
    assert "host memory" in caplog.text


@pytest.fixture
def fake_cuda(monkeypatch):
    """place_table's CUDA steps replaced by recorders, to test the decision flow on the CPU."""
    calls = []
    monkeypatch.setattr(placement, "_free_bytes", lambda device: 1000)
    monkeypatch.setattr(placement, "_to_device", lambda t, d: calls.append("device") or t)
    monkeypatch.setattr(placement, "_pin_for_device", lambda t, d: calls.append("pinned") or t)
    return calls


def test_cuda_flow_device_when_it_fits(fake_cuda, caplog):
    table = torch.zeros(20, 10)  # 800 bytes <= 80% of 1000
    with caplog.at_level(logging.INFO, logger="engine.serving.placement"):
        _, where = place_table(table, "cuda")
    assert where == "device" and fake_cuda == ["device"]
    assert "placed: device" in caplog.text


def test_cuda_flow_pinned_when_too_big(fake_cuda, caplog):
    table = torch.zeros(21, 10)  # 840 bytes > 800
    with caplog.at_level(logging.INFO, logger="engine.serving.placement"):
        _, where = place_table(table, "cuda")
    assert where == "pinned" and fake_cuda == ["pinned"]
    assert "placed: pinned" in caplog.text
    _, where = place_table(table, "cuda", headroom=0.1)
    assert where == "device"
    _, where = place_table(table, "cuda", free_bytes=10 ** 6, reserve_bytes=10 ** 6)
    assert where == "pinned"


def test_cuda_flow_falls_back_to_pinned_on_oom(fake_cuda, monkeypatch):
    def oom(table, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(placement, "_to_device", oom)
    _, where = place_table(torch.zeros(2, 2), "cuda")
    assert where == "pinned" and fake_cuda == ["pinned"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_gpu_device_placement():
    table = torch.randn(100, 16, dtype=torch.bfloat16)
    placed, where = place_table(table, torch.device("cuda"))
    assert where == "device" and placed.is_cuda and torch.equal(placed.cpu(), table)


@cuda
def test_gpu_pinned_placement_is_a_zero_copy_cuda_alias():
    table = torch.randn(100, 16, dtype=torch.bfloat16)
    placed, where = place_table(table, torch.device("cuda"), free_bytes=0)
    assert where == "pinned" and placed.is_cuda and placed.shape == table.shape and placed.dtype == table.dtype
    rows = torch.tensor([3, 0, 99], device="cuda")
    assert torch.equal(placed.index_select(0, rows).cpu(), table[[3, 0, 99]])
