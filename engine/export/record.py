"""What labels a scorer's weights were fitted on: its training record (`training.json` in the scorer folder), and the
scorer's version (a digest of its weights). The feature export reads both to refuse stacking leaks.

BAHE's weights (upper layers, head, id embeddings) are fitted on click labels, so its logit - and its trained
vectors - for an example whose label it trained on (or early-stopped on) is an in-sample prediction: a ranker
stacked on it learns to trust it more than it deserves on new data. The record says which examples those can be:
every example of the listed users (all users: `users` None) with timestamp < `labels_before`. Written by
`bahe train` (labels_before: the time split's test start, as train and validation examples lie before it), by
the out-of-fold trainer of `bahe features --folds` (its fold's training users only) and by `bahe update` (CURRENT's
record widened by the fine-tuning's examples, all before the gate period: engine.training.loops.update.next_record).

The record names the weights it describes (`weights`: the scorer version). A record whose weights are not the
folder's model (the folder was trained further and saved over, or a record copied into another scorer) describes
nothing and reads as absent: the export then refuses, as for a scorer without any record (scorers from the Python
API, and `bahe update` versions of a CURRENT without one). Calibration changes scorer.json, not the weights: the
record stays valid.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.serving.scorer_folder import read_scorer_json
from weights.atomic import atomic_write

__all__ = ["RECORD_FILE", "TrainingRecord", "scorer_version", "write_record", "read_record"]

RECORD_FILE = "training.json"
RECORD_FORMAT = "bahe-training-record"


def scorer_version(folder: str | Path) -> str:
    """A scorer's version: sha256 of its model weights part (the file scorer.json names), 16 hex digits. Equal
    weights, equal version; calibration and table appends do not change it."""
    folder = Path(folder)
    _, files = read_scorer_json(folder)
    digest = hashlib.sha256()
    with open(folder / files["model"], "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TrainingRecord:
    """labels_before: every example whose label the weights saw has timestamp < labels_before; users: the exact
    user ids (keys) whose examples they saw, None for every user; data: the log, as the command was given it;
    examples: training + validation examples; weights: the scorer version the record describes."""
    labels_before: int
    users: tuple[str, ...] | None
    data: str
    examples: int
    weights: str
    written_by: str = "bahe train"

    def saw(self, user_keys: list[str], timestamps: np.ndarray) -> np.ndarray:
        """(B,) bool: the examples (user key, timestamp) whose labels these weights may have been fitted on."""
        before = np.asarray(timestamps, dtype=np.int64) < self.labels_before
        if self.users is None:
            return before
        known = set(self.users)
        return before & np.fromiter((u in known for u in user_keys), dtype=bool, count=len(user_keys))

    def describe(self) -> str:
        who = "every user" if self.users is None else f"{len(self.users)} users"
        return f"labels of {who} before timestamp {self.labels_before} ({self.examples:,} examples of {self.data})"


def write_record(folder: str | Path, *, labels_before: int, users: list[str] | None, data: str, examples: int,
                 written_by: str = "bahe train") -> TrainingRecord:
    """Record what the scorer saved in `folder` was trained on (call after its save: the record names its
    weights). Atomic, like every write to a scorer folder."""
    folder = Path(folder)
    record = TrainingRecord(int(labels_before), None if users is None else tuple(sorted(map(str, users))), str(data),
                            int(examples), scorer_version(folder), written_by)
    meta = {"format": RECORD_FORMAT, "version": 1, **asdict(record)}
    with atomic_write(folder / RECORD_FILE) as handle:
        handle.write(json.dumps(meta, indent=1).encode())
    return record


def read_record(folder: str | Path) -> TrainingRecord | None:
    """The folder's training record, or None when it has none or its record describes other weights (module
    docstring); ValueError for a record file that is not one."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_bytes())
        if meta.get("format") != RECORD_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {RECORD_FORMAT!r}")
        users = meta["users"]
        record = TrainingRecord(int(meta["labels_before"]), None if users is None else tuple(map(str, users)),
                                str(meta["data"]), int(meta["examples"]), str(meta["weights"]),
                                str(meta.get("written_by", "")))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a training record ({err})") from None
    return record if record.weights == scorer_version(folder) else None
