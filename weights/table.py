"""`BehaviorTable`: build, open (memory-mapped), look up and append behavior (and item) tables.
The file format, its errors and the model signature live in `weights.table_format`; every public
name is importable from here."""
from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from weights.atomic import atomic_write, check_lock_timeout, file_lock, remove_stale_temps
from weights.row_codec import quantize_rows
from weights.safetensors_io import (
    TAG_OF_TORCH,
    SafetensorsFormatError,
    TensorSource,
    file_chunks,
    read_header,
    source_of,
    tensor_bytes_range,
    write_safetensors,
)
from weights.table_format import (
    EMBEDDING_DTYPES,
    QUANTIZED_DTYPES,
    ROW_DTYPES,
    HashCollisionError,
    ModelSignature,
    NonFiniteRowError,
    Snapshot,
    TableChangedError,
    TableError,
    TableFormatError,
    TableMismatchError,
    TextEncoder,
    UnknownTextError,
    check_header,
    check_no_collisions,
    first_nonfinite_row,
    table_metadata,
    text_arrays,
)
from weights.text_key import normalize_text, text_keys

__all__ = ["BehaviorTable", "HashCollisionError", "ModelSignature", "NonFiniteRowError", "TableChangedError",
           "TableError", "TableFormatError", "TableMismatchError", "UnknownTextError", "EMBEDDING_DTYPES",
           "ROW_DTYPES", "MISSING", "TextEncoder", "first_nonfinite_row"]

log = logging.getLogger(__name__)

ENCODE_CHUNK = 16384  # texts encoded and written per step while building or appending
MISSING = -1


