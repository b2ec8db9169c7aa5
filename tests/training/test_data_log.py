"""engine.training.data.log, log_schema and log_files: histories against a brute-force reference on random
logs (ties, ragged and empty sequences), leakage, truncation, the time split, file round trips and input
validation."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.training.data.log import BehaviorLog
from engine.training.data.log_files import load_log, write_log
from engine.training.data.log_schema import DEFAULT_SEQUENCES, LogFormatError

POOL = ("clicked", "viewed", "bought", "skipped")


def random_frame(rng: np.random.Generator, n: int, users: int, times: int, with_sequence: bool) -> pd.DataFrame:
    """n events over `users` users and `times` distinct timestamps (few -> many ties), rows shuffled."""
    item = rng.integers(100, 130, n)
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(0, users, n) * 7 - 3,  # sparse, negative ids are fine
            "item_id": item,
            "timestamp": rng.integers(0, times, n) * 1000,
            "label": rng.integers(0, 2, n),
            "item_text": [f"item {i} | genre {i % 3}" for i in item],
        }
    )
    if with_sequence:
        cells = []
        for _ in range(n):
            k = int(rng.integers(1, 3))
            cells.append("|".join(rng.choice(POOL, k, replace=False)))
        frame["sequence"] = cells
    return frame


def event_row_log(log: BehaviorLog) -> BehaviorLog:
    """`log` with each event's item id replaced by its row, so that its `sequences` are histories as event
    rows of `log` (to_frame writes the events in (user, timestamp) order: the rows stay put)."""
    rows = np.arange(log.num_events)
    frame = log.to_frame().assign(item_id=rows, item_text=[f"event {r}" for r in rows.tolist()])
    twin = BehaviorLog.from_frame(frame, min_history=0, sequence_names=log.sequence_names)
    np.testing.assert_array_equal(twin.item, rows)
    return twin


def reference_histories(frame: pd.DataFrame, log: BehaviorLog, row: int, max_behaviors):
    """Brute force: for log row `row`, each sequence's item ids strictly before it, oldest first."""
    order = np.lexsort((frame["timestamp"].to_numpy(), frame["user_id"].to_numpy()))  # stable
    events = frame.iloc[order].reset_index(drop=True)
    target = events.iloc[row]
    out = {}
    for name in log.sequence_names:
        if "sequence" in events:
            member = events["sequence"].str.split("|").apply(lambda names: name in names)
        else:
            label = events["label"]
            member = {"positive": label == 1, "negative": label == 0, "all": label >= 0}[name]
        same_user = events["user_id"] == target["user_id"]
        earlier = events[same_user & (events["timestamp"] < target["timestamp"]) & member]
        ids = earlier["item_id"].to_numpy()
        out[name] = ids if max_behaviors is None else ids[len(ids) - min(len(ids), max_behaviors) :]
    return out


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    users=st.integers(1, 4),
    times=st.integers(1, 8),
    with_sequence=st.booleans(),
    max_behaviors=st.one_of(st.none(), st.integers(0, 5)),
    seed=st.integers(0, 2**32 - 1),
)
def test_histories_match_reference(n, users, times, with_sequence, max_behaviors, seed):
    rng = np.random.default_rng(seed)
    frame = random_frame(rng, n, users, times, with_sequence)
    log = BehaviorLog.from_frame(frame, min_history=0)
    rows = rng.integers(0, n, int(rng.integers(0, 12)))  # repeats allowed, any order, maybe empty
    ids = log.sequences(rows, max_behaviors)
    event_rows = event_row_log(log).sequences(rows, max_behaviors)
    texts = log.sequence_texts(rows, max_behaviors)
    assert list(ids) == list(event_rows) == list(log.sequence_names)
    assert len(texts) == rows.size
    for name in log.sequence_names:
        r = ids[name]
        assert r.values.dtype == np.int64 and r.offsets.dtype == np.int64
        assert r.offsets.shape == (rows.size + 1,) and r.offsets[0] == 0 and r.offsets[-1] == r.values.size
        np.testing.assert_array_equal(log.item[event_rows[name].values], r.values)
        for b, row in enumerate(rows):
            expected = reference_histories(frame, log, int(row), max_behaviors)[name]
            np.testing.assert_array_equal(r[b], expected)
            # the text form is the id form through item_texts
            assert texts[b][name] == [log.item_texts[i] for i in r[b].tolist()]
            # no leakage: same user, strictly earlier, chronological
            hist = event_rows[name][b]
            assert (log.user[hist] == log.user[row]).all()
            assert (log.timestamp[hist] < log.timestamp[row]).all()
            assert (np.diff(log.timestamp[hist]) >= 0).all()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 80), users=st.integers(1, 5), times=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
