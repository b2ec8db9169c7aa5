"""Warm-start update of a published scorer, behind an offline gate (`bahe update`).

`update_scorer(root, new_log)` takes the current version of a version root (engine.deploy.versions) to the next:
1. ABE appends only: NEXT's tables are copies of CURRENT's with the behavior and item texts they lack appended
   (BehaviorTable.append never rewrites a row, so existing rows stay byte for byte); CURRENT's folder is only read.
2. Warm start: NEXT's model is CURRENT's weights. The item-id embedding and the item-count buffer grow by the new
   item rows, each new embedding row starting as CURRENT's unseen-item row (so before fine-tuning NEXT scores a
   new item exactly as CURRENT serves it); the heads' BatchNorm statistics stay CURRENT's (frozen, not
   recalibrated); categorical seen-marks are CURRENT's, and training marks the new period's buckets on top.
3. Fine-tune on the new period before the gate cut: its first part trains, the last `val_fraction` early-stops;
   with a history log (the older events), each user's history reaches back into it and `replay` adds a sample of
   older events to the training rows.
4. Gate: CURRENT and NEXT score the newest `gate_fraction` of the new period, which NEXT's fine-tuning never saw
   (neither trained nor validated on). Both read the same features (CURRENT through NEXT's tables: its appended
   rows are what CURRENT computes on the fly for a text it lacks, and its grown item rows are its unseen row, so
   these are CURRENT's served scores). NEXT publishes only if `GateRule` passes (or `force`).
5. Publish: NEXT's served item counts are CURRENT's plus the whole new log's; the folder is written into a staged
   version and published with the gate's figures in version.json (atomic: a crash leaves CURRENT serving).
NEXT's tables are written in a work folder under the root (`.update-work-*`, `update_work`), deleted on every exit
but a hard kill (a SIGTERM or SIGHUP becomes SystemExit while the update runs); a later update deletes the ones
killed updates left (only those no live process holds, older than itself)."""
from __future__ import annotations

import contextlib
import copy
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from engine import distributed
from engine.encoding.abe import ReusingEncoder
from engine.export.record import read_record, write_record
from engine.model.bahe_model import BAHEModel
from engine.model.head import CTRHead
from engine.serving.scorer import BAHEScorer
from engine.serving.scorer_folder import BEHAVIORS_FILE, ITEMS_FILE
from engine.deploy.versions import ScorerVersions, Version
from weights.id_vocabulary import FILE_NAME as ID_FILE
from weights.id_vocabulary import VocabularyFile
from engine.training.data.example_features import item_count_table
from engine.training.data.item_features import item_level_features
from engine.training.data.log import BehaviorLog
from engine.training.loops.ctr_models import BAHECTR
from engine.training.loops.data_parallel import DataParallel, split_users
from engine.training.loops.train import FitResult, TrainConfig, fit, predict
from engine.training.studies.metrics import Interval, log_loss, paired_auc_difference, roc_auc
from weights.atomic import copy_atomic, owned_temp_dir, remove_orphaned_dirs
from weights.table import BehaviorTable

log = logging.getLogger(__name__)

WORK_PREFIX = ".update-work-"


@contextlib.contextmanager
def exit_on_terminate() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise SystemExit(128 + signal) instead of ending the process at once, so
    cleanup (`finally`, context managers) runs. Only in the main thread and for signals left at their default
    action (an ignored or handled signal keeps its handler); restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):  # noqa: ARG001 - the signal module's handler signature
        raise SystemExit(128 + signum)
    changed = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGHUP)
               if signal.getsignal(s) is signal.SIG_DFL}
    try:
        yield
    finally:
        for s, previous in changed.items():
            signal.signal(s, previous)


@contextlib.contextmanager
def update_work(root: str | Path) -> Iterator[Path]:
    """The update's work folder under the version root `root`: the `.update-work-*` folders of updates that ended
    without cleaning up (killed) deleted first; the new one deleted on every exit of the block (SIGTERM/SIGHUP
    included: `exit_on_terminate`)."""
    for path in remove_orphaned_dirs(root, WORK_PREFIX):
        log.info("removed %s, left by an update that was killed", path)
    with exit_on_terminate(), owned_temp_dir(root, WORK_PREFIX) as work:
        yield work


