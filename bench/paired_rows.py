"""Two finished MovieLens-1M demo rows compared on the test examples they share: the kept row files of two runs
(RowCache .npz under <out>/rows, e.g. one model trained with two settings), each row's test AUC and GAUC with 95%
user-bootstrap intervals, and the paired differences A - B (same resampled users).

    python -m bench.paired_rows A.npz B.npz [--data ml1m] [--resamples 1000]

Refuses rows scored on different examples (their fingerprints' split rows differ) or a log whose split is not
the rows' (another --data).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from engine.training.studies.demo_ml1m import RowCache, ml1m_splits
from engine.training.studies.experiment import load_data
from engine.training.studies.metrics import (auc_interval, gauc_interval, paired_auc_difference,
                                             paired_gauc_difference, undefined_as_nan)


def main(argv: list[str] | None = None) -> list[str]:
    """Print (and return) the comparison's lines."""
    p = argparse.ArgumentParser(prog="python -m bench.paired_rows", description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="row file A (<out>/rows/<split>--<model>--<key>.npz)")
    p.add_argument("b", type=Path, help="row file B, scored on the same split")
    p.add_argument("--data", default="ml1m", help="the log both rows were scored on")
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    (probs_a, meta_a), (probs_b, meta_b) = RowCache.read(args.a), RowCache.read(args.b)
    fa, fb = meta_a["fingerprint"], meta_b["fingerprint"]
    if (fa["split"], fa["rows"]) != (fb["split"], fb["rows"]):
        raise SystemExit(f"{args.a.name} and {args.b.name} were scored on different examples "
                         f"({fa['split']!r} vs {fb['split']!r}, or other rows)")
    data = load_data(args.data)
    splits, _ = ml1m_splits(data, (fa["split"],), fa.get("held_out_fraction", 0.0), fa["seed"])  # (sweep rows: time)
    rows = splits[fa["split"]]
    if RowCache.rows_key(rows) != fa["rows"]:
        raise SystemExit(f"the {fa['split']} split of {args.data} is not the one these rows were scored on")
    test = rows["test"]
    labels, users = data.label[test], data.user[test]
    lines = [f"{fa['split']} split of {args.data}: {test.size:,} test examples, {len(set(users)):,} test users", "",
             "| row | model | settings | test AUC [95%] | test GAUC [95%] |", "|---|---|---|---|---|"]
    for name, probs, f in (("A", probs_a, fa), ("B", probs_b, fb)):
        a = auc_interval(labels, probs, users, resamples=args.resamples)
        g = undefined_as_nan(partial(gauc_interval, resamples=args.resamples), labels, probs, users)
        settings = ", ".join(f"{k} {v}" for k, v in sorted(f.items()) if k not in ("model", "split", "rows"))
        lines.append(f"| {name} | {f['model']} | {settings} | {a.value:.4f} [{a.low:.4f}, {a.high:.4f}] | "
                     f"{g.value:.4f} [{g.low:.4f}, {g.high:.4f}] |")
    auc = paired_auc_difference(labels, probs_a, probs_b, users, resamples=args.resamples)
    gauc = undefined_as_nan(partial(paired_gauc_difference, resamples=args.resamples), labels, probs_a, probs_b,
                            users)
    lines += ["", f"A - B, paired (same resampled users): AUC {auc.value:+.4f} [{auc.low:+.4f}, {auc.high:+.4f}], "
              f"GAUC {gauc.value:+.4f} [{gauc.low:+.4f}, {gauc.high:+.4f}]"]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
