"""The user-history store (engine.serving.by_id.history_store): appends all or nothing, reads from a position,
unknown ids refused by name, a snapshot that round-trips and that a process killed mid-write (SIGKILL during the
write, or a failure between write and rename) leaves as it was, loadable; damaged snapshots refused."""
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from engine.encoding.text_checks import InputError
from engine.serving.by_id import history_store
from engine.serving.by_id.history_store import MemoryHistoryStore, SnapshotError, UnknownUserError
from weights.atomic import TEMP_MARK
from weights.id_vocabulary import IdVocabulary

NAMES = ("click", "buy")
ITEMS = IdVocabulary(["SKU-1", "17", "u-\u00e9", "0017", *(f"i{k}" for k in range(200))])
FORK = multiprocessing.get_context("fork")


def _contents(store):
    return {user: store.read(user).items for user in store.users()}


def test_appends_and_reads_from_a_position():
    store = MemoryHistoryStore(NAMES, ITEMS)
    assert store.append(7, {"click": ["SKU-1", 17]}) == (2, 0)
    assert store.append("7", {"buy": ["0017"], "click": []}) == (2, 1)  # 7 and "7" are one user; 17 and "17" one item
    history = store.read(7)
    assert history.totals == (2, 1) and history.items == (("SKU-1", "17"), ("0017",))
    assert store.read("7", start=(1, 1)).items == (("17",), ())
    assert store.append(7, {"click": np.array([17, 18])[:1]}) == (3, 1)  # a numpy array of ids is a list of ids
    assert 7 in store and "u2" not in store and len(store) == 1
    with pytest.raises(ValueError, match=r"start \[4, 0\] is not a position"):
        store.read(7, start=(4, 0))


@pytest.mark.parametrize("events,want", [
    ({"click": ["SKU-1", "SKU-9"]}, r"events\['click'\]\[1\]: item id 'SKU-9' is not a known item"),
    ({"click": ["SKU-1"], "buy": [17.5]}, r"events\['buy'\]\[0\]: an id must be a string or an integer"),
    ({"view": ["SKU-1"]}, r"unknown sequence name\(s\) \['view'\]"),
    ({"click": "SKU-1"}, r"events\['click'\] must be a list of item ids"),
    (["SKU-1"], "events must be a dict"),
])
def test_bad_events_are_refused_and_nothing_is_stored(events, want):
    store = MemoryHistoryStore(NAMES, ITEMS)
    store.append("u1", {"click": ["i1"]})
    with pytest.raises(InputError, match=want):
        store.append("u1", events)
    assert store.read("u1").totals == (1, 0)


def test_unknown_and_bad_user_ids():
    store = MemoryHistoryStore(NAMES, ITEMS)
    with pytest.raises(UnknownUserError, match=r"user id 'nobody' has no history in the store"):
        store.read("nobody")
    with pytest.raises(InputError, match=r"user_id: an id is blank"):
        store.append("  ", {"click": ["i1"]})
    with pytest.raises(InputError, match=r"user_id: an id must be a string or an integer"):
        store.read(None)


def _filled(users=30, seed=0):
    store = MemoryHistoryStore(NAMES, ITEMS)
    for u in range(users):
        store.append(f"user-{u}", {"click": [f"i{(u * 7 + j) % 200}" for j in range(u % 9)],
                                   "buy": [17, "u-\u00e9"] * (u % 3)})
    return store


def test_snapshot_round_trip(tmp_path):
    store = _filled()
    path = tmp_path / "histories.json"
    assert store.snapshot(path) == path.stat().st_size
    loaded = MemoryHistoryStore.load(path, ITEMS, NAMES)
    assert _contents(loaded) == _contents(store) and loaded.sequence_names == NAMES
    assert loaded.generation != store.generation  # a loaded store is a new generation
    loaded.append("user-1", {"buy": ["SKU-1"]})  # and goes on appending
    assert loaded.read("user-1").totals == (1, 3)
    assert not list(tmp_path.glob(f"*{TEMP_MARK}*"))