@dataclass
class GateRule:
    """NEXT publishes when, on the gate period: AUC(NEXT) - AUC(CURRENT) >= min_auc_gain (point estimate; the paired
    user-bootstrap interval is reported beside it), logloss(NEXT) <= logloss(CURRENT) + max_logloss_increase, and
    NEXT's calibration (mean predicted / observed click rate) is within max_calibration_error of 1."""
    min_auc_gain: float = 0.0
    max_logloss_increase: float = 0.002
    max_calibration_error: float = 0.15
    resamples: int = 1000
    seed: int = 0


@dataclass
class UpdateConfig:
    """How NEXT is made from CURRENT and a new period's log (see the module docstring)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, norm_batches=0))
    gate: GateRule = field(default_factory=GateRule)
    gate_fraction: float = 0.2   # newest part of the new period's events: the gate, never trained on
    val_fraction: float = 0.1    # the part before it: early stopping
    replay: float = 0.5          # with a history log: older events sampled into training, as a fraction of the new
                                 # training rows (forgetting measured worse without it: docs/refresh.md)
    force: bool = False          # publish even if the gate fails
    keep: int = 3                # versions kept for rollback


@dataclass
class GateReport:
    """Both versions on the gate period, and the rule's verdict."""
    examples: int
    users: int
    current: dict[str, float]
    next: dict[str, float]
    auc_difference: Interval     # AUC(NEXT) - AUC(CURRENT), 95% paired user-bootstrap interval
    passed: bool
    reasons: list[str]

    def lines(self) -> list[str]:
        d = self.auc_difference
        return [f"gate: {self.examples} examples of {self.users} users, the newest period (never trained on)",
                *(f"  {name:8s} AUC {m['auc']:.4f}  log loss {m['logloss']:.4f}  calibration {m['calibration']:.3f}"
                  for name, m in (("CURRENT", self.current), ("NEXT", self.next))),
                f"  AUC(NEXT) - AUC(CURRENT) = {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}] (paired user bootstrap)",
                f"  {'PASS' if self.passed else 'FAIL'}: " + "; ".join(self.reasons)]


@dataclass
class UpdateResult:
    current: str                 # CURRENT's version name
    published: Version | None    # NEXT, or None when the gate refused it
    gate: GateReport
    fit: FitResult
    appended: dict[str, int]     # new rows per table
    rows: dict[str, int]         # training, validation, replayed and gate examples
    gate_start: int = 0          # the gate period: the examples at or after this timestamp


def _metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"auc": roc_auc(labels, probs), "logloss": log_loss(labels, probs),
            "calibration": float(probs.mean() / max(labels.mean(), 1e-12))}


def judge(labels: np.ndarray, current: np.ndarray, next_: np.ndarray, users: np.ndarray, rule: GateRule) -> GateReport:
    """The gate: both versions' metrics on the same examples, the paired difference, and the rule's verdict."""
    mine, theirs = _metrics(labels, next_), _metrics(labels, current)
    diff = paired_auc_difference(labels, next_, current, users, resamples=rule.resamples, seed=rule.seed)
    checks = [(diff.value >= rule.min_auc_gain, f"AUC gain {diff.value:+.4f} vs required >= {rule.min_auc_gain:+.4f}"),
              (mine["logloss"] <= theirs["logloss"] + rule.max_logloss_increase,
               f"log loss change {mine['logloss'] - theirs['logloss']:+.4f} vs allowed <= "
               f"{rule.max_logloss_increase:+.4f}"),
              (abs(mine["calibration"] - 1) <= rule.max_calibration_error,
               f"calibration {mine['calibration']:.3f} vs allowed 1 +- {rule.max_calibration_error}")]
    return GateReport(int(labels.size), int(np.unique(users).size), theirs, mine, diff, all(ok for ok, _ in checks),
                      [("ok: " if ok else "failed: ") + why for ok, why in checks])


def combined_log(new: BehaviorLog, history: BehaviorLog | None) -> BehaviorLog:
    """The log the update reads: the new period's events after the history's (ValueError if they overlap)."""
    if history is None:
        return new
    if history.num_events and new.num_events and history.timestamp.max() >= new.timestamp.min():
        raise ValueError(f"the history log must end before the new log starts: its last timestamp "
                         f"{int(history.timestamp.max())} >= the new log's first {int(new.timestamp.min())}")
    names = tuple(dict.fromkeys(history.sequence_names + new.sequence_names))
    frame = pd.concat([history.to_frame(), new.to_frame()], ignore_index=True)
    return BehaviorLog.from_frame(frame, sequence_names=names, source="history + new log")


