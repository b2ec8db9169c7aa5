"""Catch device -> host reads of tensor values: on a GPU each one is a synchronization.

`host_reads()` patches the torch.Tensor methods that read values back (item, int/float/bool/index
conversion, tolist, numpy, cpu) to record themselves, and wraps every Triton launch
(`kernel[grid](...)`) so the reads the Triton interpreter itself makes on the host while running a
kernel on CPU tensors are allowed (a GPU launch makes none). The log it yields holds, in order,
"launch <kernel>" and "read <method>" entries; `reads_between_launches(log)` lists the reads
between the first and the last launch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

READS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "numpy", "cpu")


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    from triton.runtime.jit import KernelInterface

    log: list[str] = []
    inside_launch = [0]
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    original_getitem = KernelInterface.__getitem__

    def recording(name, real):
        def read(self, *args, **kwargs):
            if not inside_launch[0]:
                log.append(f"read {name}")
            return real(self, *args, **kwargs)
        return read

    def launch(self, grid):
        run = original_getitem(self, grid)

        def launched(*args, **kwargs):
            log.append(f"launch {getattr(self, '__name__', type(self).__name__)}")
            inside_launch[0] += 1
            try:
                return run(*args, **kwargs)
            finally:
                inside_launch[0] -= 1
        return launched

    for name, real in originals.items():
        setattr(torch.Tensor, name, recording(name, real))
    KernelInterface.__getitem__ = launch
    try:
        yield log
    finally:
        KernelInterface.__getitem__ = original_getitem
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)


def reads_between_launches(log: list[str]) -> list[str]:
    """The "read" entries after the first launch and before the last one."""
    launches = [i for i, entry in enumerate(log) if entry.startswith("launch ")]
    if not launches:
        return []
    return [entry for entry in log[launches[0]:launches[-1]] if entry.startswith("read ")]
