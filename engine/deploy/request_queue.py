"""`BatchingScorer`: a small request queue in front of a `BAHEScorer` that coalesces the `score` / `rank` calls
of many threads into batched scorer calls.

Design. A wrapper, not a scorer option: the scorer stays a plain synchronous object (safe to call from many
threads, as before) and the queue owns its worker threads (`QueueConfig.workers`, default 1), so it has a life
cycle (`close`, or `with`) that a scorer folder does not. Callers block on a `concurrent.futures.Future`; a worker

1. waits for a first request, then gathers more until `QueueConfig.max_batch` requests (calls, whatever their
   pairs or candidates: a request is never split) or until `max_wait_ms` after the first one was queued
   (requests that queued while the worker was busy have waited already: they go at once);
2. runs ONE scorer call per kind: the score requests' pairs concatenated into one `score`, the rank requests'
   users into one `rank_many` (top_k applied per request afterwards); a kind with a single request, or a
   request whose arguments cannot be concatenated (not lists, lengths that disagree), runs as the direct call;
3. hands each caller its slice (its own array, not a view shared with the others).

With one worker the scorer runs one batch at a time: on a GPU that a single request leaves idle that is the
point; on the CPU the upper layers' cost is linear in the behaviors, so merging saves only per-call overhead,
while direct calls from C threads overlap one call's host work with another's compute (bench/RESULTS.md,
`python -m bench.queue`). More workers gather and run batches side by side.

Errors. A merged call that raises is rerun request by request as the direct calls (`score`, `rank`): each caller
gets exactly its direct call's result or exception (same type, same message: `InputError` indices are the
caller's own, not positions in the merged batch), a bad request never fails the others, and the worker carries
on. Validating each request up front would have to repeat the scorer's whole parse (and its error wording);
the rerun costs one extra call of the good requests only when some request is bad. `top_k` is checked in the
caller's thread (the merged `rank_many` runs without it).

Results equal sequential calls to float rounding, not bit for bit: a merged batch gives the upper layers (and
the on-the-fly encoder, for unknown texts) other GEMM row counts and another padded length, and the scorer's
rounding depends on those (its own batch-independence bound is 1e-5, tests/serving/test_scorer.py). Measured on the
CPU, on one thread and on two, with the tiny test models and with the trained demo scorer (8 users x 100
candidates): merged and direct probabilities differ by up to ~1.2e-7 (a float32 ulp near 0.5), rank orders
equal; tests/serving/test_request_queue.py checks 1e-6 and equal orders (distinct candidates: a near-tie could still
swap).

Closing: `close()` refuses new calls (`QueueClosedError`), lets every request already queued complete, and
joins the workers; calls after it raise `QueueClosedError`. If a worker ever dies (only a BaseException such
as SystemExit inside a scorer call gets past its handlers), the queue closes and every waiting caller gets
`QueueClosedError` rather than hanging."""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from engine.config import QueueConfig
from engine.serving.ranking import Ranking, check_top_k, ranking
from engine.deploy.handle import ScorerHandle
from engine.serving.scorer import BAHEScorer


class QueueClosedError(RuntimeError):
    """A call to a `BatchingScorer` after `close()` (or after its worker died)."""


@dataclass(frozen=True)
class QueueStats:
    """requests: calls taken by the workers; calls: scorer calls made for them (merged or direct, fallback
    reruns included); fallbacks: merged calls that raised and were rerun request by request; largest: the
    most requests in one merged call."""
    requests: int = 0
    calls: int = 0
    fallbacks: int = 0
    largest: int = 0


@dataclass
class _Request:
    kind: str                 # "score" | "rank"
    args: tuple               # score: (users, items, history_counts, side_features); rank: (user, candidates,
                              # top_k, history_counts, side_features)
    mergeable: bool
    queued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


def _per_pair(values: object, count: int) -> bool:
    return values is None or (isinstance(values, (list, tuple)) and len(values) == count)


