"""Generic behavior log: one table of (user, item, time, click) events with item texts (schema and checks:
`log_schema`; files: `log_files`), turned into CTR examples whose histories are the user's earlier events,
grouped into named sequences.

Behaviors are items: a past event's behavior text is its item's text.

Examples: every event is a CTR example (its item is the target, its label the click); its history
is the same user's events with timestamp strictly before the target's (equal timestamps are not
history, so nothing from the target's own moment leaks in). An example is addressed by its event's
row in the log (rows are sorted by (user, timestamp), ties kept in file order); `examples` lists
the rows with at least `min_history` earlier events.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from engine.features.categorical import USER_ID
from engine.features.history_window import window_start
from engine.training.data.log_columns import keys_of
from engine.training.data.log_schema import (CATEGORY_PREFIX, SEQUENCE_COLUMN, SEQUENCE_SEPARATOR, LogFormatError,
                                              validate_frame)

__all__ = ["Ragged", "TimeSplit", "BehaviorLog"]


@dataclass(frozen=True)
class Ragged:
    """B variable-length int64 sequences packed together.

    values:  (T,) int64, sequence b is values[offsets[b]:offsets[b+1]]
    offsets: (B+1,) int64, cumulative, offsets[0] = 0, offsets[-1] = T; length 0 is legal
    """

    values: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """(B,) int64."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, b: int) -> np.ndarray:
        return self.values[self.offsets[b]:self.offsets[b + 1]]


