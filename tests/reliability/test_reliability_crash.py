"""A writer killed at any moment loses nothing: a table `append` or a scorer `save_pretrained` SIGKILLed
mid-write leaves the old or the new content, never a mix, and the next write cleans up after it."""
import hashlib
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from engine import BAHEScorer
from tests.serving.test_scorer import make_scorer
from weights import table as table_module
from weights.atomic import TEMP_MARK
from weights.table import BehaviorTable, ModelSignature
from weights.text_key import text_keys

OLD_ROWS, NEW_ROWS, DIM = 40_000, 40_000, 128  # ~41 MB after the append: a kill lands mid-write
KILLS = 6


class StubEncoder:
    """Deterministic, fast stand-in for the lower layers: a text's row depends on the text alone."""

    def __init__(self, signature=None):
        self.signature = signature or ModelSignature("c" * 32, "bert", DIM, 2, "mean", 32)

    def encode(self, texts):
        keys = torch.from_numpy(text_keys(list(texts)) % 1_000_003).float()
        dim = self.signature.hidden_size
        return (keys[:, None] * 1e-6 + torch.arange(dim, dtype=torch.float32) / dim).reshape(len(texts), dim)


# Writers run in forked child processes: separate processes, SIGKILLed like any other, that do not pay
# the seconds of importing torch and transformers again for every kill.
FORK = multiprocessing.get_context("fork")


def _start(work):
    """Run `work()` in a child process; it reports 'ready' first and the seconds `work` took at the end."""
    parent_end, child_end = FORK.Pipe()

    def main():
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork (as in DataLoader workers)
        child_end.send("ready")
        start = time.perf_counter()
        work()
        child_end.send(time.perf_counter() - start)
    child = FORK.Process(target=main, daemon=True)
    child.start()
    assert parent_end.poll(60) and parent_end.recv() == "ready"
    child.pipe = parent_end
    return child


def _run_to_end(work):
    """Run `work()` in a child process to the end; -> seconds it took."""
    child = _start(work)
    child.join(120)
    assert child.exitcode == 0
    return child.pipe.recv()


def _kill(child):
    """SIGKILL the child (it may have finished already: a kill after the end is one of the moments)."""
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert child.exitcode in (0, -signal.SIGKILL)


def _kill_after(child, delay):
    time.sleep(delay)
    _kill(child)


def _kill_once_writing(child, folder, before):
    """Kill as soon as a temp file not in `before` shows up in `folder` (the write is under way)."""
    deadline = time.monotonic() + 60
    while not set(_temps(folder)) - before:
        assert child.is_alive() and time.monotonic() < deadline
        time.sleep(0.001)
    _kill(child)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _temps(folder):
    while True:
        try:
            return [p for p in Path(folder).rglob("*") if TEMP_MARK in p.name]
        except FileNotFoundError:  # a running writer removed a folder (a killed save's leftover) while listed
            continue


def _append_new_rows(path):
    table_module.ENCODE_CHUNK = 4096  # (in the child only) interleave encoding and writing: more moments to die at
    BehaviorTable.open(path, StubEncoder()).append(f"new behavior number {i}" for i in range(NEW_ROWS))


