"""pytest-benchmark latency suites of the real scorer (all-MiniLM-L6-v2, MovieLens-100K texts):

    pytest bench/ --benchmark-only --benchmark-json=bench/results/bench.json
    BAHE_BENCH_LARGE=1 pytest bench/test_bench_scorer.py --benchmark-only   # + the biggest batch x M
    BAHE_BENCH_THREADS=1 pytest bench/ --benchmark-only                     # one torch thread

On a CPU that other jobs share, torch's default thread count (one per core) loses several-fold to
oversubscription (a 1-user, M = 16 call measured 0.75 s with 2 threads vs 28 ms with 1 while another job
held a core): set BAHE_BENCH_THREADS=1 there, and compare figures only at equal thread counts.

- `BAHEScorer.score` (texts in -> probabilities out) for batch sizes B = 1, 16, 256 and behaviors per
  sequence M = 16, 128, 1024, n = 3 sequences per user (liked, disliked, watched), behaviors drawn
  uniformly from the movie texts. The combinations with B x M > 4,096 (16 x 1024, 256 x 128,
  256 x 1024: tens of seconds to minutes per call on a CPU) are skipped unless BAHE_BENCH_LARGE=1.
- ABE encoding throughput: the frozen lower layers over 512 unique behavior texts (behaviors/s in
  the JSON's extra_info).
- The gather / pooling / attention / RoPE / MLP ops on their dispatch path are benchmarked in
  bench/test_bench_kernels.py (not repeated here).

The scorer's tables are built once and cached in artifacts/bench (shared with `python -m bench.compare`).
"""
import os

import pytest
import torch

from engine.training.studies.experiment import ScorerSetup, load_data
from engine.training.studies.scaling import synthetic_users

LARGE = os.environ.get("BAHE_BENCH_LARGE") == "1"
SMALL_LIMIT = 4096  # B x M above this runs only with BAHE_BENCH_LARGE=1
BATCHES, MS = (1, 16, 256), (16, 128, 1024)


def _cases():
    for b in BATCHES:
        for m in MS:
            marks = [] if b * m <= SMALL_LIMIT else [pytest.mark.skipif(
                not LARGE, reason=f"B x M = {b * m} > {SMALL_LIMIT}: set BAHE_BENCH_LARGE=1")]
            yield pytest.param(b, m, id=f"B{b}-M{m}", marks=marks)


@pytest.fixture(scope="module")
def setup():
    if os.environ.get("BAHE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BAHE_BENCH_THREADS"]))
    data = load_data("movielens")
    texts = data.item_id_texts
    scorer = ScorerSetup().scorer(data, max_behaviors=max(MS), batch_size=max(BATCHES))
    return scorer, texts


@pytest.mark.benchmark(group="score")
@pytest.mark.parametrize("batch, m", list(_cases()))
def test_score(benchmark, setup, batch, m):
    scorer, texts = setup
    names = scorer.config.model.sequence_names
    users, items = synthetic_users(texts, names, m, batch, seed=0)
    rounds = 5 if batch * m <= SMALL_LIMIT else 2
    benchmark.pedantic(scorer.score, args=(users, items), rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(users=batch, behaviors_per_sequence=m, sequences=len(names),
                                users_per_s=batch / median, behaviors_per_s=batch * len(names) * m / median)


@pytest.mark.benchmark(group="abe")
def test_abe_encode(benchmark, setup):
    scorer, texts = setup
    unique = list(dict.fromkeys(texts))[:512]
    benchmark.pedantic(scorer.encoder.encode, args=(unique,), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(behaviors=len(unique), behaviors_per_s=len(unique) / benchmark.stats.stats.median)
