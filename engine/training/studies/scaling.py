"""BAHE vs the raw-token LLM on the same backbone and head, measured: scoring time and peak memory as
the behaviors per sequence M grow (`sweep`), the offline ABE cost and its break-even (`offline_cost`),
and one training epoch of each (`compare_training`). `python -m bench.compare` runs and reports them.

Users are synthetic (`synthetic_users`): n sequences of M behavior texts drawn uniformly from the data
set's texts with a fixed seed, and one candidate item each; both sides get the same users, texts in ->
probabilities out. Memory is `PeakMemory`'s: peak RSS on the CPU, allocator peak on CUDA; 'added' is
the peak minus the level before the call.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import ModelConfig
from engine.serving.scorer import BAHEScorer, kernel_path
from engine.training.loops.ctr_models import BAHECTR, RawTokenCTR, TokenBatch
from engine.training.data.log import BehaviorLog
from engine.training.studies.experiment import SampleConfig, ScorerSetup, sample_split
from engine.training.studies.memory import PeakMemory
from engine.training.loops.train import TrainConfig, fit
from kernels._jagged import max_length
from weights.checkpoint import Checkpoint

MB = 2 ** 20
DEFAULT_MS = (8, 16, 24, 32, 40, 48, 64, 128, 256, 512, 1024, 2048, 4096, 10000)


@dataclass
class ScalingConfig(ScorerSetup):
    """One BAHE vs raw-token measurement; the defaults finish in under 10 minutes on 2 CPU cores."""
    ms: tuple[int, ...] = DEFAULT_MS       # behaviors per sequence
    users: int = 16                        # most users per scoring batch
    positions: int = 6144                  # about this many behavior positions per BAHE batch (fewer users at large M)
    reps: int = 3                          # timed repetitions per side and M
    point_budget: float = 60.0             # no further repetition of a point once it has run this long (s)
    raw_budget: float = 120.0              # the raw side stops after a repetition longer than this (s)
    train: bool = True
    train_examples: int = 256
    val_examples: int = 32
    train_behaviors: int = 16              # max behaviors per sequence when training
    train_batch_size: int = 32
    train_reps: int = 1

    def bahe_scorer(self, data: BehaviorLog, max_behaviors: int | None = None) -> BAHEScorer:
        """The scorer of the sweep: `max_behaviors` per sequence (default: the largest M), --users per batch."""
        return self.scorer(data, max_behaviors or max(self.ms), self.users)


# ----- measurement ------------------------------------------------------------------------------
@dataclass
class Sample:
    seconds: float
    peak_bytes: int
    added_bytes: int


def measure(fn: Callable[[], object], device: torch.device) -> Sample:
    """Wall time (synchronized on CUDA) and peak memory of one call."""
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return Sample(seconds, peak.bytes, peak.added)


# ----- the two sides ----------------------------------------------------------------------------
def synthetic_users(texts: Sequence[str], names: Sequence[str], m: int, users: int,
                    seed: int) -> tuple[list[dict[str, list[str]]], list[str]]:
    """`users` users with `m` behaviors (oldest first) in each named sequence, and one item each,
    drawn uniformly from `texts` with a fixed seed (the same for every side)."""
    rng = np.random.default_rng([seed, m, users])
    picks = rng.integers(0, len(texts), size=(users, len(names), m))
    out = [{name: [texts[i] for i in picks[u, s]] for s, name in enumerate(names)} for u in range(users)]
    return out, [texts[i] for i in rng.integers(0, len(texts), size=users)]


class RawTokenSide:
    """The raw-token baseline scoring texts: `RawTokenCTR.from_scorer`, so only the input differs from
    BAHE: each sequence's behavior texts concatenated (most recent first, by RawTokenCTR.pack) and
    tokenized inside the call (as BAHE's lookup is), and every layer run over every token."""

    def __init__(self, scorer: BAHEScorer, item_max_tokens: int) -> None:
        self.model = RawTokenCTR.from_scorer(scorer, max_tokens_per_sequence=sys.maxsize,
                                             item_max_tokens=item_max_tokens).eval()
        self.names, self.device, self.kernels = scorer.config.model.sequence_names, scorer.device, scorer.kernels
        self.positions = self.model.max_tokens  # the model's position limit

    def token_batch(self, users: Sequence[dict[str, list[str]]], items: Sequence[str]) -> tuple[TokenBatch, int]:
        """-> the packed tokens and the longest sequence's token count (> positions: does not fit)."""
        batch = self.model.pack(users, items, max_tokens=self.positions + 1)
        sequences = len(users) * len(self.names)
        longest = max_length(batch.offsets[:sequences + 1])
        return batch.to(self.device), longest

    def score(self, users: Sequence[dict[str, list[str]]], items: Sequence[str]) -> np.ndarray:
        batch, _ = self.token_batch(users, items)
        with torch.inference_mode(), kernel_path(self.kernels):
            return torch.sigmoid(self.model(batch)).float().cpu().numpy()


# ----- scoring sweep ----------------------------------------------------------------------------
@dataclass
class SideResult:
    samples: list[Sample] = field(default_factory=list)
    status: str = "ok"

    @property
    def ran(self) -> bool:
        return bool(self.samples)

    def seconds(self, q: float = 0.5) -> float:
        return float(np.quantile([s.seconds for s in self.samples], q))

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.samples)

    @property
    def added_bytes(self) -> int:
        return max(s.added_bytes for s in self.samples)


