"""Behavior logs bigger than memory: `prepare_stream` reads a CSV/parquet log as a stream of record batches (CSV:
the project's one strict reader, engine.encoding.csv_rows, as load_log reads it; parquet: pyarrow datasets) and
lays it out on disk so that training holds one user shard at a time. It accepts and refuses what load_log
does, with load_log's messages (file lines of a CSV file, not rows of a batch), an item catalog and the
timestamp kinds included.

Why this layout. Every feature of an example is past-only (features.py), and all but one are per user:
histories, user counts, recent counts, `examples` (min_history) depend on the user's own events only, so
partitioning events by a hash of the user id into P shards keeps each of them exact inside a shard, computed
by the tested in-memory code (a shard is an ordinary BehaviorLog). The exception is the item count: the
target item's events of ALL users strictly before the target's time. It cannot be computed per user shard,
and an item shard would not be bounded either (under a Zipf law one item can hold a tenth of the log). So
item counts are computed over time buckets instead: events are cut into B time ranges of about equal size
(from a timestamp histogram); inside a bucket `counts_before` counts the bucket's earlier events, and a
carried (items x sequences) total adds every earlier bucket's. Buckets never split a timestamp, so "strictly
before" is the same rule. The per-event result travels back to its user shard by event id (its row in the
file). Memory: the largest user shard or time bucket (about N / P, N / B) plus items x sequences counters.

The global time split needs the k-th smallest timestamp (BehaviorLog.split): exact order statistics by
repeated histogram passes over the timestamp column (stream_time), no sort of the whole column.

Passes over the data: 1. read + validate each record batch (log_schema.validate_frame, the in-memory
checks; cross-batch checks for item texts and sequence names), write user shards; 2. timestamp histograms
(one pass, plus one or two narrowing passes for the cut points); 3. user shards -> time buckets; 4. each
bucket's item counts -> per-shard files. Order inside a shard file is file order, so a shard's BehaviorLog
breaks timestamp ties exactly as the in-memory log does.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.training.data.log import BehaviorLog, TimeSplit, cut_ranks
from engine.encoding.csv_rows import csv_row_batches
from engine.training.data.item_features import ItemLevelFeatures
from engine.training.data.log_columns import TIMESTAMP_KINDS, keys_of, timestamp_kind
from engine.training.data.log_files import PARQUET_ORDER_KEY, ItemCatalogFile, csv_frame, log_file_kind
from engine.training.data.log_schema import CATEGORY_PREFIX, LogFormatError, row_places, validate_frame
from engine.training.streaming.membership_bits import MAX_SEQUENCES, pack_membership, unpack_membership
from engine.training.streaming.stream_items import item_count_pass
from engine.training.streaming.stream_time import histogram, order_statistics, to_key
from weights.id_vocabulary import IdVocabulary

__all__ = ["StreamConfig", "StreamedLog", "Shard", "prepare_stream", "record_batches"]

_MARKER = "stream.json"  # marks a folder prepare_stream made, so it may empty it again


@dataclass
class StreamConfig:
    """How a log is laid out for streaming: `shards` user shards, `time_buckets` item-count buckets (each about
    1 / that of the log in memory at once), `batch_rows` records per read batch."""
    shards: int = 16
    time_buckets: int = 16
    batch_rows: int = 1 << 17
    min_history: int = 1
    train: float = 0.8
    val: float = 0.1


@dataclass
class Shard:
    """One user shard in memory: its log (rows sorted by (user, timestamp) like any BehaviorLog), each row's
    global event id (its row in the file) and item counts (N_p, S) over all users, and its part of the split."""
    log: BehaviorLog
    events: np.ndarray
    item_counts: np.ndarray
    split: TimeSplit


@dataclass
class StreamedLog:
    """A prepared log: the shards on disk and what is global (item catalog, sequences, split cut points)."""
    folder: Path
    shards: int
    events: int
    sequence_names: tuple[str, ...]
    categorical: tuple[str, ...]
    item_texts: dict[int, str]
    val_start: int
    test_start: int
    min_history: int
    item_counts_before: dict[int, np.ndarray] = field(repr=False, default_factory=dict)  # cut -> (I, S)
    shard_events: list[int] = field(default_factory=list)
    user_keys: np.ndarray | None = field(repr=False, default=None)  # the ids behind the codes (log_columns), or None
    item_keys: np.ndarray | None = field(repr=False, default=None)
    item_features: dict[str, dict[str, str]] = field(repr=False, default_factory=dict)  # item-level: ids.json

    @property
    def item_ids(self) -> np.ndarray:
        return np.array(sorted(self.item_texts), dtype=np.int64)

    def load(self, p: int) -> Shard:
        """User shard p as a BehaviorLog with its item counts and split."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.folder / f"users-{p}.parquet")
        counts = pq.read_table(self.folder / f"items-{p}.parquet")
        events = table["event"].to_numpy()
        user, timestamp = table["user_id"].to_numpy(), table["timestamp"].to_numpy()
        order = np.lexsort((timestamp, user))  # stable: file order breaks ties, as in BehaviorLog
        counted = counts["event"].to_numpy()  # in bucket order: align by event id
        by_event = np.argsort(counted, kind="stable")
        at = by_event[np.searchsorted(counted[by_event], events[order])]
        item_counts = np.stack([counts[f"s{s}"].to_numpy()[at] for s in range(len(self.sequence_names))], axis=1)
        item_counts = item_counts.reshape(len(order), len(self.sequence_names))
        item = table["item_id"].to_numpy()[order]
        log = BehaviorLog(user[order], item, timestamp[order], table["label"].to_numpy()[order],
                          unpack_membership(table["membership"].to_numpy()[order], len(self.sequence_names)),
                          {int(i): self.item_texts[int(i)] for i in np.unique(item)}, self.sequence_names,
                          self.min_history,
                          {name: table[CATEGORY_PREFIX + name].to_numpy(zero_copy_only=False)[order].astype(object)
                           for name in self.categorical}, self.user_keys, self.item_keys)
        return Shard(log, events[order], item_counts, log.split_at(self.val_start, self.test_start))

    def user_ids(self) -> list[str]:
        """The log's user ids (their keys, or the integer ids of its shards, read column by column), sorted by code."""
        if self.user_keys is not None:
            return self.user_keys.tolist()
        import pyarrow.parquet as pq
        ids = [pq.read_table(self.folder / f"users-{p}.parquet", columns=["user_id"])["user_id"].to_numpy()
               for p in range(self.shards)]
        return [str(u) for u in np.unique(np.concatenate(ids)).tolist()] if ids else []

    def __iter__(self) -> Iterator[Shard]:
        for p in range(self.shards):
            yield self.load(p)


