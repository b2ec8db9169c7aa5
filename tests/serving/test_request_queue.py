"""BatchingScorer (engine.deploy.request_queue): concurrent score / rank calls coalesced into batched scorer calls give
the direct calls' results, a bad request fails only its own caller (with the direct call's error), max_batch and
max_wait_ms hold, close() completes what is queued and refuses the rest, QueueConfig is validated."""
import threading
import time

import numpy as np
import pytest
import torch

from engine import (BAHEScorer, BatchingScorer, EncoderConfig, InputError, ModelConfig, QueueClosedError, QueueConfig,
                    ScorerConfig)
from tests.serving.test_scorer import BEHAVIORS, ITEMS, make_scorer, random_users

FRESH = [f"fresh item {j}" for j in range(6)]  # not in the item table: encoded on the fly, in the merged call too
TOLERANCE = 1e-6  # merged vs direct: float rounding of differently sized batches (the module docstring)


@pytest.fixture(scope="module")
def scorer(tiny_checkpoints, tmp_path_factory):
    return make_scorer(tiny_checkpoints["llama"], tmp_path_factory.mktemp("queue"))


def _in_threads(work, count):
    """work(k) in `count` threads started together -> (results, errors), each indexed by k."""
    results, errors = [None] * count, [None] * count
    barrier = threading.Barrier(count)

    def run(k):
        barrier.wait()
        try:
            results[k] = work(k)
        except Exception as err:  # noqa: BLE001 - checked by the caller
            errors[k] = err
    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller never got its answer"
    return results, errors


def _direct_error(call) -> InputError:
    with pytest.raises(InputError) as info:
        call()
    return info.value


def _score_requests(rng, count):
    requests = []
    for k in range(count):
        users = random_users(rng, int(rng.integers(1, 5))) if k != 5 else []  # an empty request among them
        items = [(ITEMS + FRESH)[i] for i in rng.integers(0, len(ITEMS) + len(FRESH), len(users))]
        counts = [{"click": len(u.get("click", [])) + 7} for u in users] if k % 3 == 0 else None
        requests.append((users, items, counts))
    return requests


def _rank_requests(rng, count):
    pool = ITEMS + FRESH  # distinct candidates: a well-defined order to compare
    return [(user, [pool[i] for i in rng.permutation(len(pool))[:int(rng.integers(1, len(pool) + 1))]],
             [None, 1, 3][k % 3], {"buy": len(user.get("buy", [])) + 2} if k % 2 else None)
            for k, user in enumerate(random_users(rng, count))]


# ----- merged == sequential -------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 3])
def test_merged_scores_equal_sequential_calls(scorer, workers):
    requests = _score_requests(np.random.default_rng(0), 12)
    direct = [scorer.score(users, items, history_counts=counts) for users, items, counts in requests]
    with BatchingScorer(scorer, QueueConfig(max_batch=12, max_wait_ms=1000, workers=workers)) as queue:
        merged, errors = _in_threads(lambda k: queue.score(requests[k][0], requests[k][1],
                                                           history_counts=requests[k][2]), 12)
        stats = queue.stats()
    assert errors == [None] * 12
    assert stats.requests == 12 and stats.largest > 1 and stats.calls < 12 and stats.fallbacks == 0
    for got, want in zip(merged, direct):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
    assert np.std(np.concatenate(direct)) > 1e-3  # the scores differ: equal results say something


def test_merged_ranks_equal_sequential_calls(scorer):
    requests = _rank_requests(np.random.default_rng(1), 10)
    direct = [scorer.rank(user, cands, top_k=top_k, history_counts=counts) for user, cands, top_k, counts in requests]
    with BatchingScorer(scorer, QueueConfig(max_batch=10, max_wait_ms=1000)) as queue:
        merged, errors = _in_threads(lambda k: queue.rank(requests[k][0], requests[k][1], top_k=requests[k][2],
                                                          history_counts=requests[k][3]), 10)
        stats = queue.stats()
    assert errors == [None] * 10 and stats.largest > 1 and stats.calls < 10
    for got, want in zip(merged, direct):
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=TOLERANCE)
        assert got.order.tolist() == want.order.tolist()  # top_k applied per request