def test_truncation_keeps_most_recent(n, users, times, seed):
    rng = np.random.default_rng(seed)
    log = BehaviorLog.from_frame(random_frame(rng, n, users, times, with_sequence=False), min_history=0)
    rows = np.arange(n)
    twin = event_row_log(log)
    full = twin.sequences(rows)
    for m in (0, 1, 3):
        cut = twin.sequences(rows, m)
        for name in log.sequence_names:
            assert (cut[name].lengths == np.minimum(full[name].lengths, m)).all()
            for b in range(n):
                whole = full[name][b]
                np.testing.assert_array_equal(cut[name][b], whole[len(whole) - min(m, len(whole)) :])


def test_equal_timestamps_are_not_history():
    frame = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2],
            "item_id": [10, 11, 12, 13, 14],
            "timestamp": [5, 5, 7, 5, 1],
            "label": [1, 0, 1, 1, 1],
            "item_text": ["a", "b", "c", "d", "e"],
        }
    )
    log = BehaviorLog.from_frame(frame)
    np.testing.assert_array_equal(log.item, [10, 11, 13, 12, 14])  # (user, time), ties in file order
    np.testing.assert_array_equal(log.history_length, [0, 0, 0, 3, 0])
    np.testing.assert_array_equal(log.examples, [3])  # min_history = 1 drops the rest
    assert log.sequence_texts([3], max_behaviors=2) == [{"positive": ["a", "d"], "negative": ["b"], "all": ["b", "d"]}]
    assert log.target_texts([3]) == ["c"] and log.label[[3]].tolist() == [1] and log.user[[3]].tolist() == [1]
    assert log.sequence_names == DEFAULT_SEQUENCES


def test_min_history_drops_short_histories():
    rng = np.random.default_rng(0)
    frame = random_frame(rng, 200, 6, 30, with_sequence=False)
    counts = {k: BehaviorLog.from_frame(frame, min_history=k).examples for k in (0, 1, 5)}
    log = BehaviorLog.from_frame(frame)
    np.testing.assert_array_equal(counts[0], np.arange(200))
    for k, examples in counts.items():
        np.testing.assert_array_equal(examples, np.flatnonzero(log.history_length >= k))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    times=st.integers(1, 400),
    train=st.floats(0.0, 1.0),
    val=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_is_a_time_cut(n, times, train, val, seed):
    val = min(val, 1.0 - train)
    rng = np.random.default_rng(seed)
    log = BehaviorLog.from_frame(random_frame(rng, n, 5, times, with_sequence=False))
    split = log.split(train, val)
    parts = [split.train, split.val, split.test]
    together = np.concatenate(parts)
    assert np.unique(together).size == together.size  # disjoint
    np.testing.assert_array_equal(np.sort(together), log.examples)  # covers every example
    stamps = [log.timestamp[p] for p in parts]
    assert all((s < split.val_start).all() for s in stamps[:1])
    assert ((stamps[1] >= split.val_start) & (stamps[1] < split.test_start)).all()
    assert (stamps[2] >= split.test_start).all()
    # cuts sit at the requested event quantiles: exact up to a run of equal timestamps
    ordered = np.sort(log.timestamp)
    for fraction, start in ((train, split.val_start), (train + val, split.test_start)):
        k = int(round(fraction * n))
        assert (ordered[:k] <= start).all() and (ordered[k:] >= start).all()


