"""The on-disk format of behavior (and item) tables: one safetensors file per table holding one
pooled lower-layer embedding per unique normalized text, the texts themselves (for collision checks
and display), their 64-bit keys with a sorted index for vectorized lookup, and the model signature.

Layout (all little-endian, the order keeps every int64 tensor 8-byte aligned):
  keys        (N,)   int64   text_key(normalized text) of each row
  key_order   (N,)   int64   permutation sorting `keys` (lookup index, built at write time)
  text_offsets(N+1,) int64   cumulative byte offsets of the texts in `text_bytes`
  embeddings  (N, d) float32 | float16 | bfloat16 | int8   (metadata "dtype" names it)
  row_scale   (N,)   float32 int8 tables only: row i reads embeddings[i] * row_scale[i] (weights.row_codec)
  text_bytes  (B,)   uint8   UTF-8 of the normalized texts, concatenated
Float tables are written as format_version 1 (what every engine reads); int8 tables as version 2, so an
older engine refuses them with "upgrade bahe-engine" instead of reading int8 values as rows. row_scale
follows embeddings (the writer streams rows, then their scales); when N * d is not a multiple of 4 it is
unaligned in the file and is copied (4 bytes per row) at open.

This module holds the errors, the model signature, the header checks and the memory-mapped view
(`Snapshot`); `weights.table.BehaviorTable` builds, opens, looks up and appends."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch

from weights.row_codec import dequantize_rows
from weights.safetensors_io import TAG_OF_TORCH, Header, SafetensorsFormatError, mmap_tensor

FORMAT_VERSION = 2  # the newest version this engine reads; 2 adds int8 rows (see the module docstring)
EMBEDDING_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Row dtypes a table may store: the float ones, plus int8 with a float32 scale per row.
ROW_DTYPES = {**EMBEDDING_DTYPES, "int8": torch.int8}
QUANTIZED_DTYPES = ("int8",)


class TableError(ValueError):
    """Base class of every documented behavior-table error."""


class TableFormatError(TableError, SafetensorsFormatError):
    """The file is not a valid behavior table (truncated, corrupt, wrong tensors, future version)."""


class TableMismatchError(TableError):
    """The table was built by another model, split or pooling than the one it is used with."""


class TableChangedError(TableError):
    """The file was removed, or replaced by another table (not appended to), since this object opened it:
    writing to it would mix two tables. Open the table (or load the scorer) again."""


class HashCollisionError(TableError):
    """Two different texts share a 64-bit key: refused rather than silently merged."""


class NonFiniteRowError(TableError):
    """An encoded row holds NaN or Inf."""


class UnknownTextError(TableError, KeyError):
    """Texts are not in the table and the caller did not ask to encode them."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSignature:
    """What determines a table's rows: the lower part of the model and how texts are pooled."""
    fingerprint: str
    family: str
    hidden_size: int
    num_lower_layers: int
    pooling: str
    max_tokens: int

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> ModelSignature:
        values = {}
        for field in fields(cls):
            if field.name not in meta:
                raise TableFormatError(f"{where}: metadata lacks {field.name!r}")
            raw = meta[field.name]
            try:
                values[field.name] = int(raw) if field.type in ("int", int) else raw
            except ValueError:
                raise TableFormatError(f"{where}: metadata {field.name}={raw!r} is not an integer") from None
        return cls(**values)

    def check_matches(self, other: ModelSignature, where: str) -> None:
        """Raise TableMismatchError naming both sides of the first difference (table = self)."""
        for name in ("hidden_size", "num_lower_layers", "family", "fingerprint", "pooling", "max_tokens"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise TableMismatchError(f"{where}: table {name} {mine} does not match the model's {name} {theirs}")


class TextEncoder(Protocol):
    """What a table needs from the model: its signature and texts -> (n, d) float32 rows."""
    signature: ModelSignature

    def encode(self, texts: list[str]) -> torch.Tensor: ...


def first_nonfinite_row(rows: torch.Tensor) -> int | None:
    """Index of the first row of `rows` (n, d) holding a NaN or an Inf; None when all are finite."""
    bad = ~torch.isfinite(rows).all(dim=1)
    return int(bad.nonzero()[0]) if bool(bad.any()) else None


def check_no_collisions(keys: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Raise HashCollisionError if two texts share a key; return the stable permutation sorting `keys`."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dup = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0]
    if dup.size:
        a, b = texts[order[dup[0]]], texts[order[dup[0] + 1]]
        raise HashCollisionError(f"texts {a!r} and {b!r} share the 64-bit key {int(sorted_keys[dup[0]])}")
    return order


def text_arrays(texts: list[str], start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 of texts concatenated (uint8), and their cumulative end offsets (int64) shifted by `start`."""
    encoded = [t.encode("utf-8") for t in texts]
    ends = np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))) + start
    return np.frombuffer(bytearray(b"".join(encoded)), dtype=np.uint8), ends


def table_metadata(signature: ModelSignature, kind: str, dtype: str) -> dict[str, str]:
    version = 2 if dtype in QUANTIZED_DTYPES else 1  # float tables stay readable by version-1 engines
    return {"format": "bahe-table", "format_version": str(version), "kind": kind, "dtype": dtype,
            **signature.to_metadata()}


def check_header(header: Header, where: str) -> tuple[ModelSignature, str, str]:
    """Metadata (format, version, signature, dtype) and tensor shapes: (signature, kind, dtype)."""
    meta = header.metadata
    if meta.get("format") != "bahe-table":
        raise TableFormatError(f"{where}: not a BAHE table (metadata format={meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise TableFormatError(f"{where}: format_version {meta.get('format_version')!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise TableFormatError(f"{where}: table format version {version} is newer than this engine's "
                               f"{FORMAT_VERSION}; upgrade bahe-engine to read it")
    signature = ModelSignature.from_metadata(meta, where)
    kind = meta.get("kind", "behavior")
    dtype = meta.get("dtype", "")
    if dtype not in ROW_DTYPES:
        raise TableFormatError(f"{where}: dtype {dtype!r} is not one of {sorted(ROW_DTYPES)}")
    _check_tensors(header, where, signature.hidden_size, dtype)
    return signature, kind, dtype


def _check_tensors(header: Header, where: str, hidden_size: int, dtype: str) -> None:
    tensors = header.tensors
    quantized = dtype in QUANTIZED_DTYPES
    missing = {"keys", "key_order", "text_offsets", "embeddings", "text_bytes"} - set(tensors)
    if quantized and "row_scale" not in tensors:
        missing.add("row_scale")
    if missing:
        raise TableFormatError(f"{where}: missing tensors {sorted(missing)}")
    if not quantized and "row_scale" in tensors:
        raise TableFormatError(f"{where}: a {dtype} table has no row_scale tensor (only int8 tables do)")
    emb = tensors["embeddings"]
    if len(emb.shape) != 2:
        raise TableFormatError(f"{where}: embeddings must be (N, d), got shape {list(emb.shape)}")
    rows, dim = emb.shape
    expected = {"keys": ("I64", (rows,)), "key_order": ("I64", (rows,)), "text_offsets": ("I64", (rows + 1,)),
                "embeddings": (TAG_OF_TORCH[ROW_DTYPES[dtype]], (rows, hidden_size))}
    if quantized:
        expected["row_scale"] = ("F32", (rows,))
    for name, (tag, shape) in expected.items():
        info = tensors[name]
        if info.dtype != tag or info.shape != shape:
            raise TableFormatError(f"{where}: tensor {name!r} is {info.dtype} {list(info.shape)}, expected "
                                   f"{tag} {list(shape)}")
    if tensors["text_bytes"].dtype != "U8" or len(tensors["text_bytes"].shape) != 1:
        raise TableFormatError(f"{where}: text_bytes must be a 1-D U8 tensor")


@dataclass
class Snapshot:
    """One consistent, memory-mapped view of the table file."""
    header: Header
    embeddings: torch.Tensor
    keys: np.ndarray
    key_order: np.ndarray
    text_offsets: np.ndarray
    text_bytes: np.ndarray
    row_scale: torch.Tensor | None = None  # (N,) float32, int8 tables only

    @classmethod
    def map(cls, header: Header, handle: BinaryIO, where: str) -> Snapshot:
        """Map every tensor of a checked `header` through `handle` (the open file it was read from)."""
        snap = cls(
            header=header,
            embeddings=mmap_tensor(header, "embeddings", handle),
            keys=mmap_tensor(header, "keys", handle).numpy(),
            key_order=mmap_tensor(header, "key_order", handle).numpy(),
            text_offsets=mmap_tensor(header, "text_offsets", handle).numpy(),
            text_bytes=mmap_tensor(header, "text_bytes", handle).numpy(),
            row_scale=_aligned_scale(header, handle) if "row_scale" in header.tensors else None,
        )
        if int(snap.text_offsets[-1]) != snap.text_bytes.size:
            raise TableFormatError(f"{where}: text_offsets ends at {int(snap.text_offsets[-1])}, text_bytes holds "
                                   f"{snap.text_bytes.size} bytes")
        return snap

    def float_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, d) float32 rows `ids` (n,) int64, dequantized for an int8 table."""
        stored = self.embeddings.index_select(0, ids)
        if self.row_scale is None:
            return stored.float()
        return dequantize_rows(stored, self.row_scale.index_select(0, ids))

    @functools.cached_property
    def sorted_keys(self) -> np.ndarray:
        n = len(self.keys)
        if n and (int(self.key_order.min()) < 0 or int(self.key_order.max()) >= n):
            raise TableFormatError(f"key_order holds ids outside [0, {n}): corrupt table")
        return self.keys[self.key_order]

    def text(self, row: int, path: Path) -> str:
        start, end = int(self.text_offsets[row]), int(self.text_offsets[row + 1])
        if not 0 <= start <= end <= self.text_bytes.size:
            raise TableFormatError(f"{path}: text of row {row} spans bytes [{start}, {end}), outside the "
                                   f"{self.text_bytes.size}-byte text_bytes: corrupt text_offsets")
        try:
            return self.text_bytes[start:end].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise TableFormatError(f"{path}: text of row {row} is not valid UTF-8") from None


def _aligned_scale(header: Header, handle: BinaryIO) -> torch.Tensor:
    """row_scale memory-mapped, or copied when its file offset is not 4-byte aligned (N * d odd multiple)."""
    scale = mmap_tensor(header, "row_scale", handle)
    return scale if scale.data_ptr() % 4 == 0 else scale.clone()
