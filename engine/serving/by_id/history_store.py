"""User histories by id: user id -> the item ids of each named sequence (the scorer's `sequence_names`), oldest
first, appended by events. `HistoryStore` is the interface a ranker reads (append, read from a position, a
generation token); `MemoryHistoryStore` keeps it in memory with a snapshot to disk, and a real key-value store
(one list per (user, sequence), appended with RPUSH and read with LRANGE from a position) fits the same five
methods.

Ids. User and item ids follow the key rule of the scorer folder's vocabulary (weights.id_vocabulary: 17 and "17"
are one id); a store given the vocabulary's item keys (`items=`) refuses an event whose item it lacks
(`InputError` naming `events['name'][j]` and the id) and nothing of that append is stored. Users need no
vocabulary: a user the scorer never saw gets its history from its first append.

Append-only. A user's sequences only grow, so (generation, totals) names a user's history exactly: a ranker that
kept a user's state at totals t reads only the events after t (`read(user, start=t)`). `generation` changes when
histories may have been replaced rather than appended (a store loaded from a snapshot is a new generation).

Snapshot. `snapshot(path)` copies the lists' lengths under the store's lock (appends go on meanwhile; the file
holds the histories as they were at that instant) and writes JSON (item ids interned: each distinct id once)
through `weights.atomic.atomic_write` under the path's `file_lock`: temp file, fsync, rename, fsync the folder. A
process killed at any moment leaves the previous snapshot (or none) under `path`, never a partial one; the next
snapshot removes the dead writer's temp file. `load` checks every field and refuses a damaged file
(`SnapshotError` naming it and what is wrong), never returning part of it."""
from __future__ import annotations

import abc
import json
import threading
import uuid
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.encoding.text_checks import InputError
from weights import bounded_json
from weights.atomic import atomic_write, file_lock, remove_stale_temps
from weights.id_vocabulary import IdError, id_key

FORMAT = "bahe-history"
FORMAT_VERSION = 1
MAX_SNAPSHOT_BYTES = 8 << 30
WRITE_CHUNK = 1 << 20  # bytes per write of a snapshot


class UnknownUserError(InputError, KeyError):
    """A user id the store holds no history for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SnapshotError(ValueError):
    """A snapshot file that is not one (truncated, damaged, another format, or other sequence names)."""


@dataclass(frozen=True)
class UserHistory:
    """One user's history read from `start`: totals[s] events in sequence s so far; items[s] the ids of events
    start[s]..totals[s]-1 of it, oldest first."""
    totals: tuple[int, ...]
    start: tuple[int, ...]
    items: tuple[tuple[str, ...], ...]


def user_key(user_id: object) -> str:
    """The key of a user id (the vocabulary's key rule); InputError naming `user_id` for a value that is not one."""
    try:
        return id_key(user_id)
    except IdError as err:
        raise InputError(f"user_id: {err}") from None


class HistoryStore(abc.ABC):
    """What a ranker needs of a user-history store: the sequence names, appends, reads from a position, and a
    generation token. Implementations are thread-safe and append-only per user."""
    sequence_names: tuple[str, ...]

    @property
    @abc.abstractmethod
    def generation(self) -> str:
        """Changes whenever histories may have been replaced rather than appended."""

    @abc.abstractmethod
    def append(self, user_id: object, events: Mapping[str, Sequence[object]]) -> tuple[int, ...]:
        """Append item ids per sequence name (oldest first), all or nothing; -> the user's totals after it."""

    @abc.abstractmethod
    def read(self, user_id: object, start: Sequence[int] | None = None) -> UserHistory:
        """The user's totals and its items from `start` (default: all); UnknownUserError for a user never appended."""

    @abc.abstractmethod
    def __contains__(self, user_id: object) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def check_events(self, events: object, items: Container[str] | None) -> dict[int, list[str]]:
        """events -> sequence index -> item keys; InputError naming the entry for an unknown sequence name, a
        value that is not a list of ids, or (given `items`) an item id it does not hold."""
        if not isinstance(events, Mapping):
            raise InputError(f"events must be a dict of sequence name -> list of item ids, got {type(events).__name__}")
        unknown = set(events) - set(self.sequence_names)
        if unknown:
            raise InputError(f"events has unknown sequence name(s) {sorted(map(str, unknown))}; expected some of "
                             f"{list(self.sequence_names)}")
        out = {}
        for name, ids in events.items():
            if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)) or np.ndim(ids) != 1:
                raise InputError(f"events[{name!r}] must be a list of item ids, got {type(ids).__name__}")
            keys = []
            for j, value in enumerate(ids):
                try:
                    key = id_key(value)
                except IdError as err:
                    raise InputError(f"events[{name!r}][{j}]: {err}") from None
                if items is not None and key not in items:
                    raise InputError(f"events[{name!r}][{j}]: item id {key!r} is not a known item (the scorer's "
                                     "ids.json vocabulary lacks it); only catalog items can be behaviors")
                keys.append(key)
            out[self.sequence_names.index(name)] = keys
        return out


