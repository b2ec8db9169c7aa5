"""`ScorerHandle`: serve the current version of a version root (engine.deploy.versions) and swap in a newly
published one between requests, in a running process.

Design. The handle holds the scorer of one version at a time, as an immutable (version name, BAHEScorer) pair. A
request takes the pair once, under a lock, and runs entirely on that scorer: no request is ever scored by two
versions. `reload()` loads the version the pointer names beside the old one (the old keeps serving while the new
loads, which takes as long as `BAHEScorer.from_pretrained`), then replaces the pair in one assignment. Requests
that started on the old scorer finish on it; the handle drops its reference, so the old scorer's memory (weights,
placed tables, caches) is released when its last in-flight request returns (`retired()` names the old versions
still referenced). A load that fails leaves the old version serving and raises to the caller of `reload`.

Per-user state never crosses versions. `user_state` and `extend_user` return a `VersionedState`: the version that
computed it, its UserState and the user's whole sequences (references to the caller's texts). Used after a swap,
it is rebuilt on the serving version from the whole user, so the result is that version's direct result; a bare
UserState (whose version the handle cannot know) is refused. The pooled-user-vector LRU belongs to each scorer
object, so a new version starts with an empty one.

`BatchingScorer(handle)` works on top: each merged batch is one handle call, hence one version."""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import ScoringConfig
from engine.serving.incremental import UserState
from engine.serving.inputs import InputError
from engine.serving.ranking import Ranking
from engine.serving.scorer import BAHEScorer
from engine.deploy.versions import ScorerVersions, VersionError

log = logging.getLogger(__name__)
RELOAD_TRIES = 3  # a version pruned between reading the pointer and loading it: read the pointer again


@dataclass(frozen=True)
class VersionedState:
    """A user's incremental state from a `ScorerHandle`: `version` computed `state`; `user` holds the user's whole
    sequences (name -> texts, oldest first) and `history_counts` its stated totals, to rebuild it on another one."""
    version: str
    state: UserState
    user: dict[str, tuple[str, ...]]
    history_counts: dict[str, int] | None = None

    @property
    def lengths(self) -> dict[str, int]:
        return self.state.lengths


