"""The serving room's only door to the device. Per request, `to_device` moves all the request's host arrays in
ONE transfer (packed into one pinned buffer, one non-blocking copy; on the CPU wrapped, not copied) and
`read_back` reads the probabilities once; `place` moves weights and item vectors at set-up or refresh time.
tests/test_layout.py holds the rule that no other serving code moves data to a device (table placement aside:
engine.serving.placement, once per table size)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

ALIGN = 16  # bytes: every array in the packed transfer starts at a multiple (any dtype may view it)


def pack(arrays: dict[str, np.ndarray], into=None) -> tuple[np.ndarray, dict[str, tuple[int, np.dtype, tuple]]]:
    """The arrays in one uint8 buffer (`into(size)` gives it, default a new array), each at an ALIGN-byte offset
    -> (buffer, name -> (offset, dtype, shape))."""
    layout, size = {}, 0
    for name, array in arrays.items():
        layout[name] = (size, array.dtype, array.shape)
        size += -(-array.nbytes // ALIGN) * ALIGN
    buffer = np.empty(size, dtype=np.uint8) if into is None else into(size)
    for name, array in arrays.items():
        offset = layout[name][0]
        buffer[offset:offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return buffer, layout


def unpack(buffer: torch.Tensor, layout: dict[str, tuple[int, np.dtype, tuple]]) -> dict[str, torch.Tensor]:
    """Views of a packed uint8 tensor (`pack`), on its device, as the arrays' dtypes and shapes."""
    out = {}
    for name, (offset, dtype, shape) in layout.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        dtype_t = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        out[name] = buffer[offset:offset + nbytes].view(dtype_t).view(shape)
    return out


def to_device(arrays: dict[str, np.ndarray | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    """The request's host arrays on `device` in ONE transfer: packed into one pinned buffer and copied without
    blocking the host (the copy is ordered before the kernels that read it on the same stream). On the CPU
    the arrays are wrapped as tensors, not copied. None stays None."""
    present = {k: np.ascontiguousarray(v) for k, v in arrays.items() if v is not None}
    out: dict[str, torch.Tensor | None] = dict.fromkeys(arrays)
    if device.type == "cpu":
        out.update({k: torch.from_numpy(v) for k, v in present.items()})
        return out
    pinned: list[torch.Tensor] = []

    def into(size: int) -> np.ndarray:  # packed straight into page-locked memory: one host copy per array
        pinned.append(torch.empty(size, dtype=torch.uint8, pin_memory=True))
        return pinned[0].numpy()
    _, layout = pack(present, into)
    out.update(unpack(pinned[0].to(device, non_blocking=True), layout))
    return out


def read_back(probabilities: torch.Tensor) -> np.ndarray:
    """The request's one device -> host read: the (P,) probabilities as float32 (a feature request also reads
    the head's inputs back this way, `ScoringPipeline.score(parts=...)`)."""
    return probabilities.float().cpu().numpy()


def place(thing: torch.Tensor | nn.Module, device: torch.device) -> torch.Tensor | nn.Module:
    """A module or tensor moved to `device` at set-up or refresh time (weights, item vectors), not per request."""
    return thing.to(device)
