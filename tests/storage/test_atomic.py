"""weights/atomic.py: atomic file and folder replacement, stale temporaries, the file lock."""
import multiprocessing
import os
import pickle
import signal
import time

import filelock
import pytest

from weights.atomic import (OWNER_LOCK, TEMP_MARK, FileLockTimeout, atomic_folder, atomic_write, file_lock,
                            owned_temp_dir, process_start_time, remove_orphaned_dirs, remove_stale_temps)


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name)


@pytest.mark.parametrize("before", ["none", "file", "folder", "link"])
def test_atomic_folder_replaces_whatever_was_there(tmp_path, before):
    final, target = tmp_path / "model", tmp_path / "elsewhere"
    target.mkdir()
    (target / "kept.txt").write_text("not ours")
    if before == "file":
        final.write_text("old")
    elif before == "folder":
        final.mkdir()
        (final / "old.txt").write_text("old")
    elif before == "link":
        final.symlink_to(target, target_is_directory=True)
    with atomic_folder(final) as tmp:
        assert tmp.parent == tmp_path and TEMP_MARK in tmp.name
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"abc")
        (tmp / "b.json").write_text("{}")
    assert final.is_dir() and not final.is_symlink()
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["b.json", "sub", "sub/a.bin"]
    assert (target / "kept.txt").read_text() == "not ours"  # a replaced link is unlinked, its target kept
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_folder_error_leaves_the_old_folder(tmp_path, existing):
    final = tmp_path / "model"
    if existing:
        final.mkdir()
        (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(final) as tmp:
            (tmp / "half.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert _temps(tmp_path) == []
    assert final.exists() == existing and (not existing or (final / "old.txt").read_text() == "old")


def test_atomic_write_error_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as handle:
            handle.write(b"new, half")
            raise RuntimeError
    assert path.read_bytes() == b"old" and _temps(tmp_path) == []


def test_remove_stale_temps_removes_files_and_folders_of_that_path_only(tmp_path):
    path = tmp_path / "t.safetensors"
    (tmp_path / f".t.safetensors{TEMP_MARK}1-dead").write_bytes(b"x")
    (tmp_path / f".t.safetensors{TEMP_MARK}2-dead").mkdir()
    (tmp_path / f".t.safetensors{TEMP_MARK}2-dead" / "f").write_bytes(b"x")
    (tmp_path / f".other{TEMP_MARK}3-alive").write_bytes(b"x")
    remove_stale_temps(path)
    assert _temps(tmp_path) == [f".other{TEMP_MARK}3-alive"]


def test_file_lock_times_out_and_keeps_the_lock_file(tmp_path):
    path = tmp_path / "t.safetensors"
    with file_lock(path):
        with pytest.raises(FileLockTimeout, match=f"{path} is locked by another process") as info:
            with file_lock(path, timeout=0):
                pass
    assert isinstance(info.value, filelock.Timeout) and isinstance(info.value, TimeoutError)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # crosses process boundaries
    assert os.listdir(tmp_path) == ["t.safetensors.lock"]
    with file_lock(path, timeout=0):
        pass


@pytest.mark.parametrize("timeout", [float("nan"), -1, -1e-9])
def test_file_lock_refuses_nan_and_negative_timeouts(tmp_path, timeout):
    with pytest.raises(ValueError, match=f"got {timeout!r}"):
        with file_lock(tmp_path / "t", timeout=timeout):
            pass
    assert os.listdir(tmp_path) == []


def _hold(parent, ready, done, kill):
    """In a forked child: make an owned folder, say so, then die by SIGKILL inside it or wait to be told to leave."""
    with owned_temp_dir(parent, ".work-") as path:
        (path / "data.bin").write_bytes(b"x")
        ready.send(str(path))
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        done.recv()


def _child(parent, kill):
    fork = multiprocessing.get_context("fork")
    (ready_out, ready_in), (done_out, done_in) = fork.Pipe(False), fork.Pipe(False)
    child = fork.Process(target=_hold, args=(parent, ready_in, done_out, kill), daemon=True)
    child.start()
    return child, ready_out.recv(), done_in


def test_owned_temp_dir_is_removed_on_return_and_on_error(tmp_path):
    with owned_temp_dir(tmp_path, ".work-") as path:
        assert path.parent == tmp_path and path.name.startswith(".work-") and (path / OWNER_LOCK).exists()
    assert not path.exists()
    with pytest.raises(RuntimeError, match="boom"), owned_temp_dir(tmp_path, ".work-") as path:
        (path / "a").write_text("a")
        raise RuntimeError("boom")
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_remove_orphaned_dirs_takes_killed_owners_old_folders_of_its_prefix_only(tmp_path):
    assert time.time() - 7 * 86400 < process_start_time() <= time.time()
    killed, dead, _ = _child(tmp_path, kill=True)
    killed.join(30)
    assert killed.exitcode == -signal.SIGKILL and os.path.isdir(dead)  # a hard kill leaves its folder
    alive, live, done = _child(tmp_path, kill=False)
    (tmp_path / ".other-1").mkdir()                      # not its kind
    (tmp_path / ".work-nolock").mkdir()                  # its kind, no lock file: a writer killed while starting
    assert remove_orphaned_dirs(tmp_path, ".work-") == []  # all younger than this process: left alone
    past = process_start_time() - 60
    for name in (dead, live, tmp_path / ".work-nolock", tmp_path / ".other-1"):
        os.utime(name, (past, past))
    removed = remove_orphaned_dirs(tmp_path, ".work-")
    assert sorted(map(str, removed)) == sorted([dead, str(tmp_path / ".work-nolock")])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other-1", os.path.basename(live)])
    assert (tmp_path / os.path.basename(live) / "data.bin").read_bytes() == b"x"  # a live owner's folder is kept
    done.send(True)
    alive.join(30)
    assert alive.exitcode == 0 and not os.path.exists(live)
