"""Named ranges around the stages of a scoring pass (lookup, gather, upper layers, pooling, head), so a
torch.profiler trace (and Nsight, through NVTX on CUDA) shows where the time goes. Outside a profiler
the cost is a few microseconds per stage."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PREFIX = "bahe."
STAGES = ("lookup", "gather", "upper_layers", "pooling", "head")
_NVTX = torch.cuda.is_available()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """`with stage("gather"): ...` -> a torch.profiler range 'bahe.gather' (+ an NVTX range on CUDA)."""
    with torch.profiler.record_function(PREFIX + name):
        if _NVTX:
            torch.cuda.nvtx.range_push(PREFIX + name)
        try:
            yield
        finally:
            if _NVTX:
                torch.cuda.nvtx.range_pop()