def test_load_refuses_damaged_or_foreign_snapshots(tmp_path):
    path = tmp_path / "histories.json"
    _filled().snapshot(path)
    whole = path.read_bytes()
    for damaged, want in [(whole[:len(whole) // 2], "not a history snapshot"),
                          (whole.replace(b'"bahe-history"', b'"bahe-ids"'), "format is not 'bahe-history'"),
                          (whole.replace(b'"format_version":1', b'"format_version":9'), "format_version 9"),
                          (b"[]", "format is not")]:
        path.write_bytes(damaged)
        with pytest.raises(SnapshotError, match=want):
            MemoryHistoryStore.load(path, ITEMS)
    path.write_bytes(whole)
    with pytest.raises(SnapshotError, match=r"holds sequences \['click', 'buy'\], not the \['click'\]"):
        MemoryHistoryStore.load(path, ITEMS, ("click",))
    with pytest.raises(SnapshotError, match=r"item id 'i\d+' is not a known item"):
        MemoryHistoryStore.load(path, IdVocabulary(["17", "u-\u00e9"]))


def _snapshot_in_child(store, path, pause_after_chunks):
    """Fork a child that snapshots `store` to `path`, writing small chunks; after `pause_after_chunks` writes it
    tells the parent and waits to be killed. -> (process, the parent's end of the pipe)."""
    parent_end, child_end = FORK.Pipe()

    def main():
        history_store.WRITE_CHUNK = 64
        real = history_store.atomic_write

        class Pausing:
            def __init__(self, handle):
                self.handle, self.writes = handle, 0

            def write(self, data):
                self.handle.write(data)
                self.writes += 1
                if self.writes == pause_after_chunks:
                    self.handle.flush()
                    child_end.send(self.writes)
                    signal.pause()  # killed here, mid-write

        def pausing_write(target):
            class Context:
                def __enter__(self):
                    self.inner = real(target)
                    return Pausing(self.inner.__enter__())

                def __exit__(self, *exc):
                    return self.inner.__exit__(*exc)
            return Context()
        history_store.atomic_write = pausing_write
        store.snapshot(path)
        child_end.send("done")
    child = FORK.Process(target=main, daemon=True)
    child.start()
    return child, parent_end


def test_a_snapshot_killed_mid_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "histories.json"
    store = _filled()
    store.snapshot(path)
    before, previous = path.read_bytes(), _contents(store)
    for u in range(30, 60):  # the next snapshot would hold more
        store.append(f"user-{u}", {"click": ["i3", "i4"]})
    child, pipe = _snapshot_in_child(store, path, pause_after_chunks=5)
    assert pipe.poll(60) and pipe.recv() == 5
    temps = list(tmp_path.glob(f".{path.name}{TEMP_MARK}*"))
    assert len(temps) == 1 and 0 < temps[0].stat().st_size < len(before)  # the kill lands inside the write
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert path.read_bytes() == before  # the previous snapshot, whole
    assert _contents(MemoryHistoryStore.load(path, ITEMS, NAMES)) == previous
    store.snapshot(path)  # the next snapshot clears the dead writer's temp file
    assert not list(tmp_path.glob(f"*{TEMP_MARK}*"))
    assert _contents(MemoryHistoryStore.load(path, ITEMS, NAMES)) == _contents(store)


def test_a_failure_between_write_and_rename_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "histories.json"
    store = _filled()
    store.snapshot(path)
    before = path.read_bytes()
    store.append("late", {"click": ["i9"]})

    def fail(src, dst):
        assert Path(src).stat().st_size > 0  # written in full, not yet renamed
        raise OSError("disk went away")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk went away"):
        store.snapshot(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and not list(tmp_path.glob(f"*{TEMP_MARK}*"))
    assert "late" not in MemoryHistoryStore.load(path, ITEMS)
