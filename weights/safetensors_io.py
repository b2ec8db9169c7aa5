"""Minimal, strict safetensors reader (memory-mapped, never reads tensor data at open) and a
streaming writer (copies large tensors chunk by chunk, so appending to a multi-GB table does not
need it in memory). Files are standard safetensors: `safetensors.safe_open` reads them."""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from weights import bounded_json

MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype tag -> (torch dtype, numpy dtype used for the raw mmap, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, type, int]] = {
    "F32": (torch.float32, np.float32, 4),
    "F16": (torch.float16, np.float16, 2),
    "BF16": (torch.bfloat16, np.uint16, 2),
    "I64": (torch.int64, np.int64, 8),
    "I8": (torch.int8, np.int8, 1),
    "U8": (torch.uint8, np.uint8, 1),
}
TAG_OF_TORCH = {torch_dtype: tag for tag, (torch_dtype, _, _) in DTYPES.items()}


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file (truncated, corrupt header, bad offsets)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset inside the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section


def read_header(path: str | Path, handle: BinaryIO) -> Header:
    """Parse and validate the header of `path` without touching tensor data, read through `handle`
    (`path` open in binary mode), so that `mmap_tensor(..., handle)` maps the same file even if
    `path` is atomically replaced in between; `path` only names the file in errors."""
    path = Path(path)
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    raw_len = handle.read(8)
    if len(raw_len) < 8:
        raise SafetensorsFormatError(f"{path}: file is {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise SafetensorsFormatError(f"{path}: header length {header_len} does not fit in a {size}-byte file "
                                     "(truncated or corrupt)")
    raw = handle.read(header_len)
    try:
        parsed = bounded_json.loads(raw, max_bytes=MAX_HEADER_BYTES)
    except ValueError as err:
        raise SafetensorsFormatError(f"{path}: header is not valid JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise SafetensorsFormatError(f"{path}: header must be a JSON object, got {type(parsed).__name__}")
    metadata = parsed.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise SafetensorsFormatError(f"{path}: __metadata__ must map strings to strings")
    data_len = size - 8 - header_len
    tensors = {name: _tensor_info(path, name, entry, data_len) for name, entry in parsed.items()}
    return Header(tensors=tensors, metadata=metadata, data_start=8 + header_len)


def _tensor_info(path: Path, name: str, entry: object, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsFormatError(f"{where}: entry must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsFormatError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise SafetensorsFormatError(f"{where}: shape {shape!r} must be a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise SafetensorsFormatError(f"{where}: data_offsets {offsets!r} outside the {data_len}-byte data "
                                     "section (truncated file?)")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.end - info.begin != info.numel * DTYPES[dtype][2]:
        raise SafetensorsFormatError(f"{where}: {info.end - info.begin} bytes do not hold shape {shape} of {dtype}")
    return info


def mmap_tensor(header: Header, name: str, handle: BinaryIO) -> torch.Tensor:
    """Tensor `name` of the file open as `handle` (the one `header` was read from), memory-mapped
    copy-on-write: pages are read on first touch only."""
    info = header.tensors[name]
    torch_dtype, np_dtype, _ = DTYPES[info.dtype]
    if info.numel == 0:
        return torch.empty(info.shape, dtype=torch_dtype)
    array = np.memmap(handle, dtype=np_dtype, mode="c",
                      offset=header.data_start + info.begin, shape=info.shape)
    tensor = torch.from_numpy(array)
    return tensor.view(torch_dtype) if info.dtype == "BF16" else tensor


@dataclass
class TensorSource:
    """A tensor to write: its dtype tag, shape, and its bytes as an iterable of chunks
    (numpy arrays, torch tensors or bytes), so big tensors can be streamed."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Iterable[object]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][2]


def source_of(name: str, tensor: torch.Tensor) -> TensorSource:
    """Wrap an in-memory tensor as a single-chunk source."""
    return TensorSource(name, TAG_OF_TORCH[tensor.dtype], tuple(tensor.shape), [tensor])


def _as_bytes(chunk: object) -> memoryview:
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().contiguous().cpu()
        if chunk.dtype == torch.bfloat16:
            chunk = chunk.view(torch.int16)
        chunk = chunk.numpy()
    if isinstance(chunk, np.ndarray):
        return memoryview(np.ascontiguousarray(chunk)).cast("B")
    return memoryview(chunk).cast("B")


def write_safetensors(handle: BinaryIO, sources: list[TensorSource], metadata: dict[str, str]) -> None:
    """Stream `sources` into an open binary file as one safetensors file."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for src in sources:
        header[src.name] = {"dtype": src.dtype, "shape": list(src.shape), "data_offsets": [offset, offset + src.nbytes]}
        offset += src.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    handle.write(struct.pack("<Q", len(raw)))
    handle.write(raw)
    for src in sources:
        written = 0
        for chunk in src.chunks:
            data = _as_bytes(chunk)
            handle.write(data)
            written += len(data)
        if written != src.nbytes:
            raise ValueError(f"tensor {src.name!r}: wrote {written} bytes, shape {src.shape} of {src.dtype} "
                             f"needs {src.nbytes}")


def file_chunks(path: str | Path, start: int, length: int, chunk_bytes: int = 64 << 20) -> Iterable[bytes]:
    """Raw bytes [start, start+length) of a file in chunks (to copy old table data into a new file)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = length
        while remaining > 0:
            block = handle.read(min(chunk_bytes, remaining))
            if not block:
                raise SafetensorsFormatError(f"{path}: ended {remaining} bytes early")
            remaining -= len(block)
            yield block


def tensor_bytes_range(header: Header, name: str) -> tuple[int, int]:
    """Absolute (start, length) of tensor `name`'s bytes in its file."""
    info = header.tensors[name]
    return header.data_start + info.begin, info.end - info.begin
