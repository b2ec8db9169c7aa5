"""Requests per second vs client threads, with and without the request queue, side by side in one run: C client
threads (1, 2, 4, 8) each sending requests back to back for a fixed time, either straight to one shared
`BAHEScorer` (as callers do today) or through one `BatchingScorer` over it (1 worker, 2 workers); p50 / p99
latency per request, and requests per scorer call.

    python -m bench.queue [--threads N] [--seconds 4] [--results bench/RESULTS.md]

Two request kinds, timed apart: rank (one user against K = 100 candidate movies) and score (one pair). Users
have n sequences of M = 100 behaviors drawn from the MovieLens texts (engine.training.studies.scaling.synthetic_users);
every request has its own user (a pool of distinct users, so neither the LRU nor `score`'s dedupe of repeated
users helps either side). The sides of one (kind, C) are timed round-robin in `--rounds` slices, so load drift
on a shared machine hits them alike."""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.config import QueueConfig
from engine.deploy.request_queue import BatchingScorer
from engine.serving.scorer import BAHEScorer
from engine.training.studies.experiment import cpu_threads, load_data
from engine.training.studies.results_sections import machine, write_section
from engine.training.studies.scaling import synthetic_users

DEFAULT_SCORER = Path("artifacts/demo/minilm/scorer")
CLIENTS = (1, 2, 4, 8)
WORKERS = (1, 2)  # queue worker threads compared
POOL = 256  # distinct users; thread k sends users k, k + C, k + 2C, ...