class MemoryHistoryStore(HistoryStore):
    """The histories in memory (one Python list of id keys per user and sequence), a snapshot to disk. Memory:
    about 8 bytes per event (a reference; each distinct id's string once if the caller passes the same objects,
    as `load` does) plus a dict entry and n lists per user."""

    def __init__(self, sequence_names: Sequence[str], items: Container[str] | None = None) -> None:
        names = tuple(sequence_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"sequence_names must be distinct non-empty strings, got {list(names)!r}")
        self.sequence_names, self.items = names, items
        self._users: dict[str, list[list[str]]] = {}
        self._lock = threading.Lock()
        self._generation = uuid.uuid4().hex

    @property
    def generation(self) -> str:
        return self._generation

    def __contains__(self, user_id: object) -> bool:
        try:
            return id_key(user_id) in self._users
        except IdError:
            return False

    def __len__(self) -> int:
        return len(self._users)

    def users(self) -> list[str]:
        """The keys of the users the store holds, in order of their first append."""
        with self._lock:
            return list(self._users)

    def append(self, user_id: object, events: Mapping[str, Sequence[object]]) -> tuple[int, ...]:
        key, checked = user_key(user_id), self.check_events(events, self.items)
        with self._lock:
            sequences = self._users.get(key)
            if sequences is None:
                sequences = self._users[key] = [[] for _ in self.sequence_names]
            for s, keys in checked.items():
                sequences[s].extend(keys)
            return tuple(len(seq) for seq in sequences)

    def read(self, user_id: object, start: Sequence[int] | None = None) -> UserHistory:
        key = user_key(user_id)
        with self._lock:
            sequences = self._users.get(key)
            if sequences is None:
                raise UnknownUserError(f"user id {key!r} has no history in the store (append its events first)")
            totals = tuple(len(seq) for seq in sequences)
            begin = (0,) * len(totals) if start is None else tuple(int(s) for s in start)
            if len(begin) != len(totals) or any(not 0 <= b <= t for b, t in zip(begin, totals)):
                raise ValueError(f"start {list(begin)} is not a position in user {key!r}'s sequences (totals "
                                 f"{list(totals)}): a store's histories only grow")
            return UserHistory(totals, begin, tuple(tuple(seq[b:]) for seq, b in zip(sequences, begin)))

    # ----- snapshot --------------------------------------------------------------------------
    def snapshot(self, path: str | Path, lock_timeout: float | None = None) -> int:
        """Write every history as it is now to `path`, atomically (see the module docstring); -> bytes written."""
        path = Path(path)
        with self._lock:  # lists only grow: their lengths now are the snapshot
            frozen = [(key, [(seq, len(seq)) for seq in sequences]) for key, sequences in self._users.items()]
        number: dict[str, int] = {}
        events = [[[number.setdefault(item, len(number)) for item in seq[:size]] for seq, size in sequences]
                  for _, sequences in frozen]
        body = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                           "sequence_names": list(self.sequence_names), "items": list(number),
                           "users": [key for key, _ in frozen], "events": events},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        with file_lock(path, lock_timeout):
            remove_stale_temps(path)
            with atomic_write(path) as handle:
                for at in range(0, len(body), WRITE_CHUNK):
                    handle.write(body[at:at + WRITE_CHUNK])
        return len(body)

    @classmethod
    def load(cls, path: str | Path, items: Container[str] | None = None,
             sequence_names: Sequence[str] | None = None) -> MemoryHistoryStore:
        """The store saved at `path` (a new generation). SnapshotError for a file that is not a whole snapshot, one
        whose sequence names differ from `sequence_names` (if given), or (given `items`) one holding an item id
        `items` lacks; FileNotFoundError if there is none."""
        path = Path(path)
        try:
            raw = bounded_json.loads(path.read_bytes(), max_bytes=MAX_SNAPSHOT_BYTES)
        except ValueError as err:
            raise SnapshotError(f"{path}: not a history snapshot ({err})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise SnapshotError(f"{path}: not a history snapshot (format is not {FORMAT!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise SnapshotError(f"{path}: history snapshot format_version {raw.get('format_version')!r} is not "
                                f"{FORMAT_VERSION}")
        names, keys, users, events = (raw.get(k) for k in ("sequence_names", "items", "users", "events"))
        if not all(isinstance(part, list) and all(isinstance(k, str) for k in part) for part in (names, keys, users)):
            raise SnapshotError(f"{path}: sequence_names, items and users must be lists of strings")
        if sequence_names is not None and tuple(names) != tuple(sequence_names):
            raise SnapshotError(f"{path}: holds sequences {names}, not the {list(sequence_names)} asked for")
        if len(set(users)) != len(users) or len(set(keys)) != len(keys):
            raise SnapshotError(f"{path}: a user or item id is listed twice")
        if not all(k.strip() for k in (*users, *keys)):
            raise SnapshotError(f"{path}: a user or item id is blank")
        if not isinstance(events, list) or len(events) != len(users) or not all(
                isinstance(user, list) and len(user) == len(names) and all(
                    isinstance(seq, list) and all(type(i) is int and 0 <= i < len(keys) for i in seq) for seq in user)
                for user in events):
            raise SnapshotError(f"{path}: events must hold, per user, one list of item numbers (0..{len(keys) - 1}) "
                                f"per sequence ({len(names)})")
        if items is not None:
            missing = next((k for k in keys if k not in items), None)
            if missing is not None:
                raise SnapshotError(f"{path}: item id {missing!r} is not a known item (not in the vocabulary given)")
        try:
            store = cls(names, items)
        except ValueError as err:
            raise SnapshotError(f"{path}: {err}") from None
        store._users = {key: [[keys[i] for i in seq] for seq in user] for key, user in zip(users, events)}
        return store
