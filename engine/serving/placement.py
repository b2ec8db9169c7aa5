"""Placement of a behavior table (N, d) for a scorer running on CUDA, decided once per table.

The table arrives as a CPU tensor memory-mapped from a safetensors file. On a CUDA scorer it goes:
  - "device": copied into GPU memory when it fits in the free memory minus a headroom (a
    fraction of free memory, default 20%, plus an optional number of bytes kept for
    activations);
  - "pinned": otherwise copied once into pinned (page-locked) host memory, which the GPU reads
    zero-copy over PCIe/NVLink-C2C. Under unified virtual addressing (every 64-bit CUDA setup)
    a pinned host allocation is also a valid device address, so the pinned buffer is handed out
    as a CUDA tensor that aliases it (through `__cuda_array_interface__`, no copy): the
    dispatcher in kernels/ops.py then routes the gather to the Triton kernel as for any CUDA
    tensor, the kernel reads the rows it needs straight from host memory, and the PyTorch
    reference (index_select) works on it too. If that aliasing is refused, the pinned CPU
    tensor itself is returned (Triton accepts it: its launcher translates a pinned host pointer
    with cuPointerGetAttribute(DEVICE_POINTER)), with a warning, since torch ops then need
    their other operands on the CPU.
Copying into a pinned buffer was preferred over cudaHostRegister on the mmap'd pages: those
pages are file-backed and may be mapped read-only, which cudaHostRegister refuses without the
ReadOnly flag, and registering them pins the file's page cache for the process's lifetime.

On a CPU scorer the table is returned unchanged ("host").

An int8 table (`stored_rows` gives a kernels.dequant_gather.QuantizedRows: int8 values + float32 row
scales) is placed as one: the decision counts both parts' bytes and both go to the same place; the
model's gathers then dequantize on the fly (kernels.ops routes QuantizedRows to dequant_gather).

The CUDA paths are untested here (no GPU on the development machine); `choose_placement` and
the decision flow of `place_table` are tested on the CPU, and tests/serving/test_placement.py holds
GPU tests that run where CUDA is available.
"""
from __future__ import annotations

import logging

from collections.abc import Callable

import torch

from kernels.dequant_gather import QuantizedRows
from weights.table import BehaviorTable

log = logging.getLogger(__name__)
Rows = torch.Tensor | QuantizedRows

DEFAULT_HEADROOM = 0.2


def choose_placement(table_bytes: int, free_bytes: int, headroom: float = DEFAULT_HEADROOM, *,
                     reserve_bytes: int = 0) -> str:
    """'device' when table_bytes <= free_bytes * (1 - headroom) - reserve_bytes, else 'pinned'."""
    if table_bytes < 0 or free_bytes < 0 or reserve_bytes < 0:
        raise ValueError(f"byte counts must be >= 0, got table {table_bytes}, free {free_bytes}, "
                         f"reserve {reserve_bytes}")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom is the fraction of free GPU memory kept free, in [0, 1), got {headroom}")
    budget = free_bytes * (1.0 - headroom) - reserve_bytes
    return "device" if table_bytes <= budget else "pinned"


def stored_rows(table: BehaviorTable) -> Rows:
    """What the model gathers from: the (N, d) float rows (memory-mapped), or for an int8 table its
    QuantizedRows (int8 values and float32 scales, memory-mapped)."""
    if table.row_scale is None:
        return table.embeddings
    return QuantizedRows(table.embeddings, table.row_scale)


def _nbytes(table: Rows) -> int:
    return table.nbytes() if isinstance(table, QuantizedRows) else table.numel() * table.element_size()


def _each(table: Rows, place: Callable[[torch.Tensor], torch.Tensor]) -> Rows:
    """`place` applied to the tensor, or to both parts of QuantizedRows."""
    if isinstance(table, QuantizedRows):
        return QuantizedRows(place(table.values), place(table.scale))
    return place(table)


def place_table(table: Rows, device: torch.device | str, *, headroom: float = DEFAULT_HEADROOM,
                reserve_bytes: int = 0, free_bytes: int | None = None) -> tuple[Rows, str]:
    """(placed table, 'device' | 'pinned' | 'host') for a scorer on `device`.

    CPU device: the table unchanged, 'host'. CUDA device: on the GPU when it fits in
    `free_bytes` (default: the device's free memory now) under the headroom, else in pinned host
    memory read zero-copy (see the module docstring). A table already on the device stays there.
    """
    device = torch.device(device)
    if device.type != "cuda":
        log.info("table %s (%s) stays in host memory: the scorer runs on %s", tuple(table.shape), table.dtype, device)
        return table, "host"
    if table.is_cuda:
        log.info("table %s (%s) is already on %s", tuple(table.shape), table.dtype, table.device)
        return table, "device"
    table_bytes = _nbytes(table)
    if free_bytes is None:
        free_bytes = _free_bytes(device)
    placement = choose_placement(table_bytes, free_bytes, headroom, reserve_bytes=reserve_bytes)
    mib = 2 ** 20
    if placement == "device":
        try:
            placed = _each(table, lambda part: _to_device(part, device))
        except torch.cuda.OutOfMemoryError:
            log.warning("copying the %.1f MiB table to %s ran out of memory; falling back to pinned host memory",
                        table_bytes / mib, device)
            placement = "pinned"
    if placement == "pinned":
        placed = _each(table, lambda part: _pin_for_device(part, device))
    log.info("table %s (%s, %.1f MiB) placed: %s (free on %s: %.1f MiB, headroom %.0f%% + %.1f MiB)",
             tuple(table.shape), table.dtype, table_bytes / mib, placement, device, free_bytes / mib,
             headroom * 100, reserve_bytes / mib)
    return placed, placement


def _free_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    return table.to(device)


class _DeviceAlias:
    """`__cuda_array_interface__` of a pinned host buffer, seen as bytes; torch keeps this object
    (hence the buffer) alive as long as the CUDA tensor built on it."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": (host.numel() * host.element_size(),),
            "typestr": "|u1",
            "data": (host.data_ptr(), False),
            "strides": None,
            "version": 3,
        }


def _pin_for_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host copy of `table` (one sequential read of the memory-mapped file), as a CUDA
    tensor aliasing it when possible, else the pinned CPU tensor."""
    host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
    host.copy_(table)
    if host.numel() == 0:
        return host.to(device)
    try:
        with torch.cuda.device(device):
            flat = torch.as_tensor(_DeviceAlias(host))
        if flat.device.type != "cuda" or flat.data_ptr() != host.data_ptr():
            raise RuntimeError(f"got a {flat.device} tensor at {flat.data_ptr():#x}, not an alias of {host.data_ptr():#x}")
        return flat.view(table.dtype).view(table.shape)
    except (RuntimeError, TypeError, ValueError) as err:
        log.warning("pinned table could not be aliased as a CUDA tensor (%s); returning the pinned CPU tensor: "
                    "the Triton gather reads it zero-copy, torch ops need CPU operands", err)
        return host