@dataclass
class Cell:
    kind: str           # "rank" | "score"
    clients: int
    workers: int        # 0: direct calls; else a BatchingScorer with this many workers
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    per_call: float     # requests per scorer call (1 for direct)
    cpu_seconds: float  # CPU time of the process (every thread) meanwhile

    @property
    def per_cpu_second(self) -> float:
        """Requests per CPU second: the work a request costs, whatever share of a shared machine the side got."""
        return self.requests / max(self.cpu_seconds, 1e-9)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def drive(send, clients: int, seconds: float) -> tuple[int, float, float, np.ndarray]:
    """`clients` threads calling send(k, j) (thread k, its j-th request) until `seconds` have passed ->
    (requests completed, seconds until the last one returned, CPU seconds of the process, latencies in ms)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)
    stop = [0.0]

    def client(k: int) -> None:
        barrier.wait()
        j = 0
        try:
            while time.perf_counter() < stop[0]:
                start = time.perf_counter()
                send(k, j)
                latencies[k].append(time.perf_counter() - start)
                j += 1
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    started, cpu = time.perf_counter(), time.process_time()
    stop[0] = started + seconds
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    flat = np.array([x for per in latencies for x in per]) * 1e3
    return flat.size, time.perf_counter() - started, time.process_time() - cpu, flat


def run(scorer: BAHEScorer, texts: list[str], clients=CLIENTS, seconds: float = 4.0, m: int = 100, k: int = 100,
        queue_config: QueueConfig | None = None, workers=WORKERS, rounds: int = 2, kinds=("rank", "score"),
        seed: int = 0) -> list[Cell]:
    """Per request kind and client count: direct calls and a queue of each worker count, timed round-robin in
    `rounds` slices of seconds / rounds each (load drift on a shared machine hits every side alike)."""
    config = queue_config or QueueConfig()
    names = scorer.config.model.sequence_names
    users, items = synthetic_users(texts, names, m, POOL, seed=seed)
    movies = list(dict.fromkeys(texts))
    rng = np.random.default_rng(seed)
    candidates = [[movies[i] for i in rng.choice(len(movies), k, replace=False)] for _ in range(32)]
    cells = []
    for kind in kinds:
        for c in clients:
            def send(target, t, j, c=c, kind=kind):
                u = (t + j * c) % POOL
                if kind == "rank":
                    target.rank(users[u], candidates[u % len(candidates)])
                else:
                    target.score([users[u]], [items[u]])
            send(scorer, 0, 0)  # warm
            sides = (0, *workers)
            done = {w: [0, 0.0, [], 0, 0, 0.0] for w in sides}  # requests, s, latencies, requests, calls, CPU s
            for _ in range(rounds):
                for w in sides:
                    if w == 0:
                        count, took, cpu, lat = drive(lambda t, j: send(scorer, t, j), c, seconds / rounds)
                        stats = None
                    else:
                        with BatchingScorer(scorer, replace(config, workers=w)) as queue:
                            count, took, cpu, lat = drive(lambda t, j, q=queue: send(q, t, j), c,
                                                          seconds / rounds)
                            stats = queue.stats()
                    acc = done[w]
                    acc[0] += count
                    acc[1] += took
                    acc[2].append(lat)
                    acc[3] += stats.requests if stats else count
                    acc[4] += stats.calls if stats else count
                    acc[5] += cpu
            for w in sides:
                count, took, lat, requests, calls, cpu = done[w]
                p50, p99 = np.percentile(np.concatenate(lat), [50, 99])
                cells.append(Cell(kind, c, w, count, took, float(p50), float(p99), requests / max(calls, 1), cpu))
            logging.info("%s, %d clients: %s", kind, c, ", ".join(
                f"{f'queue x{x.workers}' if x.workers else 'direct'} {x.rps:.1f} req/s" for x in cells[-len(sides):]))
    return cells


def table(cells: list[Cell]) -> list[str]:
    workers = sorted({c.workers for c in cells} - {0})
    head = ["request", "client threads", "direct req/s"]
    for w in workers:
        head += [f"queue ({w} worker{'s' * (w > 1)}) req/s", "vs direct"]
    head += ["p50 / p99 ms: direct", *[f"queue ({w})" for w in workers], "requests per CPU s: direct / " +
             " / ".join(f"queue ({w})" for w in workers), "requests per call: " +
             " / ".join(f"queue ({w})" for w in workers)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(c.kind, c.clients, c.workers): c for c in cells}
    for kind, clients in dict.fromkeys((c.kind, c.clients) for c in cells):
        direct, queued = by[kind, clients, 0], [by[kind, clients, w] for w in workers]
        row = [kind, str(clients), f"{direct.rps:.1f}"]
        for q in queued:
            row += [f"{q.rps:.1f}", f"{q.rps / direct.rps:.2f}x"]
        row += [f"{x.p50_ms:.0f} / {x.p99_ms:.0f}" for x in (direct, *queued)]
        row.append(" / ".join(f"{x.per_cpu_second:.1f}" for x in (direct, *queued)))
        row.append(" / ".join(f"{q.per_call:.1f}" for q in queued))
        out.append("| " + " | ".join(row) + " |")
    return out


def main(argv: list[str] | None = None) -> list[Cell]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scorer", type=Path, default=DEFAULT_SCORER, help="a saved scorer folder (the trained demo's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default="movielens", help="where behavior texts are drawn from (load_data)")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: as they are)")
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS), help="client thread counts")
    p.add_argument("--seconds", type=float, default=4.0, help="sending time per (request kind, clients, side)")
    p.add_argument("--rounds", type=int, default=2, help="round-robin slices of --seconds per side")
    p.add_argument("--workers", type=int, nargs="+", default=list(WORKERS), help="queue worker counts compared")
    p.add_argument("--m", type=int, default=100, help="behaviors per sequence")
    p.add_argument("--k", type=int, default=100, help="candidates per rank request")
    p.add_argument("--max-batch", type=int, default=QueueConfig.max_batch, help="QueueConfig.max_batch")
    p.add_argument("--max-wait-ms", type=float, default=QueueConfig.max_wait_ms, help="QueueConfig.max_wait_ms")
    p.add_argument("--results", type=Path, default=None, help="write the section of this markdown file")
    p.add_argument("--note", default="", help="a line for the results section (e.g. the machine was shared)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    config = QueueConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    with cpu_threads(args.threads):
        scorer = BAHEScorer.from_pretrained(args.scorer, device=args.device)
        cells = run(scorer, load_data(args.data).item_id_texts, tuple(args.clients), args.seconds, args.m, args.k,
                    config, tuple(args.workers), args.rounds)
        where = machine()
    lines = table(cells)
    print("\n".join(lines))
    if args.results is not None:
        shown = [a for a in (sys.argv[1:] if argv is None else argv)]
        if "--results" in shown:  # where it was written is not how it was measured
            at = shown.index("--results")
            del shown[at:at + 2]
        if "--note" in shown:
            at = shown.index("--note")
            del shown[at:at + 2]
        command = " ".join(["python -m bench.queue", *shown])
        write_section(args.results, f"bench:queue:{args.device}:threads-{args.threads or 'default'}", [
            f"### Request queue: requests per second vs client threads ({args.scorer.name} of "
            f"{args.scorer.parent.name}, {args.device})", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {where}; "
            f"{(time.perf_counter() - started) / 60:.1f} min in all. {args.note}".rstrip(), "",
            f"The trained demo scorer ({args.scorer}); C client threads send requests back to back for "
            f"{args.seconds:g} s per side, straight to the one shared BAHEScorer (direct) or through one "
            f"BatchingScorer over it (QueueConfig(max_batch={config.max_batch}, max_wait_ms={config.max_wait_ms:g}, "
            f"workers=W)); the sides of one row timed round-robin in {args.rounds} slices. rank: one user (n = 3 "
            f"sequences of M = {args.m} behaviors drawn from the MovieLens texts) against K = {args.k} candidate "
            "movies; score: one (user, movie) pair; every request its own user. p50 / p99: latency of one request as "
            "its caller sees it (queueing included); requests per CPU s: requests over the process's CPU time "
            "(all its threads) meanwhile, the cost of a request whatever share of a shared machine each side got; "
            "requests per call: how many requests the queue merged into one scorer call on average.",
            "", *lines])
    return cells


if __name__ == "__main__":
    main()