def test_score_and_rank_requests_mix_in_one_gather(scorer):
    scores, ranks = _score_requests(np.random.default_rng(2), 4), _rank_requests(np.random.default_rng(3), 4)

    def work(k):
        if k < 4:
            return queue.score(scores[k][0], scores[k][1])
        user, cands, top_k, _ = ranks[k - 4]
        return queue.rank(user, cands, top_k=top_k)
    with BatchingScorer(scorer, QueueConfig(max_batch=8, max_wait_ms=1000)) as queue:
        results, errors = _in_threads(work, 8)
        assert queue.stats().calls == 2  # one score, one rank_many
    assert errors == [None] * 8
    for k in range(4):
        np.testing.assert_allclose(results[k], scorer.score(scores[k][0], scores[k][1]), rtol=0, atol=TOLERANCE)
        user, cands, top_k, _ = ranks[k]
        assert results[4 + k].order.tolist() == scorer.rank(user, cands, top_k=top_k).order.tolist()


def test_merged_side_features_reach_their_own_pairs(tiny_checkpoints, tmp_path):
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=("click", "buy", "search"), max_behaviors=6,
                                            categorical_features=("user_id", "gender"), categorical_buckets=64))
    torch.manual_seed(0)
    scorer = BAHEScorer.create(tiny_checkpoints["bert"], behavior_texts=BEHAVIORS, item_texts=ITEMS,
                               tables_dir=tmp_path, config=config, device="cpu", progress=False)
    with torch.no_grad():
        scorer.model.side.category_seen.fill_(True)  # as if training had seen every bucket
        scorer.model.side.category.weight.mul_(20)
    rng = np.random.default_rng(8)
    users = random_users(rng, 8)
    side = [None if k % 3 == 0 else {"user_id": k, "gender": "MF"[k % 2]} for k in range(8)]
    cands = ITEMS + FRESH[:2]

    def direct(k):
        if k % 2:
            return scorer.score([users[k]] * 2, ITEMS[:2], side_features=[side[k], None])
        return scorer.rank(users[k], cands, side_features=side[k]).scores

    def queued(k):
        if k % 2:
            return queue.score([users[k]] * 2, ITEMS[:2], side_features=[side[k], None])
        return queue.rank(users[k], cands, side_features=side[k]).scores
    with BatchingScorer(scorer, QueueConfig(max_batch=8, max_wait_ms=1000)) as queue:
        results, errors = _in_threads(queued, 8)
        assert queue.stats().calls == 2
    assert errors == [None] * 8
    for k in range(8):
        np.testing.assert_allclose(results[k], direct(k), rtol=0, atol=TOLERANCE)
    bare = scorer.score([users[1]] * 2, ITEMS[:2])
    assert abs(results[1][0] - bare[0]) > 1e-4 and results[1][1] == pytest.approx(bare[1], abs=TOLERANCE)


