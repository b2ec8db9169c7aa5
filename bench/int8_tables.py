"""int8 behavior tables against float32 ones on a trained scorer, side by side in one run: bytes per row,
gather time, the largest probability difference and the paired test-AUC difference.

    python -m bench.int8_tables --scorer DIR [--data movielens] [--path serving] [--threads 1] [--limit N]

The scorer's float32 tables are rewritten as int8 tables (weights.row_codec: per-row absmax / 127) in a copy of
its folder (the same rows `bahe encode --row-dtype int8` writes: quantization is applied to the encoder's
float32 rows, which the float32 table holds exactly); its item vectors are then stale (their fingerprint names
the int8 table) and recomputed from the int8 rows. Both scorers score every test example of the time split
with `BAHEScorer.score` (whole histories as texts, categorical side features), as bench.serving_auc does, or with
`--path timeline` through the training's batched predict (BAHECTR: one forward per user, the path `bahe train`
reports test AUC on; minutes instead of hours on MovieLens-1M); the AUC difference is paired over users (1,000
user resamples). Gather: ops.jagged_gather of --gather-rows random rows (+ position embeddings) from each table,
median of --reps alternating calls, on this machine's backend. MovieLens-1M writes its own section (-ml1m).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.serving_auc import served
from engine.serving.scorer import BAHEScorer
from engine.serving.scorer_folder import BEHAVIORS_FILE, ITEMS_FILE, SCORER_FILE
from engine.training.loops.ctr_models import BAHECTR
from engine.training.loops.train import predict
from engine.training.studies.experiment import cpu_threads, data_name, load_data, ml1m_suffix
from engine.training.studies.metrics import auc_interval, paired_auc_difference
from engine.training.studies.results_sections import machine, write_section
from kernels import ops
from weights.table import BehaviorTable

MARKER = "bench:int8-tables"


class StoredRows:
    """A TextEncoder that returns a table's stored float32 rows (for writing the same rows in another dtype)."""

    def __init__(self, table: BehaviorTable) -> None:
        self.table, self.signature = table, table.signature

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.table.float_rows(torch.from_numpy(self.table.lookup(texts)))


def int8_copy(scorer_dir: Path, target: Path) -> None:
    """A copy of the scorer folder whose behavior and item tables are int8 (same texts, same row order)."""
    shutil.copytree(scorer_dir, target)
    for name in (BEHAVIORS_FILE, ITEMS_FILE):
        source = BehaviorTable.open(scorer_dir / name)
        texts = [source.text(i) for i in range(len(source))]
        built = BehaviorTable.build(target / name, texts, StoredRows(source), dtype="int8", kind=source.kind,
                                    overwrite=True)
        if not np.array_equal(built.keys, source.keys):
            raise RuntimeError(f"{name}: the int8 copy does not keep the row order")
    meta = json.loads((target / SCORER_FILE).read_text())
    meta["config"]["encoder"]["table_dtype"] = "int8"
    (target / SCORER_FILE).write_text(json.dumps(meta))


def gather_ms(tables: dict[str, object], dim: int, rows: int, reps: int, seed: int = 0) -> dict[str, float]:
    """Median ms of ops.jagged_gather (+ positions, float32 out) of `rows` random rows from each table, alternating."""
    gen = torch.Generator().manual_seed(seed)
    size = next(iter(tables.values())).shape[0]
    ids = torch.randint(0, size, (rows,), generator=gen)
    offsets = torch.arange(0, rows + 1, 64).clamp(max=rows)
    offsets = torch.cat([offsets, torch.tensor([rows])]) if int(offsets[-1]) != rows else offsets
    pos = torch.randn(64, dim, generator=gen)
    samples = {name: [] for name in tables}
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first round warms up
            for name, table in tables.items():
                began = time.perf_counter()
                ops.jagged_gather(table, ids, offsets=offsets, pos=pos, max_len=64, out_dtype=torch.float32)
                samples[name].append((time.perf_counter() - began) * 1e3)
    return {name: statistics.median(times[1:]) for name, times in samples.items()}


