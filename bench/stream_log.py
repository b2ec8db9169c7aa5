"""Training on a log bigger than memory: generate (or reuse) a synthetic log of `--events` events (MovieLens
texts, Zipf users and items: engine.training.streaming.synthetic), lay it out for streaming (prepare_stream), train
BAHE over its shards (fit_stream) and test it; wall time and peak RSS of each phase. For the bound, the same
preparation of a smaller log, and that smaller log loaded whole in memory (load_log + its past counts + split,
what `bahe train` holds before its first step). Writes a section of bench/RESULTS.md.

    python -m bench.stream_log --events 20000000 --small-events 2000000

Training over all 20M events does not fit in the time of a 2-core benchmark: every shard is visited but only
`--steps-per-shard` optimizer steps are taken in each (users in random order), and validation / test use
`--eval-per-shard` examples of each shard; the memory bound does not depend on either.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
from pathlib import Path

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.training.loops.ctr_models import BAHECTR
from engine.training.data.log_files import load_log
from engine.training.streaming.stream import StreamConfig, prepare_stream
from engine.training.streaming.synthetic import SyntheticConfig, write_synthetic_log
from engine.training.studies.experiment import build_scorer, cpu_threads
from engine.training.data.example_features import PastCounts
from engine.training.studies.memory import PeakMemory
from engine.training.studies.results_sections import machine, write_section
from engine.training.streaming.stream_train import StreamBudget, catalog_log, evaluate_stream, fit_stream
from engine.training.loops.train import TrainConfig

MIB = 1 << 20


def _phase(name: str, figures: dict, work):
    """Run work(), recording its wall seconds and peak RSS (MiB, the kernel's high-water mark reset at entry)."""
    with PeakMemory("cpu") as peak:
        start = time.perf_counter()
        out = work()
        seconds = time.perf_counter() - start
    figures[name] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak.bytes / MIB),
                     "rss_at_start_mib": round((peak.bytes - peak.added) / MIB)}
    logging.info("%s: %s", name, figures[name])
    return out


def _log(folder: Path, events: int, figures: dict, key: str) -> Path:
    path = folder / f"log-{events}.parquet"
    if not path.exists():
        _phase(key, figures, lambda: write_synthetic_log(path, SyntheticConfig(events=events)))
    return path


def _stream_and_train(args: argparse.Namespace, folder: Path, figures: dict, stream_config: StreamConfig) -> None:
    """The big log: prepared, trained over its shards, tested (everything released on return)."""
    big = _log(folder, args.events, figures, "generate")
    stream = _phase("prepare", figures, lambda: prepare_stream(big, folder / "work", stream_config))
    figures["largest_shard_events"] = max(stream.shard_events)
    catalog = catalog_log(stream)
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=args.lower_layers, max_tokens=32),
                          model=ModelConfig(sequence_names=stream.sequence_names, max_behaviors=args.max_behaviors))
    scorer, _ = build_scorer(args.model, catalog, config, folder / "tables", device="cpu", progress=False)
    model = BAHECTR(scorer, catalog)
    budget = StreamBudget(steps_per_shard=args.steps_per_shard, eval_per_shard=args.eval_per_shard)
    train = TrainConfig(epochs=1, batch_size=args.batch_size, norm_batches=4, progress=False)
    result = _phase("train", figures, lambda: fit_stream(model, stream, train, budget=budget))
    trained = result.history[0]["examples"]
    figures["train_examples"], figures["train_examples_per_s"] = trained, round(trained / result.epoch_seconds[0], 1)
    figures["val_auc"] = round(result.best_val_auc, 4)
    test = _phase("test", figures, lambda: evaluate_stream(model, stream, "test", budget=budget))
    figures["test_auc"], figures["test_examples"] = round(test["auc"], 4), test["examples"]
    model.set_item_counts(stream.item_ids, stream.item_counts_before[stream.test_start], stream.sequence_names)