class ScorerHandle:
    """The serving scorer of the version root `root`, swapped in place by `reload()` (see the module docstring).
    `device`, `kernels`, `dtype`, `scoring`: as `BAHEScorer.from_pretrained`, for every version loaded."""

    def __init__(self, root: str | Path, *, device: str = "auto", kernels: str = "auto", dtype: str = "float32",
                 scoring: ScoringConfig | None = None) -> None:
        self.versions = ScorerVersions(root)
        self._options = {"device": device, "kernels": kernels, "dtype": dtype, "scoring": scoring}
        self._lock, self._reload_lock = threading.Lock(), threading.Lock()
        self._retired: list[tuple[str, weakref.ref]] = []
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        name, scorer = self._load_current()
        self._live = (name, scorer)

    # ----- versions ------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """The name of the version serving now (v000003)."""
        with self._lock:
            return self._live[0]

    @contextlib.contextmanager
    def using(self) -> Iterator[tuple[str, BAHEScorer]]:
        """(version, scorer) for several calls that must see one version; a swap meanwhile does not affect them."""
        with self._lock:
            live = self._live
        yield live

    def _load_current(self) -> tuple[str, BAHEScorer]:
        for attempt in range(1, RELOAD_TRIES + 1):
            version = self.versions.current()
            try:
                return version.name, BAHEScorer.from_pretrained(version.path, **self._options)
            except (OSError, ValueError):
                if attempt == RELOAD_TRIES or self.versions.current().name == version.name:
                    raise
                log.info("version %s went away while loading; loading the current one", version.name)
        raise VersionError("unreachable")

    def reload(self) -> bool:
        """Load the version the root's pointer names now, if it is not the one serving, and switch to it between
        requests; -> whether it switched. One reload at a time; the old version serves until the switch."""
        with self._reload_lock:
            if self.versions.current().name == self.version:
                return False
            name, scorer = self._load_current()
            with self._lock:
                old = self._live
                self._live = (name, scorer)
                self._retired = [(n, ref) for n, ref in self._retired if ref() is not None]
                self._retired.append((old[0], weakref.ref(old[1])))
            log.info("serving version %s (was %s)", name, old[0])
            return True

    def retired(self) -> list[str]:
        """Versions swapped out whose scorer is still referenced (in-flight requests, a caller's `using` block)."""
        with self._lock:
            return [name for name, ref in self._retired if ref() is not None]

    def start_polling(self, seconds: float) -> None:
        """Call `reload` every `seconds` in a daemon thread until `close` (a failed reload is logged, the serving
        version stays)."""
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        if self._poller is not None:
            raise RuntimeError("this handle polls already")

        def poll() -> None:
            while not self._stop.wait(seconds):
                try:
                    self.reload()
                except Exception:  # noqa: BLE001 - keep serving the old version; say why
                    log.exception("reloading %s failed; still serving %s", self.versions.root, self.version)
        self._poller = threading.Thread(target=poll, name="bahe-scorer-reload", daemon=True)
        self._poller.start()

    def close(self) -> None:
        """Stop polling (the handle still serves)."""
        self._stop.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join()

    # ----- requests: each on one version ------------------------------------------------------
    def score(self, users: Sequence[dict[str, Sequence[str]]], items: Sequence[str], **kwargs) -> np.ndarray:
        """`BAHEScorer.score` on the serving version."""
        with self.using() as (_, scorer):
            return scorer.score(users, items, **kwargs)

    def rank(self, user: dict[str, Sequence[str]] | VersionedState, candidates: Sequence[str], **kwargs) -> Ranking:
        """`BAHEScorer.rank` on the serving version; a VersionedState from another version ranks as its whole user."""
        with self.using() as (version, scorer):
            if isinstance(user, UserState):
                raise InputError("a bare UserState cannot be checked against the serving version: pass the "
                                 "VersionedState that handle.user_state / extend_user returned")
            if not isinstance(user, VersionedState):
                return scorer.rank(user, candidates, **kwargs)
            if user.version == version:
                return scorer.rank(user.state, candidates, **kwargs)
            return scorer.rank(dict(user.user), candidates, history_counts=user.history_counts, **kwargs)

    def rank_many(self, users: Sequence[dict[str, Sequence[str]]], candidates: Sequence[Sequence[str]],
                  **kwargs) -> list[Ranking]:
        """`BAHEScorer.rank_many` on the serving version."""
        with self.using() as (_, scorer):
            return scorer.rank_many(users, candidates, **kwargs)

    def user_state(self, user: dict[str, Sequence[str]], *,
                   history_counts: dict[str, int] | None = None) -> VersionedState:
        """`BAHEScorer.user_state` on the serving version, tagged with it."""
        with self.using() as (version, scorer):
            state = scorer.user_state(user, history_counts=history_counts)
        whole = {name: tuple(user.get(name, ())) for name in scorer.config.model.sequence_names}
        return VersionedState(version, state, whole, None if history_counts is None else dict(history_counts))

    def extend_user(self, state: VersionedState, behaviors: dict[str, Sequence[str]]) -> VersionedState:
        """`BAHEScorer.extend_user` on the serving version; a state from another version is rebuilt from its whole
        user plus `behaviors` on the serving one."""
        if not isinstance(state, VersionedState):
            raise InputError(f"expected a VersionedState (from handle.user_state), got {type(state).__name__}")
        with self.using() as (version, scorer):
            if state.version == version:
                extended = scorer.extend_user(state.state, behaviors)
                user = {name: seq + tuple(behaviors.get(name, ())) for name, seq in state.user.items()}
            else:
                unknown = sorted(set(behaviors) - set(state.user)) if isinstance(behaviors, dict) else None
                if unknown is None or unknown:
                    raise InputError(f"behaviors must be a dict of sequence names {sorted(state.user)} -> texts, "
                                     f"got {unknown if unknown else type(behaviors).__name__}")
                user = {name: seq + tuple(behaviors.get(name, ())) for name, seq in state.user.items()}
                extended = None
        counts = state.history_counts
        if counts is not None:
            counts = {name: count + len(behaviors.get(name, ())) for name, count in counts.items()}
        if extended is None:  # rebuilt on the version serving now (checks `behaviors` as user_state does)
            return self.user_state(user, history_counts=counts)
        return VersionedState(version, extended, user, counts)
