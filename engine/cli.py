"""`bahe` command line: encode, train, score, calibrate, features, demo, bench, profile, models, info, update,
rollback, versions."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bahe")


def cmd_encode(args: argparse.Namespace) -> None:
    from engine.encoding.abe import AtomicEncoder
    from weights.checkpoint import Checkpoint
    from weights.registry import resolve_model
    from weights.table import BehaviorTable
    launch = _launch("bahe encode", args.distributed)
    from engine.encoding.text_files import read_texts
    try:
        texts = read_texts(args.texts, args.column)
    except (OSError, ValueError) as err:
        raise SystemExit(f"bahe encode: {err}") from None
    device = launch.device() if launch else "cpu"
    try:  # a split the checkpoint has not (--lower-layers past its layers, negative), a bad model: one line
        encoder = AtomicEncoder.from_checkpoint(Checkpoint(resolve_model(args.model)), args.lower_layers,
                                                max_tokens=args.max_tokens, device=device,
                                                progress=launch is None or launch.is_writer)
    except ValueError as err:  # CheckpointError, a config value out of range: the message names both numbers
        raise SystemExit(f"bahe encode: {err}") from None
    out = Path(args.out)
    start = time.perf_counter()  # the encoding and the write, not the model's loading
    if launch is not None:
        _encode_distributed(out, texts, encoder, launch, args)
    elif out.exists():
        table = BehaviorTable.open(out, encoder)
        added = table.append(texts)
        print(f"appended {added} new rows to {out} (now {len(table)} rows; {len(texts)} texts given) "
              f"in {time.perf_counter() - start:.2f} s")
    else:
        table = BehaviorTable.build(out, texts, encoder, dtype=args.dtype, kind=args.kind)
        print(f"built {out}: {len(texts)} texts -> {len(table)} unique rows, dim {table.dim}, {args.dtype} "
              f"in {time.perf_counter() - start:.2f} s")


def _launch(command: str, distributed: bool):
    """This process's torchrun Launch with --distributed (None without); SystemExit with one line when the
    flag and the environment disagree."""
    from engine.distributed import LaunchError, check_not_launched, launch_from_env
    try:
        if not distributed:
            check_not_launched(command)
            return None
        return launch_from_env(command=command)
    except LaunchError as err:
        raise SystemExit(f"{command}: {err}") from None


def _encode_distributed(out: Path, texts: list[str], encoder, launch, args: argparse.Namespace) -> None:
    from engine import distributed
    from engine.encoding.abe_sharded import build_or_append
    distributed.start(launch, encoder.device)
    start = time.perf_counter()
    try:
        action, added, table = build_or_append(out, texts, encoder, launch, dtype=args.dtype, kind=args.kind)
    except Exception as err:  # noqa: BLE001 - one line per rank, as in a single-process run
        raise SystemExit(f"bahe encode: rank {launch.rank}: {err}") from None
    finally:
        distributed.stop()
    if table is not None:
        print(f"{action} {out} over {launch.world_size} ranks: {added} new rows (now {len(table)} rows; "
              f"{len(texts)} texts given) in {time.perf_counter() - start:.2f} s")


def cmd_train(args: argparse.Namespace) -> None:
    from engine.training.loops.train_commands import train_command
    train_command(args, _launch("bahe train", args.distributed))


def cmd_score(args: argparse.Namespace) -> None:
    """Reads and checks every request line before scoring and writes the output only once all are scored:
    a bad line is one line on stderr naming the file and line, and nothing on stdout."""
    from engine.serving.ranking import ItemCatalog
    from engine.serving.inputs import InputError, ItemById, at_line, read_requests
    from engine.serving.scorer import BAHEScorer
    from weights.table import UnknownTextError
    source = "<stdin>" if args.input == "-" else args.input
    try:
        data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
        users, items, sides, lines = read_requests(data, source)
    except OSError as err:
        raise SystemExit(f"bahe score: {source}: {err.strerror or err}") from None
    except InputError as err:
        raise SystemExit(f"bahe score: {err}") from None
    scorer = BAHEScorer.from_pretrained(args.scorer, device=args.device, kernels=args.kernels or "auto")
    by_id = [i for i, item in enumerate(items) if isinstance(item, ItemById)]
    ids = {i: items[i].id for i in by_id}
    if by_id:  # item ids -> texts (and the item's features, where a line gives none) through the catalog
        try:
            catalog = ItemCatalog.open(args.scorer)
            for i in by_id:
                items[i] = catalog.text(ids[i], f"line {lines[i]}: item_id")
            sides = catalog.with_features([ids.get(i) for i in range(len(items))], sides,
                                          scorer.config.model.categorical_features)
        except InputError as err:
            raise SystemExit(f"bahe score: {source}: {err}") from None
    try:
        probs = scorer.score(users, items, side_features=sides if any(s is not None for s in sides) else None)
    except (InputError, UnknownTextError) as err:
        raise SystemExit(f"bahe score: {source}: {at_line(str(err), lines)}") from None
    sys.stdout.write("".join(json.dumps({**({"item_id": ids[i]} if i in ids else {}), "item": item,
                                         "p_click": round(float(p), 6)}) + "\n"
                             for i, (item, p) in enumerate(zip(items, probs))))


def cmd_info(args: argparse.Namespace) -> None:
    from weights.table import BehaviorTable
    table = BehaviorTable.open(args.table, verify=args.verify)
    print(json.dumps({"path": str(table.path), "rows": len(table), "dim": table.dim, "dtype": table.dtype,
                      "bytes_per_row": table.bytes_per_row, "kind": table.kind,
                      **table.signature.to_metadata()}, indent=2))


def cmd_models(args: argparse.Namespace) -> None:
    from weights.registry import EMBEDDED, resolve_model
    if args.action == "list":
        for name, what in EMBEDDED.items():
            print(f"{name:8s} {what}")
        return
    print(resolve_model(args.name))


def cmd_demo(args: argparse.Namespace) -> None:
    from engine.training.studies.demo import DemoConfig, run_demo
    from engine.training.studies.experiment import is_movielens_1m
    ml1m = is_movielens_1m(args.data)
    if args.quick and not ml1m:
        raise SystemExit("bahe demo: --quick is the MovieLens-1M demo's short run; add --data ml1m")
    name = Path(args.model).name
    out = Path(args.out) if args.out else Path("artifacts/demo") / (f"ml1m-{name}" if ml1m else name)
    from engine.training.studies.demo_ml1m import ML1M_TRAINING, Ml1mConfig
    overrides = {**ML1M_TRAINING, "epochs": args.epochs or ML1M_TRAINING["epochs"], "seed": args.seed,
                 "lr_decay": not args.constant_lr, "item_id_dropout": args.item_id_dropout} if ml1m else {}
    if args.lower_layers is not None:
        overrides["num_lower_layers"] = args.lower_layers
    config = DemoConfig.preset(args.model, data=args.data, out=out, results=Path(args.results), **overrides)
    if not ml1m:
        run_demo(config)
        return
    from engine.training.studies.demo_ml1m_report import run_ml1m_demo
    run_ml1m_demo(Ml1mConfig(config, quick=args.quick, threads=args.threads, models=tuple(args.models or ()),
                             splits=tuple(args.splits or ())),
                  command=shlex.join(["bahe", *sys.argv[1:]]) if sys.argv[1:] else "bahe demo --data ml1m")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from engine.training.loops.calibrate import calibrate_scorer
    from engine.training.studies.experiment import load_data
    report = calibrate_scorer(args.scorer, load_data(args.data), args.kind, newest=args.newest, save=not args.dry_run)
    c = report.calibration
    fitted = f"a={c.a:.4f}, b={c.b:+.4f}" if c.kind == "platt" else f"{len(c.x)} points"
    window = "validation" if args.newest is None else "newest"
    print(f"{c.kind} calibration ({fitted}) fitted on {report.fitted_examples:,} {window} examples; "
          f"{report.measured_on}, {report.measured_examples:,}:")
    print("\n".join(report.lines()))
    print("not saved (--dry-run)" if args.dry_run else f"saved into {args.scorer}")


def cmd_features(args: argparse.Namespace) -> None:
    from engine.training.export.features_command import features_command
    features_command(args)


def _run_module(module: str, argv: list[str]) -> None:
    """Run `python -m module argv...` (benchmarks live outside the package: no import of them here)."""
    import subprocess
    code = subprocess.call([sys.executable, "-m", module, *argv])
    if code:
        raise SystemExit(code)


def cmd_bench(args: argparse.Namespace) -> None:
    _run_module("bench.compare", args.bench_args)


def cmd_profile(args: argparse.Namespace) -> None:
    _run_module("bench.profile", args.profile_args)


# ----- keeping a scorer fresh: update, rollback, versions (docs/refresh.md) -----------------------
def cmd_update(args: argparse.Namespace) -> None:
    from engine.training.loops.update_command import run_update
    run_update(args)


def cmd_version_root(args: argparse.Namespace) -> None:
    """`bahe rollback` (make the previous version current) or `bahe versions` (list the kept ones)."""
    from engine.deploy.versions import VersionError, history_lines, rollback_lines
    try:
        print(rollback_lines(args.root) if args.command == "rollback" else "\n".join(history_lines(args.root)))
    except (VersionError, OSError) as err:
        raise SystemExit(f"bahe {args.command}: {err}") from None


def add_log_format(p: argparse.ArgumentParser) -> None:
    """--catalog and --timestamps: how to read a log file (engine.training.studies.experiment.load_data)."""
    p.add_argument("--catalog", help="an item catalog file (item_id, item_text[, cat_<name> ...]): the events' "
                   "item texts and item features, so the log need not repeat them")
    p.add_argument("--timestamps", default="auto", choices=["auto", "integer", "iso8601"],
                   help="the log's timestamps: integers (any unit), ISO-8601 times (read as epoch ms, UTC), or auto")


def add_refresh_commands(sub) -> None:
    """`bahe update`, `bahe rollback`, `bahe versions`."""
    p = sub.add_parser("update", help="warm-start the next scorer version on a new log, gate it, publish it")
    p.add_argument("--scorer", help="a scorer folder (starts the version root --out with it) or a version root")
    p.add_argument("--data", required=True, help="the new period's log (CSV/parquet, the `bahe train` schema)")
    add_log_format(p)  # of --data and --history
    p.add_argument("--out", help="the version root NEXT is published into (default: --scorer, if it is a root)")
    p.add_argument("--history", help="the older log: users' histories reach back into it; --replay samples it")
    p.add_argument("--replay", type=float, help="older events of --history replayed, as a fraction of the new "
                   "training examples (default with --history: 0.5; 0: none)")
    p.add_argument("--gate-fraction", type=float, default=0.2, help="newest fraction of the new log's events: the "
                   "gate period, never trained on")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the fraction before it: early stopping")
    p.add_argument("--force", action="store_true", help="publish NEXT even if it fails the gate")
    p.add_argument("--keep", type=int, default=3, help="versions kept for rollback")
    for flag, kind, default in (("--min-auc-gain", float, 0.0), ("--max-logloss-increase", float, 0.002),
                                ("--max-calibration-error", float, 0.15), ("--epochs", int, 2), ("--batch-size", int,
                                256), ("--lr", float, 1e-3), ("--backbone-lr", float, 5e-5), ("--seed", int, 0)):
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--device", default="auto")
    p.add_argument("--distributed", action="store_true", help="under torchrun: data-parallel fine-tuning; rank 0 "
                   "judges and publishes")
    p.add_argument("--stream", metavar="WORK", help="a new log bigger than memory: laid out as user shards in WORK "
                   "(as `bahe train --stream`) and fine-tuned shard by shard; its newest events are the gate")
    p.add_argument("--shards", type=int, default=16, help="with --stream: user shards")
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("rollback", help="make the previous scorer version current again")
    p.add_argument("root")
    p.set_defaults(func=cmd_version_root)

    p = sub.add_parser("versions", help="list a version root's kept versions")
    p.add_argument("root")
    p.set_defaults(func=cmd_version_root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bahe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="ABE: build or append to a behavior table from a text file")
    p.add_argument("texts", help="one text per line, or a CSV/parquet file with --column")
    p.add_argument("--column")
    p.add_argument("--model", default="minilm", help="'minilm', 'smollm2' or a local checkpoint folder")
    p.add_argument("--lower-layers", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", "--row-dtype", dest="dtype", default="float32",
                   choices=["float32", "float16", "bfloat16", "int8"],
                   help="row storage: int8 = per-row absmax int8 + a float32 scale (about 4x smaller than float32)")
    p.add_argument("--kind", default="behavior", choices=["behavior", "item"])
    p.add_argument("--out", required=True, help="table file (.safetensors); appended to if it exists")
    p.add_argument("--distributed", action="store_true", help="under torchrun: each rank encodes the texts whose "
                   "key falls on it (on cuda:LOCAL_RANK, else the CPU), rank 0 writes the table")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("train", help="fine-tune BAHE (upper layers + head) on a click log, save a scorer")
    p.add_argument("--data", default="movielens", help="'movielens' (MovieLens-100K), 'ml1m' (MovieLens-1M), a "
                   "folder of its .dat files, or a CSV/parquet log (user_id, item_id, timestamp, label, item_text[, "
                   "sequence][, cat_<name> ...])")
    add_log_format(p)
    p.add_argument("--model", default="minilm")
    p.add_argument("--out", required=True)
    p.add_argument("--lower-layers", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-behaviors", type=int, default=1024)
    p.add_argument("--categorical", default="all", help="categorical side features: 'all' (user_id and every "
                   "cat_<name> column of the log), 'none', or names joined by ','")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="targets per batch (timeline batches: a few users)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr", type=float, default=5e-5)
    p.add_argument("--lr-decay", action="store_true", help="both rates fall linearly to 0 over the epochs' steps")
    p.add_argument("--id-rows", action="store_true", help="ABE rows + learned id rows (ModelConfig.id_rows; ML-1M's)")
    p.add_argument("--item-id-dropout", type=float, default=0.0, help="ModelConfig.item_id_dropout (default 0)")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}-examples", type=int, help=f"a random sample of the {split} examples (all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--distributed", action="store_true", help="under torchrun: data-parallel (DDP) training, each "
                   "rank on cuda:LOCAL_RANK (else the CPU, gloo) takes its users' share of every batch; rank 0 saves")
    p.add_argument("--stream", metavar="WORK", help="a log bigger than memory: user shards in the folder WORK (new, "
                   "empty or an earlier --stream's: emptied first), trained shard by shard, one in memory at a time")
    p.add_argument("--shards", type=int, default=16, help="with --stream: user shards (and item-count time buckets)")
    p.add_argument("--steps-per-shard", type=int, help="with --stream: optimizer steps per shard per epoch (all)")
    p.add_argument("--eval-per-shard", type=int, help="with --stream: val / test examples per shard (all)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score JSON lines {\"user\": {...}, \"item\": \"...\"} (or \"item_id\": an id "
                       "of the scorer's catalog, ids.json) with a saved scorer")
    p.add_argument("--scorer", required=True)
    p.add_argument("--input", default="-")
    p.add_argument("--device", default="auto")
    p.add_argument("--kernels", choices=["auto", "torch", "triton"],
                   help="kernel path (default: $BAHE_KERNELS, else auto)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("demo", help="MovieLens-100K (or -1M): BAHE vs its peers, one table")
    p.add_argument("--model", default="minilm")
    p.add_argument("--data", default="movielens", help="'movielens' (MovieLens-100K) or 'ml1m' (MovieLens-1M, "
                   "or a folder of its .dat files): BAHE against its strongest peers, three splits, ~2.5 h on 2 cores")
    p.add_argument("--quick", action="store_true", help="with --data ml1m: the time split, BAHE, the sequential id "
                   "model and both LightGBM rows (all the training data)")
    p.add_argument("--models", nargs="+", help="with --data ml1m: these rows only (BAHE always; names as in the "
                   "table, e.g. BAHE 'sequential id' 'LightGBM, side + text features')")
    p.add_argument("--splits", nargs="+", help="with --data ml1m: these splits only ('time', 'per-user', "
                   "'held-out items'); the RESULTS.md section is named after them")
    p.add_argument("--epochs", type=int, help="with --data ml1m: most epochs per neural model (default 2)")
    p.add_argument("--lower-layers", type=int, help="frozen lower layers (default: the model's preset, minilm 5)")
    p.add_argument("--constant-lr", action="store_true", help="with --data ml1m: constant learning rates (default: "
                   "linear decay to 0 over the planned epochs, docs/results-movielens-1m.md)")
    p.add_argument("--seed", type=int, default=0, help="with --data ml1m: weights, data order, held-out items")
    p.add_argument("--item-id-dropout", type=float, default=0.0, help="with --data ml1m: ModelConfig.item_id_dropout")
    p.add_argument("--out", help="output folder (default: artifacts/demo/<model>)")
    p.add_argument("--results", default="bench/RESULTS.md")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="fit, report and save a scorer's probability calibration (log loss, ECE, AUC)")
    p.add_argument("--scorer", required=True)
    p.add_argument("--data", default="movielens", help="a log: its time split's validation part fitted, test reported")
    p.add_argument("--kind", default="platt", choices=["platt", "isotonic"])
    p.add_argument("--newest", type=int, help="fit on the log's newest N labels instead (a periodic refit)")
    p.add_argument("--dry-run", action="store_true", help="report only; leave the scorer folder as it is")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("features", help="BAHE's feature block per log example, for a ranker (docs/feature-export.md)")
    p.add_argument("--scorer", action="append", help="a scorer folder with a training record (repeatable)")
    p.add_argument("--folds", type=int, help="train K scorers on disjoint user folds, each for its held-out users")
    p.add_argument("--data", required=True, help="the log, as `bahe train --data`")
    p.add_argument("--out", required=True, help="the parquet file to write")
    p.add_argument("--since", type=int, help="only the examples at or after this timestamp")
    p.add_argument("--project", type=int, help="the vectors' width (default: the model's hidden size)")
    p.add_argument("--projection", default="random", choices=["random", "pca"])
    p.add_argument("--work", help="with --folds: where the fold scorers go (default: next to --out)")
    for flag, kind, default in (("--model", str, "minilm"), ("--lower-layers", int, 3), ("--max-behaviors", int, 1024),
                                ("--epochs", int, 2), ("--batch-size", int, 256), ("--seed", int, 0),
                                ("--device", str, "cpu")):
        p.add_argument(flag, type=kind, default=default, help="with --folds: as `bahe train`'s")
    p.add_argument("--lr-decay", action="store_true", help="with --folds: as `bahe train`'s")
    p.set_defaults(func=cmd_features, categorical="all", max_tokens=32, lr=1e-3, backbone_lr=5e-5)

    # Everything after `bench` / `profile` goes to the benchmark's own parser ('+' prefix: '--x' stays an argument).
    p = sub.add_parser("bench", help="BAHE vs raw-token: time and memory as M grows (bench.compare)",
                       prefix_chars="+", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("profile", help="a scoring batch under torch.profiler, stage by stage", prefix_chars="+",
                       add_help=False)
    p.add_argument("profile_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("models", help="embedded models: list, or prepare (convert and cache) one")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("name", nargs="?", default="smollm2")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="print a behavior table's metadata")
    p.add_argument("table")
    p.add_argument("--verify", action="store_true", help="scan every row and key")
    p.set_defaults(func=cmd_info)
    add_refresh_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
