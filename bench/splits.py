"""Choose num_lower_layers: BAHE trained with several splits of one model on the same MovieLens
examples; validation AUC against ABE and training cost. Writes its table to bench/RESULTS.md.

    python -m bench.splits --model smollm2 --layers 21 24 27 29
"""
from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.training.loops.ctr_models import BAHECTR
from engine.training.studies.results_sections import machine, write_section
from engine.training.studies.experiment import SampleConfig, build_scorer, load_data, sample_split, train_and_test
from engine.training.loops.train import TrainConfig
from weights.checkpoint import Checkpoint
from weights.registry import resolve_model


def run(model: str, layers: list[int], sample: SampleConfig, max_behaviors: int, epochs: int,
        out: Path, batch_size: int) -> list[str]:
    data = load_data("movielens")
    rows = sample_split(data.split(), sample)
    total = Checkpoint(resolve_model(model)).num_layers
    lines = ["| lower layers (frozen, ABE) | upper layers (trained) | ABE s (both tables) | train s/epoch | "
             "best val AUC | test AUC |", "|---|---|---|---|---|---|"]
    for lower in layers:
        config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=lower),
                              model=ModelConfig(sequence_names=data.sequence_names, max_behaviors=max_behaviors))
        scorer, tables = build_scorer(model, data, config, out / f"tables-{lower}", device="cpu")
        report = train_and_test(BAHECTR(scorer, data), data, rows, TrainConfig(epochs=epochs, patience=epochs,
                                                                                batch_size=batch_size))
        lines.append(f"| {lower} | {total - lower} | {tables.seconds:.0f} | {np.mean(report.fit.epoch_seconds):.0f} | "
                     f"{report.fit.best_val_auc:.4f} | {report.test['auc']:.4f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, nargs="+", default=[21, 24, 27, 29])
    parser.add_argument("--train", type=int, default=2000, help="examples (0: all)")
    parser.add_argument("--val", type=int, default=300, help="examples (0: all)")
    parser.add_argument("--test", type=int, default=500, help="examples (0: all)")
    parser.add_argument("--max-behaviors", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default="artifacts/splits")
    parser.add_argument("--results", default="bench/RESULTS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sample = SampleConfig(args.train or None, args.val or None, args.test or None)
    lines = run(args.model, args.layers, sample, args.max_behaviors, args.epochs, Path(args.out), args.batch_size)
    command = (f"python -m bench.splits --model {args.model} --layers {' '.join(map(str, args.layers))} "
               f"--train {args.train} --val {args.val} --test {args.test} --max-behaviors {args.max_behaviors} "
               f"--epochs {args.epochs}")
    write_section(args.results, f"splits:{args.model}", [
        f"### Choosing num_lower_layers for {args.model}", "",
        f"`{command}` on {datetime.date.today().isoformat()}, {machine()}; "
        f"{(time.perf_counter() - started) / 60:.0f} min. MovieLens-100K time split, the same "
        f"{args.train or 'all'} train / {args.val or 'all'} validation / {args.test or 'all'} test examples for "
        f"every split, M = {args.max_behaviors}, {args.epochs} epochs, the full CTR model.", "", *lines])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