def test_append_killed_at_random_moments_leaves_old_or_new_table(tmp_path):
    path = tmp_path / "t.safetensors"
    BehaviorTable.build(path, (f"old behavior number {i}" for i in range(OLD_ROWS)), StubEncoder())
    old_bytes, old_sha = path.read_bytes(), _sha(path)
    reference = tmp_path / "ref" / "t.safetensors"
    reference.parent.mkdir()
    shutil.copy(path, reference)
    seconds = _run_to_end(lambda: _append_new_rows(reference))
    new_sha = _sha(reference)
    assert reference.stat().st_size > 40e6

    rng = np.random.default_rng(7)
    mid_write = 0
    for k in range(KILLS + 1):
        before = set(_temps(tmp_path))
        child = _start(lambda: _append_new_rows(path))
        if k == KILLS:
            _kill_once_writing(child, tmp_path, before)
        else:
            _kill_after(child, float(rng.uniform(0, 1.3 * seconds)))
        mid_write += bool(set(_temps(tmp_path)) - before)
        sha = _sha(path)
        assert sha in (old_sha, new_sha), f"kill {k}: the table is neither the old nor the new file"
        table = BehaviorTable.open(path, StubEncoder(), verify=True)
        assert len(table) == (OLD_ROWS if sha == old_sha else OLD_ROWS + NEW_ROWS)
        assert table.lookup(["old behavior number 0", f"old behavior number {OLD_ROWS - 1}"]).tolist() == \
            [0, OLD_ROWS - 1]
        if sha == new_sha:
            path.write_bytes(old_bytes)  # start the next kill from the old table again
    assert mid_write >= 1, "no kill landed while the temp file was being written"

    _run_to_end(lambda: _append_new_rows(path))  # stale temps of the killed writers do not get in the way
    assert _sha(path) == new_sha
    assert not _temps(tmp_path), f"stale temp files left behind: {_temps(tmp_path)}"
    table = BehaviorTable.open(path, StubEncoder(), verify=True)
    assert table.lookup([f"new behavior number {NEW_ROWS - 1}"]).tolist() == [OLD_ROWS + NEW_ROWS - 1]


PROBE_USERS = [{"click": ["bought latte", "only in the new table"], "buy": ["bought big book"]},
               {"search": ["searched blue film", "watched toy story"]}, {}]
PROBE_ITEMS = ["coffee", "toy story", "red phone"]


def test_save_pretrained_killed_at_random_moments_leaves_old_or_new_scorer(tiny_checkpoints, tmp_path):
    old = make_scorer(tiny_checkpoints["llama"], tmp_path / "a")
    # ~40 MB behavior table (stub rows under the scorer's own signature), so the save takes a while.
    BehaviorTable.open(old.behaviors.path, StubEncoder(old.encoder.signature)).append(
        f"filler behavior number {i}" for i in range(150_000))
    old.save_pretrained(tmp_path / "old")
    old = BAHEScorer.from_pretrained(tmp_path / "old", device="cpu")
    old_scores = old.score(PROBE_USERS, PROBE_ITEMS)

    shutil.copytree(tmp_path / "old", tmp_path / "new")
    new = BAHEScorer.from_pretrained(tmp_path / "new", device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in new.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    new.save_pretrained(tmp_path / "new")
    BehaviorTable.open(new.behaviors.path, StubEncoder(new.encoder.signature)).append(["only in the new table"])
    new_scores = BAHEScorer.from_pretrained(tmp_path / "new", device="cpu").score(PROBE_USERS, PROBE_ITEMS)
    assert not np.allclose(old_scores, new_scores)

    target = tmp_path / "target"
    shutil.copytree(tmp_path / "old", target)
    new = BAHEScorer.from_pretrained(tmp_path / "new", device="cpu")
    seconds = _run_to_end(lambda: new.save_pretrained(tmp_path / "calibration"))
    rng = np.random.default_rng(11)
    for k in range(KILLS - 1):
        before = set(_temps(target))
        child = _start(lambda: new.save_pretrained(target))
        if k == KILLS - 2:
            _kill_once_writing(child, target, before)
        else:
            _kill_after(child, float(rng.uniform(0, 1.2 * seconds)))
        got = BAHEScorer.from_pretrained(target, device="cpu").score(PROBE_USERS, PROBE_ITEMS)
        assert np.array_equal(got, old_scores) or np.array_equal(got, new_scores), \
            f"kill {k}: scores {got} are neither the old {old_scores} nor the new {new_scores}"
        if np.array_equal(got, new_scores):
            shutil.rmtree(target)
            shutil.copytree(tmp_path / "old", target)

    _run_to_end(lambda: new.save_pretrained(target))
    np.testing.assert_array_equal(BAHEScorer.from_pretrained(target, device="cpu").score(PROBE_USERS, PROBE_ITEMS),
                                  new_scores)
    assert not _temps(target)
