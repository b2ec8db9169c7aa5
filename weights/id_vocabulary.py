"""Exact user and item ids: the key rule and the persistent, append-only vocabulary a scorer folder keeps.

Key rule. An id (a user's, an item's, a categorical value's) is its text: a string as written (nothing is
stripped or case-folded), an integer as its decimal digits. So 17 (an integer cell of a parquet file) and
"17" (a CSV cell, a JSON string) are the same id; "017", "+17", "17.0" and " 17" are other ids. A float is
an id only when it is an integer below 2^53 (a parquet integer column with gaps reads as floats). Empty or
blank text, None/NaN, booleans and other floats are refused (`IdError`).

Vocabulary. `IdVocabulary` numbers keys densely in the order they first came (`extend`); a key never
changes its number and is never removed, so numbers are exact ids (no hashing, hence no collisions) that
later updates only extend. `VocabularyFile` is its on-disk form beside a scorer's parts (`ids.json`: the
user keys, and the item keys with each item's text): `update` re-reads the file under its lock, keeps every
stored key and text, appends the new ones and writes the result atomically (temp file, fsync, rename); an
item that comes back with another text is refused (`IdError` naming both), the file left as it was.
`carry_vocabulary` takes a scorer's vocabulary along when it is saved to another folder."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from weights import bounded_json
from weights.atomic import atomic_write, file_lock

FILE_NAME = "ids.json"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 1 << 30
_EXACT_FLOAT = 2 ** 53


class IdError(ValueError):
    """An id that is not one (empty, a non-integral float, ...), or a vocabulary file that is not one."""


def id_key(value: object) -> str:
    """The key of id `value` by the rule above; IdError saying why for a value that is not an id."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        raise IdError(f"an id must be a string or an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and value == math.floor(value) and abs(value) < _EXACT_FLOAT:
            return str(int(value))
        if math.isnan(value):
            raise IdError("an id is missing (empty cell)")
        raise IdError(f"an id must be a string or an integer, got the float {float(value)!r}")
    if isinstance(value, str):
        if not value.strip():
            raise IdError("an id is empty" if not value else f"an id is blank ({value!r})")
        return value
    raise IdError(f"an id must be a string or an integer, got {type(value).__name__}")