def _text_list(texts: object, name: str) -> None:
    """TypeError for a single str (or bytes) where a list of texts is expected: iterating it would
    make one text per character."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a list (or iterable) of texts, got a single {type(texts).__name__}: "
                        f"{texts[:40]!r}; wrap it in a list")


def _unique_normalized(texts: Iterable[object]) -> list[str]:
    """Normalized texts, first appearance order, duplicates removed."""
    unique = dict.fromkeys(texts)
    return list(dict.fromkeys(normalize_text(t) for t in unique))


def _encoded_chunks(texts: list[str], encoder: TextEncoder, dtype: torch.dtype,
                    scales: list[torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Encode in chunks, refusing non-finite rows, converted to the table's storage dtype; int8 rows are
    quantized per row (weights.row_codec) and their scales appended to `scales`, chunk by chunk."""
    for start in range(0, len(texts), ENCODE_CHUNK):
        block = texts[start:start + ENCODE_CHUNK]
        rows = encoder.encode(block)
        if rows.shape != (len(block), encoder.signature.hidden_size):
            raise TableError(f"encoder returned shape {tuple(rows.shape)} for {len(block)} texts, expected "
                             f"({len(block)}, {encoder.signature.hidden_size})")
        bad = first_nonfinite_row(rows)
        if bad is not None:
            raise NonFiniteRowError(f"encoding {block[bad]!r} gave NaN or Inf")
        if dtype == torch.int8:
            values, scale = quantize_rows(rows)
            if not bool(torch.isfinite(scale).all()):
                raise NonFiniteRowError(f"a row's int8 scale overflows float32 (values up to "
                                        f"{float(rows.abs().max()):.3g})")
            scales.append(scale)
            yield values
            continue
        converted = rows.to(dtype)
        if not bool(torch.isfinite(converted).all()):
            raise NonFiniteRowError(f"a row overflows {dtype} (values up to {float(rows.abs().max()):.3g})")
        yield converted


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
        """Encode every unique text once with `encoder` and write a new table at `path` atomically. `dtype`
        'int8' stores each row quantized with a float32 scale (weights.row_codec; about 4x smaller than float32)."""
        path = Path(path)
        _text_list(texts, "texts")
        if dtype not in ROW_DTYPES:
            raise ValueError(f"table dtype must be one of {sorted(ROW_DTYPES)}, got {dtype!r}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; open it and append, or pass overwrite=True")
        unique = _unique_normalized(texts)
        keys = text_keys(unique)
        key_order = check_no_collisions(keys, unique)
        text_bytes, ends = text_arrays(unique)
        offsets = np.concatenate([np.zeros(1, np.int64), ends])
        torch_dtype, scales = ROW_DTYPES[dtype], []
        sources = [
            source_of("keys", torch.from_numpy(keys)),
            source_of("key_order", torch.from_numpy(key_order)),
            source_of("text_offsets", torch.from_numpy(offsets)),
            TensorSource("embeddings", TAG_OF_TORCH[torch_dtype], (len(unique), encoder.signature.hidden_size),
                         _encoded_chunks(unique, encoder, torch_dtype, scales)),
            *_scale_source(dtype, len(unique), scales),
            source_of("text_bytes", torch.from_numpy(text_bytes)),
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path), atomic_write(path) as handle:
            write_safetensors(handle, sources, table_metadata(encoder.signature, kind, dtype))
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
        self.signature, self.kind, self.dtype, self._snap = self._read()

    def _read(self) -> tuple[ModelSignature, str, str, Snapshot]:
        """(signature, kind, dtype, snapshot) of the file now at `path`."""
        where = str(self.path)
        # Header and data through one open file: an append replacing the path meanwhile cannot mix them.
        with open(self.path, "rb") as handle:
            try:
                header = read_header(self.path, handle)
            except SafetensorsFormatError as err:
                raise TableFormatError(str(err)) from None
            signature, kind, dtype = check_header(header, where)
            return signature, kind, dtype, Snapshot.map(header, handle, where)

    def _on_disk(self, signature: ModelSignature) -> tuple[ModelSignature, str, Snapshot]:
        """(signature, kind, snapshot) of the file at `path` now, provided it is this table, possibly grown
        by appends: built with `signature` (else TableMismatchError), same dtype and this object's rows
        first (else TableChangedError; also when the file is gone)."""
        try:
            found, kind, dtype, snap = self._read()
        except FileNotFoundError:
            raise TableChangedError(f"{self.path} was removed since this table was opened (a scorer saved over "
                                    "its folder?); open it again") from None
        found.check_matches(signature, str(self.path))
        old = self._snap
        n = len(old.keys)
        if dtype != self.dtype or len(snap.keys) < n or not np.array_equal(snap.keys[:n], old.keys):
            raise TableChangedError(f"{self.path} was replaced by another table since this one was opened "
                                    f"({len(snap.keys)} {dtype} rows on disk do not extend the {n} {self.dtype} rows "
                                    "read before); open it again")
        return found, kind, snap

    def _reload_to_write(self) -> None:
        """Under the file lock: take the table as it is on disk now (another process may have appended),
        checked against the encoder by `_on_disk`. Nothing is taken from a file that fails, so this object
        never mixes two tables."""
        signature, kind, snap = self._on_disk(self.encoder.signature)
        # one assignment of the snapshot: concurrent readers see the old or the new table, never a mix
        self.signature, self.kind, self._snap = signature, kind, snap

    def extended_on_disk(self) -> bool:
        """Whether the file at `path` is still this table, possibly grown by appends (call under its lock)."""
        try:
            self._on_disk(self.signature)
        except TableError:
            return False
        return True

    # ----- reading --------------------------------------------------------------------------
    @property
    def embeddings(self) -> torch.Tensor:
        """(N, d) rows in the table's storage dtype, memory-mapped; for an int8 table the quantized values
        (row i is embeddings[i] * row_scale[i]: read float rows with `float_rows`)."""
        return self._snap.embeddings

    @property
    def bytes_per_row(self) -> int:
        """Stored bytes of one row: d values of the row dtype, + a 4-byte scale for int8."""
        scale = 0 if self._snap.row_scale is None else self._snap.row_scale.element_size()
        return self.dim * self._snap.embeddings.element_size() + scale

    @property
    def row_scale(self) -> torch.Tensor | None:
        """(N,) float32 scale of each row of an int8 table (memory-mapped); None for a float table."""
        return self._snap.row_scale

    def float_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, d) float32 rows of ids `rows` (n,) int64 (dequantized for an int8 table)."""
        return self._snap.float_rows(rows)

    def __len__(self) -> int:
        return self._snap.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self._snap.embeddings.shape[1]

    @property
    def keys(self) -> np.ndarray:
        """(N,) int64 64-bit text key of each row, in row order (memory-mapped, read-only use)."""
        return self._snap.keys

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
        _text_list(texts, "texts")
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
            if snap.row_scale is not None:  # int8 values are finite: the scales must be finite and >= 0
                block = snap.row_scale[start:start + ENCODE_CHUNK, None]
                if bool((block < 0).any()):
                    raise TableFormatError(f"{where}: row {start + int((block < 0).nonzero()[0, 0])} has a "
                                           "negative int8 scale")
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
        check_no_collisions(snap.keys, texts)

    # ----- writing --------------------------------------------------------------------------
    def append(self, texts: Iterable[str], *, lock_timeout: float | None = None) -> int:
        """Encode the texts not yet in the table and rewrite the file atomically (temp file, fsync,
        rename) under an inter-process lock. Returns how many rows were added. The file on disk must be
        this table, possibly grown by other writers: TableMismatchError if it now holds another model's
        table, TableChangedError if it was removed or replaced."""
        _text_list(texts, "texts")
        check_lock_timeout(lock_timeout)
        if self.encoder is None:
            raise TableError(f"{self.path}: appending needs the model: open the table with an encoder")
        unique = _unique_normalized(texts)
        with self._write_lock, file_lock(self.path, timeout=lock_timeout):
            remove_stale_temps(self.path)
            self._reload_to_write()  # another process may have appended since we opened
            new = [t for t, row in zip(unique, self._find(unique)) if row == MISSING]
            if not new:
                return 0
            new_keys = text_keys(new)
            check_no_collisions(new_keys, new)  # _find already refused keys that collide with stored rows
            self._write_appended(new, new_keys)
            self._reload_to_write()
        log.info("appended %d rows to %s (now %d)", len(new), self.path, len(self))
        return len(new)

    def _write_appended(self, new: list[str], new_keys: np.ndarray) -> None:
        snap = self._snap
        old_n, header = len(self), snap.header
        keys = np.concatenate([snap.keys, new_keys])
        new_bytes, new_ends = text_arrays(new, start=int(snap.text_offsets[-1]))
        offsets = np.concatenate([snap.text_offsets, new_ends])
        torch_dtype, scales = ROW_DTYPES[self.dtype], []
        emb_start, emb_len = tensor_bytes_range(header, "embeddings")
        txt_start, txt_len = tensor_bytes_range(header, "text_bytes")
        if self.dtype in QUANTIZED_DTYPES:  # the old rows' scales are copied byte for byte, as their values
            scale_start, scale_len = tensor_bytes_range(header, "row_scale")
            scales.append(file_chunks(self.path, scale_start, scale_len))
        sources = [
            source_of("keys", torch.from_numpy(keys)),
            source_of("key_order", torch.from_numpy(np.argsort(keys, kind="stable"))),
            source_of("text_offsets", torch.from_numpy(offsets)),
            TensorSource("embeddings", TAG_OF_TORCH[torch_dtype], (old_n + len(new), self.dim),
                         itertools.chain(file_chunks(self.path, emb_start, emb_len),
                                         _encoded_chunks(new, self.encoder, torch_dtype, scales))),
            *_scale_source(self.dtype, old_n + len(new), scales),
            TensorSource("text_bytes", "U8", (txt_len + new_bytes.size,),
                         itertools.chain(file_chunks(self.path, txt_start, txt_len), [new_bytes])),
        ]
        try:
            with atomic_write(self.path) as handle:
                write_safetensors(handle, sources, dict(header.metadata))
        except SafetensorsFormatError as err:  # the old rows could not be read back: the file is damaged
            raise TableFormatError(str(err)) from None

    def save_copy(self, target: Path) -> None:
        """Write the rows this object holds (its snapshot, whatever happened to `path` since) to `target`
        atomically: a table file equal to the one it was read from."""
        snap, step = self._snap, ENCODE_CHUNK
        sources = [source_of(name, torch.from_numpy(getattr(snap, name)))
                   for name in ("keys", "key_order", "text_offsets")]
        sources.append(TensorSource("embeddings", TAG_OF_TORCH[snap.embeddings.dtype], tuple(snap.embeddings.shape),
                                    (snap.embeddings[i:i + step] for i in range(0, len(self), step))))
        if snap.row_scale is not None:
            sources.append(source_of("row_scale", snap.row_scale))
        sources.append(source_of("text_bytes", torch.from_numpy(snap.text_bytes)))
        with atomic_write(target) as handle:
            write_safetensors(handle, sources, dict(snap.header.metadata))


def _scale_source(dtype: str, rows: int, scales: list) -> list[TensorSource]:
    """The row_scale tensor of an int8 table ([] for a float one). It follows embeddings in the file, so
    `scales` is filled while the rows stream (old rows' bytes first when appending) and read only after."""
    if dtype not in QUANTIZED_DTYPES:
        return []
    return [TensorSource("row_scale", "F32", (rows,), _flattened(scales))]


def _flattened(parts: list) -> Iterator[object]:
    """Each part of `parts` in order: a tensor, or an iterable of byte chunks (lazily, when iterated)."""
    for part in parts:
        if isinstance(part, torch.Tensor):
            yield part
        else:
            yield from part
