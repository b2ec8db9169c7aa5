"""Behavior (and item) tables: one safetensors file per table holding one pooled lower-layer
embedding per unique normalized text, the texts themselves (for collision checks and display),
their 64-bit keys with a sorted index for vectorized lookup, and the model signature.

Layout (all little-endian, the order keeps every int64 tensor 8-byte aligned):
  keys        (N,)   int64   text_key(normalized text) of each row
  key_order   (N,)   int64   permutation sorting `keys` (lookup index, built at write time)
  text_offsets(N+1,) int64   cumulative byte offsets of the texts in `text_bytes`
  embeddings  (N, d) float32 | float16 | bfloat16
  text_bytes  (B,)   uint8   UTF-8 of the normalized texts, concatenated
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from weights.atomic import atomic_write, file_lock, remove_stale_temps
from weights.safetensors_io import (
    TAG_OF_TORCH,
    Header,
    SafetensorsFormatError,
    TensorSource,
    file_chunks,
    mmap_tensor,
    read_header,
    source_of,
    tensor_bytes_range,
    write_safetensors,
)
from weights.text_key import normalize_text, text_keys

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EMBEDDING_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ENCODE_CHUNK = 16384  # texts encoded and written per step while building or appending
MISSING = -1


class TableError(ValueError):
    """Base class of every documented behavior-table error."""


class TableFormatError(TableError, SafetensorsFormatError):
    """The file is not a valid behavior table (truncated, corrupt, wrong tensors, future version)."""


class TableMismatchError(TableError):
    """The table was built by another model, split or pooling than the one it is used with."""


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


def _unique_normalized(texts: Iterable[object]) -> list[str]:
    """Normalized texts, first appearance order, duplicates removed."""
    unique = dict.fromkeys(texts)
    return list(dict.fromkeys(normalize_text(t) for t in unique))


def _check_no_collisions(keys: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Raise HashCollisionError if two texts share a key; return the stable permutation sorting `keys`."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dup = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0]
    if dup.size:
        a, b = texts[order[dup[0]]], texts[order[dup[0] + 1]]
        raise HashCollisionError(f"texts {a!r} and {b!r} share the 64-bit key {int(sorted_keys[dup[0]])}")
    return order


def _encoded_chunks(texts: list[str], encoder: TextEncoder, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Encode in chunks, refusing non-finite rows, converted to the table's storage dtype."""
    for start in range(0, len(texts), ENCODE_CHUNK):
        block = texts[start:start + ENCODE_CHUNK]
        rows = encoder.encode(block)
        if rows.shape != (len(block), encoder.signature.hidden_size):
            raise TableError(f"encoder returned shape {tuple(rows.shape)} for {len(block)} texts, expected "
                             f"({len(block)}, {encoder.signature.hidden_size})")
        bad = first_nonfinite_row(rows)
        if bad is not None:
            raise NonFiniteRowError(f"encoding {block[bad]!r} gave NaN or Inf")
        converted = rows.to(dtype)
        if not bool(torch.isfinite(converted).all()):
            raise NonFiniteRowError(f"a row overflows {dtype} (values up to {float(rows.abs().max()):.3g})")
        yield converted