def run(args: argparse.Namespace) -> dict:
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures: dict = {"events": args.events, "small_events": args.small_events}
    stream_config = StreamConfig(shards=args.shards, time_buckets=args.shards)
    _stream_and_train(args, folder, figures, stream_config)
    small = _log(folder, args.small_events, figures, "generate_small")
    _phase("prepare_small", figures, lambda: prepare_stream(small, folder / "work-small", stream_config))
    _phase("in_memory_small", figures, lambda: _in_memory(small))
    return figures


def _in_memory(path: Path):
    """What the in-memory `bahe train` holds before its first step: the log, its past counts and split."""
    log = load_log(path)
    return PastCounts(log, 0), log.split()


def run_in_memory(args: argparse.Namespace) -> dict:
    """--in-memory-only: the `--events` log (generated if missing) loaded whole."""
    figures: dict = {"events": args.events}
    path = _log(Path(args.folder), args.events, figures, "generate")
    _phase("in_memory", figures, lambda: _in_memory(path))
    return figures


def _section(args: argparse.Namespace, figures: dict) -> list[str]:
    f = figures
    return [f"### Logs bigger than memory: streaming a {f['events']:,}-event log", "",
            f"`python -m bench.stream_log --events {args.events} --small-events {args.small_events} --shards "
            f"{args.shards} --steps-per-shard {args.steps_per_shard} --eval-per-shard {args.eval_per_shard} --threads "
            f"{args.threads}` on "
            f"{datetime.date.today()}, {f['machine']}; the machine was shared with another job (timings are upper "
            f"bounds). Model: {args.model}, {args.lower_layers} lower layers, max_behaviors {args.max_behaviors}, "
            f"batch {args.batch_size}; one epoch visiting all {args.shards} shards, {args.steps_per_shard} steps "
            f"in each; val / test: {args.eval_per_shard} examples per shard.", "",
            "| phase | wall s | peak RSS MiB | RSS at start MiB |", "|---|---|---|---|",
            *[f"| {name} | {v['seconds']} | {v['peak_rss_mib']} | {v['rss_at_start_mib']} |"
              for name, v in f.items() if isinstance(v, dict)], "",
            f"Largest user shard: {f['largest_shard_events']:,} events. Training: {f['train_examples']:,} examples at "
            f"{f['train_examples_per_s']} examples/s; val AUC {f['val_auc']}, test AUC {f['test_auc']} "
            f"({f['test_examples']:,} test examples). prepare_small / in_memory_small: a {f['small_events']:,}-event log "
            f"of the same generator streamed, and loaded whole in memory.", "", "```json", json.dumps(f, indent=1), "```"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=20_000_000)
    p.add_argument("--small-events", type=int, default=2_000_000)
    p.add_argument("--folder", default="/tmp/bahe-stream", help="logs, shards and tables (big: keep out of the repo)")
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--steps-per-shard", type=int, default=4)
    p.add_argument("--eval-per-shard", type=int, default=500)
    p.add_argument("--model", default="minilm")
    p.add_argument("--lower-layers", type=int, default=4)
    p.add_argument("--max-behaviors", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--in-memory-only", action="store_true", help="only load the --events log whole, for comparison")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with cpu_threads(args.threads):
        figures = run_in_memory(args) if args.in_memory_only else run(args)
        figures["machine"] = machine()
    print(json.dumps(figures, indent=1))
    if args.in_memory_only:
        v = figures["in_memory"]
        write_section(args.out, "stream-log-in-memory", [
            f"The same {args.events:,}-event log loaded whole (`python -m bench.stream_log --in-memory-only --events "
            f"{args.events} --threads {args.threads}`, {datetime.date.today()}, same machine, shared): {v['seconds']} s, peak RSS "
            f"{v['peak_rss_mib']} MiB (RSS at start {v['rss_at_start_mib']} MiB)."])
    else:
        write_section(args.out, "stream-log", _section(args, figures))


if __name__ == "__main__":
    main()
