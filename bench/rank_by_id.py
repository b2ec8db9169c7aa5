"""Id-keyed serving vs the text path, side by side in one run: one user (n sequences of M behaviors) against K
candidates, by ids (`IdRanker.rank` over a `MemoryHistoryStore`, the user's state kept) and by texts
(`BAHEScorer.rank` on the user's texts, the user LRU off as by default, and warm), the text lookup's share of
each text request (the time inside `ScoringPipeline.lookup`: normalizing, hashing and searching the texts);
and the latency of an append of one event by ids (store + kept state extended) beside the text path's
`extend_user` of one behavior. p50 / p99 over `--repeats` requests, the paths timed round-robin.

    python -m bench.rank_by_id [--m 100] [--k 1000] [--repeats 30] [--results bench/RESULTS.md]

The scorer: the benchmarks' all-MiniLM-L6-v2 3 + 3 with the full CTR head of `ModelConfig` (count and similarity
features, item ids), untrained (timing only), over the MovieLens-100K texts (tables cached in the work dir); its
catalog: the MovieLens item ids and texts written to a temporary ids.json."""
from __future__ import annotations

import argparse
import datetime
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.config import EncoderConfig, ModelConfig, ScorerConfig, ScoringConfig
from engine.serving.by_id.history_store import MemoryHistoryStore
from engine.serving.by_id.id_ranker import IdRanker
from engine.serving.ranking import ItemCatalog
from engine.serving.scorer import BAHEScorer
from engine.training.studies.experiment import ScorerSetup, build_scorer, cpu_threads, load_data
from engine.training.studies.results_sections import machine, write_section
from weights.id_vocabulary import FILE_NAME, VocabularyFile


class LookupClock:
    """CPU seconds spent inside a pipeline's `lookup` (the text lookup) since `seconds` was reset."""

    def __init__(self, scorer: BAHEScorer) -> None:
        self.seconds, real = 0.0, scorer.pipeline.lookup

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start
        scorer.pipeline.lookup = timed