def grown_model(model: BAHEModel, num_items: int, num_behaviors: int) -> BAHEModel:
    """A copy of `model` for tables of `num_items` items and `num_behaviors` behaviors: old rows kept; new ones start
    as the unseen-item row (item-id embedding) or at 0 (counts, id rows: text alone until the update trains them)."""
    model = copy.deepcopy(model)
    side = model.side
    if side.item_id is not None:
        old = side.item_id.weight.detach()
        trained = old.shape[0] - 1
        if num_items < trained:
            raise ValueError(f"the item table has {num_items} rows, fewer than the {trained} the model was trained on")
        weight = old[trained].expand(num_items + 1, -1).clone()
        weight[:trained] = old[:trained]
        side.item_id = nn.Embedding.from_pretrained(weight, freeze=False)
    if model.item_id_rows is not None:  # ModelConfig.id_rows
        model.item_id_rows = _zero_grown(model.item_id_rows, num_items, "item")
        model.behavior_id_rows = _zero_grown(model.behavior_id_rows, num_behaviors, "behavior")
    if model.item_counts.numel():
        counts = torch.zeros(num_items, model.item_counts.shape[1], dtype=torch.int64, device=model.item_counts.device)
        counts[:model.item_counts.shape[0]] = model.item_counts
        model.item_counts = counts
    return model


def _zero_grown(rows: nn.Parameter, size: int, table: str) -> nn.Parameter:
    """`rows` (n, d) extended with zero rows to (size, d); ValueError if the table shrank."""
    if size < rows.shape[0]:
        raise ValueError(f"the {table} table has {size} rows, fewer than the {rows.shape[0]} the model was trained on")
    grown = rows.detach().new_zeros(size, rows.shape[1])
    grown[:rows.shape[0]] = rows.detach()
    return nn.Parameter(grown)


def check_fractions(config: UpdateConfig) -> None:
    """ValueError naming gate_fraction / val_fraction / replay unless they cut the new log into three parts."""
    gate, val = config.gate_fraction, config.val_fraction
    if not (0 < gate < 1 and 0 < val and gate + val < 1):
        raise ValueError(f"gate_fraction and val_fraction must be > 0 with a sum < 1, got {config.gate_fraction}, "
                         f"{config.val_fraction}")
    if not config.replay >= 0:
        raise ValueError(f"replay must be >= 0 (a fraction of the new training rows), got {config.replay}")


def _periods(data: BehaviorLog, new: BehaviorLog, config: UpdateConfig, rng: np.random.Generator) -> dict:
    """Example rows of `data`: new-period training, validation and gate rows, and replayed older rows."""
    check_fractions(config)
    times = np.sort(new.timestamp)
    pick = lambda q: int(times[min(int(round(q * times.size)), times.size - 1)])  # noqa: E731
    start, val_start, gate_start = int(times[0]), pick(1 - config.gate_fraction - config.val_fraction), \
        pick(1 - config.gate_fraction)
    rows = data.examples
    t = data.timestamp[rows]
    out = {"train": rows[(t >= start) & (t < val_start)], "val": rows[(t >= val_start) & (t < gate_start)],
           "gate": rows[t >= gate_start]}
    older = rows[t < start]
    take = min(older.size, int(round(config.replay * out["train"].size)))
    out["replay"] = np.sort(rng.choice(older, take, replace=False)) if take else older[:0]
    for name in ("train", "val", "gate"):
        if not out[name].size:
            raise ValueError(f"the new log's {name} period holds no examples (events with earlier history); give a "
                             f"longer log or change gate_fraction / val_fraction")
    return out


def next_tables(current: BAHEScorer, data: BehaviorLog, work: Path) -> tuple[BehaviorTable, BehaviorTable, dict]:
    """Copies of CURRENT's tables in `work` with the log's texts they lack appended."""
    texts = data.item_id_texts
    copy_atomic(current.behaviors.path, work / BEHAVIORS_FILE)
    copy_atomic(current.items.path, work / ITEMS_FILE)
    behaviors = BehaviorTable.open(work / BEHAVIORS_FILE, current.encoder)
    items = BehaviorTable.open(work / ITEMS_FILE, ReusingEncoder(current.encoder, behaviors))
    appended = {"behaviors": behaviors.append(texts), "items": items.append(texts)}
    return behaviors, items, appended