def test_split_fractions_with_distinct_timestamps():
    rng = np.random.default_rng(1)
    n = 1000
    frame = random_frame(rng, n, 1, 1, with_sequence=False)
    frame["timestamp"] = rng.permutation(n)
    log = BehaviorLog.from_frame(frame)
    split = log.split()
    assert (split.train.size, split.val.size, split.test.size) == (799, 100, 100)  # first event: no history
    summary = log.summary(split)
    assert summary["splits"]["test"]["examples"] == 100
    assert summary["splits"]["val"]["positive_rate"] == pytest.approx(log.label[split.val].mean())
    assert summary["events"] == n and summary["examples"]["examples"] == 999
    with pytest.raises(ValueError, match="split fractions"):
        log.split(0.9, 0.2)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("with_sequence", [False, True])
def test_file_round_trip(tmp_path, suffix, with_sequence):
    rng = np.random.default_rng(2)
    frame = random_frame(rng, 120, 4, 20, with_sequence)
    frame.loc[0, "item_text"] = 'NA, "quoted", comma'  # must survive CSV verbatim
    frame.loc[frame["item_id"] == frame.loc[0, "item_id"], "item_text"] = frame.loc[0, "item_text"]
    path = tmp_path / f"log{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    log = load_log(path)
    again_path = tmp_path / f"again{suffix}"
    write_log(log, again_path)
    again = load_log(again_path)
    for name in ("user", "item", "timestamp", "label"):
        np.testing.assert_array_equal(getattr(again, name), getattr(log, name))
    assert again.item_texts == log.item_texts
    assert set(again.sequence_names) == set(log.sequence_names)
    order = [again.sequence_names.index(n) for n in log.sequence_names]
    np.testing.assert_array_equal(again.membership[:, order], log.membership)
    if suffix == ".parquet":
        assert again.sequence_names == log.sequence_names  # parquet stores the order


def test_sequence_names_fix_the_order():
    frame = pd.DataFrame(
        {"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1, 2], "label": [0, 1], "item_text": ["x", "y"]}
    )
    frame["sequence"] = ["b|a", "c"]
    assert BehaviorLog.from_frame(frame).sequence_names == ("b", "a", "c")  # first appearance
    log = BehaviorLog.from_frame(frame, sequence_names=("c", "a", "b", "empty"))
    np.testing.assert_array_equal(log.membership, [[False, True, True, False], [True, False, False, False]])
    assert log.sequence_texts([1]) == [{"c": [], "a": ["x"], "b": ["x"], "empty": []}]
    with pytest.raises(LogFormatError, match=r"sequences \['b'\] occur in the table but not in sequence_names"):
        BehaviorLog.from_frame(frame, sequence_names=("a", "c"))


def good_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1, 1, 2],
            "item_id": [10, 11, 10],
            "timestamp": [100, 200, 150],
            "label": [1, 0, 1],
            "item_text": ["Heat (1995) | Action", "Up (2009) | Animation", "Heat (1995) | Action"],
        }
    )


def with_changes(column, values):
    frame = good_frame()
    if column in frame:
        frame = frame.astype({column: object})
    frame[column] = values
    return frame