def record_batches(path: str | os.PathLike, batch_rows: int):
    """(the file's schema metadata, an iterator of (frame, lines, first_row) record batches of at most
    `batch_rows` rows): a CSV file through the project's one strict reader (engine.encoding.csv_rows: cells as
    exact strings, `lines` the file line of each row, errors naming the line as load_log's), a parquet file
    through pyarrow (`lines` None, `first_row` the file row of the batch's row 0). Read ahead one batch at a
    time, so memory holds about one batch, not the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if log_file_kind(path) == "csv":
        _, batches = csv_row_batches(path, batch_rows, LogFormatError)
        return {}, ((*csv_frame(rows), 0) for rows in batches)
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(path, format=ds.ParquetFileFormat())
        schema = dataset.schema
    except (pa.ArrowException, OSError) as err:
        raise LogFormatError(f"{path}: not a readable parquet file ({err})") from None
    batches = dataset.to_batches(batch_size=batch_rows, batch_readahead=1, fragment_readahead=1, use_threads=False)
    return schema.metadata or {}, _parquet_frames(batches, path)


def _parquet_frames(batches, path: str):
    import pyarrow as pa

    first_row = 0
    try:
        for batch in batches:
            yield batch.to_pandas(), None, first_row
            first_row += batch.num_rows
    except (pa.ArrowException, OSError) as err:
        raise LogFormatError(f"{path}: not a readable parquet file ({err})") from None


def _validated(frame, lines, first_row: int, sequence_names, source: str, timestamps: str, vocabularies: dict | None):
    """validate_frame on one record batch, its errors naming the file line (CSV) or row (parquet)."""
    return validate_frame(frame, sequence_names, source, lines, timestamps, vocabularies, first_row)


def _shard_of(user: np.ndarray, shards: int) -> np.ndarray:
    """(N,) shard of each user id: a multiplicative hash, so consecutive ids spread."""
    mixed = user.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(shards)).astype(np.int64)


def prepare_stream(path: str | os.PathLike, folder: str | os.PathLike, config: StreamConfig = StreamConfig(),
                   sequence_names: Sequence[str] | None = None, *, catalog: str | os.PathLike | None = None,
                   timestamps: str = "auto") -> StreamedLog:
    """Lay the log at `path` out under `folder` for streaming: user shards, item counts per event, split cut
    points. `folder` must be new, empty, or one this function made (it is emptied first); ValueError for any
    other. `catalog` (an item catalog file) and `timestamps` ('auto': decided on the first row, 'integer',
    'iso8601') as load_log's. Errors in the log as load_log's: LogFormatError naming the file and the line (CSV)
    or row (parquet) and column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if config.shards < 1 or config.time_buckets < 1 or config.batch_rows < 1:
        raise ValueError(f"shards, time_buckets and batch_rows must be >= 1, got {config}")
    if timestamps not in TIMESTAMP_KINDS:
        raise ValueError(f"timestamps must be one of {TIMESTAMP_KINDS}, got {timestamps!r}")
    path, folder = os.fspath(path), Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / _MARKER).is_file():
        raise ValueError(f"{folder}: not empty and not a stream folder (no {_MARKER}); give an empty or new folder")
    items = None if catalog is None else ItemCatalogFile.read(catalog)  # a bad catalog fails before any work
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / _MARKER).write_text(json.dumps({"log": os.path.abspath(path), "shards": config.shards}))
    metadata, batches = record_batches(path, config.batch_rows)
    if sequence_names is None and PARQUET_ORDER_KEY in metadata:
        sequence_names = json.loads(metadata[PARQUET_ORDER_KEY])
    names: list[str] = list(sequence_names) if sequence_names is not None else []
    texts: dict[int, str] = {}
    first_seen: dict[int, int] = {}  # item -> the line (CSV) or row (parquet) of its first event
    categorical: tuple[str, ...] | None = None
    writers: list = [None] * config.shards
    vocabularies: dict | None = None  # set once the log's ids turn out to be keys (strings ...)
    item_features = ItemLevelFeatures()
    shard_events = [0] * config.shards
    n, lo, hi, span = 0, None, None, ("", "")
    try:
        for frame, lines, first_row in batches:
            if len(frame) == 0:
                continue
            if items is not None:
                frame = items.join(frame, lines, path, first_row)
            if n == 0 and "timestamp" in frame.columns:  # 'auto': the first row decides, as in load_log
                timestamps = timestamp_kind(frame["timestamp"], timestamps)
            parts = _validated(frame, lines, first_row, sequence_names, path, timestamps, vocabularies)
            if vocabularies is None and (parts[-1]["user"] is not None or parts[-1]["item"] is not None):
                if n:  # integer ids so far were kept as they are: they cannot join a numbering now
                    word, here = _place(lines, first_row, 0).split()
                    raise LogFormatError(f"{path}: {word}s {span[0]} to {span[1]} hold integer ids only, the {word}s "
                                         f"from {word} {here} on hold other ids (strings, or integers past int64); "
                                         "put a string id among the first rows, or load the log whole")
                vocabularies = {"user": IdVocabulary(), "item": IdVocabulary()}  # string ids: numbered in one pass
                parts = _validated(frame, lines, first_row, sequence_names, path, timestamps, vocabularies)
            user, item, timestamp, label, member, batch_texts, batch_names, cats, _ = parts
            span = (span[0] if n else _place(lines, first_row, 0).split()[1],
                    _place(lines, first_row, len(frame) - 1).split()[1])  # the places read so far
            _merge_texts(texts, first_seen, batch_texts, item, lines, first_row, path,
                         None if vocabularies is None else vocabularies["item"])
            item_features.add(user, item, cats)
            mask = _mask(member, batch_names, names)
            if categorical is None:
                categorical = tuple(cats)
            keys = to_key(timestamp)
            lo = int(keys.min()) if lo is None else min(lo, int(keys.min()))
            hi = int(keys.max()) if hi is None else max(hi, int(keys.max()))
            columns = {"event": np.arange(n, n + user.size, dtype=np.int64), "user_id": user, "item_id": item,
                       "timestamp": timestamp, "label": label.astype(np.int8), "membership": mask}
            table = pa.table({**columns, **{CATEGORY_PREFIX + k: pa.array(cats[k], pa.string()) for k in categorical}})
            shard = _shard_of(user, config.shards)
            for p in np.unique(shard).tolist():
                part = table.filter(pa.array(shard == p))
                if writers[p] is None:
                    writers[p] = pq.ParquetWriter(folder / f"users-{p}.parquet", part.schema)
                writers[p].write_table(part)
                shard_events[p] += part.num_rows
            n += user.size
    finally:
        for w in writers:
            if w is not None:
                w.close()
    if n == 0:
        raise LogFormatError(f"{path}: the table has no rows")
    if len(names) > MAX_SEQUENCES:
        raise LogFormatError(f"{path}: {len(names)} sequences; streaming supports at most {MAX_SEQUENCES}")
    schema = next(w.schema for w in writers if w is not None)
    for p in range(config.shards):  # a shard no user hashed to: an empty file, so every shard loads
        if writers[p] is None:
            pq.write_table(schema.empty_table(), folder / f"users-{p}.parquet")
    stream = StreamedLog(folder, config.shards, n, tuple(names), categorical or (), texts, 0, 0,
                         config.min_history, shard_events=shard_events)
    if vocabularies is not None:
        stream.user_keys, stream.item_keys = (np.array(vocabularies[k].keys, dtype=object) for k in ("user", "item"))
    stream.item_features = item_features.result(lambda codes: keys_of(codes, stream.item_keys))

    def timestamps():
        for p in range(config.shards):
            for b in pq.ParquetFile(folder / f"users-{p}.parquet").iter_batches(config.batch_rows, columns=["timestamp"]):
                yield b.column(0).to_numpy()

    first = histogram(timestamps, lo, hi)
    stream.val_start, stream.test_start = order_statistics(timestamps, cut_ranks(n, config.train, config.val), n,
                                                           lo, hi, first=first)
    stream.item_counts_before = item_count_pass(stream, first, lo, config)
    return stream