class IdVocabulary:
    """Keys -> dense int64 numbers 0, 1, 2, ... in order of first appearance; append-only."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.keys: list[str] = []
        self._number: dict[str, int] = {}
        self.extend(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._number

    def extend(self, keys: Iterable[str]) -> np.ndarray:
        """The numbers of `keys` (each a key by `id_key`), new keys appended in order."""
        out = []
        for key in keys:
            number = self._number.get(key)
            if number is None:
                number = self._number[key] = len(self.keys)
                self.keys.append(key)
            out.append(number)
        return np.array(out, dtype=np.int64)

    def numbers(self, keys: Iterable[str]) -> np.ndarray:
        """(n,) int64 numbers of known `keys`, -1 for a key never added."""
        return np.array([self._number.get(key, -1) for key in keys], dtype=np.int64)


class VocabularyFile:
    """`ids.json` of a scorer folder: user keys, item keys, each item's text and its item-level categorical
    features (feature name -> one value or None per item), append-only."""

    def __init__(self, users: IdVocabulary, items: IdVocabulary, item_texts: list[str],
                 item_features: dict[str, list[str | None]] | None = None) -> None:
        if len(item_texts) != len(items):
            raise ValueError(f"{len(items)} item keys but {len(item_texts)} item texts")
        self.users, self.items, self.item_texts = users, items, item_texts
        self.item_features = item_features or {}

    def features_of(self, item_key: str) -> dict[str, str]:
        """The stored categorical features of item `item_key` (name -> value; unknown ones left out)."""
        number = self.items.numbers([item_key])[0]
        if number < 0:
            return {}
        return {name: values[number] for name, values in self.item_features.items() if values[number] is not None}

    def text_of(self, item_key: str) -> str | None:
        """The text of item `item_key`, None when the vocabulary does not hold it."""
        number = self.items.numbers([item_key])[0]
        return None if number < 0 else self.item_texts[number]

    @classmethod
    def read(cls, path: str | Path) -> VocabularyFile:
        """The vocabulary stored at `path` (IdError for a file that is not one; FileNotFoundError if absent)."""
        return cls.loads(Path(path).read_bytes(), path)

    @classmethod
    def loads(cls, data: bytes, path: str | Path) -> VocabularyFile:
        """The vocabulary in `data`, the bytes of the file `path` (named in errors): IdError for one that is not."""
        try:
            raw = bounded_json.loads(data, max_bytes=MAX_FILE_BYTES)
        except ValueError as err:
            raise IdError(f"{path}: not an id vocabulary ({err})") from None
        if not isinstance(raw, dict) or raw.get("format") != "bahe-ids":
            raise IdError(f"{path}: not an id vocabulary (format is not 'bahe-ids')")
        if not isinstance(raw.get("format_version"), int) or raw["format_version"] > FORMAT_VERSION:
            raise IdError(f"{path}: id vocabulary format_version {raw.get('format_version')!r} is not one this engine "
                          f"reads (at most {FORMAT_VERSION})")
        parts = [raw.get(name) for name in ("users", "items", "item_texts")]
        if not all(isinstance(p, list) and all(isinstance(k, str) for k in p) for p in parts):
            raise IdError(f"{path}: users, items and item_texts must be lists of strings")
        users, items, texts = parts
        if len(set(users)) != len(users) or len(set(items)) != len(items) or len(items) != len(texts):
            raise IdError(f"{path}: a key is listed twice, or items and item_texts differ in length")
        features = raw.get("item_features", {})
        if not isinstance(features, dict) or not all(
                isinstance(v, list) and len(v) == len(items) and all(x is None or isinstance(x, str) for x in v)
                for v in features.values()):
            raise IdError(f"{path}: item_features must map names to one string or null per item")
        return cls(IdVocabulary(users), IdVocabulary(items), texts, features)

    def dumps(self) -> bytes:
        """The file's bytes (UTF-8 JSON)."""
        body = {"format": "bahe-ids", "format_version": FORMAT_VERSION, "users": self.users.keys,
                "items": self.items.keys, "item_texts": self.item_texts, "item_features": self.item_features}
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    def write(self, path: str | Path) -> None:
        """Write atomically (temp file, fsync, rename)."""
        with atomic_write(Path(path)) as handle:
            handle.write(self.dumps())

    def merge(self, users: Iterable[str], items: Mapping[str, str],
              item_features: Mapping[str, Mapping[str, str]] | None = None, where: str = FILE_NAME) -> None:
        """Extend in memory, append-only (see `update`); IdError naming `where` and the item whose stored text
        differs, this vocabulary then left as it was."""
        for key, text in items.items():
            known = self.text_of(key)
            if known is not None and known != text:
                raise IdError(f"{where}: item {key!r} has the text {known!r} in the vocabulary and {text!r} now; "
                              "an id keeps its text (give the changed item a new id)")
        self.users.extend(users)
        before = len(self.items)
        self.items.extend(items)
        self.item_texts.extend(items[key] for key in self.items.keys[before:])
        for name, by_key in (item_features or {}).items():
            values = self.item_features.setdefault(name, [None] * before)
            values.extend([None] * (len(self.items) - len(values)))
            for key, value in by_key.items():
                number = self.items.numbers([key])[0]
                if number >= 0 and values[number] is None and value is not None:
                    values[number] = value
        for values in self.item_features.values():
            values.extend([None] * (len(self.items) - len(values)))

    @classmethod
    def update(cls, path: str | Path, users: Iterable[str], items: Mapping[str, str],
               lock_timeout: float | None = None, write: bool = True,
               item_features: Mapping[str, Mapping[str, str]] | None = None) -> VocabularyFile:
        """Extend the file at `path` (made if absent) with user keys `users` and items (key -> text), under its
        lock: stored keys keep their numbers and texts, new ones are appended. IdError naming the item when a
        stored item comes with another text (nothing written). `write=False`: only check (and return the
        result). `item_features` (name -> item key -> value) fill the features of new items, and of stored
        items only where theirs is unknown: a stored value is never changed."""
        path = Path(path)
        with file_lock(path, lock_timeout):
            try:
                stored = cls.read(path)
            except FileNotFoundError:
                stored = cls(IdVocabulary(), IdVocabulary(), [])
            stored.merge(users, items, item_features, str(path))
            if write:
                stored.write(path)
        return stored


def carry_vocabulary(data: bytes, source: str | Path, folder: str | Path, write: bool = True) -> None:
    """Put the vocabulary `data` (the bytes of the file `source`, read when a scorer was opened) into the scorer
    folder `folder`, as `save_pretrained` to another folder does: written as it is (atomically, under the file's
    lock) where the folder has none, else merged into the folder's by `update` (append-only: its stored keys,
    texts and features stay; IdError naming an item whose stored text differs, nothing written). IdError naming
    `source` for data that is not a vocabulary. `write=False`: check only."""
    carried = VocabularyFile.loads(data, source)
    path = Path(folder) / FILE_NAME
    with file_lock(path):
        if not path.exists():
            if write:
                with atomic_write(path) as handle:
                    handle.write(data)
            return
    features = {name: {key: value for key, value in zip(carried.items.keys, values) if value is not None}
                for name, values in carried.item_features.items()}
    VocabularyFile.update(path, carried.users.keys, dict(zip(carried.items.keys, carried.item_texts)), write=write,
                          item_features=features)
