"""Test-set AUC through the serving path, fp32 vs bf16, side by side in one run: the demo's saved scorer
(`bahe demo`, time split) scores every test example of the time split with `BAHEScorer.score` on the target's
whole history as texts and its categorical side features, once opened in float32 and once with
dtype='bfloat16'; beside them the training function's AUC (timeline forward, item counts from the log's past).

    python -m bench.serving_auc [--scorer artifacts/demo/minilm/scorer] [--threads 2]

Prints AUC with 95% user-bootstrap intervals, the paired bf16 - fp32 difference, the largest probability
difference and the scoring time of each; writes the section <!-- bench:serving-auc --> of --results-md."""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

from engine.serving.scorer import BAHEScorer
from engine.training.loops.ctr_models import BAHECTR
from engine.training.studies.experiment import cpu_threads, load_data
from engine.training.studies.metrics import auc_interval, paired_auc_difference
from engine.training.studies.results_sections import machine, write_section
from engine.training.loops.train import predict

MARKER = "bench:serving-auc"


def _ci(i) -> str:
    return f"{i.value:.4f} [{i.low:.4f}, {i.high:.4f}]"


def served(scorer: BAHEScorer, users: list, items: list[str], side: list[dict], chunk: int) -> tuple[np.ndarray, float]:
    """Probabilities of the pairs through `score`, `chunk` pairs per call, and the seconds it took."""
    start, out = time.perf_counter(), []
    for lo in range(0, len(items), chunk):
        out.append(scorer.score(users[lo:lo + chunk], items[lo:lo + chunk], side_features=side[lo:lo + chunk]))
    return np.concatenate(out), time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.serving_auc", description=__doc__.split("\n\n")[0])
    p.add_argument("--scorer", type=Path, default=Path("artifacts/demo/minilm/scorer"))
    p.add_argument("--data", default="movielens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk", type=int, default=256, help="pairs per score call")
    p.add_argument("--limit", type=int, default=None, help="first N test examples only (smoke runs)")
    p.add_argument("--results-md", default="bench/RESULTS.md", help="markdown file to update ('': skip)")
    p.add_argument("--note", default="", help="a sentence for the results section (e.g. the machine was shared)")
    args = p.parse_args(argv)
    with cpu_threads(args.threads):
        host = machine()
        data = load_data(args.data)
        rows = data.split().test[:args.limit]
        fp32 = BAHEScorer.from_pretrained(args.scorer, device="cpu")
        bf16 = BAHEScorer.from_pretrained(args.scorer, device="cpu", dtype="bfloat16")
        names = fp32.config.model.categorical_features
        values = {name: data.category_values(name, rows) for name in names}
        side = [{name: values[name][i] for name in names} for i in range(rows.size)]
        users, items = data.sequence_texts(rows, None), data.target_texts(rows)
        labels, who = data.label[rows], data.user[rows]
        probs = {}
        probs["fp32"], fp32_s = served(fp32, users, items, side, args.chunk)
        probs["bf16"], bf16_s = served(bf16, users, items, side, args.chunk)
        probs["timeline"] = predict(BAHECTR(fp32, data), data, rows)
    aucs = {k: auc_interval(labels, v, who) for k, v in probs.items()}
    diff = paired_auc_difference(labels, probs["bf16"], probs["fp32"], who)
    max_diff = float(np.abs(probs["bf16"].astype(np.float64) - probs["fp32"]).max())
    lines = ["| scoring | test AUC [95% CI] | test users | seconds | pairs/s |", "|---|---|---|---|---|",
             f"| `score`, fp32 | {_ci(aucs['fp32'])} | {aucs['fp32'].users} | {fp32_s:.1f} | {rows.size / fp32_s:,.0f} |",
             f"| `score`, bf16 | {_ci(aucs['bf16'])} | {aucs['bf16'].users} | {bf16_s:.1f} | {rows.size / bf16_s:,.0f} |",
             f"| training function (timeline, item counts from the log's past) | {_ci(aucs['timeline'])} | "
             f"{aucs['timeline'].users} | | |", "",
             f"bf16 - fp32 AUC: {diff.value:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}] (paired over users); largest "
             f"probability difference {max_diff:.2e} over {rows.size:,} test examples."]
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench.serving_auc", *given])
    print("\n".join(lines))
    if args.results_md:
        write_section(args.results_md, MARKER, [
            "### Serving-path test AUC, fp32 vs bf16", "",
            f"`{command}` on {datetime.date.today().isoformat()}, {host}. The demo's saved scorer ({args.scorer}: "
            f"time split) scores the {rows.size:,} test examples of the time split with `BAHEScorer.score` (whole "
            "histories as texts, categorical side features; item statistics from the scorer's snapshot at the test "
            "cut), opened in fp32 and with dtype='bfloat16'; 95% intervals resample users (1,000 resamples). "
            f"{args.note}".rstrip(), "",
            *lines])
    return {"auc": {k: v.value for k, v in aucs.items()}, "bf16_minus_fp32": diff.value, "max_diff": max_diff}


if __name__ == "__main__":
    main()
