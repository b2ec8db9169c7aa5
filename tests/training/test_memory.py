"""PeakMemory on the CPU: a block's peak covers memory allocated and freed inside it, and a nested
block (which resets the kernel's high-water mark) does not erase the enclosing block's peak. Each
check runs with RSS sampling as usual, and with sampling off so only the high-water mark counts."""
import numpy as np
import pytest

from engine.training.studies import memory
from engine.training.studies.memory import PeakMemory, current_rss

MB = 2 ** 20


@pytest.fixture(params=["sampled", "high-water mark only"])
def mode(request, monkeypatch):
    if request.param != "sampled":
        with PeakMemory("cpu") as probe:
            pass
        if not probe.exact:
            pytest.skip("the high-water mark cannot be reset here (/proc/self/clear_refs)")
        monkeypatch.setattr(memory, "SAMPLE_SECONDS", 3600.0)  # the sampler never wakes during the block
    return request.param


def _touch(megabytes: int) -> None:
    """Allocate, write (so the pages are resident) and free `megabytes` MB."""
    block = np.ones(megabytes * MB, dtype=np.uint8)
    assert block.sum() == block.size


@pytest.mark.parametrize("megabytes", [16, 64, 128])
def test_peak_covers_freed_allocation(mode, megabytes):
    with PeakMemory("cpu") as peak:
        _touch(megabytes)
    assert peak.added >= 0.9 * megabytes * MB
    assert peak.bytes >= current_rss() - 8 * MB and peak.bytes - peak.added > 0


@pytest.mark.parametrize("outer_mb, inner_mb", [(128, 16), (16, 128), (64, 64)])
def test_nested_block_keeps_the_outer_peak(mode, outer_mb, inner_mb):
    with PeakMemory("cpu") as outer:
        _touch(outer_mb)
        with PeakMemory("cpu") as inner:
            _touch(inner_mb)
    assert inner.added >= 0.9 * inner_mb * MB
    assert outer.added >= 0.9 * max(outer_mb, inner_mb) * MB
    assert outer.bytes >= inner.bytes


def _fragmented_heap(megabytes: int) -> list:
    """Leave about `megabytes` MB of freed but resident heap: many 100 KB blocks (below malloc's mmap threshold),
    written, then all freed but every 50th (so the heap's top stays in use and malloc cannot shrink it by itself)."""
    blocks = [bytearray(b"x" * 100_000) for _ in range(megabytes * 10)]
    return blocks[::50]


def test_heap_trimmer_returns_freed_heap_only_past_its_slack():
    if not memory.trim_heap():
        pytest.skip("no malloc_trim here (not glibc)")
    patient = memory.HeapTrimmer(slack=2 ** 40)
    eager = memory.HeapTrimmer(slack=64 * MB)
    kept = _fragmented_heap(256)
    grown = current_rss()
    assert grown - eager.level > 128 * MB  # the freed blocks are still resident
    assert not patient() and patient.trims == 0
    assert eager() and eager.trims == 1
    assert current_rss() < grown - 128 * MB and eager.level <= current_rss() + 8 * MB
    assert not eager()  # no growth since: no second trim
    assert len(kept) > 0
