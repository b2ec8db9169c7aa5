"""Calibration of a trained scorer (issue 23 item 4): its raw served probabilities, the Platt and isotonic maps
fitted on the validation part of the log's time split, and a Platt map refitted for each test period on the newest
labels before it (what a daily recalibration would serve), measured on the test part - log loss, ECE with a 95%
user-bootstrap interval, the ECE a perfectly calibrated model would show on this many examples (the noise floor,
engine.training.studies.calibration_metrics), AUC - and the reliability curves as a table and a plot. The scorer
folder is only read (`bahe calibrate` saves a map into it).

    python -m bench.reliability --scorer DIR [--data ml1m] [--threads 2]

Outputs: the section `<!-- bench:calibration:<data> -->` of --results-md and calibration-<data>.png and .json
under --out-dir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from engine.model.calibration import calibrate
from engine.serving.scorer import BAHEScorer
from engine.training.loops.calibrate import CalibrationReport, ServedSplit, rolling_calibration
from engine.training.studies.calibration_metrics import ece_interval, ece_noise_floor, reliability_curve
from engine.training.studies.experiment import cpu_threads, load_data
from engine.training.studies.metrics import log_loss, roc_auc
from engine.training.studies.results_sections import machine, write_section

KINDS = ("platt", "isotonic")
ROLLING = "rolling platt"  # refitted per test period on the newest labels (engine.training.loops.calibrate)


def measure(scorer_dir: Path, data_name: str, resamples: int, periods: int, window: int, users: int | None = None,
            seed: int = 0) -> dict:
    """Every figure of the module docstring, as a JSON-ready dict (`users`: a sample of the split's users)."""
    data = load_data(data_name)
    start = time.perf_counter()
    served = ServedSplit.of(BAHEScorer.from_pretrained(scorer_dir, device="cpu"), data, users=users, seed=seed)
    seconds = time.perf_counter() - start
    reports = {kind: CalibrationReport.fit(kind, served) for kind in KINDS}
    probs = {"raw": served.test_probs, **{k: calibrate(r.calibration, served.test_probs) for k, r in reports.items()},
             ROLLING: rolling_calibration(served, "platt", periods=periods, window=window)}
    rows = {}
    for name, p in probs.items():
        ece, low, high = ece_interval(served.test_labels, p, served.test_users, resamples=resamples)
        floor, floor95 = ece_noise_floor(p)
        curve = reliability_curve(served.test_labels, p)
        rows[name] = {"logloss": log_loss(served.test_labels, p), "auc": roc_auc(served.test_labels, p), "ece": ece,
                      "ece_low": low,
                      "ece_high": high, "floor": floor, "floor95": floor95,
                      "curve": {"predicted": curve.predicted.tolist(), "observed": curve.observed.tolist(),
                                "count": curve.count.tolist()}}
    fits = {k: (f"a = {r.calibration.a:.3f}, b = {r.calibration.b:+.3f}" if k == "platt"
                else f"{len(r.calibration.x)} points") for k, r in reports.items()}
    fits[ROLLING] = f"refitted for each of {periods} test periods on the newest {window:,} labeled examples before it"
    return {"scorer": str(scorer_dir), "data": data_name, "val_examples": int(served.val_labels.size),
            "test_examples": int(served.test_labels.size), "test_users": int(np.unique(served.test_users).size),
            "val_positive_rate": float(served.val_labels.mean()),
            "test_positive_rate": float(served.test_labels.mean()),
            "serving_seconds": seconds, "fits": fits, "rows": rows}


def table_lines(result: dict) -> list[str]:
    lines = ["| test split | log loss | ECE [95% over users] | ECE of a perfectly calibrated model (mean; 95th pct) "
             "| AUC |", "|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        label = name if name == "raw" else f"{name} ({result['fits'][name]})"
        lines.append(f"| {label} | {r['logloss']:.4f} | {r['ece']:.4f} [{r['ece_low']:.4f}, {r['ece_high']:.4f}] | "
                     f"{r['floor']:.4f}; {r['floor95']:.4f} | {r['auc']:.4f} |")
    curves = result["rows"]
    lines += ["", "| " + " | ".join(f"{n}: predicted | observed | examples" for n in curves) + " |",
              "|" + "---|" * (3 * len(curves))]
    depth = max(len(r["curve"]["count"]) for r in curves.values())
    for i in range(depth):
        cells = []
        for r in curves.values():
            c = r["curve"]
            cells += ([f"{c['predicted'][i]:.3f}", f"{c['observed'][i]:.3f}", f"{int(c['count'][i]):,}"]
                      if i < len(c["count"]) else ["", "", ""])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(result: dict, path: Path) -> None:
    """The reliability curves (observed vs mean predicted click rate per bin) beside the diagonal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, label="perfect")
    for name, r in result["rows"].items():
        ax.plot(r["curve"]["predicted"], r["curve"]["observed"], marker="o", ms=3,
                label=f"{name}: ECE {r['ece']:.4f}")
    ax.set(xlabel="mean predicted click probability (bin)", ylabel="observed click rate",
           title=f"reliability on the {result['data']} test split", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scorer", type=Path, required=True, help="a scorer folder (read only)")
    p.add_argument("--data", default="movielens", help="the log it was trained on (engine.training.studies."
                   "experiment.load_data)")
    p.add_argument("--resamples", type=int, default=1000, help="user-bootstrap resamples of the ECE")
    p.add_argument("--periods", type=int, default=20, help="test periods of the rolling Platt map")
    p.add_argument("--window", type=int, default=20_000, help="labeled examples each rolling fit uses")
    p.add_argument("--users", type=int, default=None, help="serve the validation and test examples of this many "
                   "users drawn at random (None: all; MovieLens-1M's 200k examples take over 30 min on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="the user sample's seed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--results-md", default="bench/RESULTS.md", help="markdown file to update ('' to skip)")
    args = p.parse_args(argv)
    with cpu_threads(args.threads):
        host = machine()
        result = measure(args.scorer, args.data, args.resamples, args.periods, args.window, args.users, args.seed)
    name = Path(args.data).stem
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / f"calibration-{name}.png"
    (args.out_dir / f"calibration-{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, png)
    table = table_lines(result)
    print("\n".join(table))
    if args.results_md:
        link = os.path.relpath(png, Path(args.results_md).resolve().parent)
        sampled = "" if args.users is None else f" (those of {args.users:,} users drawn with seed {args.seed})"
        write_section(args.results_md, f"bench:calibration:{name}", [
            f"### Calibration on {args.data}: raw, Platt and isotonic", "",
            f"`python -m bench.reliability {' '.join(argv)}` on {datetime.date.today().isoformat()}, {host}. Maps "
            f"fitted on the time split's {result['val_examples']:,} validation examples{sampled} (positive rate "
            f"{result['val_positive_rate']:.3f}), measured on its {result['test_examples']:,} test examples "
            f"({result['test_users']:,} users, positive rate {result['test_positive_rate']:.3f}) through "
            f"`BAHEScorer.score` ({result['serving_seconds']:.0f} s for both parts); 15 equal-width bins, empty bins "
            "left out. The floor column: the ECE that labels drawn from the row's own probabilities give on this many "
            "examples (200 draws) - what no calibration can go under.", "", *table, "",
            f"![reliability curves]({link})"])
        print(f"wrote {args.results_md} (section <!-- bench:calibration:{name} -->)")
    print(f"wrote {png}")
    return result


if __name__ == "__main__":
    main()