def timeline_scored(scorer: BAHEScorer, data, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Probabilities of the log's example `rows` (sorted) through the training's batched predict, and the seconds."""
    start = time.perf_counter()
    return predict(BAHECTR(scorer, data), data, rows, batch_size=512), time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.int8_tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--scorer", type=Path, required=True, help="a trained scorer folder with float32 tables")
    p.add_argument("--data", default="movielens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--path", choices=["serving", "timeline"], default="serving",
                   help="serving: BAHEScorer.score on texts; timeline: the training's batched predict")
    p.add_argument("--chunk", type=int, default=256, help="pairs per score call (serving path)")
    p.add_argument("--limit", type=int, default=None, help="first N test examples only (smoke runs)")
    p.add_argument("--gather-rows", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--results-md", default="bench/RESULTS.md", help="markdown file to update ('': skip)")
    p.add_argument("--note", default="", help="a sentence for the results section (e.g. the machine was shared)")
    args = p.parse_args(argv)
    with cpu_threads(args.threads), tempfile.TemporaryDirectory() as work:
        host = machine()
        data = load_data(args.data)
        rows = np.sort(data.split().test[:args.limit])
        fp32 = BAHEScorer.from_pretrained(args.scorer, device="cpu")
        if fp32.behaviors.dtype != "float32":
            raise SystemExit(f"{args.scorer}: its tables are {fp32.behaviors.dtype}, expected float32")
        int8_copy(args.scorer, Path(work) / "int8")
        int8 = BAHEScorer.from_pretrained(Path(work) / "int8", device="cpu")
        labels, who = data.label[rows], data.user[rows]
        if args.path == "timeline":
            def scored(scorer):
                return timeline_scored(scorer, data, rows)
        else:
            names = fp32.config.model.categorical_features
            values = {name: data.category_values(name, rows) for name in names}
            side = [{name: values[name][i] for name in names} for i in range(rows.size)]
            users, items = data.sequence_texts(rows, None), data.target_texts(rows)

            def scored(scorer):
                return served(scorer, users, items, side, args.chunk)
        probs, seconds = {}, {}
        for key, scorer in (("fp32", fp32), ("int8", int8)):
            probs[key], seconds[key] = scored(scorer)
        gathers = gather_ms({"fp32": fp32.table_rows("behaviors"), "int8": int8.table_rows("behaviors")},
                            fp32.behaviors.dim, args.gather_rows, args.reps)
        sizes = {key: (scorer.behaviors.bytes_per_row, scorer.behaviors.path.stat().st_size)
                 for key, scorer in (("fp32", fp32), ("int8", int8))}
    aucs = {k: auc_interval(labels, v, who) for k, v in probs.items()}
    diff = paired_auc_difference(labels, probs["int8"], probs["fp32"], who)
    max_diff = float(np.abs(probs["int8"].astype(np.float64) - probs["fp32"]).max())
    lines = ["| behavior table | bytes per row | table file | gather ms | test AUC [95% CI] | test users | score s |",
             "|---|---|---|---|---|---|---|"]
    for key in ("fp32", "int8"):
        lines.append(f"| {key} | {sizes[key][0]:,} | {sizes[key][1] / 2**20:.2f} MiB | {gathers[key]:.2f} | "
                     f"{aucs[key].value:.4f} [{aucs[key].low:.4f}, {aucs[key].high:.4f}] | {aucs[key].users} | "
                     f"{seconds[key]:.1f} |")
    lines += ["", f"int8 - fp32 test AUC: {diff.value:+.5f} [{diff.low:+.5f}, {diff.high:+.5f}] (paired over users); "
              f"largest probability difference {max_diff:.2e} over {rows.size:,} test examples; gather: "
              f"{args.gather_rows:,} rows + positions, float32 out, median of {args.reps}."]
    given = list(sys.argv[1:] if argv is None else argv)
    if "--note" in given:  # the note is printed as prose after the command
        at = given.index("--note")
        del given[at:at + 2]
    command = " ".join(["python -m bench.int8_tables", *given])
    print("\n".join(lines))
    if args.results_md:
        path = "serving path" if args.path == "serving" else "training's batched predict"
        write_section(args.results_md, MARKER + ml1m_suffix(args.data), [
            f"### int8 behavior tables vs float32 ({path}, {data_name(args.data)} time split)", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {host}. {args.note}".rstrip(), "", *lines])
    return {"auc": {k: v.value for k, v in aucs.items()}, "int8_minus_fp32": diff.value, "max_diff": max_diff,
            "gather_ms": gathers, "bytes_per_row": {k: v[0] for k, v in sizes.items()}}


if __name__ == "__main__":
    main()
