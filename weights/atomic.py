"""Crash-safe replacement of files and folders, and an inter-process lock for paths the engine owns.

A file or folder is written under a temporary sibling (`.<name>.tmp-<pid>-<random>`, same folder so
the rename is atomic), fsynced and renamed into place, then the parent folder is fsynced. A crash
leaves the old version (or none) under the final name, plus at most a temporary sibling, which
`remove_stale_temps` deletes while the caller holds the path's `file_lock`."""
from __future__ import annotations

import contextlib
import logging
import numbers
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import filelock

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"
OWNER_LOCK = ".owner.lock"  # in an `owned_temp_dir`: locked by the process that made it, for as long as it lives
_IMPORTED = time.time()


class FileLockTimeout(filelock.Timeout):
    """Another process held `<path>.lock` for longer than the caller agreed to wait."""

    def __init__(self, lock_file: str, path: str = "", waited: float | None = None) -> None:
        super().__init__(lock_file)
        self.path, self.waited = path or lock_file, waited

    def __str__(self) -> str:
        return f"{self.path} is locked by another process (waited {self.waited} s)"


def temp_sibling(path: Path) -> Path:
    """A unique temporary name in the same folder (same file system, so rename is atomic)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        else:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for sub in reversed(folders):
        fsync_dir(sub)


def remove_path(path: Path) -> None:
    """Delete a file, a link or a whole folder; a path already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Write `path` through a temporary sibling: flush, fsync, rename, fsync the folder.
    A crash at any point leaves the old file (or none) under `path`, never a partial one."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Build the folder `path` in a temporary sibling, which is yielded. On a clean exit every file
    and folder in it is fsynced, whatever is under `path` is moved aside and deleted, the sibling is
    renamed to `path` and the parent folder fsynced; on an error the sibling is deleted. A crash
    leaves the old folder (or none) under `path`, never a half-written one.

    Raises OSError (errno EEXIST or ENOTEMPTY) when another writer, not held off by `file_lock`,
    renamed its folder into `path` between the move-aside and the rename."""
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            old = temp_sibling(path)
            os.rename(path, old)
            remove_path(old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        remove_path(tmp)


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy the file `src` to `dst` through `atomic_write` (nothing to do when they are one file)."""
    if src.resolve() == dst.resolve():
        return
    with atomic_write(dst) as handle, open(src, "rb") as source:
        shutil.copyfileobj(source, handle, 16 << 20)


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary siblings of `path` (files or folders) left by killed writers; call only
    while holding `file_lock` on the lock that serializes writers of `path`."""
    for stale in path.parent.glob(f".{path.name}{TEMP_MARK}*"):
        log.info("removing leftover temporary %s", stale)
        remove_path(stale)


def process_start_time() -> float:
    """When this process started (Unix time; from /proc on Linux, else when this module was imported)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as stat:
            boot = next(float(line.split()[1]) for line in stat if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


@contextlib.contextmanager
def owned_temp_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A new folder `parent/<prefix><random>` for this process's scratch files, deleted when the block exits
    (return or exception). While the block runs the process holds a lock on the folder's OWNER_LOCK file, which
    the kernel drops if the process dies, so `remove_orphaned_dirs` can tell a live folder from a killed one's."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    lock = filelock.FileLock(path / OWNER_LOCK, timeout=0, preserve_lock_file=True)
    try:
        lock.acquire()
        yield path
    finally:
        remove_path(path)
        if lock.is_locked:
            lock.release()


def remove_orphaned_dirs(parent: str | Path, prefix: str, before: float | None = None) -> list[Path]:
    """Delete the folders `parent/<prefix>*` (`owned_temp_dir`'s) whose process has ended - no process holds
    their lock - and that were last modified before `before` (default: this process's start), so a folder
    another process is still setting up is never touched. -> the folders deleted."""
    before = process_start_time() if before is None else before
    removed = []
    for path in sorted(Path(parent).glob(f"{prefix}*")):
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_mtime >= before:
                continue
        except FileNotFoundError:  # removed meanwhile by another cleaner
            continue
        lock = filelock.FileLock(path / OWNER_LOCK, timeout=0, preserve_lock_file=True)
        try:
            lock.acquire()
        except (filelock.Timeout, FileNotFoundError):  # its process is alive, or another cleaner removed it
            continue
        try:
            log.info("removing %s, left by a process that ended", path)
            remove_path(path)
            removed.append(path)
        finally:
            lock.release()
    return removed


def check_lock_timeout(timeout: object) -> None:
    """ValueError naming `lock_timeout` unless it is None (wait forever) or a number of seconds >= 0."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or not timeout >= 0):  # NaN fails every comparison
        raise ValueError(f"lock_timeout must be a number of seconds >= 0 or None (wait forever), got {timeout!r}")


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Exclusive lock on `<path>.lock` (flock, through `filelock.FileLock`). Waits up to `timeout`
    seconds (None: forever), then raises FileLockTimeout naming `path`. The lock file is kept on
    release; the kernel drops the lock of a holder that dies."""
    check_lock_timeout(timeout)
    lock_path = f"{path}.lock"
    # preserve_lock_file: unlinking on release would let a waiter lock an inode no later writer sees;
    # it also keeps filelock on flock (no fallback to a soft lock that a killed holder leaves behind).
    lock = filelock.FileLock(lock_path, timeout=-1 if timeout is None else timeout, preserve_lock_file=True)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FileLockTimeout(lock_path, str(path), timeout) from None
    try:
        yield
    finally:
        lock.release()
