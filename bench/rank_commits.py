"""`bench.rank` of two source trees (e.g. an old commit's `git worktree` and this one) side by side in one run:
rounds alternate which tree goes first, so load drift hits both alike; prints the median over rounds of each
(M, K) row's rank p50 and user-cached p50, and their new / old ratio.

    git worktree add /tmp/old <commit>
    python -m bench.rank_commits --old /tmp/old --new . --rounds 4 -- --threads 1 --ks 1000 --ms 100 --repeats 15

Everything after `--` goes to `python -m bench.rank` in each tree (run with this interpreter, cwd = the tree)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np


def rank_rows(tree: Path, bench_args: list[str]) -> dict[tuple[int, int], tuple[float, float]]:
    """(M, K) -> (rank p50 ms, cached p50 ms) of one `python -m bench.rank` run in `tree`."""
    done = subprocess.run([sys.executable, "-m", "bench.rank", *bench_args], cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench.rank in {tree} failed:\n{done.stderr[-3000:]}")
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].isdigit():
            rows[(int(cells[0]), int(cells[1]))] = (float(cells[2]), float(cells[6]))
    return rows


def main(argv: list[str] | None = None) -> list[str]:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m bench.rank_commits", description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="the baseline source tree")
    p.add_argument("--new", type=Path, default=Path("."), help="the tree measured against it")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(ours)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            runs[name].append(rank_rows(trees[name], bench_args))
    lines = ["| M | K | old rank p50 ms | new rank p50 ms | new / old | old cached p50 ms | new cached p50 ms | new / old |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(runs["new"][0]):
        old = np.median([run[key] for run in runs["old"]], axis=0)
        new = np.median([run[key] for run in runs["new"]], axis=0)
        lines.append(f"| {key[0]} | {key[1]} | {old[0]:.2f} | {new[0]:.2f} | {new[0] / old[0]:.2f} | {old[1]:.2f} | "
                     f"{new[1]:.2f} | {new[1] / old[1]:.2f} |")
    print(f"medians over {args.rounds} alternating rounds; old = {trees['old']}, new = {trees['new']}")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
