"""Crash-safe file replacement and an inter-process lock for files the engine owns."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_MARK = ".tmp-"


class FileLockTimeout(TimeoutError):
    """Another process holds the lock for longer than the caller agreed to wait."""


def temp_sibling(path: Path) -> Path:
    """A unique temporary name in the same folder (same file system, so rename is atomic)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy the file `src` to `dst` through `atomic_write` (nothing to do when they are one file)."""
    if src.resolve() == dst.resolve():
        return
    with atomic_write(dst) as handle, open(src, "rb") as source:
        shutil.copyfileobj(source, handle, 16 << 20)


def remove_stale_temps(path: Path) -> int:
    """Delete temporary siblings of `path` left by killed writers; call only while holding its lock."""
    removed = 0
    for stale in path.parent.glob(f".{path.name}{TEMP_MARK}*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float | None = None, poll: float = 0.05) -> Iterator[None]:
    """Exclusive advisory lock on `<path>.lock` (flock). Waits up to `timeout` seconds
    (None: forever), then raises FileLockTimeout naming the file."""
    lock_path = Path(f"{path}.lock")
    deadline = None if timeout is None else time.monotonic() + timeout
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise FileLockTimeout(f"{path} is locked by another process (waited {timeout} s)") from None
                time.sleep(poll)
        yield
    finally:
        os.close(fd)