@dataclass
class Point:
    m: int
    users: int
    bahe: SideResult
    raw: SideResult
    raw_tokens_per_sequence: float | None = None  # mean, over the batch's sequences
    raw_longest: int | None = None

    def per_1k(self, side: str, q: float = 0.5) -> float:
        return getattr(self, side).seconds(q) * 1000 / self.users

    @property
    def common(self) -> bool:
        return self.bahe.ran and self.raw.ran

    @property
    def time_ratio(self) -> float:
        return self.raw.seconds() / self.bahe.seconds()

    @property
    def memory_ratio(self) -> float:
        return self.raw.added_bytes / self.bahe.added_bytes if self.bahe.added_bytes > 0 else math.nan


def users_per_batch(config: ScalingConfig, m: int, n: int) -> int:
    return max(1, min(config.users, config.positions // (n * m)))


def sweep(config: ScalingConfig, scorer: BAHEScorer, raw: RawTokenSide, texts: Sequence[str]) -> list[Point]:
    """Time and memory of both sides per M, interleaved repetition by repetition (BAHE first on even
    repetitions, raw first on odd ones). The raw side stops at the first M whose longest sequence
    needs more tokens than the model has positions, or after a repetition longer than raw_budget."""
    names, device = scorer.config.model.sequence_names, scorer.device
    points, raw_stop = [], None
    for m in config.ms:
        u = users_per_batch(config, m, len(names))
        users, items = synthetic_users(texts, names, m, u, config.seed)
        point = Point(m, u, SideResult(), SideResult())
        sides: dict[str, Callable[[], object]] = {"bahe": lambda: scorer.score(users, items)}
        if raw_stop is None:
            batch, longest = raw.token_batch(users, items)
            point.raw_longest = longest
            point.raw_tokens_per_sequence = float(batch.offsets[len(names) * u].item()) / (len(names) * u)
            if longest > raw.positions:
                raw_stop = (f"stopped from M={m}: a sequence needs {longest} tokens > the model's "
                            f"{raw.positions} positions")
            else:
                sides["raw"] = lambda: raw.score(users, items)
            del batch
        if "raw" not in sides:
            point.raw.status = raw_stop if not points or points[-1].raw.ran else f"not run ({raw_stop.split(':')[0]})"
        warm = min(m, 256)  # warm-up, untimed: one user, at most 256 behaviors per sequence
        warm_users = [{name: seq[-warm:] for name, seq in users[0].items()}]
        for side in sides:
            (scorer if side == "bahe" else raw).score(warm_users, items[:1])
        began = time.perf_counter()
        for rep in range(config.reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for side in order:
                sample = measure(sides[side], device)
                getattr(point, side).samples.append(sample)
                if side == "raw" and sample.seconds > config.raw_budget:
                    raw_stop = f"stopped after M={m}: a repetition took {sample.seconds:.0f} s > --raw-budget"
            spent = time.perf_counter() - began
            if rep + 1 < config.reps and spent * (rep + 2) / (rep + 1) > config.point_budget:
                break
        points.append(point)
        _print_point(point)
    return points


def _print_point(p: Point) -> None:
    raw = (f"raw {p.per_1k('raw'):9.2f} s/1k users, +{p.raw.added_bytes / MB:7.1f} MB | "
           f"x{p.time_ratio:.1f} time, x{p.memory_ratio:.1f} memory" if p.raw.ran else p.raw.status)
    print(f"M={p.m:>6} ({p.users:>3} users, {len(p.bahe.samples)} reps): BAHE {p.per_1k('bahe'):9.2f} s/1k users, "
          f"+{p.bahe.added_bytes / MB:7.1f} MB | {raw}", flush=True)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y vs log x (nan with fewer than two points)."""
    if len(xs) < 2:
        return math.nan
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def slopes(points: list[Point]) -> dict[str, float]:
    common = [p for p in points if p.common]
    bahe_all = [p for p in points if p.bahe.ran]
    tail = [p for p in bahe_all if p.m >= 64]
    return {
        "raw time vs M (its range)": loglog_slope([p.m for p in common], [p.per_1k("raw") for p in common]),
        "BAHE time vs M (same range)": loglog_slope([p.m for p in common], [p.per_1k("bahe") for p in common]),
        "BAHE time vs M (all M)": loglog_slope([p.m for p in bahe_all], [p.per_1k("bahe") for p in bahe_all]),
        "BAHE time vs M (M >= 64)": loglog_slope([p.m for p in tail], [p.per_1k("bahe") for p in tail]),
        "raw memory vs M (its range)": loglog_slope([p.m for p in common],
                                                    [max(p.raw.added_bytes, 1) / p.users for p in common]),
        "BAHE memory vs M (M >= 64)": loglog_slope([p.m for p in tail],
                                                   [max(p.bahe.added_bytes, 1) / p.users for p in tail]),
    }


# ----- offline cost and training ----------------------------------------------------------------
@dataclass
class OfflineCost:
    unique_behaviors: int
    behavior_events: int
    seconds: float
    added_bytes: int

    @property
    def per_second(self) -> float:
        return self.unique_behaviors / self.seconds

    @property
    def dedup_ratio(self) -> float:
        return self.behavior_events / max(self.unique_behaviors, 1)


def offline_cost(scorer: BAHEScorer, data: BehaviorLog, texts: list[str]) -> OfflineCost:
    """ABE of every unique behavior text, timed (the table itself may come from the cache)."""
    unique = list(dict.fromkeys(texts))
    sample = measure(lambda: scorer.encoder.encode(unique), scorer.device)
    return OfflineCost(len(unique), int(data.membership.sum()), sample.seconds, sample.added_bytes)


def break_even_users(abe_seconds: float, point: Point) -> float:
    """Users to score before the one-off ABE cost is repaid by the per-user saving at this M."""
    saving = (point.raw.seconds() - point.bahe.seconds()) / point.users
    return abe_seconds / saving if saving > 0 else math.inf


@dataclass
class TrainRow:
    name: str
    epoch_seconds: list[float]
    peak_bytes: list[int]
    added_bytes: list[int]

    @property
    def seconds(self) -> float:
        return statistics.median(self.epoch_seconds)

    @property
    def peak(self) -> int:
        return max(self.peak_bytes)

    @property
    def added(self) -> int:
        return max(self.added_bytes)


def training_ratios(bahe: TrainRow, raw: TrainRow) -> dict[str, float]:
    """raw / BAHE: time per epoch, added peak memory, absolute peak memory."""
    return {"time": raw.seconds / bahe.seconds, "added_memory": raw.added / max(bahe.added, 1),
            "peak_memory": raw.peak / max(bahe.peak, 1)}


def compare_training(config: ScalingConfig, data: BehaviorLog, ckpt: Checkpoint,
                     device: torch.device) -> tuple[list[TrainRow], int]:
    """One epoch of `fit` for BAHE and the raw-token baseline on the same examples, interleaved."""
    rows = sample_split(data.split(), SampleConfig(train=config.train_examples, val=config.val_examples, test=1,
                                                   seed=config.seed))
    train_config = TrainConfig(epochs=1, batch_size=config.train_batch_size, seed=config.seed, progress=False)

    def bahe():
        return BAHECTR(config.bahe_scorer(data, max_behaviors=config.train_behaviors), data)

    def raw():
        model_config = ModelConfig(sequence_names=data.sequence_names, max_behaviors=config.train_behaviors)
        return RawTokenCTR(ckpt, config.lower_layers, model_config, max_tokens_per_sequence=sys.maxsize,
                           item_max_tokens=config.max_tokens)

    labels = data.label[rows["val"]]
    warm_val = rows["val"][[int(np.argmax(labels == 1)), int(np.argmax(labels == 0))]]  # one of each class
    results = {"BAHE": TrainRow("BAHE", [], [], []), "raw-token LLM": TrainRow("raw-token LLM", [], [], [])}
    builders = {"BAHE": bahe, "raw-token LLM": raw}
    for rep in range(config.train_reps):
        for name in (list(builders) if rep % 2 == 0 else list(reversed(builders))):
            model = builders[name]()
            fit(model, data, rows["train"][:config.train_batch_size], warm_val, train_config,
                device=device)  # one warm-up step, untimed: first-call costs land in neither side's epoch
            with PeakMemory(device) as peak:  # around fit's own: also counts moving the model to the device
                result = fit(model, data, rows["train"], rows["val"], train_config, device=device)
            row = results[name]
            row.epoch_seconds.append(result.epoch_seconds[0])
            row.peak_bytes.append(max(result.peak_memory_bytes, peak.bytes))
            row.added_bytes.append(max(result.added_memory_bytes, peak.added))
            print(f"training {name}: {result.epoch_seconds[0]:.1f} s/epoch on {rows['train'].size} examples, "
                  f"peak {row.peak_bytes[-1] / MB:,.0f} MB (+{row.added_bytes[-1] / MB:,.0f})", flush=True)
            del model
    return list(results.values()), int(rows["train"].size)