# ----- errors ---------------------------------------------------------------------------------------
def test_a_bad_request_fails_only_its_caller_with_the_direct_error(scorer):
    good = _score_requests(np.random.default_rng(4), 4)
    user, cands, _, _ = _rank_requests(np.random.default_rng(5), 1)[0]
    bad_calls = {  # merged into the batch, but malformed: each must fail alone, as the direct call does
        4: lambda s: s.score([{"click": BEHAVIORS[:2]}, {"buy": ["ok", 7]}], ["coffee", "big book"]),
        5: lambda s: s.rank(user, ["coffee", "   "]),
        6: lambda s: s.score([{"click": []}], ["coffee", "big book"]),  # lengths disagree: run alone
        7: lambda s: s.rank({"nope": []}, cands),
    }
    expected = {k: str(_direct_error(lambda call=call: call(scorer))) for k, call in bad_calls.items()}
    assert "users[1]['buy'] behavior 1" in expected[4] and "candidates[1]" in expected[5]

    def work(k):
        if k < 4:
            return queue.score(good[k][0], good[k][1])
        if k == 8:
            return queue.rank(user, cands)
        return bad_calls[k](queue)
    with BatchingScorer(scorer, QueueConfig(max_batch=9, max_wait_ms=1000)) as queue:
        results, errors = _in_threads(work, 9)
        assert queue.stats().fallbacks == 2  # the score batch and the rank batch each held a bad request
        again = queue.score(good[0][0], good[0][1])  # the worker lives on
    for k in range(4):
        assert errors[k] is None
        np.testing.assert_allclose(results[k], scorer.score(good[k][0], good[k][1]), rtol=0, atol=TOLERANCE)
    assert errors[8] is None and results[8].order.tolist() == scorer.rank(user, cands).order.tolist()
    for k, message in expected.items():
        assert type(errors[k]) is InputError and str(errors[k]) == message
    np.testing.assert_allclose(again, results[0], rtol=0, atol=TOLERANCE)


def test_a_bad_top_k_is_refused_in_the_callers_thread(scorer):
    with BatchingScorer(scorer) as queue:
        with pytest.raises(InputError, match=r"top_k must be None or an int >= 1, got 0"):
            queue.rank({"click": []}, ITEMS, top_k=0)
        assert queue.stats().requests == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_dead_worker_fails_waiting_callers_instead_of_hanging(scorer, monkeypatch, workers):
    queue = BatchingScorer(scorer, QueueConfig(max_batch=1, workers=workers))

    def fatal(*args, **kwargs):
        raise SystemExit("boom")  # not an Exception: gets past the worker's handlers
    monkeypatch.setattr(scorer, "score", fatal)
    with pytest.raises(QueueClosedError, match="worker stopped"):
        queue.score([{}], ["coffee"])
    for worker in queue._workers:
        worker.join(10)
    assert queue.closed and not any(w.is_alive() for w in queue._workers)
    with pytest.raises(QueueClosedError, match="closed"):
        queue.score([{}], ["coffee"])


# ----- max_batch, max_wait_ms ---------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_max_batch_bounds_every_scorer_call(scorer, monkeypatch, workers):
    sizes = []
    for name in ("score", "rank_many", "rank"):
        real = getattr(scorer, name)

        def counted(users, *args, real=real, **kwargs):
            sizes.append(len(users) if isinstance(users, list) else 1)
            return real(users, *args, **kwargs)
        monkeypatch.setattr(scorer, name, counted)
    user, cands, _, _ = _rank_requests(np.random.default_rng(6), 1)[0]

    def work(k):
        return queue.score([user], ["coffee"]) if k % 2 else queue.rank(user, cands)
    with BatchingScorer(scorer, QueueConfig(max_batch=3, max_wait_ms=200, workers=workers)) as queue:
        _, errors = _in_threads(work, 20)
        stats = queue.stats()
    assert errors == [None] * 20
    assert sum(sizes) == 20 and max(sizes) <= 3 and max(sizes) > 1 and stats.largest <= 3
    assert stats.calls == len(sizes) < 20


def test_workers_run_batches_side_by_side(scorer, monkeypatch):
    both_in, real = threading.Barrier(2, timeout=10), scorer.score

    def meet(*args, **kwargs):
        both_in.wait()  # passes only when two scorer calls are in at once
        return real(*args, **kwargs)
    monkeypatch.setattr(scorer, "score", meet)
    with BatchingScorer(scorer, QueueConfig(max_batch=1, max_wait_ms=0, workers=2)) as queue:
        results, errors = _in_threads(lambda k: queue.score([{"click": BEHAVIORS[k:k + 2]}], ["coffee"]), 2)
    assert errors == [None, None] and queue.stats().calls == 2
    np.testing.assert_allclose(results[1], real([{"click": BEHAVIORS[1:3]}], ["coffee"]), rtol=0, atol=TOLERANCE)