def _place(lines: np.ndarray | None, first_row: int, i: int) -> str:
    """Row i of a record batch as load_log names it: 'line L' (CSV) or 'row R' (parquet)."""
    return row_places(lines, first_row)(i)


def _merge_texts(texts: dict[int, str], first_seen: dict[int, int], batch: dict[int, str], item: np.ndarray,
                 lines: np.ndarray | None, first_row: int, path: str, items: IdVocabulary | None) -> None:
    """Add a batch's item texts; an item whose text differs from an earlier batch's is refused as load_log
    refuses it, naming both texts at the first event of each."""
    codes, first = np.unique(item, return_index=True)
    places = dict(zip(codes.tolist(), (lines[first] if lines is not None else first + first_row).tolist()))
    word = "row" if lines is None else "line"
    for code, text in batch.items():
        known = texts.setdefault(code, text)
        first_seen.setdefault(code, places[code])
        if known != text:
            name = code if items is None else items.keys[code]
            raise LogFormatError(f"{path}: item_id {name} has two different texts: {known!r} ({word} "
                                 f"{first_seen[code]}) and {text!r} ({word} {places[code]})")


def _mask(member: np.ndarray, batch_names: Sequence[str], names: list[str]) -> np.ndarray:
    """(N,) int64 bit masks in the global sequence order `names` (extended by names seen for the first time);
    names past MAX_SEQUENCES get no bit (prepare_stream refuses the log once every batch is read)."""
    for name in batch_names:
        if name not in names:
            names.append(name)
    bits = [names.index(name) for name in batch_names]
    kept = [j for j, bit in enumerate(bits) if bit < MAX_SEQUENCES]
    return pack_membership(member[:, kept], [bits[j] for j in kept])
