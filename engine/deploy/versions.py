"""Scorer versions under one root, published atomically, with rollback.

Layout of a version root:
  ROOT/current.json          the pointer: {"format": "bahe-versions", "current": "v000003",
                             "history": ["v000001", "v000002", "v000003"], "serial": 3}
  ROOT/versions/v000003/     a scorer folder (`BAHEScorer.save_pretrained`) plus version.json (what published it)
  ROOT/versions/.next.tmp-*  a version being staged: never read, removed by the next publisher if left behind
  ROOT/publish.lock          held by the one publisher (or rollback) at a time

Publishing (`stage` then `Staged.publish`): the new version is written whole into a temporary folder beside
the versions, fsynced file by file, renamed to its final name `vNNNNNN` (never reused: `serial` only grows),
and only then does the pointer switch - one `atomic_write` of current.json (temp file, fsync, rename, fsync of
the root). A crash before that rename leaves the old pointer, so CURRENT keeps serving; the temporary folder,
or a complete folder the pointer never named, is deleted by the next `stage` under the lock. Readers open only
the versions the pointer names, so a half-written or unpublished version is never visible.

Why a JSON pointer, not a `current` symlink replaced by rename: (1) the history that rollback needs switches in
the same rename as the pointer (a symlink would need a second file, updated apart from it); (2) a reader reads
the version's name once and opens `versions/<name>`, a folder never written again, whereas a load through
ROOT/current/ resolves the link at every file it opens, so a switch in the middle of a load could mix the
scorer.json of one version with the weights of another.

Retention: the pointer's history keeps the last `keep` versions that were current (rollback walks it back);
folders it no longer names are deleted after each publish and by the next `stage` after a rollback."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from weights import bounded_json
from weights.atomic import (atomic_write, file_lock, fsync_dir, fsync_tree, remove_path, remove_stale_temps,
                            temp_sibling)

POINTER_FILE, VERSIONS_DIR, VERSION_FILE, LOCK_NAME = "current.json", "versions", "version.json", "publish"
STAGING_NAME = "next"
NAME = re.compile(r"v(\d{6,})")
MAX_POINTER_BYTES = 1 << 20


class VersionError(ValueError):
    """A version root that is missing, damaged, or cannot do what was asked (no version to roll back to)."""


@dataclass(frozen=True)
class Version:
    """One published scorer version: its name (v000003), folder and the note it was published with."""
    name: str
    path: Path
    note: dict


def version_name(serial: int) -> str:
    return f"v{serial:06d}"


class ScorerVersions:
    """The versions of a scorer under `root` (see the module docstring); `keep` >= 1: versions kept for rollback."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (versions kept for rollback), got {keep!r}")
        self.root, self.keep = Path(root), keep

    @staticmethod
    def is_root(path: str | Path) -> bool:
        """Whether `path` is a version root (it holds current.json)."""
        return (Path(path) / POINTER_FILE).is_file()

    @classmethod
    def create(cls, root: str | Path, scorer_folder: str | Path, *, keep: int = 3,
               note: dict | None = None) -> ScorerVersions:
        """A new version root whose first version is a copy of the scorer folder `scorer_folder`."""
        root, source = Path(root), Path(scorer_folder)
        if cls.is_root(root):
            raise VersionError(f"{root} is a version root already (it has {POINTER_FILE})")
        if not (source / "scorer.json").is_file():
            raise VersionError(f"{source} is not a scorer folder: scorer.json is missing")
        versions = cls(root, keep)
        with versions.stage() as staged:
            shutil.rmtree(staged.path)
            shutil.copytree(source, staged.path)
            staged.publish({"source": str(source.resolve()), **(note or {})})
        return versions

    # ----- reading ------------------------------------------------------------------------
    def pointer(self) -> dict:
        """current.json, checked: a current version named in a history of version names, and a serial."""
        path = self.root / POINTER_FILE
        if not path.is_file():
            raise VersionError(f"{self.root} is not a version root: {POINTER_FILE} is missing "
                               f"(make one with `bahe update --out` or ScorerVersions.create)")
        try:
            data = bounded_json.loads(path.read_bytes(), max_bytes=MAX_POINTER_BYTES)
        except (OSError, ValueError) as err:
            raise VersionError(f"{path}: unreadable ({err})") from None
        history = data.get("history") if isinstance(data, dict) else None
        if (not isinstance(data, dict) or data.get("format") != "bahe-versions" or not isinstance(history, list)
                or not history or not all(isinstance(h, str) and NAME.fullmatch(h) for h in history)
                or data.get("current") != history[-1] or isinstance(data.get("serial"), bool)
                or not isinstance(data.get("serial"), int)):
            raise VersionError(f"{path}: not a version pointer (expected format 'bahe-versions', a history of "
                               f"version names ending with 'current', an integer serial)")
        return data

    def _version(self, name: str) -> Version:
        path = self.root / VERSIONS_DIR / name
        try:
            note = json.loads((path / VERSION_FILE).read_text())
        except (OSError, ValueError) as err:
            raise VersionError(f"version {name} of {self.root} is missing or damaged ({err})") from None
        return Version(name, path, note)

    def current(self) -> Version:
        """The version serving now."""
        return self._version(self.pointer()["current"])

    def history(self) -> list[Version]:
        """The versions kept for rollback, oldest first; the last is the current one."""
        return [self._version(name) for name in self.pointer()["history"]]

    # ----- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, lock_timeout: float | None = None) -> Iterator[Staged]:
        """Hold the publish lock and yield a Staged version: write a scorer folder into `staged.path`, then call
        `staged.publish(note)`; leaving the block without publishing (or by an exception) deletes it."""
        (self.root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / LOCK_NAME, lock_timeout):
            floor = self._next_serial()  # before the clean: an unpublished folder's name is not reused either
            self._clean()
            staged = Staged(self, temp_sibling(self.root / VERSIONS_DIR / STAGING_NAME), floor)
            staged.path.mkdir()
            try:
                yield staged
            finally:
                if not staged.published:
                    remove_path(staged.path)

    def rollback(self, lock_timeout: float | None = None) -> Version:
        """Make the previous version current again (one atomic switch of the pointer); -> that version.
        VersionError when the history holds no earlier version."""
        with file_lock(self.root / LOCK_NAME, lock_timeout):
            pointer = self.pointer()
            history = pointer["history"]
            if len(history) < 2:
                raise VersionError(f"{self.root}: no earlier version to roll back to (history {history}; "
                                   f"versions are kept for rollback: keep={self.keep})")
            previous = self._version(history[-2])
            self._write_pointer(history[:-1], pointer["serial"])
        return previous

    def _write_pointer(self, history: list[str], serial: int) -> None:
        data = {"format": "bahe-versions", "current": history[-1], "history": history, "serial": serial}
        with atomic_write(self.root / POINTER_FILE) as handle:
            handle.write(json.dumps(data, indent=2).encode())

    def _clean(self) -> None:
        """Under the lock: delete killed stages' temporary folders and every version folder the pointer does not
        name (never published, rolled back from, or past `keep`)."""
        folder = self.root / VERSIONS_DIR
        remove_stale_temps(folder / STAGING_NAME)
        named = set(self.pointer()["history"]) if self.is_root(self.root) else set()
        for path in folder.iterdir():
            if NAME.fullmatch(path.name) and path.name not in named:
                remove_path(path)

    def _next_serial(self) -> int:
        on_disk = [int(m.group(1)) for p in (self.root / VERSIONS_DIR).iterdir() if (m := NAME.fullmatch(p.name))]
        serial = self.pointer()["serial"] if self.is_root(self.root) else 0
        return max([serial, *on_disk]) + 1