def timed(call) -> tuple[float, float]:
    """(wall ms, CPU ms of the process) of one call: on a shared machine the CPU time moves less with the load."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def round_robin(calls: dict[str, object], repeats: int, clocks: dict[str, LookupClock]) -> dict[str, np.ndarray]:
    """(repeats, 3) per call: [wall ms, CPU ms, text lookup share of the CPU time], the calls timed in turn after
    one warm-up each."""
    out: dict[str, list] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            clock = clocks.get(name)
            if clock is not None:
                clock.seconds = 0.0
            wall, cpu = timed(call)
            out[name].append((wall, cpu, clock.seconds * 1e3 / cpu if clock is not None and cpu > 0 else 0.0))
    return {name: np.array(v) for name, v in out.items()}


def run(setup: ScorerSetup, m: int, k: int, repeats: int, work: Path) -> dict:
    data = load_data(setup.data)
    names = data.sequence_names
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=setup.lower_layers, max_tokens=setup.max_tokens),
                          model=ModelConfig(sequence_names=names, max_behaviors=m),
                          scoring=ScoringConfig(batch_size=64))
    built, _ = build_scorer(setup.model, data, config, setup.tables_dir(), device=setup.device, progress=False)
    built.save_pretrained(work / "scorer")
    keys, texts = data.item_key(data.item_ids), data.item_id_texts
    VocabularyFile.update(work / "scorer" / FILE_NAME, [], dict(zip(keys, texts)))
    plain = BAHEScorer.from_pretrained(work / "scorer", device=setup.device)
    lru = BAHEScorer.from_pretrained(work / "scorer", device=setup.device,
                                     scoring=ScoringConfig(batch_size=64, user_cache_bytes=256 << 20))
    by_id = BAHEScorer.from_pretrained(work / "scorer", device=setup.device)
    catalog = ItemCatalog.open(work / "scorer")
    ranker = IdRanker(by_id, MemoryHistoryStore(names, catalog.vocabulary.items), catalog)
    rng = np.random.default_rng(setup.seed)
    picks = rng.integers(0, len(keys), size=(len(names), m + repeats + 1))
    ranker.append("bench-user", {name: [keys[i] for i in picks[s, :m]] for s, name in enumerate(names)})
    user = {name: [texts[i] for i in picks[s, :m]] for s, name in enumerate(names)}
    cand = rng.choice(len(keys), k, replace=False)
    cand_ids, cand_texts = [keys[i] for i in cand], [texts[i] for i in cand]
    diff = float(np.abs(ranker.rank("bench-user", cand_ids).scores - plain.rank(user, cand_texts).scores).max())
    clocks = {"text": LookupClock(plain), "text_lru": LookupClock(lru)}
    ranks = round_robin({"text": lambda: plain.rank(user, cand_texts), "text_lru": lambda: lru.rank(user, cand_texts),
                         "by_id": lambda: ranker.rank("bench-user", cand_ids)}, repeats, clocks)
    state = plain.user_state(user)
    appends: dict[str, list[tuple[float, float]]] = {"by_id": [], "extend_user": []}
    for j in range(repeats):  # one event appended to the last sequence, by each path in turn
        event_id, event_text = keys[picks[-1, m + j]], texts[picks[-1, m + j]]
        appends["by_id"].append(timed(lambda: ranker.append("bench-user", {names[-1]: [event_id]})))
        before = state
        appends["extend_user"].append(timed(lambda: plain.extend_user(before, {names[-1]: [event_text]})))
        state = plain.extend_user(before, {names[-1]: [event_text]})
    return {"ranks": ranks, "appends": {n: np.array(v) for n, v in appends.items()}, "diff": diff,
            "names": names, "items": len(keys), "upper": len(plain.model.upper.layers)}


def table(result: dict) -> list[str]:
    ranks, appends = result["ranks"], result["appends"]
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    lines = ["| request | p50 ms | p99 ms | CPU p50 ms | text lookup share of the CPU (p50) |", "|---|---|---|---|---|"]
    for name, label in (("text", "rank by texts, user LRU off (the default)"),
                        ("text_lru", "rank by texts, user LRU warm"), ("by_id", "rank by ids, user state kept")):
        share = f"{pct(ranks[name][:, 2], 50):.1%}" if name != "by_id" else "none"
        lines.append(f"| {label} | {pct(ranks[name][:, 0], 50):.2f} | {pct(ranks[name][:, 0], 99):.2f} | "
                     f"{pct(ranks[name][:, 1], 50):.2f} | {share} |")
    for name, label in (("by_id", "append 1 event by ids (store + kept state extended)"),
                        ("extend_user", "append 1 behavior by texts (`extend_user` of a UserState)")):
        lines.append(f"| {label} | {pct(appends[name][:, 0], 50):.2f} | {pct(appends[name][:, 0], 99):.2f} | "
                     f"{pct(appends[name][:, 1], 50):.2f} | |")
    out = [""]
    for column, what in ((1, "CPU"), (0, "wall")):
        warm, by_id = pct(ranks["text_lru"][:, column], 50), pct(ranks["by_id"][:, column], 50)
        default = pct(ranks["text"][:, column], 50)
        target = warm * (1 - pct(ranks["text_lru"][:, 2], 50))
        out.append(f"- Goal on {what} p50 (by ids faster than the warm text path by at least its lookup share): "
                   f"{by_id:.2f} ms vs {target:.2f} ms, {'met' if by_id <= target else 'NOT met'}; by ids / warm "
                   f"text = {by_id / warm:.3f}, by ids / default text = {by_id / default:.3f}.")
    out.append(f"- Max abs difference of the by-id scores from the text path's: {result['diff']:.1e}.")
    return lines + out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ScorerSetup.add_arguments(p, ScorerSetup())
    p.add_argument("--m", type=int, default=100, help="behaviors per sequence (and max_behaviors)")
    p.add_argument("--k", type=int, default=1000, help="candidates per rank request")
    p.add_argument("--repeats", type=int, default=30, help="timed requests per path (p99 of these)")
    p.add_argument("--results", type=Path, default=None, help="write the section of this markdown file")
    p.add_argument("--note", default="", help="a line for the results section (e.g. the machine was shared)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = ScorerSetup(**ScorerSetup.options(args))
    started = time.perf_counter()
    with cpu_threads(setup.threads), tempfile.TemporaryDirectory() as work:
        result = run(setup, args.m, args.k, args.repeats, Path(work))
        where = machine()
    lines = table(result)
    print("\n".join(lines))
    if args.results is not None:
        command = (f"python -m bench.rank_by_id --m {args.m} --k {args.k} --repeats {args.repeats}"
                   + (f" --threads {setup.threads}" if setup.threads else ""))
        write_section(args.results, f"bench:rank_by_id:{setup.model}", [
            f"### Ranking by ids vs by texts, and appends ({setup.model}, M = {args.m}, K = {args.k})", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {where}; "
            f"{(time.perf_counter() - started) / 60:.1f} min in all. {args.note}".rstrip(), "",
            f"One user, n = {len(result['names'])} sequences ({', '.join(result['names'])}) of M item ids drawn from "
            f"the {result['items']:,} items of {setup.data}, K distinct candidates; {setup.model} {setup.lower_layers}"
            f" + {result['upper']} layers with the full CTR head (count, similarity, item-id features; "
            "untrained: timing only). The three rank paths timed round-robin, p50 / p99 over the repeats; text lookup "
            "share: the CPU time inside `ScoringPipeline.lookup` over the request's. CPU: the process's CPU time per "
            "request (`time.process_time`), which moves less than the wall time with other jobs' load. Appends: the "
            "by-id path writes the "
            "store and extends the kept state by the new row (the window rebuilt whole each S = M / 4 appends: the "
            "p99); the text path's `extend_user` does the same work on a UserState it holds.", "", *lines])
    return result


if __name__ == "__main__":
    main()
