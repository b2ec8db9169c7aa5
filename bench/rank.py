"""Ranking vs per-pair scoring, side by side in one run: one user against K candidates (`BAHEScorer.rank`)
and the same K pairs through the per-pair path that `score` took before ranking existed (every pair's user
sequences and its item packed into one batch through the upper layers, `BAHEModel.forward`), for K in
{10, 100, 1000} and M behaviors per sequence in {10, 100, 1000}; p50 / p99 per rank request; bf16 vs fp32.

    python -m bench.rank [--threads 1] [--results bench/RESULTS.md]

The real scorer of the benchmarks (engine.training.studies.experiment.ScorerSetup: all-MiniLM-L6-v2 3 + 3, the text
part of the CTR model, MovieLens-100K texts, tables cached in artifacts/bench). The per-pair side is timed on
a subset of the pairs (`--pair-budget` behaviors per timing, at least 2 pairs) and scaled to K: its cost is
linear in the pairs (one user tower per pair); the subset is stated in the output."""
from __future__ import annotations

import argparse
import datetime
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.model.bahe_model import PackedBatch
from engine.config import ScoringConfig
from engine.serving.scorer import BAHEScorer
from engine.training.studies.experiment import ScorerSetup, cpu_threads, load_data
from engine.training.studies.results_sections import machine, write_section
from engine.training.studies.scaling import synthetic_users
from kernels import ops

KS, MS = (10, 100, 1000), (10, 100, 1000)


def per_pair_seconds(scorer: BAHEScorer, user: dict[str, list[str]], items: list[str]) -> float:
    """Seconds to score (user, items[i]) pairs the way `score` did before ranking: lookups per pair, then
    batch_size pairs per forward, each pair's n sequences and its item one packed batch of the upper layers."""
    config = scorer.config.model
    if config.count_features:
        raise ValueError("the per-pair baseline here takes the text-only model (ScorerSetup's)")
    start = time.perf_counter()
    n, users = len(config.sequence_names), [user] * len(items)
    flat = [t for u in users for name in config.sequence_names for t in u.get(name, [])[-config.max_behaviors:]]
    lengths = np.array([len(u.get(name, [])[-config.max_behaviors:]) for u in users for name in config.sequence_names])
    rows, item_rows = scorer.behaviors.lookup(flat), scorer.items.lookup(items)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    behavior_table, item_table = scorer.table_rows("behaviors"), scorer.table_rows("items")
    step = scorer.config.scoring.batch_size
    with torch.inference_mode(), ops.use_backend(scorer.kernels):
        for lo in range(0, len(items), step):
            hi = min(lo + step, len(items))
            chunk = offsets[lo * n:hi * n + 1]
            batch = PackedBatch(torch.from_numpy(rows[chunk[0]:chunk[-1]]), torch.from_numpy(chunk - chunk[0]),
                                torch.from_numpy(item_rows[lo:hi]))
            torch.sigmoid(scorer.model(behavior_table, item_table, batch)).numpy()
    return time.perf_counter() - start


@dataclass
class Row:
    m: int
    k: int
    p50_ms: float
    p99_ms: float
    cached_p50_ms: float  # the user's pooled vectors in the LRU: lookups + item vectors + head only
    bf16_p50_ms: float
    bf16_max_diff: float
    pairs_timed: int
    per_pair_ms: float  # the K pairs, scaled from pairs_timed

    @property
    def speedup(self) -> float:
        return self.per_pair_ms / self.p50_ms


