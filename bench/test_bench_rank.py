"""pytest-benchmark suite of ranking (the real scorer of bench/test_bench_scorer.py: all-MiniLM-L6-v2 3 + 3,
MovieLens texts, tables cached in artifacts/bench):

    pytest bench/test_bench_rank.py --benchmark-only
    BAHE_BENCH_LARGE=1 pytest bench/test_bench_rank.py --benchmark-only   # + M = 1000
    BAHE_BENCH_THREADS=1 ...                                               # one torch thread (shared CPUs)

- `rank`: one user (n = 3 sequences of M behaviors) against K distinct candidates, K = 10, 100, 1000, fp32 and
  bf16 (the scorer reopened with dtype='bfloat16').
- `per-pair`: the same user scored with 10 candidates through `score` with repeated-user dedupe off (a user
  tower per pair; item vectors stored): the per-pair cost that ranking divides by K.
- `concurrent rank`: 1, 2, 4, 8 client threads sending rank requests at once, direct vs through the request
  queue (requests per second in extra_info; `python -m bench.queue` prints the side-by-side table).
`python -m bench.rank` prints the side-by-side table (per-pair as `score` did before ranking, p50 / p99)."""
import os

import numpy as np
import pytest
import torch

from engine.serving.scorer import BAHEScorer
from engine.training.studies.experiment import ScorerSetup, load_data
from engine.training.studies.scaling import synthetic_users

LARGE = os.environ.get("BAHE_BENCH_LARGE") == "1"
KS = (10, 100, 1000)
MS = (10, 100, 1000)


def _ms():
    for m in MS:
        marks = [] if m <= 100 else [pytest.mark.skipif(not LARGE, reason="M = 1000: set BAHE_BENCH_LARGE=1")]
        yield pytest.param(m, id=f"M{m}", marks=marks)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if os.environ.get("BAHE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BAHE_BENCH_THREADS"]))
    data = load_data("movielens")
    scorer = ScorerSetup().scorer(data, max_behaviors=max(MS), batch_size=64)
    folder = tmp_path_factory.mktemp("rank") / "scorer"
    scorer.save_pretrained(folder)
    bf16 = BAHEScorer.from_pretrained(folder, device=ScorerSetup().device, dtype="bfloat16")
    return {"float32": scorer, "bfloat16": bf16}, list(dict.fromkeys(data.item_id_texts))


def _request(scorers, texts, m, k):
    names = scorers["float32"].config.model.sequence_names
    user = synthetic_users(texts, names, m, 1, seed=0)[0][0]
    candidates = [texts[i] for i in np.random.default_rng([m, k]).choice(len(texts), k, replace=False)]
    return user, candidates


@pytest.mark.benchmark(group="rank")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", list(_ms()))
def test_rank(benchmark, setup, m, k, dtype):
    scorers, texts = setup
    user, candidates = _request(scorers, texts, m, k)
    benchmark.pedantic(scorers[dtype].rank, args=(user, candidates), rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(behaviors_per_sequence=m, candidates=k, dtype=dtype,
                                candidates_per_s=k / benchmark.stats.stats.median)


@pytest.mark.benchmark(group="per-pair")
@pytest.mark.parametrize("m", list(_ms()))
def test_per_pair(benchmark, setup, m):
    scorers, texts = setup
    scorer = scorers["float32"]
    user, candidates = _request(scorers, texts, m, 10)
    scorer.config.scoring.dedupe_users = False
    try:
        benchmark.pedantic(scorer.score, args=([user] * len(candidates), candidates), rounds=3, iterations=1,
                           warmup_rounds=1)
    finally:
        scorer.config.scoring.dedupe_users = True
    benchmark.extra_info.update(behaviors_per_sequence=m, pairs=len(candidates),
                                ms_per_pair=1e3 * benchmark.stats.stats.median / len(candidates))


@pytest.mark.benchmark(group="concurrent rank")
@pytest.mark.parametrize("clients", [1, 2, 4, 8])
@pytest.mark.parametrize("queued", [False, True], ids=["direct", "queue"])
def test_concurrent_rank(benchmark, setup, clients, queued):
    """`clients` threads each sending 4 rank requests (M = 100, K = 100) at once, straight to the shared scorer
    or through a BatchingScorer (engine.deploy.request_queue); one round = all 4 x clients requests answered."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.config import QueueConfig
    from engine.deploy.request_queue import BatchingScorer
    scorers, texts = setup
    user, candidates = _request(scorers, texts, 100, 100)
    with BatchingScorer(scorers["float32"], QueueConfig()) as queue, ThreadPoolExecutor(clients) as pool:
        target = queue if queued else scorers["float32"]

        def client(_):
            for _ in range(4):
                target.rank(user, candidates)
        benchmark.pedantic(lambda: list(pool.map(client, range(clients))), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(clients=clients, queued=queued,
                                requests_per_s=4 * clients / benchmark.stats.stats.median)