@dataclass(frozen=True)
class TimeSplit:
    """Example rows per split of a global time cut: train has timestamp < val_start,
    val has val_start <= timestamp < test_start, test has timestamp >= test_start."""

    train: np.ndarray  # (n_train,) int64 example rows, ascending
    val: np.ndarray
    test: np.ndarray
    val_start: int
    test_start: int

    def items(self) -> list[tuple[str, np.ndarray]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


def cut_ranks(n: int, train: float, val: float) -> tuple[int, int]:
    """The 0-based ranks, among a log's n timestamps in ascending order, of the first validation and the
    first test timestamp of `BehaviorLog.split` (a rank of n or more: past the last timestamp)."""
    if not (0.0 <= train and 0.0 <= val and train + val <= 1.0):
        raise ValueError(f"split fractions must satisfy 0 <= train, 0 <= val, train + val <= 1, got {train}, {val}")
    return int(round(train * n)), int(round((train + val) * n))


@dataclass(eq=False)
class BehaviorLog:
    """Events sorted by (user, timestamp) stably, with per-user prefix indexes so that an example's
    sequence is a slice. Construct with `load_log`, `BehaviorLog.from_frame`, or directly (arrays in
    any order: they are sorted and checked here).

    user, item, timestamp: (N,) int64; label: (N,) int8 0/1;
    membership: (N, S) bool, membership[i, s] = event i belongs to sequence_names[s];
    item_texts: item id -> text, covering every item in `item`;
    categorical: feature name -> (N,) object array of the event's value (str, or None: unknown), from the
    file's cat_<name> columns (engine.features.categorical; the user id is always there as `category_values("user_id")`);
    user_keys, item_keys: the exact ids behind `user` and `item` (engine.training.data.log_columns): (K,) object
    keys by code, or None when the codes are the integer ids themselves.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray
    membership: np.ndarray
    item_texts: dict[int, str]
    sequence_names: tuple[str, ...]
    min_history: int = 1
    categorical: dict[str, np.ndarray] = field(default_factory=dict)
    user_keys: np.ndarray | None = None
    item_keys: np.ndarray | None = None

    # Derived indexes (built in __post_init__).
    _user_start: np.ndarray = field(init=False, repr=False)  # (N,) first row of the event's user
    _history_end: np.ndarray = field(init=False, repr=False)  # (N,) first row of the user at the event's time
    _seq_cum: np.ndarray = field(init=False, repr=False)  # (S, N+1) seq-s events among rows [0, j)
    _seq_rows: list[np.ndarray] = field(init=False, repr=False)  # per sequence: its event rows, ascending
    _item_ids: np.ndarray = field(init=False, repr=False)  # (I,) sorted unique item ids with a text
    _text_of: np.ndarray = field(init=False, repr=False)  # (I,) object: texts aligned with _item_ids
    _event_item_row: np.ndarray = field(init=False, repr=False)  # (N,) index into _item_ids

    def __post_init__(self) -> None:
        self._check_and_sort()
        n = self.user.size
        rows = np.arange(n, dtype=np.int64)
        new_user = np.ones(n, dtype=bool)
        new_user[1:] = self.user[1:] != self.user[:-1]
        new_moment = new_user.copy()
        new_moment[1:] |= self.timestamp[1:] != self.timestamp[:-1]
        self._user_start = np.maximum.accumulate(np.where(new_user, rows, 0))
        self._history_end = np.maximum.accumulate(np.where(new_moment, rows, 0))
        self._seq_cum = np.zeros((self.num_sequences, n + 1), dtype=np.int64)
        np.cumsum(self.membership.T, axis=1, out=self._seq_cum[:, 1:])
        self._seq_rows = [np.flatnonzero(self.membership[:, s]) for s in range(self.num_sequences)]
        self._item_ids = np.array(sorted(self.item_texts), dtype=np.int64)
        self._text_of = np.array([self.item_texts[i] for i in self._item_ids.tolist()], dtype=object)
        self._event_item_row = np.searchsorted(self._item_ids, self.item)

    def _check_and_sort(self) -> None:
        for name in ("user", "item", "timestamp"):
            kind = np.asarray(getattr(self, name)).dtype
            if not np.issubdtype(kind, np.integer):
                raise TypeError(f"{name} must hold integers, got dtype {kind}")
            if np.issubdtype(kind, np.unsignedinteger):  # the cast below would wrap values >= 2^63 negative
                above = np.flatnonzero(np.asarray(getattr(self, name)) > np.iinfo(np.int64).max)
                if above.size:
                    raise LogFormatError(f"{name} row {int(above[0])} holds "
                                         f"{int(np.asarray(getattr(self, name))[above[0]])}, outside the int64 "
                                         f"range [-2^63, 2^63 - 1]")
        self.user = np.asarray(self.user, dtype=np.int64)
        self.item = np.asarray(self.item, dtype=np.int64)
        self.timestamp = np.asarray(self.timestamp, dtype=np.int64)
        self.label = np.asarray(self.label)
        self.membership = np.asarray(self.membership, dtype=bool)
        self.sequence_names = tuple(self.sequence_names)
        self.item_texts = {int(k): str(v) for k, v in self.item_texts.items()}
        self.categorical = {str(name): np.asarray(values, dtype=object) for name, values in self.categorical.items()}
        if USER_ID in self.categorical:
            raise ValueError(f"categorical feature {USER_ID!r} is the log's user column; do not pass it")
        for name, values in self.categorical.items():
            if values.shape != (self.user.size,):
                raise ValueError(f"categorical[{name!r}] must have shape ({self.user.size},) like user, got "
                                 f"{values.shape}")
        n = self.user.size
        for name in ("user", "item", "timestamp", "label"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) like user, got {arr.shape}")
        for name in ("user", "item"):
            keys = getattr(self, f"{name}_keys")
            if keys is not None:
                keys = np.asarray(keys, dtype=object)
                setattr(self, f"{name}_keys", keys)
                codes = getattr(self, name)
                if codes.size and (codes.min() < 0 or codes.max() >= keys.size):
                    raise ValueError(f"{name} codes must index {name}_keys ({keys.size} keys), got {int(codes.min())}.."
                                     f"{int(codes.max())}")
        if not np.isin(self.label, (0, 1)).all():
            raise ValueError(f"label must hold 0 or 1, got values {np.unique(self.label)[:5].tolist()}")
        self.label = self.label.astype(np.int8)
        if self.membership.shape != (n, len(self.sequence_names)):
            raise ValueError(f"membership must have shape (N, S) = ({n}, {len(self.sequence_names)}) for sequences "
                             f"{self.sequence_names}, got {self.membership.shape}")
        if len(set(self.sequence_names)) != len(self.sequence_names) or not all(self.sequence_names):
            raise ValueError(f"sequence names must be distinct and non-empty, got {self.sequence_names}")
        if self.min_history < 0:
            raise ValueError(f"min_history must be >= 0, got {self.min_history}")
        missing = np.setdiff1d(np.unique(self.item), np.fromiter(self.item_texts, np.int64, len(self.item_texts)))
        if missing.size:
            raise ValueError(f"item_texts has no text for {missing.size} item ids, e.g. {missing[:5].tolist()}")
        order = np.lexsort((self.timestamp, self.user))  # stable: ties keep their input order
        if n and (np.diff(order) != 1).any():
            for name in ("user", "item", "timestamp", "label", "membership"):
                setattr(self, name, getattr(self, name)[order])
            self.categorical = {name: values[order] for name, values in self.categorical.items()}

    # ----- construction ---------------------------------------------------------------------
    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, min_history: int = 1, sequence_names: Sequence[str] | None = None,
                   source: str = "log", lines: np.ndarray | None = None, timestamps: str = "auto") -> BehaviorLog:
        """Validate a table in the file schema (`log_schema`) and build the log. `sequence_names` fixes
        the order of the sequences (it must name every sequence in the table; listed names that never
        occur are kept, empty); by default they come in order of first appearance. `source` names the
        table in error messages, `lines` (a CSV file's line of each row) the places in them; `timestamps`:
        'auto', 'integer' or 'iso8601' (engine.training.data.log_columns)."""
        *columns, categorical, ids = validate_frame(frame, sequence_names, source, lines, timestamps)
        return cls(*columns, min_history, categorical, ids["user"], ids["item"])

    def to_frame(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """The log (or its events at ascending `rows`) in the file schema, rows in (user, timestamp) order, with a
        `sequence` column."""
        rows = np.arange(self.num_events) if rows is None else np.asarray(rows, dtype=np.int64)
        names, membership = np.array(self.sequence_names, dtype=object), self.membership[rows]
        if not membership.any(axis=1).all():
            row = int(rows[np.flatnonzero(~membership.any(axis=1))[0]])
            raise ValueError(f"every event must belong to a sequence to be written; row {row} belongs to none")
        combos, combo_of = np.unique(membership, axis=0, return_inverse=True)
        cells = np.array([SEQUENCE_SEPARATOR.join(names[c]) for c in combos], dtype=object)
        user, item = self.user[rows], self.item[rows]
        return pd.DataFrame({"user_id": user if self.user_keys is None else self.user_keys[user],
                             "item_id": item if self.item_keys is None else self.item_keys[item],
                             "timestamp": self.timestamp[rows], "label": self.label[rows].astype(np.int64),
                             "item_text": self._text_of[self._event_item_row[rows]],
                             SEQUENCE_COLUMN: cells[combo_of.reshape(-1)],
                             **{CATEGORY_PREFIX + name: values[rows] for name, values in self.categorical.items()}})

    def between(self, lo: int, hi: int) -> BehaviorLog:
        """The log of the events with lo <= timestamp < hi (a period: histories start at lo)."""
        return self._of_rows(np.flatnonzero((self.timestamp >= lo) & (self.timestamp < hi)))

    def user_sample(self, users: int | None, seed: int) -> BehaviorLog:
        """The log of `users` users drawn at random with `seed`, all their events (all users: None or at least as
        many as it holds)."""
        present = np.unique(self.user)
        if users is None or users >= present.size:
            return self
        keys = present if self.user_keys is None else self.user_keys[present]
        chosen = np.random.default_rng(seed).choice(np.unique(keys), users, replace=False)  # drawn in key order
        chosen_users = present[np.isin(keys, chosen)]
        return self._of_rows(np.flatnonzero(np.isin(self.user, chosen_users)))

    def _of_rows(self, rows: np.ndarray) -> BehaviorLog:
        """The log of the events at ascending `rows` alone (converted without the rest of the log)."""
        return BehaviorLog.from_frame(self.to_frame(rows), sequence_names=self.sequence_names)

    def category_values(self, name: str, rows: np.ndarray) -> list:
        """Feature `name`'s values (str, or None: unknown) at event `rows`: the user id for "user_id", else the
        log's cat_<name> column; KeyError naming the features the log has."""
        if name == USER_ID:  # its key: an integer id hashes as its decimal text, so ints serve as they are
            return self.user[rows].tolist() if self.user_keys is None else self.user_keys[self.user[rows]].tolist()
        if name not in self.categorical:
            raise KeyError(f"the log has no categorical feature {name!r}; it has {[USER_ID, *self.categorical]}")
        return self.categorical[name][rows].tolist()

    # ----- sizes ------------------------------------------------------------------------------
    @property
    def num_events(self) -> int:
        return int(self.user.size)

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_names)

    @property
    def history_length(self) -> np.ndarray:
        """(N,) int64: number of the user's events strictly before each event."""
        return self._history_end - self._user_start

    @property
    def examples(self) -> np.ndarray:
        """(E,) int64 ascending rows of the events with at least `min_history` earlier events."""
        return np.flatnonzero(self.history_length >= self.min_history)

    @property
    def item_ids(self) -> np.ndarray:
        """(I,) int64 sorted ids of the items with a text."""
        return self._item_ids

    @property
    def item_id_texts(self) -> list[str]:
        """(I,) the texts of `item_ids`, in the same order."""
        return self._text_of.tolist()

    def user_key(self, codes: np.ndarray) -> list[str]:
        """The exact ids (keys, `weights.id_vocabulary`) of user `codes`."""
        return keys_of(np.asarray(codes, dtype=np.int64), self.user_keys)

    def item_key(self, codes: np.ndarray) -> list[str]:
        """The exact ids (keys) of item `codes` (e.g. `item_ids`)."""
        return keys_of(np.asarray(codes, dtype=np.int64), self.item_keys)

    def target_texts(self, rows: Any) -> list[str]:
        """The texts of the target items of the examples at `rows`."""
        return self._text_of[self._event_item_row[self._check_rows(rows)]].tolist()

    # ----- histories --------------------------------------------------------------------------
    def _check_rows(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 1:
            raise ValueError(f"example rows must be 1-D, got shape {rows.shape}")
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise TypeError(f"example rows must be integers, got {rows.dtype}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_events):
            bad = int(rows.min() if rows.min() < 0 else rows.max())
            raise IndexError(f"example row {bad} is outside the log's {self.num_events} events")
        return rows

    def _sequence_event_rows(self, rows: np.ndarray, max_behaviors: int | None, window_step: int) -> list[Ragged]:
        """Histories as event rows of this log, per sequence: Ragged rows over the batch, each example's
        events of that sequence strictly before it, oldest first, from the window start of
        engine.features.history_window (`max_behaviors` None: all; `window_step` 1: the most recent max_behaviors).
        Each history is a slice of the sequence's row list between the user's prefix counts, so the cost is
        O(B * S) plus the output size."""
        if max_behaviors is not None and max_behaviors < 0:
            raise ValueError(f"max_behaviors must be >= 0 or None, got {max_behaviors}")
        start, end = self._user_start[rows], self._history_end[rows]
        out = []
        for s in range(self.num_sequences):
            hi = self._seq_cum[s, end]
            lo = self._seq_cum[s, start]
            if max_behaviors == 0:
                lo = hi
            elif max_behaviors is not None:
                lo = lo + window_start(hi - lo, max_behaviors, window_step)
            lengths = hi - lo
            offsets = np.zeros(rows.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            # Position in this sequence's row list of every packed element: lo[b] + (k - offsets[b]).
            positions = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
            out.append(Ragged(self._seq_rows[s][positions], offsets))
        return out

    def sequences(self, rows: Any, max_behaviors: int | None = None, window_step: int = 1) -> dict[str, Ragged]:
        """Id-level histories of the examples at `rows`: sequence name -> Ragged item ids over the
        batch, oldest first; each example's whole (`max_behaviors` None) or its window (engine.features.history_window:
        at most max_behaviors, the most recent; `window_step` 1: exactly the last max_behaviors)."""
        rows = self._check_rows(rows)
        return {name: Ragged(self.item[r.values], r.offsets)
                for name, r in zip(self.sequence_names, self._sequence_event_rows(rows, max_behaviors, window_step))}

    def sequence_texts(self, rows: Any, max_behaviors: int | None = None,
                       window_step: int = 1) -> list[dict[str, list[str]]]:
        """Text-level histories: for each example at `rows`, sequence name -> behavior texts,
        the same behaviors as `sequences`."""
        rows = self._check_rows(rows)
        columns = []
        for r in self._sequence_event_rows(rows, max_behaviors, window_step):
            flat = self._text_of[self._event_item_row[r.values]].tolist()
            bounds = r.offsets.tolist()
            columns.append([flat[bounds[b]:bounds[b + 1]] for b in range(rows.size)])
        if not columns:
            return [{} for _ in range(rows.size)]
        return [dict(zip(self.sequence_names, texts)) for texts in zip(*columns)]

    # ----- split and summary ------------------------------------------------------------------
    def split(self, train: float = 0.8, val: float = 0.1) -> TimeSplit:
        """Global time cut: the first `train` fraction of events by timestamp, the next `val`, and
        the rest (test). Cuts fall on timestamp values, so events sharing a timestamp share a split
        and train timestamps < val timestamps < test timestamps; with many ties the fractions are
        approximate. Returns the example rows (`examples`) of each split."""
        ordered = np.sort(self.timestamp)
        n = ordered.size

        def cut(k: int) -> int:  # the k-th smallest timestamp (0-based); past the end: the last one + 1
            if k < n:
                return int(ordered[k])
            return int(ordered[-1]) + 1 if n else 0

        val_rank, test_rank = cut_ranks(n, train, val)
        return self.split_at(cut(val_rank), cut(test_rank))

    def split_at(self, val_start: int, test_start: int) -> TimeSplit:
        """The example rows of each part of the time cut at `val_start` and `test_start` (from `split`, or from
        a streaming pass over a bigger log: engine.training.streaming.stream)."""
        examples = self.examples
        t = self.timestamp[examples]
        return TimeSplit(train=examples[t < val_start], val=examples[(t >= val_start) & (t < test_start)],
                         test=examples[t >= test_start], val_start=val_start, test_start=test_start)

    def summary(self, split: TimeSplit | None = None) -> dict[str, Any]:
        """Counts and positive rates: the whole log, each sequence, and each split's examples
        (default split: `split()`)."""
        split = self.split() if split is None else split

        def part(rows: np.ndarray) -> dict[str, Any]:
            return {"examples": int(rows.size),
                    "positive_rate": float(self.label[rows].mean()) if rows.size else float("nan"),
                    "first_timestamp": int(self.timestamp[rows].min()) if rows.size else None,
                    "last_timestamp": int(self.timestamp[rows].max()) if rows.size else None}

        return {"events": self.num_events, "users": int(np.unique(self.user).size),
                "items": int(np.unique(self.item).size),
                "positive_rate": float(self.label.mean()) if self.num_events else float("nan"),
                "min_history": self.min_history,
                "sequences": {n: int(self._seq_rows[s].size) for s, n in enumerate(self.sequence_names)},
                "examples": part(self.examples), "splits": {name: part(rows) for name, rows in split.items()},
                "val_start": split.val_start, "test_start": split.test_start}