def _text_arrays(texts: list[str], start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 of texts concatenated, and their cumulative end offsets shifted by `start`."""
    encoded = [t.encode("utf-8") for t in texts]
    ends = np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))) + start
    return np.frombuffer(bytearray(b"".join(encoded)), dtype=np.uint8), ends


def _metadata(signature: ModelSignature, kind: str, dtype: str) -> dict[str, str]:
    return {"format": "bahe-table", "format_version": str(FORMAT_VERSION), "kind": kind, "dtype": dtype,
            **signature.to_metadata()}


class BehaviorTable:
    """A memory-mapped table of pooled lower-layer embeddings, one row per unique normalized text.
    Use `build`, `open`, `lookup`, `append`. Rows are numbered in order of first appearance, so
    building in one step or building then appending gives the same row numbers."""

    def __init__(self, path: Path, encoder: TextEncoder | None) -> None:
        self.path = path
        self.encoder = encoder
        self._write_lock = threading.Lock()
        self._load()

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, path: str | Path, texts: Iterable[str], encoder: TextEncoder, *, dtype: str = "float32",
              kind: str = "behavior", overwrite: bool = False) -> BehaviorTable:
        """Encode every unique text once with `encoder` and write a new table at `path` atomically."""
        path = Path(path)
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"table dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; open it and append, or pass overwrite=True")
        unique = _unique_normalized(texts)
        keys = text_keys(unique)
        key_order = _check_no_collisions(keys, unique)
        text_bytes, ends = _text_arrays(unique)
        offsets = np.concatenate([np.zeros(1, np.int64), ends])
        torch_dtype = EMBEDDING_DTYPES[dtype]
        sources = [
            source_of("keys", torch.from_numpy(keys)),
            source_of("key_order", torch.from_numpy(key_order)),
            source_of("text_offsets", torch.from_numpy(offsets)),
            TensorSource("embeddings", TAG_OF_TORCH[torch_dtype], (len(unique), encoder.signature.hidden_size),
                         _encoded_chunks(unique, encoder, torch_dtype)),
            source_of("text_bytes", torch.from_numpy(text_bytes)),
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path), atomic_write(path) as handle:
            write_safetensors(handle, sources, _metadata(encoder.signature, kind, dtype))
        log.info("built %s table %s: %d unique texts, dim %d, %s", kind, path, len(unique),
                 encoder.signature.hidden_size, dtype)
        return cls(path, encoder)

    @classmethod
    def open(cls, path: str | Path, encoder: TextEncoder | None = None, *, verify: bool = False) -> BehaviorTable:
        """Memory-map an existing table (no tensor data is read). With `encoder` the table must have
        been built by the same model split; `verify` scans every row and key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"behavior table {path} does not exist")
        table = cls(path, encoder)
        if encoder is not None:
            table.signature.check_matches(encoder.signature, str(path))
        if verify:
            table.verify()
        return table

    def _load(self) -> None:
        where = str(self.path)
        # Header and data through one open file: an append replacing the path meanwhile cannot mix them.
        with open(self.path, "rb") as handle:
            try:
                header = read_header(self.path, handle)
            except SafetensorsFormatError as err:
                raise TableFormatError(str(err)) from None
            self._check_header(header, where)
            snap = _Snapshot(
                header=header,
                embeddings=mmap_tensor(header, "embeddings", handle),
                keys=mmap_tensor(header, "keys", handle).numpy(),
                key_order=mmap_tensor(header, "key_order", handle).numpy(),
                text_offsets=mmap_tensor(header, "text_offsets", handle).numpy(),
                text_bytes=mmap_tensor(header, "text_bytes", handle).numpy(),
            )
        if int(snap.text_offsets[-1]) != snap.text_bytes.size:
            raise TableFormatError(f"{where}: text_offsets ends at {int(snap.text_offsets[-1])}, text_bytes holds "
                                   f"{snap.text_bytes.size} bytes")
        self._snap = snap  # one assignment: concurrent readers see the old or the new table, never a mix

    def _check_header(self, header: Header, where: str) -> None:
        """Metadata (format, version, signature, dtype) and tensor shapes; sets signature, kind, dtype."""
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
        self.signature = ModelSignature.from_metadata(meta, where)
        self.kind = meta.get("kind", "behavior")
        self.dtype = meta.get("dtype", "")
        if self.dtype not in EMBEDDING_DTYPES:
            raise TableFormatError(f"{where}: dtype {self.dtype!r} is not one of {sorted(EMBEDDING_DTYPES)}")
        self._check_tensors(header, where)

    def _check_tensors(self, header: Header, where: str) -> None:
        tensors = header.tensors
        missing = {"keys", "key_order", "text_offsets", "embeddings", "text_bytes"} - set(tensors)
        if missing:
            raise TableFormatError(f"{where}: missing tensors {sorted(missing)}")
        emb = tensors["embeddings"]
        if len(emb.shape) != 2:
            raise TableFormatError(f"{where}: embeddings must be (N, d), got shape {list(emb.shape)}")
        rows, dim = emb.shape
        expected = {"keys": ("I64", (rows,)), "key_order": ("I64", (rows,)), "text_offsets": ("I64", (rows + 1,)),
                    "embeddings": (TAG_OF_TORCH[EMBEDDING_DTYPES[self.dtype]], (rows, self.signature.hidden_size))}
        for name, (dtype, shape) in expected.items():
            info = tensors[name]
            if info.dtype != dtype or info.shape != shape:
                raise TableFormatError(f"{where}: tensor {name!r} is {info.dtype} {list(info.shape)}, expected "
                                       f"{dtype} {list(shape)}")
        if tensors["text_bytes"].dtype != "U8" or len(tensors["text_bytes"].shape) != 1:
            raise TableFormatError(f"{where}: text_bytes must be a 1-D U8 tensor")

    # ----- reading --------------------------------------------------------------------------
    @property
    def embeddings(self) -> torch.Tensor:
        """(N, d) rows in the table's storage dtype, memory-mapped."""
        return self._snap.embeddings

    def __len__(self) -> int:
        return self._snap.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self._snap.embeddings.shape[1]

    def text(self, row: int) -> str:
        """The normalized text stored at `row`."""
        return self._snap.text(row, self.path)

    def _find(self, normalized: list[str]) -> np.ndarray:
        """Rows of normalized texts (MISSING where absent); a key match with another text is a collision."""
        snap = self._snap
        keys = text_keys(normalized)
        if not len(snap.keys):
            return np.full(len(normalized), MISSING, dtype=np.int64)
        at = np.minimum(np.searchsorted(snap.sorted_keys, keys), len(snap.keys) - 1)
        found = snap.sorted_keys[at] == keys
        rows = np.where(found, snap.key_order[at], MISSING)
        for i in np.nonzero(found)[0]:
            stored = snap.text(int(rows[i]), self.path)
            if stored != normalized[i]:
                raise HashCollisionError(f"{self.path}: text {normalized[i]!r} shares its 64-bit key with row "
                                         f"{int(rows[i])} {stored!r}")
        return rows

    def lookup(self, texts: Sequence[str], *, on_missing: str = "raise") -> np.ndarray:
        """(n,) int64 row of each text. Unknown texts: 'raise' (UnknownTextError), 'mark' (row -1),
        or 'encode' (encoded with the table's encoder and appended to the file)."""
        if on_missing not in ("raise", "mark", "encode"):
            raise ValueError(f"on_missing must be 'raise', 'mark' or 'encode', got {on_missing!r}")
        unique = list(dict.fromkeys(texts))
        slot = {t: i for i, t in enumerate(unique)}
        normalized = [normalize_text(t) for t in unique]
        rows = self._find(normalized)
        missing = np.nonzero(rows == MISSING)[0]
        if missing.size and on_missing == "raise":
            shown = ", ".join(repr(normalized[i]) for i in missing[:3])
            raise UnknownTextError(f"{missing.size} text(s) not in {self.path}: {shown}"
                                   f"{' ...' if missing.size > 3 else ''} (pass on_missing='encode' to add them)")
        if missing.size and on_missing == "encode":
            self.append([normalized[i] for i in missing])
            rows[missing] = self._find([normalized[i] for i in missing])
        inverse = np.fromiter((slot[t] for t in texts), dtype=np.int64, count=len(texts))
        return rows[inverse]

    def verify(self) -> None:
        """Full scan: finite rows, keys match the stored texts, key_order sorts the keys."""
        where, snap, n = str(self.path), self._snap, len(self)
        for start in range(0, n, ENCODE_CHUNK):
            block = snap.embeddings[start:start + ENCODE_CHUNK]
            bad = first_nonfinite_row(block.float())
            if bad is not None:
                raise NonFiniteRowError(f"{where}: row {start + bad} holds NaN or Inf")
        if snap.text_offsets[0] != 0 or np.any(np.diff(snap.text_offsets) < 0):
            raise TableFormatError(f"{where}: text_offsets are not cumulative")
        texts = [snap.text(i, self.path) for i in range(n)]
        if not np.array_equal(text_keys(texts), snap.keys):
            raise TableFormatError(f"{where}: keys do not match the stored texts")
        if not np.array_equal(np.sort(snap.key_order), np.arange(n)) or np.any(np.diff(snap.sorted_keys) < 0):
            raise TableFormatError(f"{where}: key_order is not a sorting permutation of keys")
        _check_no_collisions(snap.keys, texts)

    # ----- writing --------------------------------------------------------------------------
    def append(self, texts: Iterable[str], *, lock_timeout: float | None = None) -> int:
        """Encode the texts not yet in the table and rewrite the file atomically (temp file, fsync,
        rename) under an inter-process lock. Returns how many rows were added."""
        if self.encoder is None:
            raise TableError(f"{self.path}: appending needs the model: open the table with an encoder")
        unique = _unique_normalized(texts)
        with self._write_lock, file_lock(self.path, timeout=lock_timeout):
            remove_stale_temps(self.path)
            self._load()  # another process may have appended since we opened
            new = [t for t, row in zip(unique, self._find(unique)) if row == MISSING]
            if not new:
                return 0
            new_keys = text_keys(new)
            _check_no_collisions(new_keys, new)  # _find already refused keys that collide with stored rows
            self._write_appended(new, new_keys)
            self._load()
        log.info("appended %d rows to %s (now %d)", len(new), self.path, len(self))
        return len(new)

    def _write_appended(self, new: list[str], new_keys: np.ndarray) -> None:
        snap = self._snap
        old_n, header = len(self), snap.header
        keys = np.concatenate([snap.keys, new_keys])
        new_bytes, new_ends = _text_arrays(new, start=int(snap.text_offsets[-1]))
        offsets = np.concatenate([snap.text_offsets, new_ends])
        torch_dtype = EMBEDDING_DTYPES[self.dtype]
        emb_start, emb_len = tensor_bytes_range(header, "embeddings")
        txt_start, txt_len = tensor_bytes_range(header, "text_bytes")
        sources = [
            source_of("keys", torch.from_numpy(keys)),
            source_of("key_order", torch.from_numpy(np.argsort(keys, kind="stable"))),
            source_of("text_offsets", torch.from_numpy(offsets)),
            TensorSource("embeddings", TAG_OF_TORCH[torch_dtype], (old_n + len(new), self.dim),
                         _chain(file_chunks(self.path, emb_start, emb_len),
                                _encoded_chunks(new, self.encoder, torch_dtype))),
            TensorSource("text_bytes", "U8", (txt_len + new_bytes.size,),
                         _chain(file_chunks(self.path, txt_start, txt_len), [new_bytes])),
        ]
        with atomic_write(self.path) as handle:
            write_safetensors(handle, sources, dict(header.metadata))


@dataclass
class _Snapshot:
    """One consistent, memory-mapped view of the table file."""
    header: Header
    embeddings: torch.Tensor
    keys: np.ndarray
    key_order: np.ndarray
    text_offsets: np.ndarray
    text_bytes: np.ndarray

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


def _chain(*parts: Iterable[object]) -> Iterator[object]:
    for part in parts:
        yield from part
