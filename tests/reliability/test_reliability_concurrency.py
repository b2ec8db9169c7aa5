"""Concurrency: processes appending to one table at once (file lock: wait, or FileLockTimeout), a reader
racing an append, and BAHEScorer.score from 8 threads with unknown behaviors encoded on the fly."""
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from tests.reliability.test_reliability_crash import StubEncoder, _temps
from tests.serving.test_scorer import BEHAVIORS, ITEMS, make_scorer, random_users
from weights import table as table_module
from weights.atomic import FileLockTimeout
from weights.table import BehaviorTable, UnknownTextError

FORK = multiprocessing.get_context("fork")
BASE = [f"base behavior {i}" for i in range(1000)]


class SlowEncoder(StubEncoder):
    """Holds the table lock long enough for the other writer to run into it."""

    def encode(self, texts):
        time.sleep(0.3)
        return super().encode(texts)


def _appender(path, texts, go, lock_timeout=None):
    def main():
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
        table_module.ENCODE_CHUNK = 64
        table = BehaviorTable.open(path, SlowEncoder())
        go.wait(60)
        try:
            table.append(texts, lock_timeout=lock_timeout)
        except FileLockTimeout:
            os._exit(3)
    child = FORK.Process(target=main, daemon=True)
    child.start()
    return child


def _start_holding_the_lock(path, texts, tmp_path):
    """A child process appending `texts` (slowly), returned once it is writing: it holds the lock."""
    go = FORK.Event()
    holder = _appender(path, texts, go)
    go.set()
    deadline = time.monotonic() + 60
    while not _temps(tmp_path):
        assert holder.is_alive() and time.monotonic() < deadline
        time.sleep(0.005)
    return holder


def test_two_processes_appending_at_once_both_land_exactly_once(tmp_path):
    path = tmp_path / "t.safetensors"
    BehaviorTable.build(path, BASE, StubEncoder())
    shared = [f"shared behavior {i}" for i in range(100)]
    first = [f"first writer {i}" for i in range(200)] + shared + BASE[:10]
    second = [f"second writer {i}" for i in range(200)] + shared[::-1]
    go = FORK.Event()
    children = [_appender(path, first, go), _appender(path, second, go)]
    go.set()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    table = BehaviorTable.open(path, StubEncoder(), verify=True)
    everything = list(dict.fromkeys(BASE + first + second))
    assert len(table) == len(everything)
    rows = table.lookup(everything)
    assert sorted(rows.tolist()) == list(range(len(everything)))  # every text once, no row lost or doubled
    torch.testing.assert_close(table.embeddings[torch.from_numpy(rows)], StubEncoder().encode(everything),
                               rtol=0, atol=0)
    assert not _temps(tmp_path)


def test_second_appender_fails_clearly_with_a_timeout_then_succeeds(tmp_path):
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, BASE, StubEncoder())
    holder = _start_holding_the_lock(path, [f"slow writer {i}" for i in range(400)], tmp_path)
    with pytest.raises(FileLockTimeout, match="locked by another process"):
        table.append(["impatient writer"], lock_timeout=0.1)
    assert table.append(["patient writer"]) == 1  # waits for the holder, then sees its rows
    holder.join(60)
    assert holder.exitcode == 0
    reopened = BehaviorTable.open(path, StubEncoder(), verify=True)
    assert len(reopened) == len(BASE) + 400 + 1
    assert reopened.lookup(["slow writer 399", "patient writer"]).tolist() == [len(BASE) + 399, len(BASE) + 400]
    with pytest.raises(UnknownTextError):
        reopened.lookup(["impatient writer"])


def test_a_killed_lock_holder_does_not_block_the_next_writer(tmp_path):
    """flock is released by the kernel when its holder dies: no stale lock to clean up by hand."""
    path = tmp_path / "t.safetensors"
    table = BehaviorTable.build(path, BASE, StubEncoder())
    holder = _start_holding_the_lock(path, [f"doomed writer {i}" for i in range(400)], tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(60)
    assert table.append(["next writer"], lock_timeout=5) == 1
    assert len(BehaviorTable.open(path, StubEncoder(), verify=True)) == len(BASE) + 1


def test_open_racing_an_append_sees_one_whole_file(tmp_path, monkeypatch):
    """The file is replaced between reading the header and mapping the data: the table must still be
    the old file throughout (header and data read through one open file)."""
    path, newer = tmp_path / "t.safetensors", tmp_path / "newer.safetensors"
    BehaviorTable.build(path, BASE, StubEncoder())
    BehaviorTable.build(newer, [f"prefix {i}" for i in range(5000)] + BASE, StubEncoder())
    real_read_header = table_module.read_header

    def racing_read_header(*args, **kwargs):
        header = real_read_header(*args, **kwargs)
        if newer.exists():
            os.replace(newer, path)  # what a concurrent append does
        return header
    monkeypatch.setattr(table_module, "read_header", racing_read_header)
    table = BehaviorTable.open(path, StubEncoder())
    monkeypatch.undo()
    assert len(table) == len(BASE)
    assert table.lookup(BASE).tolist() == list(range(len(BASE)))
    torch.testing.assert_close(table.embeddings, StubEncoder().encode(BASE), rtol=0, atol=0)
    assert len(BehaviorTable.open(path, verify=True)) == 5000 + len(BASE)


def _in_threads(work, count=8):
    results, errors = [None] * count, []
    barrier = threading.Barrier(count)

    def run(k):
        try:
            barrier.wait()
            results[k] = work(k)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "scoring threads deadlocked"
    assert not errors, errors
    return results


def _batches(count):
    """Per thread: shared users plus behaviors and items no table holds (some shared between threads)."""
    rng = np.random.default_rng(5)
    batches = []
    for k in range(count):
        users = random_users(rng, 6)
        users[0] = {**users[0], "click": users[0].get("click", []) + [f"unseen behavior of thread {k}",
                                                                      "unseen behavior of every thread"]}
        users[3] = {**users[3], "search": [f"unseen search {k % 3}", BEHAVIORS[k]]}
        items = [ITEMS[i % len(ITEMS)] for i in range(5)] + [f"unseen item {k % 2}"]
        batches.append((users, items))
    return batches


@pytest.mark.parametrize("append_unknown", [False, True])
def test_threads_encoding_unknown_behaviors_match_sequential_calls(tiny_checkpoints, tmp_path, append_unknown):
    scorer = make_scorer(tiny_checkpoints["qwen2"], tmp_path, append_unknown=append_unknown)
    batches = _batches(8)
    if not append_unknown:
        expected = [scorer.score(users, items) for users, items in batches]
    threaded = _in_threads(lambda k: scorer.score(*batches[k]))
    if append_unknown:  # the threads appended every unknown text; sequential calls now read those rows
        expected = [scorer.score(users, items) for users, items in batches]
        unknown = {t for users, _ in batches for u in users for seq in u.values() for t in seq} - set(BEHAVIORS)
        table = BehaviorTable.open(scorer.behaviors.path, verify=True)
        assert len(table) == len(BEHAVIORS) + len(unknown)  # each appended exactly once
        assert len(BehaviorTable.open(scorer.items.path, verify=True)) == len(ITEMS) + 2
    else:
        assert len(scorer.behaviors) == len(BEHAVIORS) and len(scorer.items) == len(ITEMS)
    for got, want in zip(threaded, expected):
        np.testing.assert_array_equal(got, want)
