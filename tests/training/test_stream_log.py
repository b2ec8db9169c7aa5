"""Streamed logs (engine.training.streaming.stream, stream_time, stream_items; engine.training.streaming.stream_train): the
shards give the in-memory log's examples, histories, features and split; the passes hold one record batch,
one shard or one time bucket at a time; bad files fail as load_log's do; training over shards is the
in-memory loop when there is one shard."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from engine.config import ModelConfig
from engine.training.loops.ctr_models import SideOnlyCTR
from engine.training.data import BehaviorLog, LogFormatError, load_log, write_log
from engine.training.streaming import stream as stream_module
from engine.training.streaming import stream_items
from engine.training.streaming.stream import StreamConfig, prepare_stream
from engine.training.streaming.stream_time import histogram, order_statistics, to_key
from engine.training.data.example_features import PastCounts
from engine.training.streaming.stream_train import (ShardCounts, StreamBudget, catalog_log, fit_stream,
                                                   planned_steps)
from engine.training.loops.train import TrainConfig, fit
from tests.synthetic_logs import FIXTURE, random_log


def _random_log(seed: int, n: int = 2000, users: int = 60, times: int = 40) -> BehaviorLog:
    log = random_log(np.random.default_rng(seed), n, users, 25, times, 3)
    member = log.membership.copy()
    member[:, 0] |= ~member.any(axis=1)  # every event in a sequence, so the log can be written
    cats = {"color": np.array([["red", None, "blue"][u % 3] for u in log.user.tolist()], dtype=object)}
    return BehaviorLog(log.user, log.item, log.timestamp, log.label, member, log.item_texts, log.sequence_names,
                       categorical=cats)


def _row_of(path) -> np.ndarray:
    """Row of the in-memory log of each event id (file row): the inverse of its stable (user, time) sort."""
    frame = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)
    order = np.lexsort((frame["timestamp"].to_numpy(), frame["user_id"].to_numpy()))
    row_of = np.empty_like(order)
    row_of[order] = np.arange(order.size)
    return row_of


@pytest.mark.parametrize("source", ["movielens", "random-parquet", "random-csv"])
@pytest.mark.parametrize("shards,buckets,batch_rows", [(1, 1, 1 << 17), (4, 5, 97)])
def test_shards_give_the_in_memory_examples_histories_features_and_split(tmp_path, source, shards, buckets,
                                                                         batch_rows):
    if source == "movielens":
        path = FIXTURE
    else:
        path = tmp_path / ("log.csv" if source.endswith("csv") else "log.parquet")
        write_log(_random_log(shards + buckets), path)
    memory = load_log(path)
    split, counts = memory.split(), PastCounts(memory, window=3)
    stream = prepare_stream(path, tmp_path / "work", StreamConfig(shards=shards, time_buckets=buckets,
                                                                  batch_rows=batch_rows))
    assert (stream.val_start, stream.test_start) == (split.val_start, split.test_start)
    assert stream.sequence_names == memory.sequence_names and stream.categorical == tuple(memory.categorical)
    assert stream.item_texts == memory.item_texts and stream.events == memory.num_events
    row_of, seen = _row_of(path), []
    parts = {"train": [], "val": [], "test": []}
    for shard in stream:
        rows, log = row_of[shard.events], shard.log
        seen.append(rows)
        for name in ("user", "item", "timestamp", "label", "membership"):
            np.testing.assert_array_equal(getattr(log, name), getattr(memory, name)[rows], err_msg=name)
        for name in memory.categorical:
            assert log.categorical[name].tolist() == memory.categorical[name][rows].tolist()
        np.testing.assert_array_equal(rows[log.examples], np.intersect1d(rows, memory.examples))
        np.testing.assert_array_equal(shard.item_counts, counts.item[rows])
        own = ShardCounts(shard, window=3)  # the shard's own user and recent counts, as the trainer's
        np.testing.assert_array_equal(own.user, counts.user[rows])
        np.testing.assert_array_equal(own.recent, counts.recent[rows])
        if log.examples.size:
            local = log.examples
            for limit in (None, 2):
                got, want = log.sequences(local, limit, 1), memory.sequences(rows[local], limit, 1)
                for name in memory.sequence_names:
                    np.testing.assert_array_equal(got[name].values, want[name].values)
                    np.testing.assert_array_equal(got[name].offsets, want[name].offsets)
        for name, part in shard.split.items():
            parts[name].append(rows[part])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(memory.num_events))
    for name, rows in split.items():
        np.testing.assert_array_equal(np.sort(np.concatenate(parts[name])), rows, err_msg=name)
    for cut in (split.val_start, split.test_start):
        ids = stream.item_ids
        want = np.zeros((ids.size, memory.num_sequences), np.int64)
        keep = memory.timestamp < cut
        np.add.at(want, np.searchsorted(ids, memory.item[keep]), memory.membership[keep].astype(np.int64))
        np.testing.assert_array_equal(stream.item_counts_before[cut], want)


@pytest.mark.parametrize("seed", range(8))
def test_order_statistics_equal_sorting(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    scale = [5, 10**7, 2**62][seed % 3]
    values = rng.integers(-scale if seed % 2 else 0, scale, n)
    chunks = lambda: (values[i:i + 101] for i in range(0, n, 101))  # noqa: E731
    keys = to_key(values)
    lo, hi = int(keys.min()), int(keys.max())
    ranks = [0, n - 1, n, int(rng.integers(0, n)), int(round(0.8 * n))]
    ordered = np.sort(values)
    want = [int(ordered[k]) if k < n else int(ordered[-1]) + 1 for k in ranks]
    assert order_statistics(chunks, ranks, n, lo, hi, bins=16) == want
    assert order_statistics(chunks, ranks, n, lo, hi, first=histogram(chunks, lo, hi, bins=16), bins=16) == want


def test_passes_hold_one_batch_one_shard_one_bucket(tmp_path, monkeypatch):
    log = _random_log(0, n=4000, users=400, times=4000)
    path = tmp_path / "log.parquet"
    write_log(log, path)
    batches, buckets = [], []
    validate, count = stream_module.validate_frame, stream_items.counts_before
    monkeypatch.setattr(stream_module, "validate_frame", lambda frame, *a: batches.append(len(frame)) or validate(frame, *a))
    monkeypatch.setattr(stream_items, "counts_before", lambda keys, *a: buckets.append(keys.size) or count(keys, *a))
    stream = prepare_stream(path, tmp_path / "work", StreamConfig(shards=4, time_buckets=8, batch_rows=50))
    assert max(batches) <= 50 and len(batches) == math.ceil(4000 / 50) and sum(batches) == 4000
    assert len(buckets) == 8 and sum(buckets) == 4000 and max(buckets) <= 1.5 * 4000 / 8
    assert sum(stream.shard_events) == 4000 and max(stream.shard_events) <= 1.5 * 4000 / 4
    assert not list((tmp_path / "work").glob("bucket-*"))  # time buckets are deleted once counted


def _frame(n: int = 30) -> pd.DataFrame:
    return pd.DataFrame({"user_id": np.arange(n) % 4, "item_id": np.arange(n) % 5, "timestamp": np.arange(n),
                         "label": np.arange(n) % 2, "item_text": [f"movie {i % 5}" for i in range(n)]})


@pytest.mark.parametrize("break_it,message", [
    (lambda f: f.drop(columns=["label"]), "missing column(s) ['label']"),
    (lambda f: f.assign(label=[*[0] * 25, 3, *[0] * 4]), "row 25, column 'label': must be 0 or 1, got 3"),
    (lambda f: f.assign(item_text=[*f["item_text"][:22], "other", *f["item_text"][23:]]),
     "item_id 2 has two different texts"),
    (lambda f: f.iloc[:0], "the table has no rows"),
])
def test_bad_logs_fail_naming_the_problem_and_the_file_row(tmp_path, break_it, message):
    path = tmp_path / "log.parquet"
    break_it(_frame()).to_parquet(path)
    with pytest.raises(LogFormatError, match="log.parquet") as err:
        prepare_stream(path, tmp_path / "work", StreamConfig(shards=2, batch_rows=10))
    assert message in str(err.value)


@pytest.mark.parametrize("rows,batch_rows", [(2000, 100), (20_000, 5000)])
def test_a_csv_cell_of_the_wrong_type_fails_naming_it(tmp_path, rows, batch_rows):
    """The file LINE (header = line 1), not the batch's row nor the file's data row, as load_log names it."""
    frame = _frame(rows).astype({"timestamp": object})
    frame.loc[rows - 100, "timestamp"] = "soon"
    path = tmp_path / "log.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(LogFormatError) as err:
        prepare_stream(path, tmp_path / "work", StreamConfig(shards=2, batch_rows=batch_rows))
    assert str(err.value) == f"{path}: line {rows - 100 + 2}, column 'timestamp': must hold integers, got 'soon'"
    with pytest.raises(LogFormatError) as whole:
        load_log(path)
    assert str(whole.value) == str(err.value)
    with pytest.raises(FileNotFoundError):
        prepare_stream(tmp_path / "absent.csv", tmp_path / "work")


GOOD = ["user_id,item_id,timestamp,label,item_text", *(f"u{i % 3},{i % 4},{i},{i % 2},Movie {i % 4}"
                                                       for i in range(12))]


def _broken(kind: str) -> bytes:
    """The good CSV with one defect at file line 9 (data row 7)."""
    lines = list(GOOD)
    if kind == "stray quote":  # text after a closing quote: pandas and pyarrow read it as Heat (1995)
        lines[8] = 'u1,3,7,1,"Movie 3" (1995)'
    elif kind == "short row":
        lines[8] = "u1,3,7,1"
    elif kind == "long row":
        lines[8] += ",extra"
    elif kind == "open quote":
        lines[8] = 'u1,3,7,1,"Movie 3'
    elif kind == "not utf-8":
        data = ("\n".join(lines) + "\n").encode()
        return data.replace(b"u1,3,7,1,Movie 3", b"u1,3,7,1,Movie \xff")
    elif kind == "header twice":
        lines[0] = "user_id,item_id,timestamp,label,item_id"
    elif kind == "quoted line break":  # not a defect: a row spanning lines 9-10; the bad cell is on line 11
        lines[8] = 'u1,7,7,1,"Movie 7\nthe sequel"'
        lines[9] = "u2,0,8,soon,Movie 0"
    elif kind == "item text":
        lines[10] = "u0,1,9,1,Movie 9"  # item 1 has "Movie 1" on line 3, 7, 11
    elif kind == "empty":
        return b""
    elif kind == "header only":
        return (GOOD[0] + "\n").encode()
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("kind,want", [
    ("stray quote", "line 9: a quoted field goes on after its closing quote"),
    ("short row", "line 9 has 4 fields, but the header has 5"),
    ("long row", "line 9 has 6 fields, but the header has 5"),
    ("open quote", "line 9: a quoted field is never closed"),
    ("not utf-8", r"line 9 is not UTF-8 text \(byte 0xff at column 16\)"),
    ("header twice", r"line 1: the header names column\(s\) \['item_id'\] more than once"),
    ("quoted line break", "line 11, column 'label': must hold integers, got 'soon'"),
    ("item text", r"item_id 1 has two different texts: 'Movie 1' \(line 3\) and 'Movie 9' \(line 11\)"),
    ("empty", "the file is empty"),
    ("header only", "the table has no rows"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_a_malformed_csv_fails_in_the_stream_exactly_as_load_log(tmp_path, kind, want, gz):
    """One parser for both (engine.encoding.csv_rows): the same message, naming the file line, whatever batch the
    defect falls in; before, the stream read CSV through pyarrow, which rewrote `"Movie 3" (1995)` silently."""
    import gzip
    data = _broken(kind)
    path = tmp_path / ("log.csv.gz" if gz else "log.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(LogFormatError) as whole:
        load_log(path)
    assert __import__("re").search(want, str(whole.value)), str(whole.value)
    for batch_rows in (1, 3, 4, 100):
        with pytest.raises(LogFormatError) as streamed:
            prepare_stream(path, tmp_path / "work", StreamConfig(shards=2, batch_rows=batch_rows))
        assert str(streamed.value) == str(whole.value), batch_rows


def _model(log: BehaviorLog) -> SideOnlyCTR:
    torch.manual_seed(0)
    return SideOnlyCTR(ModelConfig(sequence_names=log.sequence_names, head_hidden=(16, 8), recent_events=2), log)


@pytest.mark.parametrize("lr_decay", [False, True])
def test_one_shard_trains_exactly_as_the_in_memory_loop(tmp_path, lr_decay):
    """Same losses, AUCs and weights, with constant rates and with the linear decay (planned over the stream)."""
    memory = load_log(FIXTURE)
    config = TrainConfig(epochs=2, patience=2, batch_size=32, norm_batches=3, progress=False, lr_decay=lr_decay)
    split = memory.split()
    reference = _model(memory)
    want = fit(reference, memory, split.train, split.val, config)
    stream = prepare_stream(FIXTURE, tmp_path / "work", StreamConfig(shards=1, time_buckets=3, batch_rows=64))
    model = _model(catalog_log(stream))
    got = fit_stream(model, stream, config)
    assert [h["train_loss"] for h in got.history] == [h["train_loss"] for h in want.history]
    assert [h["val_auc"] for h in got.history] == [h["val_auc"] for h in want.history]
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_training_visits_every_shard_within_the_budget(tmp_path):
    path = tmp_path / "log.parquet"
    write_log(_random_log(1, n=3000, users=90), path)
    stream = prepare_stream(path, tmp_path / "work", StreamConfig(shards=3, time_buckets=4))
    train = sum(shard.split.train.size for shard in stream)
    config = TrainConfig(epochs=1, batch_size=64, norm_batches=2, progress=False)
    whole = fit_stream(_model(catalog_log(stream)), stream, config)
    assert whole.history[0]["examples"] == train and math.isfinite(whole.history[0]["train_loss"])
    capped = fit_stream(_model(catalog_log(stream)), stream, config, budget=StreamBudget(steps_per_shard=2))
    assert capped.history[0]["examples"] == 3 * 2 * 64
    assert planned_steps(stream, config, StreamBudget()) == sum(-(-shard.split.train.size // 64) for shard in stream)
    assert planned_steps(stream, config, StreamBudget(steps_per_shard=2)) == 3 * 2


def test_bahe_train_stream_trains_and_saves_a_scorer(tiny_checkpoints, tmp_path, capsys):
    from engine import cli

    out = tmp_path / "run"
    cli.main(["train", "--data", str(FIXTURE), "--model", str(tiny_checkpoints["llama"]), "--out", str(out),
              "--lower-layers", "2", "--max-behaviors", "8", "--epochs", "1", "--device", "cpu", "--stream",
              str(tmp_path / "work"), "--shards", "3", "--steps-per-shard", "2", "--eval-per-shard", "20"])
    printed = capsys.readouterr().out
    assert '"events": 535' in printed and "test AUC" in printed and (out / "scorer" / "scorer.json").is_file()
    bad = tmp_path / "bad.csv"
    _frame().drop(columns=["item_text"]).to_csv(bad, index=False)
    with pytest.raises(SystemExit, match=r"bad.csv: missing column\(s\) \['item_text'\]"):
        cli.main(["train", "--data", str(bad), "--out", str(out), "--stream", str(tmp_path / "work2")])
    with pytest.raises(SystemExit, match="--steps-per-shard"):
        cli.main(["train", "--data", str(FIXTURE), "--out", str(out), "--stream", str(tmp_path / "w"),
                  "--train-examples", "10"])


def test_a_folder_with_other_files_is_never_emptied(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a stream folder"):
        prepare_stream(FIXTURE, tmp_path, StreamConfig(shards=2))
    assert (tmp_path / "keep.txt").read_text() == "mine"
    prepare_stream(FIXTURE, tmp_path / "work", StreamConfig(shards=2))
    assert prepare_stream(FIXTURE, tmp_path / "work", StreamConfig(shards=3)).shards == 3  # its own: redone


def test_shards_no_user_hashed_to_load_empty_and_training_skips_them(tmp_path):
    stream = prepare_stream(FIXTURE, tmp_path / "work", StreamConfig(shards=16, time_buckets=16))
    assert 0 in stream.shard_events and sum(stream.shard_events) == 535  # 8 users over 16 shards
    empty = stream.load(stream.shard_events.index(0))
    assert empty.log.num_events == 0 and empty.split.train.size == 0 and empty.item_counts.shape == (0, 3)
    config = TrainConfig(epochs=1, batch_size=32, norm_batches=2, progress=False)
    result = fit_stream(_model(catalog_log(stream)), stream, config)
    assert result.history[0]["examples"] == sum(shard.split.train.size for shard in stream)