class BatchingScorer:
    """`score` and `rank` of `scorer`, coalesced across threads into batched calls (see the module docstring).

        with BatchingScorer(scorer, QueueConfig(max_batch=32, max_wait_ms=2)) as queue:
            p = queue.score(users, items)          # from any number of threads
            r = queue.rank(user, candidates, top_k=10)
    """

    def __init__(self, scorer: BAHEScorer | ScorerHandle, config: QueueConfig | None = None) -> None:
        if not isinstance(scorer, (BAHEScorer, ScorerHandle)):
            raise TypeError(f"BatchingScorer wraps a BAHEScorer, got {type(scorer).__name__} (a ScorerHandle of "
                            "scorer versions works too)")
        self.scorer, self.config = scorer, config or QueueConfig()
        if not isinstance(self.config, QueueConfig):
            raise TypeError(f"config must be a QueueConfig, got {type(self.config).__name__}")
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._stats = QueueStats()
        self._workers = [threading.Thread(target=self._run, name=f"bahe-request-queue-{w}", daemon=True)
                         for w in range(self.config.workers)]
        for worker in self._workers:
            worker.start()

    # ----- the callers' side --------------------------------------------------------------
    def score(self, users: Sequence[dict[str, Sequence[str]]], items: Sequence[str], *,
              history_counts: Sequence[dict[str, int] | None] | None = None,
              side_features: Sequence[dict | None] | None = None) -> np.ndarray:
        """`BAHEScorer.score`, run in a batch with other threads' requests: (B,) float32 probabilities."""
        count = len(users) if isinstance(users, (list, tuple)) else -1
        mergeable = (count >= 0 and isinstance(items, (list, tuple)) and len(items) == count
                     and _per_pair(history_counts, count) and _per_pair(side_features, count))
        return self._submit(_Request("score", (users, items, history_counts, side_features), mergeable))

    def rank(self, user: dict[str, Sequence[str]], candidates: Sequence[str], *, top_k: int | None = None,
             history_counts: dict[str, int] | None = None, side_features: dict | None = None) -> Ranking:
        """`BAHEScorer.rank`, run in one `rank_many` with other threads' rank requests."""
        check_top_k(top_k)
        mergeable = (isinstance(user, dict) and isinstance(candidates, (list, tuple))
                     and (history_counts is None or isinstance(history_counts, dict))
                     and (side_features is None or isinstance(side_features, dict)))
        return self._submit(_Request("rank", (user, candidates, top_k, history_counts, side_features), mergeable))

    def stats(self) -> QueueStats:
        """What the workers have done so far (requests taken, scorer calls made, fallbacks, largest merge)."""
        with self._cond:
            return self._stats

    def close(self, timeout: float | None = None) -> None:
        """Refuse new calls, complete the queued ones, stop the workers (waiting at most `timeout` seconds for
        each). Calling it again does nothing."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> BatchingScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, request: _Request):
        with self._cond:
            if self._closed:
                raise QueueClosedError("this BatchingScorer is closed: call the scorer directly or open a new queue")
            self._pending.append(request)
            self._cond.notify_all()
        return request.future.result()

    # ----- the worker ---------------------------------------------------------------------
    def _run(self) -> None:
        batch: list[_Request] = []
        try:
            while batch := self._gather():
                self._execute(batch)
        finally:  # normally the queue is closed and drained here; if a worker died, nobody is left waiting
            with self._cond:
                self._closed = True
                stranded = [*batch, *self._pending]
                self._pending.clear()
            for request in stranded:
                if not request.future.done():
                    request.future.set_exception(QueueClosedError("the BatchingScorer's worker stopped before "
                                                                  "this request ran"))

    def _gather(self) -> list[_Request]:
        """Up to max_batch requests: the first one queued, and those queued by max_wait_ms after it (an empty
        list once the queue is closed and drained). Workers gather under one lock; one that finds its requests
        taken by another starts over."""
        max_batch, wait = self.config.max_batch, self.config.max_wait_ms / 1e3
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return []
                while 0 < len(self._pending) < max_batch and not self._closed:
                    left = self._pending[0].queued + wait - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._pending:
                    return [self._pending.popleft() for _ in range(min(max_batch, len(self._pending)))]

    def _execute(self, batch: list[_Request]) -> None:
        self._count(requests=len(batch))
        for kind in ("score", "rank"):
            merged = [r for r in batch if r.kind == kind and r.mergeable]
            if len(merged) > 1:
                self._merged(kind, merged)
            else:
                for request in merged:
                    self._direct(request)
        for request in batch:
            if not request.mergeable:
                self._direct(request)

    def _merged(self, kind: str, requests: list[_Request]) -> None:
        try:
            self._count(calls=1, largest=len(requests))
            results = self._score_many(requests) if kind == "score" else self._rank_many(requests)
        except Exception:  # noqa: BLE001 - some request is bad (or the batch too big): each runs as its direct call
            self._count(fallbacks=1)
            for request in requests:
                self._direct(request)
            return
        for request, result in zip(requests, results):
            request.future.set_result(result)

    def _direct(self, request: _Request) -> None:
        self._count(calls=1)
        try:
            if request.kind == "score":
                users, items, counts, side = request.args
                result = self.scorer.score(users, items, history_counts=counts, side_features=side)
            else:
                user, candidates, top_k, counts, side = request.args
                result = self.scorer.rank(user, candidates, top_k=top_k, history_counts=counts, side_features=side)
        except Exception as err:  # noqa: BLE001 - the caller's own error, raised in its thread
            request.future.set_exception(err)
        else:
            request.future.set_result(result)

    def _score_many(self, requests: list[_Request]) -> list[np.ndarray]:
        users = [u for r in requests for u in r.args[0]]
        items = [i for r in requests for i in r.args[1]]
        counts, side = (self._concat([r.args[0] for r in requests], [r.args[k] for r in requests]) for k in (2, 3))
        probs = self.scorer.score(users, items, history_counts=counts, side_features=side)
        bounds = np.cumsum([0] + [len(r.args[0]) for r in requests])
        return [probs[lo:hi].copy() for lo, hi in zip(bounds[:-1], bounds[1:])]

    def _rank_many(self, requests: list[_Request]) -> list[Ranking]:
        counts, side = ([r.args[k] for r in requests] for k in (3, 4))
        many = self.scorer.rank_many([r.args[0] for r in requests], [r.args[1] for r in requests],
                                     history_counts=None if all(c is None for c in counts) else counts,
                                     side_features=None if all(s is None for s in side) else side)
        return [ranking(result.scores.copy(), r.args[2]) for r, result in zip(requests, many)]

    @staticmethod
    def _concat(users: list[Sequence], values: list[Sequence | None]) -> list | None:
        """Per-pair arguments of several requests as one list (None entries where a request passed None)."""
        if all(v is None for v in values):
            return None
        return [x for u, v in zip(users, values) for x in (v if v is not None else [None] * len(u))]

    def _count(self, requests: int = 0, calls: int = 0, fallbacks: int = 0, largest: int = 0) -> None:
        with self._cond:
            s = self._stats
            self._stats = QueueStats(s.requests + requests, s.calls + calls, s.fallbacks + fallbacks,
                                     max(s.largest, largest))
