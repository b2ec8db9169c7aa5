"""`bahe update` (engine/cli.py parses it): the version root's CURRENT -> NEXT through engine.training.loops.update,
printed as the gate's figures and the verdict. It lives in the harness because it drives the trainer."""
from __future__ import annotations

import argparse
from pathlib import Path


def run_update(args: argparse.Namespace) -> None:
    """Warm-start NEXT from the version root's current scorer on a new log, gate it, publish it if it passes."""
    from engine.serving.versions import ScorerVersions, VersionError
    from engine.training.data.log_schema import LogFormatError
    from engine.training.loops.train import TrainConfig
    from engine.training.loops.update import GateRule, UpdateConfig, update_scorer
    from engine.training.studies.experiment import load_data
    if args.distributed or args.stream:
        raise SystemExit("bahe update: --distributed and --stream are not built for update yet; run it in one "
                         "process on a log that fits in memory")
    out = Path(args.out or args.scorer)
    try:
        if not ScorerVersions.is_root(out):
            if args.scorer is None or ScorerVersions.is_root(args.scorer):
                raise VersionError(f"--out {out} is not a version root; give --scorer a scorer folder to start it")
            ScorerVersions.create(out, args.scorer, keep=args.keep)
            print(f"{out}: new version root, v000001 = {args.scorer}")
        elif args.scorer is not None and Path(args.scorer).resolve() not in (
                out.resolve(), ScorerVersions(out).current().path.resolve()):
            raise VersionError(f"--scorer {args.scorer} is not the current version of {out}; the update always starts "
                               "from the root's current version")
        new = load_data(args.data)
        history = load_data(args.history) if args.history else None
        config = UpdateConfig(
            train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr,
                              seed=args.seed, norm_batches=0),
            gate=GateRule(args.min_auc_gain, args.max_logloss_increase, args.max_calibration_error, seed=args.seed),
            gate_fraction=args.gate_fraction, val_fraction=args.val_fraction, replay=args.replay, force=args.force,
            keep=args.keep)
        result = update_scorer(out, new, config, history=history, device=args.device)
    except (LogFormatError, OSError, ValueError) as err:
        raise SystemExit(f"bahe update: {err}") from None
    print(f"CURRENT {result.current}; appended {result.appended['behaviors']} behavior rows, "
          f"{result.appended['items']} item rows; fine-tuned on {result.rows['train']} new + {result.rows['replay']} "
          f"replayed examples (best epoch {result.fit.best_epoch}, val AUC {result.fit.best_val_auc:.4f})")
    print("\n".join(result.gate.lines()))
    if result.published is None:
        raise SystemExit(f"bahe update: NEXT failed the gate and was not published; {out} still serves "
                         f"{result.current} (--force publishes anyway)")
    print(f"published {result.published.name}{' (forced past the gate)' if not result.gate.passed else ''}: "
          f"{out} now serves {result.published.path}")