def _interleaved(calls: dict[int, object], repeats: int) -> dict[int, np.ndarray]:
    """ms per call of each of `calls`, timed round-robin (call 1, call 2, ..., call 1, ...) after one warm-up
    each, so a change of load on a shared machine hits every K alike."""
    out: dict[int, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for k, call in calls.items():
            start = time.perf_counter()
            call()
            out[k].append(time.perf_counter() - start)
    return {k: np.array(v) * 1e3 for k, v in out.items()}


def describe(folder: Path) -> str:
    """The layers and features of a saved scorer, in a few words."""
    config = BAHEScorer.from_pretrained(folder, device="cpu").config
    m = config.model
    return (f"{config.encoder.num_lower_layers} lower layers, count features {m.count_features}, similarity "
            f"temperatures {list(m.similarity_temperatures)}, item id dim {m.item_id_dim}, categorical "
            f"{list(m.categorical_features)}")


def pairs_through_score(folder: Path, device: str):
    """The per-pair baseline of a saved scorer with any features: `score` on K copies of the user, repeated
    users not deduplicated and no cache, so every pair runs its user's sequences through the upper layers."""
    scorer = BAHEScorer.from_pretrained(folder, device=device,
                                        scoring=ScoringConfig(dedupe_users=False, user_cache_bytes=0, batch_size=64))

    def seconds(user: dict[str, list[str]], items: list[str]) -> float:
        start = time.perf_counter()
        scorer.score([user] * len(items), items)
        return time.perf_counter() - start
    return seconds


def run(setup: ScorerSetup, repeats: int, pair_budget: int, ks=KS, ms=MS, saved: Path | None = None) -> list[Row]:
    """`saved`: time this saved scorer (e.g. the demo's full CTR model) instead of ScorerSetup's text part."""
    data = load_data(setup.data)
    texts = data.item_id_texts
    if saved is not None:
        scorer = BAHEScorer.from_pretrained(saved, device=setup.device, scoring=ScoringConfig(batch_size=64))
        per_pair = pairs_through_score(saved, setup.device)
    else:
        scorer = setup.scorer(data, max_behaviors=max(ms), batch_size=64)
        per_pair = lambda user, items: per_pair_seconds(scorer, user, items)  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:
        if saved is None:
            scorer.save_pretrained(folder)
        bf16 = BAHEScorer.from_pretrained(saved or folder, device=setup.device, dtype="bfloat16")
        names = scorer.config.model.sequence_names
        rng = np.random.default_rng(setup.seed)
        unique = list(dict.fromkeys(texts))
        rows = []
        for m in ms:
            user = synthetic_users(texts, names, m, 1, seed=setup.seed)[0][0]
            cands = {k: [unique[i] for i in rng.choice(len(unique), k, replace=False)] for k in ks}
            reps = repeats if m <= 100 else max(repeats // 3, 5)
            fp32 = _interleaved({k: lambda c=c: scorer.rank(user, c) for k, c in cands.items()}, reps)
            scorer.pipeline.resize_user_cache(1 << 30)
            cached = _interleaved({k: lambda c=c: scorer.rank(user, c) for k, c in cands.items()}, reps)
            scorer.pipeline.resize_user_cache(0)
            half = _interleaved({k: lambda c=c: bf16.rank(user, c) for k, c in cands.items()}, max(reps // 2, 3))
            for k, candidates in cands.items():
                diff = float(np.abs(bf16.rank(user, candidates).scores - scorer.rank(user, candidates).scores).max())
                timed = int(min(k, max(2, pair_budget // (m * len(names)))))
                pair_ms = per_pair(user, candidates[:timed]) * 1e3 * k / timed
                rows.append(Row(m, k, float(np.percentile(fp32[k], 50)), float(np.percentile(fp32[k], 99)),
                                float(np.percentile(cached[k], 50)), float(np.percentile(half[k], 50)), diff, timed,
                                pair_ms))
                logging.info("M=%d K=%d: rank p50 %.1f ms, per-pair %.0f ms", m, k, rows[-1].p50_ms, pair_ms)
    return rows


def table(rows: list[Row]) -> list[str]:
    out = ["| M | K | rank p50 ms | rank p99 ms | per-pair ms (pairs timed) | speedup | user cached: rank p50 ms | "
           "bf16 rank p50 ms | bf16 max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.m} | {r.k} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.per_pair_ms:,.0f} ({r.pairs_timed}) | "
                   f"{r.speedup:,.0f}x | {r.cached_p50_ms:.1f} | {r.bf16_p50_ms:.1f} | {r.bf16_max_diff:.1e} |")
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ScorerSetup.add_arguments(p, ScorerSetup())
    p.add_argument("--ks", type=int, nargs="+", default=list(KS), help="candidates per request")
    p.add_argument("--ms", type=int, nargs="+", default=list(MS), help="behaviors per sequence")
    p.add_argument("--repeats", type=int, default=30, help="timed rank requests per (M, K) (p99 of these)")
    p.add_argument("--pair-budget", type=int, default=6000, help="behaviors per per-pair timing (sets its subset)")
    p.add_argument("--results", type=Path, default=None, help="write the section of this markdown file")
    p.add_argument("--note", default="", help="a line for the results section (e.g. the machine was shared)")
    p.add_argument("--scorer", type=Path, default=None,
                   help="a saved scorer to time (e.g. artifacts/demo/minilm/scorer, the full CTR model) instead of "
                        "ScorerSetup's text part; its per-pair side: `score` without dedupe or cache")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = ScorerSetup(**ScorerSetup.options(args))
    started = time.perf_counter()
    with cpu_threads(setup.threads):
        rows = run(setup, args.repeats, args.pair_budget, tuple(args.ks), tuple(args.ms), args.scorer)
        where = machine()
    lines = table(rows)
    print("\n".join(lines))
    if args.results is not None:
        command = "python -m bench.rank" + (f" --threads {setup.threads}" if setup.threads else "") + (
            f" --scorer {args.scorer}" if args.scorer else "")
        what = (f"The saved scorer {args.scorer} (its full CTR model: {describe(args.scorer)})" if args.scorer else
                "ScorerSetup's scorer (3 lower + 3 upper layers, text part of the CTR model)")
        baseline = ("`score` on K copies of the user without dedupe or cache (each pair's user sequences through "
                    "the upper layers, known items from the stored vectors)" if args.scorer else
                    "the pre-ranking `score` path (each pair's user sequences + item through the upper layers)")
        model = "saved" if args.scorer else setup.model
        write_section(args.results, f"bench:rank:{model}:threads-{setup.threads or 'default'}", [
            f"### Ranking one user against K candidates vs per-pair scoring ({setup.model})", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {where}; "
            f"{(time.perf_counter() - started) / 60:.1f} min in all. {args.note}".rstrip(), "",
            f"{what}, n = 3 sequences of M "
            "behaviors drawn from the MovieLens texts, K distinct candidate movies. rank: p50 / p99 over "
            f"{args.repeats} requests ({max(args.repeats // 3, 5)} at M = 1000), the K of one M timed round-robin "
            "(load drift hits them alike); user cached and bf16 likewise (bf16: half the requests). per-pair: "
            f"{baseline}, timed on the first "
            "'pairs timed' pairs and scaled to K. user cached: the user's pooled vectors in the LRU (lookups, stored "
            "item vectors and the head only). bf16: the same scorer opened with dtype='bfloat16'; max abs "
            "difference of its K probabilities from fp32's" + ("." if args.scorer else " (the benchmarks' scorer is "
            "untrained, its probabilities near 0.5: a trained head's bf16 differences may be larger)."), "", *lines])
    return rows


if __name__ == "__main__":
    main()