def test_a_lone_request_waits_max_wait_then_runs(scorer):
    users, items = [{"click": BEHAVIORS[:4]}], ["coffee"]
    scorer.score(users, items)
    start = time.perf_counter()
    scorer.score(users, items)
    compute = time.perf_counter() - start
    for wait_ms in (0, 150):
        with BatchingScorer(scorer, QueueConfig(max_batch=8, max_wait_ms=wait_ms)) as queue:
            start = time.perf_counter()
            queue.score(users, items)
            elapsed = time.perf_counter() - start
        assert elapsed >= wait_ms / 1e3 * 0.9  # nobody joined: it waited for them
        assert elapsed <= wait_ms / 1e3 + 5 * compute + 0.25, (wait_ms, elapsed, compute)  # then ran at once
    with BatchingScorer(scorer, QueueConfig(max_batch=1, max_wait_ms=10_000)) as queue:
        start = time.perf_counter()
        queue.score(users, items)  # a full batch of one: no wait
        assert time.perf_counter() - start < 5


# ----- closing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_close_completes_queued_requests_and_refuses_new_ones(scorer, monkeypatch, workers):
    release, real = threading.Event(), scorer.score

    def held(*args, **kwargs):
        release.wait(30)
        return real(*args, **kwargs)
    monkeypatch.setattr(scorer, "score", held)
    queue = BatchingScorer(scorer, QueueConfig(max_batch=2, max_wait_ms=0, workers=workers))
    requests = _score_requests(np.random.default_rng(7), 5)
    results = [None] * 5
    callers = [threading.Thread(target=lambda k=k: results.__setitem__(k, queue.score(*requests[k][:2])))
               for k in range(5)]
    for t in callers:
        t.start()
    deadline = time.monotonic() + 30
    while len(queue._pending) + queue.stats().requests < 5:  # all 5 in: the workers hold some, the rest queue
        assert time.monotonic() < deadline
        time.sleep(0.005)
    closer = threading.Thread(target=queue.close)
    closer.start()
    while not queue.closed:
        time.sleep(0.005)
    with pytest.raises(QueueClosedError, match="closed"):
        queue.score(*requests[0][:2])
    assert closer.is_alive()  # close waits for the queued requests
    release.set()
    closer.join(30)
    for t in callers:
        t.join(30)
    assert not closer.is_alive() and not any(w.is_alive() for w in queue._workers)
    for got, (users, items, _) in zip(results, requests):
        np.testing.assert_allclose(got, real(users, items), rtol=0, atol=TOLERANCE)
    queue.close()  # again: nothing happens
    with pytest.raises(QueueClosedError):
        queue.rank({}, ITEMS)


# ----- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"max_batch": 0}, r"max_batch must be >= 1, got 0"),
    ({"max_batch": 2.5}, r"max_batch must be int, got float 2.5"),
    ({"max_batch": True}, r"max_batch must be int, got bool"),
    ({"max_wait_ms": -1}, r"max_wait_ms must be >= 0.0, got -1.0"),
    ({"max_wait_ms": float("nan")}, r"max_wait_ms must be a finite float, got float nan"),
    ({"max_wait_ms": "5"}, r"max_wait_ms must be a finite float, got str '5'"),
    ({"workers": 0}, r"workers must be >= 1, got 0"),
])
def test_queue_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QueueConfig(**kwargs)


def test_queue_config_defaults_and_types(scorer):
    config = QueueConfig(max_batch=np.int64(4), max_wait_ms=3)
    assert (config.max_batch, config.max_wait_ms) == (4, 3.0) and type(config.max_batch) is int
    with pytest.raises(TypeError, match="wraps a BAHEScorer, got str"):
        BatchingScorer("scorer")
    with pytest.raises(TypeError, match="config must be a QueueConfig, got dict"):
        BatchingScorer(scorer, {"max_batch": 4})
    with BatchingScorer(scorer) as queue:
        assert queue.config == QueueConfig() and QueueConfig().max_batch >= 1