@pytest.mark.parametrize(
    "frame, message",
    [
        (good_frame().drop(columns="label"), r"missing column\(s\) \['label'\]"),
        (good_frame().iloc[:0], "no rows"),
        (with_changes("user_id", [1, 1.5, 2]), "row 1, column 'user_id': an id must be a string or an integer, got "
                                               "the float 1.5"),
        (with_changes("item_id", [10, None, 10]), "row 1, column 'item_id': the id is missing"),
        (with_changes("item_id", [10, " ", 10]), r"row 1, column 'item_id': an id is blank \(' '\)"),
        (with_changes("timestamp", [100, None, 150]), "row 1, column 'timestamp': must hold integers"),
        (with_changes("user_id", [True, False, True]), "row 0, column 'user_id': an id must be a string or an "
                                                       "integer, got True"),
        (with_changes("label", [1, 2, 0]), "row 1, column 'label': must be 0 or 1, got 2"),
        (with_changes("item_text", ["a", "  ", "a"]), "row 1, column 'item_text': empty \\(item_id 11\\)"),
        (with_changes("item_text", ["a", None, "a"]), "row 1, column 'item_text': missing \\(item_id 11\\)"),
        (with_changes("item_text", ["a", 7, "a"]), "row 1, column 'item_text': must hold strings, got 7"),
        (
            with_changes("item_text", ["a", "b", "c"]),
            r"item_id 10 has two different texts: 'a' \(row 0\) and 'c' \(row 2\)",
        ),
        (with_changes("sequence", ["x", "", "y"]), "row 1, column 'sequence': must name one or more .* got ''"),
        (with_changes("sequence", ["x", "x||y", "y"]), "row 1, column 'sequence': .* got 'x||y'"),
        (with_changes("sequence", ["x", None, "y"]), "row 1, column 'sequence': missing"),
    ],
)
def test_bad_tables_name_column_and_row(frame, message):
    with pytest.raises(LogFormatError, match=message):
        BehaviorLog.from_frame(frame)


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(LogFormatError, match="unknown file type"):
        load_log(tmp_path / "log.json")
    csv = tmp_path / "log.csv"
    good_frame().assign(user_id=["1", "", "2"]).to_csv(csv, index=False)
    with pytest.raises(LogFormatError, match=r"log.csv: line 3, column 'user_id': an id is empty"):
        load_log(csv)
    good_frame().assign(item_text=["Heat (1995) | Action", "", "Heat (1995) | Action"]).to_csv(csv, index=False)
    with pytest.raises(LogFormatError, match="log.csv: line 3, column 'item_text': empty"):
        load_log(csv)
    log = BehaviorLog.from_frame(good_frame())
    with pytest.raises(IndexError, match="example row 3 is outside the log's 3 events"):
        log.sequences([0, 3])
    with pytest.raises(TypeError, match="example rows must be integers"):
        log.sequences(np.array([0.0]))
    with pytest.raises(ValueError, match="max_behaviors must be >= 0"):
        log.sequences([0], -1)
    with pytest.raises(ValueError, match="item_texts has no text for 1 item ids"):
        BehaviorLog(log.user, log.item, log.timestamp, log.label, log.membership, {10: "a"}, log.sequence_names)
    with pytest.raises(ValueError, match=r"membership must have shape \(N, S\) = \(3, 3\)"):
        BehaviorLog(
            log.user, log.item, log.timestamp, log.label, log.membership[:, :2], log.item_texts, log.sequence_names
        )


def test_direct_construction_sorts_stably():
    log = BehaviorLog(
        user=np.array([2, 1, 1, 1]),
        item=np.array([1, 2, 3, 4]),
        timestamp=np.array([0, 9, 3, 3]),
        label=np.array([True, False, True, False]),
        membership=np.array([[True], [False], [True], [True]]),
        item_texts={1: "a", 2: "b", 3: "c", 4: "d"},
        sequence_names=("s",),
    )
    np.testing.assert_array_equal(log.item, [3, 4, 2, 1])
    np.testing.assert_array_equal(log.membership[:, 0], [True, True, False, True])
    assert log.label.dtype == np.int8 and log.label.tolist() == [1, 0, 0, 1]
    assert log.sequence_texts([2]) == [{"s": ["c", "d"]}]


def test_period_and_user_sample_keep_whole_events():
    """`between` keeps exactly the events of [lo, hi); `user_sample` all events of the drawn users, by their ids."""
    rng = np.random.default_rng(3)
    frame = random_frame(rng, 400, 12, 50, with_sequence=True)
    log = BehaviorLog.from_frame(frame, min_history=0)
    period = log.between(10_000, 30_000)
    inside = frame[(frame["timestamp"] >= 10_000) & (frame["timestamp"] < 30_000)]
    assert period.num_events == len(inside) and period.sequence_names == log.sequence_names
    assert sorted(period.to_frame()["timestamp"]) == sorted(inside["timestamp"])
    sample = log.user_sample(5, seed=1)
    ids = set(sample.to_frame()["user_id"])
    assert len(ids) == 5 and ids <= set(frame["user_id"])
    assert sample.num_events == int(frame["user_id"].isin(ids).sum())
    assert set(log.user_sample(5, seed=1).to_frame()["user_id"]) == ids  # the seed fixes the draw
    assert log.user_sample(None, seed=1) is log and log.user_sample(99, seed=1) is log