class Staged:
    """A version being written (`ScorerVersions.stage`): `path` is a temporary folder beside the versions."""

    def __init__(self, versions: ScorerVersions, path: Path, floor: int = 1) -> None:
        self.versions, self.path, self.floor, self.published = versions, path, floor, False

    def publish(self, note: dict | None = None) -> Version:
        """Make the staged folder the current version: version.json written, every file fsynced, the folder
        renamed to its version name, then the pointer switched in one rename. -> the new Version."""
        versions = self.versions
        if self.published:
            raise VersionError("this staged version is published already")
        if not (self.path / "scorer.json").is_file():
            raise VersionError(f"nothing to publish: {self.path} holds no scorer.json (save the scorer there first)")
        note = {"published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(note or {})}
        with atomic_write(self.path / VERSION_FILE) as handle:
            handle.write(json.dumps(note, indent=2, default=float).encode())
        serial = max(self.floor, versions._next_serial())
        name = version_name(serial)
        final = versions.root / VERSIONS_DIR / name
        fsync_tree(self.path)
        os.rename(self.path, final)
        fsync_dir(final.parent)
        self.published = True
        history = versions.pointer()["history"] if versions.is_root(versions.root) else []
        kept = (history + [name])[-versions.keep:]
        versions._write_pointer(kept, serial)  # the switch: CURRENT serves until this rename
        for path in final.parent.iterdir():
            if NAME.fullmatch(path.name) and path.name not in kept:
                remove_path(path)
        return Version(name, final, note)


def rollback_lines(root: str | Path) -> str:
    """`bahe rollback ROOT`: make the previous version current; the line saying which serves now (VersionError,
    OSError when there is none to go back to or the root is unreadable)."""
    versions = ScorerVersions(root)
    was = versions.current().name
    return f"{root}: now serving {versions.rollback().name} (was {was})"


def history_lines(root: str | Path) -> list[str]:
    """`bahe versions ROOT`: one line per kept version, oldest first - name, publish time, the gate's AUCs."""
    history = ScorerVersions(root).history()
    lines = []
    for version in history:
        gate = version.note.get("gate", {})
        figures = f" gate AUC {gate['current']['auc']:.4f} -> {gate['next']['auc']:.4f}" if gate else ""
        lines.append(f"{version.name}{' (current)' if version is history[-1] else ''}  "
                     f"{version.note.get('published_at', '')}{figures}")
    return lines
