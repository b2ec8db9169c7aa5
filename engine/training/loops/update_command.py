"""`bahe update` (engine/cli.py parses it): the version root's CURRENT -> NEXT through engine.training.loops.update,
printed as the gate's figures and the verdict; `--distributed` under torchrun (data-parallel fine-tuning, rank 0
judges and publishes); `--stream WORK` for a log bigger than memory (engine.training.streaming.update_stream). It lives
in the harness because it drives the trainer."""
from __future__ import annotations

import argparse
from pathlib import Path

from engine import distributed
from engine.deploy.versions import ScorerVersions, VersionError
from engine.training.data.log import BehaviorLog
from engine.training.data.log_schema import LogFormatError
from engine.training.loops.data_parallel import DataParallel
from engine.training.loops.train import TrainConfig
from engine.training.loops.update import GateRule, UpdateConfig, UpdateResult, update_scorer
from engine.training.studies.experiment import load_data


def _root(args: argparse.Namespace, out: Path) -> str | None:
    """Check --scorer against --out; start the root from --scorer when --out is none yet. -> what to print."""
    if not ScorerVersions.is_root(out):
        if args.scorer is None or ScorerVersions.is_root(args.scorer):
            raise VersionError(f"--out {out} is not a version root; give --scorer a scorer folder to start it")
        ScorerVersions.create(out, args.scorer, keep=args.keep)
        return f"{out}: new version root, v000001 = {args.scorer}"
    if args.scorer is not None and Path(args.scorer).resolve() not in (
            out.resolve(), ScorerVersions(out).current().path.resolve()):
        raise VersionError(f"--scorer {args.scorer} is not the current version of {out}; the update always starts "
                           "from the root's current version")
    return None


def _log(args: argparse.Namespace, source: str | None) -> BehaviorLog | None:
    """The log file `source` read with --catalog and --timestamps (None: none given)."""
    return None if source is None else load_data(source, catalog=args.catalog, timestamps=args.timestamps)


def _config(args: argparse.Namespace, progress: bool) -> UpdateConfig:
    return UpdateConfig(
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr,
                          seed=args.seed, norm_batches=0, progress=progress),
        gate=GateRule(args.min_auc_gain, args.max_logloss_increase, args.max_calibration_error, seed=args.seed),
        gate_fraction=args.gate_fraction, val_fraction=args.val_fraction,
        replay=0.5 if args.replay is None else args.replay, force=args.force, keep=args.keep)


def run_update(args: argparse.Namespace) -> None:
    """Warm-start NEXT from the version root's current scorer on a new log, gate it, publish it if it passes."""
    if args.stream and (args.distributed or args.history):
        raise SystemExit("bahe update: --stream runs in one process on the new log alone; --distributed and --history "
                         "with it are not built yet")
    if args.replay is not None and not args.history:
        raise SystemExit("bahe update: --replay samples the older events of --history; give --history too")
    out = Path(args.out or args.scorer)
    try:
        if args.stream:
            from engine.training.streaming.update_stream import update_streamed
            distributed.check_not_launched("bahe update")
            said = _root(args, out)
            if said:
                print(said)
            result, writer = update_streamed(out, args.data, args.stream, _config(args, True), shards=args.shards,
                                             device=args.device, catalog=args.catalog,
                                             timestamps=args.timestamps), True
        elif not args.distributed:
            distributed.check_not_launched("bahe update")
            said = _root(args, out)
            if said:
                print(said)
            result, writer = update_scorer(out, _log(args, args.data), _config(args, True), history=_log(
                args, args.history), device=args.device, source=args.data), True
        else:
            result, writer = _run_distributed(args, out)
    except (LogFormatError, OSError, ValueError, distributed.LaunchError) as err:
        raise SystemExit(f"bahe update: {err}") from None
    if writer:
        _report(result, out)
    elif result.published is None:  # every rank of the job exits non-zero, rank 0 alone says why
        raise SystemExit(1)


def _run_distributed(args: argparse.Namespace, out: Path) -> tuple[UpdateResult, bool]:
    """Every rank of the torchrun job updates alike; rank 0 starts the root, judges and publishes. -> (the result,
    the same on every rank; whether this rank reports it)."""
    launch = distributed.launch_from_env(command="bahe update")
    device = launch.device(args.device)
    distributed.start(launch, device)
    try:
        error = None
        if launch.is_writer:
            try:
                said = _root(args, out)
                if said:
                    print(said)
            except (VersionError, OSError) as err:
                error = err
        distributed.broadcast_outcome(error)
        if error is not None:
            raise error
        result = update_scorer(out, _log(args, args.data), _config(args, launch.is_writer),
                               history=_log(args, args.history), device=str(device),
                               parallel=DataParallel.from_process_group(), source=args.data)
    except Exception as err:  # noqa: BLE001 - one line per rank, as in `bahe train --distributed`
        raise SystemExit(f"bahe update: rank {launch.rank}: {err}") from None
    finally:
        distributed.stop()
    return result, launch.is_writer


def _report(result: UpdateResult, out: Path) -> None:
    print(f"CURRENT {result.current}; appended {result.appended['behaviors']} behavior rows, "
          f"{result.appended['items']} item rows; fine-tuned on {result.rows['train']} new + {result.rows['replay']} "
          f"replayed examples (best epoch {result.fit.best_epoch}, val AUC {result.fit.best_val_auc:.4f})")
    print("\n".join(result.gate.lines()))
    if result.published is None:
        raise SystemExit(f"bahe update: NEXT failed the gate and was not published; {out} still serves "
                         f"{result.current} (--force publishes anyway)")
    print(f"published {result.published.name}{' (forced past the gate)' if not result.gate.passed else ''}: "
          f"{out} now serves {result.published.path}")
