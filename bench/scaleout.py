"""1 process vs N processes (torchrun, gloo on the CPU or NCCL on GPUs), side by side in one run:

- ABE: `bahe encode` of the MovieLens-100K item texts (the demo's 1,664 unique texts) with --model, vs
  `torchrun --nproc-per-node N -m engine.cli encode --distributed`; texts/s of the encoding and the write
  (the model's loading is not counted; process start-up is reported apart, as the command's wall time).
- Training: `bahe train` for one short epoch on a sample of MovieLens vs the same under torchrun --distributed;
  train examples/s of the epoch (as the command prints it).

    python -m bench.scaleout                         # minilm, 2 processes, 1 thread each
    python -m bench.scaleout --nproc 2 --train-examples 6000
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], threads: int) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, wall


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "engine.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "engine.cli"]


def encode(nproc: int, texts: Path, work: Path, args: argparse.Namespace) -> tuple[float, float]:
    out = work / f"encode-{nproc}.safetensors"
    command = [*_launcher(nproc), "encode", str(texts), "--model", args.model, "--lower-layers",
               str(args.lower_layers), "--out", str(out)] + (["--distributed"] if nproc > 1 else [])
    printed, wall = _run(command, args.threads)
    seconds = float(re.search(r"in ([0-9.]+) s", printed).group(1))
    return seconds, wall


def train(nproc: int, work: Path, args: argparse.Namespace) -> tuple[float, float]:
    command = [*_launcher(nproc), "train", "--model", args.model, "--lower-layers", str(args.lower_layers),
               "--out", str(work / f"train-{nproc}"), "--epochs", "1", "--train-examples", str(args.train_examples),
               "--val-examples", "500", "--test-examples", "500", "--max-behaviors", str(args.max_behaviors),
               "--device", "cpu"] + (["--distributed"] if nproc > 1 else [])
    printed, wall = _run(command, args.threads)
    return float(re.search(r"([0-9.]+) train examples/s", printed).group(1)), wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--lower-layers", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--train-examples", type=int, default=6000)
    p.add_argument("--max-behaviors", type=int, default=100)
    args = p.parse_args(argv)
    if args.nproc < 2:
        raise SystemExit(f"--nproc must be >= 2 (compared with 1 process), got {args.nproc}")
    from engine.training.data.movielens import load_movielens
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = work / "texts.txt"
        from weights.text_key import normalize_text
        item_texts = load_movielens().item_id_texts
        texts.write_text("\n".join(item_texts) + "\n")
        count = len(dict.fromkeys(normalize_text(t) for t in item_texts))  # the table's rows: unique texts
        rows = []
        enc = {n: encode(n, texts, work, args) for n in (1, args.nproc)}
        rows.append(("ABE encode, texts/s", count / enc[1][0], count / enc[args.nproc][0]))
        rows.append(("ABE encode command, wall s", enc[1][1], enc[args.nproc][1]))
        trn = {n: train(n, work, args) for n in (1, args.nproc)}
        rows.append(("train, examples/s (1 epoch)", trn[1][0], trn[args.nproc][0]))
        rows.append(("train command, wall s", trn[1][1], trn[args.nproc][1]))
    print(f"{args.model}, {count} unique texts, {args.train_examples} train examples, {args.threads} thread(s) per process")
    print(f"| measure | 1 process | {args.nproc} processes | speed-up |\n|---|---|---|---|")
    for name, one, many in rows:  # speed-up: rate ratio, or the inverse ratio of seconds
        print(f"| {name} | {one:.1f} | {many:.1f} | {(one / many if name.endswith(' s') else many / one):.2f}x |")


if __name__ == "__main__":
    main()
