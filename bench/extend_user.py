"""Appending to a cached user (`BAHEScorer.extend_user`, engine.serving.incremental) vs recomputing it (`rank` of the
whole user), on a trained scorer: one behavior appended to one sequence of a user holding M behaviors in each
sequence, M in {100, 1000}; and ranking K candidates from the state vs from the whole user. Median of
`--repeats` timings per figure; on a shared machine the figures are indicative.

    python -m bench.extend_user [--scorer artifacts/demo/minilm/scorer] [--threads 1] [--results bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import numpy as np

from engine.serving.scorer import BAHEScorer
from engine.training.studies.experiment import cpu_threads
from engine.training.studies.results_sections import machine, write_section

MS, K = (100, 1000), 100


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(scorer: BAHEScorer, m: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Seconds (median) of: the full recompute (rank of the whole user with one behavior more), the append
    (extend_user of one behavior), rank of the state; and the state's bytes."""
    names = scorer.config.model.sequence_names
    rng = np.random.default_rng([seed, m])
    texts = [scorer.behaviors.text(int(i)) for i in rng.integers(0, len(scorer.behaviors), len(names) * m + 1)]
    user = {name: texts[s * m:(s + 1) * m] for s, name in enumerate(names)}
    new = {names[-1]: texts[-1:]}
    longer = {**user, names[-1]: user[names[-1]] + texts[-1:]}
    candidates = [scorer.items.text(int(i)) for i in rng.integers(0, len(scorer.items), K)]
    state = scorer.user_state(user)
    extended = scorer.extend_user(state, new)
    np.testing.assert_allclose(scorer.rank(extended, candidates).scores, scorer.rank(longer, candidates).scores,
                               rtol=1e-4, atol=1e-5)
    return {"recompute": median_seconds(lambda: scorer.rank(longer, candidates), repeats),
            "append": median_seconds(lambda: scorer.extend_user(state, new), repeats),
            "rank_state": median_seconds(lambda: scorer.rank(extended, candidates), repeats),
            "build": median_seconds(lambda: scorer.user_state(longer), max(1, repeats // 2)),
            "bytes": extended.nbytes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scorer", default="artifacts/demo/minilm/scorer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", default=None, help="markdown file to write the table into (a section)")
    args = parser.parse_args(argv)
    scorer = BAHEScorer.from_pretrained(args.scorer, device="cpu")
    upper = scorer.model.upper
    lines = [f"{datetime.date.today()}, {machine()}, {args.threads} thread(s), scorer {args.scorer} "
             f"({upper.family}, {len(upper.layers)} upper layer(s), d = {upper.hidden_size}, "
             f"{len(scorer.config.model.sequence_names)} sequences, fp32); K = {K} candidates; median of "
             f"{args.repeats}; indicative (shared machine)", "",
             "| M per sequence | recompute: rank(whole user + 1) | extend_user(+1) | rank(state) | extend + rank "
             "| user_state (build) | state bytes |", "|---|---|---|---|---|---|---|"]
    with cpu_threads(args.threads):
        for m in MS:
            r = measure(scorer, m, args.repeats)
            lines.append(f"| {m} | {r['recompute'] * 1e3:.1f} ms | {r['append'] * 1e3:.2f} ms | "
                         f"{r['rank_state'] * 1e3:.1f} ms | {(r['append'] + r['rank_state']) * 1e3:.1f} ms | "
                         f"{r['build'] * 1e3:.1f} ms | {r['bytes'] / 2**20:.2f} MiB |")
    print("\n".join(lines))
    if args.results:
        write_section(args.results, "incremental:" + upper.family, ["### Appending to a cached user", "", *lines])


if __name__ == "__main__":
    main()