def scorer_with(current: BAHEScorer, model: BAHEModel, behaviors: BehaviorTable, items: BehaviorTable) -> BAHEScorer:
    """A scorer of CURRENT's config, checkpoint and encoder over `model` and the given tables (NEXT, or CURRENT's
    weights over NEXT's tables for the gate)."""
    return BAHEScorer(config=copy.deepcopy(current.config), checkpoint=current.checkpoint, encoder=current.encoder,
                      model=model, behaviors=behaviors, items=items, device=current.device, kernels=current.kernels)


def next_vocabulary(current: BAHEScorer, users: Sequence[str], log: BehaviorLog,
                    item_features: dict | None = None) -> tuple[Path, bytes] | None:
    """CURRENT's id vocabulary (its `ids.json` as opened; None when it has none) extended, append-only, with the
    new log's user ids (`users`), item ids, texts and item-level features (`log`'s, or `item_features`), as NEXT
    carries it into its version folder; IdError naming an item whose text differs, before any training."""
    if current.ids is None:
        return None
    folder, data = current.ids
    vocabulary = VocabularyFile.loads(data, folder / ID_FILE)
    vocabulary.merge(users, dict(zip(log.item_key(log.item_ids), log.item_id_texts)),
                     item_level_features(log) if item_features is None else item_features, str(folder / ID_FILE))
    return folder, vocabulary.dumps()


def check_log(current: BAHEScorer, data: BehaviorLog) -> None:
    """ValueError naming what the log lacks of what the scorer reads: a sequence, a categorical feature's column."""
    missing = [n for n in current.config.model.sequence_names if n not in data.sequence_names]
    if missing:
        raise ValueError(f"the log lacks the scorer's sequences {missing} (it has {list(data.sequence_names)})")
    for name in current.config.model.categorical_features:
        try:
            data.category_values(name, np.zeros(0, dtype=np.int64))
        except KeyError:
            raise ValueError(f"the scorer reads categorical feature {name!r}; the log has no cat_{name} "
                             "column") from None


def update_scorer(root: str | Path, new: BehaviorLog, config: UpdateConfig | None = None, *,
                  history: BehaviorLog | None = None, device: str = "auto",
                  parallel: DataParallel | None = None, source: str = "the new log") -> UpdateResult:
    """Make NEXT from the current version of the version root `root` and the new period's log `new`, gate it on the
    newest events, and publish it if it passes (see the module docstring). CURRENT keeps serving throughout.
    With `parallel` (every rank of a torchrun job calls this alike): data-parallel fine-tuning, each rank scores its
    users' share of the gate period, rank 0 judges and publishes, every rank returns the same verdict. `source` names
    the new log in NEXT's training record (`next_record`)."""
    config = config or UpdateConfig()
    shared = parallel is not None and parallel.world_size > 1
    versions = ScorerVersions(root, config.keep)
    version = versions.current()
    current = BAHEScorer.from_pretrained(version.path, device=device)
    data = combined_log(new, history)
    check_log(current, data)
    ids = next_vocabulary(current, data.user_key(np.unique(data.user)), data)
    rows = _periods(data, new, config, np.random.default_rng(config.train.seed))
    sizes = {k: int(v.size) for k, v in rows.items()}
    # each rank appends the same texts with the same frozen layers to its own copy: identical rows everywhere
    with update_work(versions.root) as work:
        behaviors, items, appended = next_tables(current, data, work)
        baseline, upcoming = scorer_pair(current, behaviors, items, ids)
        trained = BAHECTR(upcoming, data)
        train_rows = np.union1d(rows["train"], rows["replay"])
        result = fit(trained, data, train_rows, rows["val"], config.train, device=str(upcoming.device),
                     parallel=parallel)
        gate_rows = rows["gate"]
        mine = split_users(gate_rows, data, parallel.world_size)[parallel.rank] if shared else gate_rows
        probs = {}
        for name, model in (("current", BAHECTR(baseline, data)), ("next", trained)):
            scored = predict(model, data, mine, batch_size=config.train.eval_batch_size, device=str(upcoming.device))
            gathered = parallel.gather_predictions(mine, scored) if shared else (mine, scored)
            probs[name] = None if gathered is None else gathered[1]  # every rank's share, on rank 0
        writer = not shared or parallel.rank == 0
        outcome, error = None, None
        if writer:
            try:
                seen = np.concatenate([train_rows, rows["val"]])
                record = next_record(version.path, int(data.timestamp[gate_rows].min()),
                                     data.user_key(np.unique(data.user[seen])), source, int(seen.size))
                outcome = judge_and_publish(versions, version, data.label[gate_rows], data.user[gate_rows], probs,
                                            upcoming, lambda: extend_item_counts(trained, *item_count_table(new),
                                                                                 new.sequence_names),
                                            config, {"appended": appended, "rows": sizes}, record)
            except Exception as err:  # noqa: BLE001 - with ranks: every rank raises it (broadcast_outcome)
                error = err
        if shared:
            distributed.broadcast_outcome(error)
            outcome = parallel.broadcast(outcome)
        elif error is not None:
            raise error
    gate, published = outcome
    return UpdateResult(version.name, published, gate, result, appended, sizes, int(data.timestamp[gate_rows].min()))


