"""ScorerHandle (engine.deploy.handle): 8 client threads call rank, score and extend_user (directly and through a
BatchingScorer) while the version root is republished and reloaded 20 times: no call fails, every result is one
version's direct result (never a mix), user states made by one version are rebuilt on another, and swapped-out
scorers are released."""
import gc
import shutil
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from engine import BAHEScorer, BatchingScorer, InputError, QueueConfig, ScorerHandle, ScorerVersions, VersionedState
from tests.serving.test_scorer import BEHAVIORS, ITEMS, make_scorer, random_users

CANDIDATES = ITEMS + ["an item not in the table"]
USERS = random_users(np.random.default_rng(4), 6)
APPENDS = [{"click": [BEHAVIORS[(3 * k) % len(BEHAVIORS)]], "search": [BEHAVIORS[(5 * k + 1) % len(BEHAVIORS)]]}
           for k in range(6)]
SWAPS, CLIENTS = 20, 8
TOLERANCE = 1e-4  # incremental vs whole-user and batched (the queue's rank_many) vs alone rounding: up to 1.2e-5
# measured on this tiny random model's large logits; the versions' results differ by far more (the fixture checks)


@pytest.fixture(scope="module")
def weights(tiny_checkpoints, tmp_path_factory):
    """Three saved scorers that score differently (A, B, C) and their direct results on the probes."""
    tmp = tmp_path_factory.mktemp("handle")
    scorer = make_scorer(tiny_checkpoints["llama"], tmp / "a", max_behaviors=4)
    folders = []
    for k in range(3):
        with torch.no_grad():
            for p in scorer.model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        scorer.save_pretrained(tmp / f"w{k}")
        folders.append(tmp / f"w{k}")
    expected = []
    for folder in folders:
        direct = BAHEScorer.from_pretrained(folder, device="cpu")
        grown, extended = dict(USERS[0]), []
        for new in APPENDS:
            grown = {name: list(grown.get(name, [])) + new.get(name, []) for name in ("click", "buy", "search")}
            extended.append(direct.rank(grown, CANDIDATES).scores)
        expected.append({"score": direct.score(USERS, ITEMS[:2] * 3),
                         "rank": [direct.rank(u, CANDIDATES).scores for u in USERS], "extend": extended})
    for a in range(3):
        for b in range(a):
            for key in ("rank", "extend"):
                gaps = [np.abs(x - y).max() for x, y in zip(expected[a][key], expected[b][key])]
                assert min(gaps) > 100 * TOLERANCE, f"versions {a} and {b} rank alike: {key} gaps {gaps}"
            assert np.abs(expected[a]["score"] - expected[b]["score"]).max() > 100 * TOLERANCE
    return folders, expected


def _publish(root, folder):
    with ScorerVersions(root, keep=3).stage() as staged:
        shutil.rmtree(staged.path)
        shutil.copytree(folder, staged.path)
        staged.publish()


def _which(result, wanted):
    """Index of the version whose direct result `result` is (within TOLERANCE), or None."""
    hits = [v for v, w in enumerate(wanted) if np.allclose(result, w, rtol=0, atol=TOLERANCE)]
    return hits[0] if len(hits) == 1 else None


def test_twenty_swaps_under_eight_clients(weights, tmp_path):
    folders, expected = weights
    root = tmp_path / "root"
    ScorerVersions.create(root, folders[0], keep=3)
    handle = ScorerHandle(root, device="cpu")
    with handle.using() as (_, scorer):
        first = weakref.ref(scorer)
    del scorer
    queue = BatchingScorer(handle, QueueConfig(max_batch=8, max_wait_ms=1))
    done, errors, seen, lock = threading.Event(), [], set(), threading.Lock()

    def client(c):
        through = queue if c % 2 else handle
        rng, state, appended, calls = np.random.default_rng(c), None, 0, 0
        while not done.is_set() or calls < 6:
            calls += 1
            try:
                op = calls % 3
                if op == 0:
                    got, wanted = through.score(USERS, ITEMS[:2] * 3), [e["score"] for e in expected]
                elif op == 1:
                    u = int(rng.integers(len(USERS)))
                    got, wanted = through.rank(USERS[u], CANDIDATES).scores, [e["rank"][u] for e in expected]
                else:
                    if state is None or appended == len(APPENDS):
                        state, appended = handle.user_state(USERS[0]), 0
                    state = handle.extend_user(state, APPENDS[appended])
                    appended += 1
                    got = handle.rank(state, CANDIDATES).scores
                    wanted = [e["extend"][appended - 1] for e in expected]
                version = _which(got, wanted)
                if version is None:
                    gaps = [float(np.abs(np.asarray(got) - w).max()) for w in wanted]
                    raise AssertionError(f"client {c} op {op}: {got} is no version's direct result (largest "
                                         f"differences from each version's: {gaps})")
                with lock:
                    seen.add(version)
            except Exception as err:  # noqa: BLE001 - counted, reported below
                with lock:
                    errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    names = [handle.version]
    for k in range(1, SWAPS + 1):
        _publish(root, folders[k % 3])
        assert handle.reload()
        names.append(handle.version)
        time.sleep(0.02)
    done.set()
    for t in threads:
        t.join(120)
    queue.close()
    assert not errors, f"{len(errors)} failed calls, e.g. {errors[:3]}"
    assert len(set(names)) == SWAPS + 1 and names[-1] == ScorerVersions(root).current().name
    assert seen == {0, 1, 2}, f"results came from versions {seen} only"
    assert not handle.reload()  # nothing new published
    gc.collect()
    assert first() is None, "the first version's scorer is still referenced after it was swapped out"
    assert handle.retired() == []


def test_states_cross_versions_only_rebuilt_and_old_requests_finish_on_old(weights, tmp_path):
    folders, expected = weights
    root = tmp_path / "root"
    ScorerVersions.create(root, folders[0])
    handle = ScorerHandle(root, device="cpu")
    state = handle.extend_user(handle.user_state(USERS[0]), APPENDS[0])
    assert isinstance(state, VersionedState) and state.version == "v000001"
    np.testing.assert_allclose(handle.rank(state, CANDIDATES).scores, expected[0]["extend"][0], atol=1e-5)
    with handle.using() as (version, old):  # an in-flight request holds the old scorer
        _publish(root, folders[1])
        assert handle.reload() and handle.version == "v000002" and version == "v000001"
        assert handle.retired() == ["v000001"]
        np.testing.assert_allclose(old.score(USERS, ITEMS[:2] * 3), expected[0]["score"], atol=1e-6)
    del old
    gc.collect()
    assert handle.retired() == []
    # the v1 state on v2: rebuilt from its whole user, v2's direct result, and extended there
    np.testing.assert_allclose(handle.rank(state, CANDIDATES).scores, expected[1]["extend"][0], atol=1e-5)
    moved = handle.extend_user(state, APPENDS[1])
    assert moved.version == "v000002"
    np.testing.assert_allclose(handle.rank(moved, CANDIDATES).scores, expected[1]["extend"][1], atol=1e-5)
    with pytest.raises(InputError, match="bare UserState"):
        handle.rank(state.state, CANDIDATES)
    with pytest.raises(InputError, match="expected a VersionedState"):
        handle.extend_user(state.state, APPENDS[1])
    with pytest.raises(InputError, match="sequence names"):
        handle.extend_user(state, {"nope": ["x"]})
    with handle.using() as (_, scorer):  # the scorer itself refuses another scorer object's state
        with pytest.raises(ValueError, match="other weights"):
            scorer.rank(state.state, CANDIDATES)