def scorer_pair(current: BAHEScorer, behaviors: BehaviorTable, items: BehaviorTable, ids: tuple[Path, bytes] | None
                ) -> tuple[BAHEScorer, BAHEScorer]:
    """(CURRENT, NEXT-to-train), both over the grown tables: CURRENT's weights as it serves them, and a copy that
    carries `ids` (CURRENT's and the new log's) and keeps CURRENT's standardization in its heads (frozen norms,
    not statistics of a few new batches)."""
    baseline = scorer_with(current, grown_model(current.model, len(items), len(behaviors)), behaviors, items)
    upcoming = scorer_with(current, grown_model(current.model, len(items), len(behaviors)), behaviors, items)
    upcoming.ids = ids
    for head in (m for m in upcoming.model.modules() if isinstance(m, CTRHead)):
        head.freeze_norm()
    return baseline, upcoming


def next_record(current: Path, labels_before: int, users: Sequence[str], source: str, examples: int
                ) -> dict | None:
    """NEXT's training record (engine.export.record's fields): what CURRENT's weights saw (its record) joined with
    what the fine-tuning saw (`examples` train, replay and validation examples of `users`, all before
    `labels_before`, the gate's start), widened to one rule - the later cut, the union of the users - so that the
    feature export never takes a seen label for an unseen one. None when CURRENT has no record: nothing says what
    its weights saw, so NEXT gets none and the export refuses it."""
    prior = read_record(current)
    if prior is None:
        return None
    return {"labels_before": max(prior.labels_before, labels_before),
            "users": None if prior.users is None else sorted(set(prior.users) | set(map(str, users))),
            "data": f"{prior.data} + {source}", "examples": prior.examples + examples, "written_by": "bahe update"}


def judge_and_publish(versions: ScorerVersions, version: Version, labels: np.ndarray, users: np.ndarray,
                      probs: dict[str, np.ndarray], upcoming: BAHEScorer, extend_counts: Callable[[], None],
                      config: UpdateConfig, note: dict, record: dict | None) -> tuple[GateReport, Version | None]:
    """The gate's verdict on the gate examples' scores; if it passes (or config.force), NEXT's item counts extended
    (`extend_counts`) and NEXT published with the gate's figures and `note` in version.json and its training
    `record` (next_record; None: none) in training.json."""
    gate = judge(labels.astype(np.float64), probs["current"], probs["next"], users, config.gate)
    if not (gate.passed or config.force):
        return gate, None
    extend_counts()
    with versions.stage() as staged:
        upcoming.save_pretrained(staged.path)
        if record is not None:
            write_record(staged.path, **record)
        return gate, staged.publish({"previous": version.name, "forced": not gate.passed, "gate": {
            "current": gate.current, "next": gate.next, "auc_difference": asdict(gate.auc_difference),
            "passed": gate.passed, "reasons": gate.reasons}, **note})


def extend_item_counts(model: BAHECTR, ids: np.ndarray, by_item: np.ndarray, sequence_names: Sequence[str]) -> None:
    """The served item statistics extended, not restarted: CURRENT's counts plus `by_item` (I, S) of item `ids`
    (sequences in the order `sequence_names`): the new log's events."""
    counts = model.model.item_counts
    if not counts.numel():
        return
    rows = torch.from_numpy(model.item_row[ids]).to(counts.device)
    for s, name in enumerate(model.scorer.config.model.sequence_names):
        if name in sequence_names:
            counts[rows, s] += torch.from_numpy(by_item[:, list(sequence_names).index(name)]).to(counts.device)
