"""BAHE vs the raw-token LLM on the same backbone and head: scoring time and peak memory as the
behaviors per sequence M grow, training time and memory, and the offline ABE cost and its break-even.

    python -m bench.compare                # default: under 10 minutes on 2 CPU cores
    python -m bench.compare --large        # more users, repetitions and training examples
    python -m bench.compare --threads 1    # one torch thread (steadier when other jobs share the CPU)
    bahe bench [the same flags]

Scoring. Synthetic users over the data set's behavior texts (MovieLens-100K: 1,682 movie texts), the
same users for both sides: n sequences (MovieLens: liked, disliked, watched) of M behaviors each,
drawn uniformly with a fixed seed, and one candidate item per user. Both sides go texts in ->
probabilities out:
- BAHE: `BAHEScorer.score` (table lookup -> gather -> upper layers over n*M + 1 behavior positions per
  user -> pooling -> head);
- raw-token: `RawTokenCTR`'s forward with the scorer's own modules (lower layers, upper layers,
  empty-sequence vectors, head): each sequence's texts concatenated (most recent first, ' ; ') and
  tokenized (inside the timed region, as BAHE's lookup is), then ALL layers over M x t tokens.
The sides alternate repetition by repetition in one process (BAHE first on even repetitions, raw
first on odd ones); ratios are raw / BAHE of medians from that run. The raw side stops at the first
M whose longest sequence needs more tokens than the model has positions (BERT: 512), or once a
repetition takes longer than --raw-budget seconds; BAHE goes on to 10,000 behaviors per sequence.
Users per batch shrink as M grows (at most --users, about --positions behavior positions per batch).

Memory: peak RSS during the call on the CPU (engine.training.memory.PeakMemory, tightened by the kernel's
exact high-water mark where /proc/self/clear_refs allows resetting it; freed heap is returned to
the OS with malloc_trim before each measurement); torch.cuda.max_memory_allocated on CUDA. 'added'
is the peak minus the level before the call (the working memory of the call): ratios use it.

Offline cost: ABE encoding of every unique behavior text, its throughput, the dedup (behavior events
in the log vs unique table rows) and the break-even: after how many scored users the one-off ABE
cost is repaid by the per-user saving (raw - BAHE) at each common M.

Training: one epoch of `engine.training.train.fit` for BAHE and the raw-token baseline on the same fixed
subset of the data set's train examples (the paper's own table compares training time and memory).

Outputs (under --out-dir, default bench/results): compare.json (every number of the run),
compare.csv (one row per (side, M), appended, labeled with the machine and time, so runs on
different machines sit side by side), scaling-<model>.png (log-log time and memory vs M); and the section
of --results-md (bench/RESULTS.md) between `<!-- bench:compare:<model> -->` and `<!-- /bench -->`.
Kernel-level timings: `python -m bench.kernels`; latency suites: `pytest bench/ --benchmark-only`.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.config import EncoderConfig, ModelConfig, ScorerConfig, ScoringConfig
from engine.training.ctr_models import BAHECTR, RawTokenCTR, TokenBatch
from engine.training.data.log import BehaviorLog
from engine.training.experiment import SampleConfig, load_data, sample_split
from engine.training.memory import PeakMemory
from engine.training.report import append_csv, machine as machine_label, write_section
from engine.scorer import BAHEScorer, resolve_device
from engine.training.train import TrainConfig, fit
from kernels import ops
from kernels._jagged import max_length
from weights.checkpoint import Checkpoint
from weights.registry import resolve_model

log = logging.getLogger(__name__)

MARKER = "bench:compare:{model}"  # the section <!-- bench:compare:<model> --> ... <!-- /bench --> of RESULTS.md
MB = 2 ** 20
DEFAULT_MS = (8, 16, 24, 32, 40, 48, 64, 128, 256, 512, 1024, 2048, 4096, 10000)


@dataclass
class CompareConfig:
    """One benchmark run; the defaults finish in under 10 minutes on 2 CPU cores."""
    model: str = "minilm"
    data: str = "movielens"
    lower_layers: int = 3
    max_tokens: int = 32                   # per behavior (ABE) and per item text (raw side)
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
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    work_dir: Path = Path("artifacts/bench")   # cached behavior tables
    out_dir: Path = Path("bench/results")
    results_md: Path | None = Path("bench/RESULTS.md")
    large: bool = False


LARGE = dict(users=64, positions=24576, reps=5, point_budget=300.0, raw_budget=600.0, train_examples=1024,
             val_examples=128, train_reps=2)


# ----- measurement ------------------------------------------------------------------------------
@dataclass
class Sample:
    seconds: float
    peak_bytes: int
    added_bytes: int


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so one side's leftovers neither
    inflate nor (by reuse) hide the next measurement's RSS."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class _Peak:
    """PeakMemory, tightened on the CPU by the exact high-water mark when it can be reset:
    `with _Peak(device) as peak: ...` then `peak.bytes` and `peak.added`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = self.added = 0

    def __enter__(self) -> _Peak:
        _release_freed_memory()
        self._hwm = self.device.type == "cpu" and _reset_high_water_mark()
        self._peak = PeakMemory(self.device).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._peak.__exit__(*exc)
        start = self._peak.bytes - self._peak.added
        self.bytes = max(self._peak.bytes, _high_water_mark()) if self._hwm else self._peak.bytes
        self.added = self.bytes - start


def measure(fn: Callable[[], object], device: torch.device) -> Sample:
    """Wall time (synchronized on CUDA) and peak memory of one call."""
    with _Peak(device) as peak:
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


class RawTokenScorer:
    """The raw-token baseline scoring texts: RawTokenCTR's forward, with the BAHE scorer's own lower
    layers, upper layers, empty-sequence vectors and head, so only the input differs: each sequence's
    behavior texts concatenated (most recent first, by RawTokenCTR.pack) and tokenized, and
    every layer run over every token."""

    def __init__(self, scorer: BAHEScorer, item_max_tokens: int) -> None:
        self.model = RawTokenCTR(scorer.checkpoint, scorer.config.encoder.num_lower_layers, scorer.config.model,
                                 max_tokens_per_sequence=sys.maxsize, item_max_tokens=item_max_tokens)
        self.model.lower, self.model.upper = scorer.encoder.lower, scorer.model.upper
        self.model.head, self.model.empty_sequence = scorer.model.head, scorer.model.empty_sequence
        self.model.to(scorer.device).eval()
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
        with torch.inference_mode(), ops.use_backend(self.kernels):
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


def users_per_batch(config: CompareConfig, m: int, n: int) -> int:
    return max(1, min(config.users, config.positions // (n * m)))


def sweep(config: CompareConfig, scorer: BAHEScorer, raw: RawTokenScorer, texts: Sequence[str]) -> list[Point]:
    """Time and memory of both sides per M, interleaved repetition by repetition."""
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


def compare_training(config: CompareConfig, data: BehaviorLog, ckpt: Checkpoint,
                     device: torch.device) -> tuple[list[TrainRow], int]:
    """One epoch of `fit` for BAHE and the raw-token baseline on the same examples, interleaved."""
    rows = sample_split(data.split(), SampleConfig(train=config.train_examples, val=config.val_examples, test=1,
                                                   seed=config.seed))
    train_config = TrainConfig(epochs=1, batch_size=config.train_batch_size, seed=config.seed, progress=False)

    def bahe():
        return BAHECTR(build(config, data, max_behaviors=config.train_behaviors), data)

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
            with _Peak(device) as peak:
                result = fit(model, data, rows["train"], rows["val"], train_config, device=device)
            row = results[name]
            row.epoch_seconds.append(result.epoch_seconds[0])
            row.peak_bytes.append(max(result.peak_memory_bytes, peak.bytes))
            row.added_bytes.append(max(result.added_memory_bytes, peak.added))
            print(f"training {name}: {result.epoch_seconds[0]:.1f} s/epoch on {rows['train'].size} examples, "
                  f"peak {row.peak_bytes[-1] / MB:,.0f} MB (+{row.added_bytes[-1] / MB:,.0f})", flush=True)
            del model
    return list(results.values()), int(rows["train"].size)


# ----- outputs ----------------------------------------------------------------------------------
def plot(points: list[Point], path: Path, title: str) -> None:
    """Log-log: time per 1k users and added memory per user vs M, and time vs positions attended."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bahe = [p for p in points if p.bahe.ran]
    raw = [p for p in points if p.raw.ran]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {"bahe": dict(marker="o", color="tab:blue", label="BAHE (table rows, upper layers)"),
              "raw": dict(marker="s", color="tab:red", label="raw-token LLM (all layers, all tokens)")}
    for side, pts in (("bahe", bahe), ("raw", raw)):
        if not pts:
            continue
        ms = [p.m for p in pts]
        axes[0].plot(ms, [p.per_1k(side) for p in pts], **styles[side])
        axes[1].plot(ms, [max(getattr(p, side).added_bytes, 1) / MB / p.users for p in pts], **styles[side])
        positions = ms if side == "bahe" else [p.raw_tokens_per_sequence for p in pts]
        axes[2].plot(positions, [p.per_1k(side) for p in pts], **styles[side])
    if raw and len(raw) < len(bahe):
        stop = raw[-1].m
        for ax in axes[:2]:
            ax.axvline(stop, color="tab:red", linestyle=":", linewidth=1)
            ax.text(stop, 0.03, " raw side stops here", transform=ax.get_xaxis_transform(), color="tab:red",
                    fontsize=8)
    axes[0].set(xlabel="behaviors per sequence M", ylabel="seconds per 1,000 users", title="scoring time")
    axes[1].set(xlabel="behaviors per sequence M", ylabel="MB added per user in the batch (peak)",
                title="scoring memory")
    axes[2].set(xlabel="positions per sequence (BAHE: M behaviors, raw: M x tokens)",
                ylabel="seconds per 1,000 users", title="cost follows positions")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mb(b: int) -> str:
    return f"{b / MB:,.1f}"


def _x(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:,.1f}x"


def report_lines(config: CompareConfig, command: str, machine: str, points: list[Point], fitted: dict[str, float],
                 cost: OfflineCost, training: list[TrainRow] | None, train_examples: int, elapsed: float,
                 plot_link: str, n: int, oversubscribed: bool) -> list[str]:
    common = [p for p in points if p.common]
    lines = ["### Benchmark: BAHE vs the raw-token LLM as M grows", "",
             f"`{command}` on {datetime.date.today().isoformat()}; {machine}; {elapsed / 60:.1f} min in all. "
             "Absolute times are this machine's; ratios come from one run with both sides interleaved "
             "repetition by repetition.", ""]
    if oversubscribed:
        lines += [f"**Caution:** other jobs were running and torch used {torch.get_num_threads()} threads on "
                  f"{os.cpu_count()} cores (oversubscribed). That slows BAHE's many small operations several-fold "
                  "more than the raw side's large matrix products, so the ratios below understate BAHE's advantage; "
                  "re-run on a quiet machine, or with `--threads 1` on a shared one.", ""]
    lines += [f"Model `{config.model}`, {config.lower_layers} lower layers frozen for ABE; data `{config.data}`. "
              f"Users: {n} sequences x M behaviors (texts drawn uniformly from the data set's "
              f"{cost.unique_behaviors:,} unique behavior texts, fixed seed) + one item; the same users for both "
              "sides, texts in -> probabilities out. BAHE: `BAHEScorer.score`. Raw: `RawTokenCTR`'s forward with "
              "the scorer's own modules over each sequence's concatenated tokens. Times: median of the "
              "repetitions, per 1,000 users. Memory: peak RSS (CPU) or allocator peak (CUDA) during the call, "
              "and (+) what the call added; the memory ratio uses the added part.", "",
              "| M | users / batch | reps | raw tokens / sequence | BAHE s / 1k users | raw s / 1k users | time "
              "raw / BAHE | BAHE peak MB (+added) | raw peak MB (+added) | memory raw / BAHE | break-even users | "
              "raw side |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        tokens = f"{p.raw_tokens_per_sequence:,.0f} (max {p.raw_longest})" if p.raw_tokens_per_sequence else "-"
        if p.raw.ran:
            raw_cols = (f"{p.per_1k('raw'):,.2f} | {_x(p.time_ratio)} | {_mb(p.bahe.peak_bytes)} "
                        f"(+{_mb(p.bahe.added_bytes)}) | {_mb(p.raw.peak_bytes)} (+{_mb(p.raw.added_bytes)}) | "
                        f"{_x(p.memory_ratio)} | {break_even_users(cost.seconds, p):,.0f} | ran")
        else:
            raw_cols = (f"- | - | {_mb(p.bahe.peak_bytes)} (+{_mb(p.bahe.added_bytes)}) | - | - | - | "
                        f"{p.raw.status}")
        lines.append(f"| {p.m:,} | {p.users} | {len(p.bahe.samples)} | {tokens} | {p.per_1k('bahe'):,.2f} | "
                     f"{raw_cols} |")
    lines += ["", "Fitted log-log slopes (cost ~ M^slope): " + "; ".join(
        f"{k} {v:.2f}" for k, v in fitted.items() if math.isfinite(v)) + ".", "",
        f"![BAHE vs raw-token scaling]({plot_link})", ""]
    if common:
        top = common[-1]
        lines.append(f"**Headline (largest common M = {top.m}):** raw-token / BAHE = {_x(top.time_ratio)} time "
                     f"per 1,000 users ({top.per_1k('raw'):,.2f} s vs {top.per_1k('bahe'):,.2f} s), "
                     f"{_x(top.memory_ratio)} added memory ({_mb(top.raw.added_bytes)} vs "
                     f"{_mb(top.bahe.added_bytes)} MB for {top.users} users).")
        longest = [p for p in points if p.bahe.ran][-1]
        lines.append(f"BAHE at M = {longest.m:,} ({longest.m / top.m:,.0f}x the raw side's largest M): "
                     f"{longest.per_1k('bahe'):,.2f} s per 1,000 users, "
                     f"{longest.per_1k('bahe') / top.per_1k('raw'):.2f}x "
                     f"the raw side's time at M = {top.m}.")
        lines.append("")
    lines += [f"**Offline ABE:** {cost.unique_behaviors:,} unique behavior texts encoded in {cost.seconds:.1f} s "
              f"({cost.per_second:,.0f} behaviors/s, +{_mb(cost.added_bytes)} MB); the log has "
              f"{cost.behavior_events:,} behavior events -> {cost.dedup_ratio:,.0f}x dedup "
              f"({1000 * cost.seconds / max(cost.behavior_events, 1):.3f} ms of ABE per behavior event). "
              "Break-even = ABE seconds / per-user saving (raw - BAHE) at that M: past that many scored users "
              "the table has paid for itself.", ""]
    if training:
        bahe, raw = training
        lines += [f"**Training** (`engine.training.train.fit`, 1 epoch, the same {train_examples:,} {config.data} train "
                  f"examples for both, at most {config.train_behaviors} behaviors per sequence, batch "
                  f"{config.train_batch_size}; raw sequences up to the model's positions; median of "
                  f"{config.train_reps} interleaved run(s)):", "",
                  "| model | s / epoch | examples / s | peak MB (+added) |", "|---|---|---|---|"]
        for row in training:
            lines.append(f"| {row.name} | {row.seconds:,.1f} | {train_examples / row.seconds:,.1f} | "
                         f"{_mb(row.peak)} (+{_mb(row.added)}) |")
        ratio = training_ratios(bahe, raw)
        lines += ["", f"Training raw / BAHE: {_x(ratio['time'])} time per epoch, "
                  f"{_x(ratio['added_memory'])} added peak memory, {_x(ratio['peak_memory'])} absolute peak.", ""]
    lines += ["Latency suites (pytest-benchmark, JSON under bench/results/): "
              "`pytest bench/ --benchmark-only --benchmark-json=bench/results/bench.json` "
              "(`BAHE_BENCH_LARGE=1` adds the biggest batch x M combinations)."]
    return lines


def write_csv(path: Path, points: list[Point], machine: str, run: str, threads: int) -> None:
    fields = ["run", "machine", "threads", "side", "m", "users", "reps", "s_per_1k_users_p50", "p20", "p80",
              "peak_mb", "added_mb", "raw_tokens_per_sequence", "status"]
    rows = []
    for p in points:
        for side in ("bahe", "raw"):
            r = getattr(p, side)
            ran = r.ran
            rows.append({"run": run, "machine": machine, "threads": threads, "side": side, "m": p.m,
                         "users": p.users, "reps": len(r.samples),
                         "s_per_1k_users_p50": round(p.per_1k(side), 5) if ran else "",
                         "p20": round(p.per_1k(side, 0.2), 5) if ran else "",
                         "p80": round(p.per_1k(side, 0.8), 5) if ran else "",
                         "peak_mb": round(r.peak_bytes / MB, 2) if ran else "",
                         "added_mb": round(r.added_bytes / MB, 2) if ran else "",
                         "raw_tokens_per_sequence": round(p.raw_tokens_per_sequence, 1)
                         if p.raw_tokens_per_sequence else "", "status": r.status})
    append_csv(path, fields, rows)


# ----- main ---------------------------------------------------------------------------------------
def tables_dir_for(config: CompareConfig) -> Path:
    """Cached tables, one folder per (model folder, lower layers, max tokens)."""
    folder = resolve_model(config.model).resolve()
    tag = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return config.work_dir / f"tables-{folder.name}-{tag}-L{config.lower_layers}-T{config.max_tokens}"


def build(config: CompareConfig, data: BehaviorLog, max_behaviors: int | None = None) -> BAHEScorer:
    """The BAHE scorer over every item text of `data` (tables built once, then reused from the work
    dir), keeping `max_behaviors` per sequence (default: the largest M)."""
    scorer_config = ScorerConfig(
        encoder=EncoderConfig(num_lower_layers=config.lower_layers, max_tokens=config.max_tokens),
        model=ModelConfig(sequence_names=data.sequence_names, max_behaviors=max_behaviors or max(config.ms)),
        scoring=ScoringConfig(batch_size=max(config.users, 1)))
    texts = data.item_id_texts
    return BAHEScorer.create(config.model, behavior_texts=texts, item_texts=texts, tables_dir=tables_dir_for(config),
                             config=scorer_config, device=resolve_device(config.device), progress=False)


def run(config: CompareConfig, command: str = "python -m bench.compare") -> dict:
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    load = os.getloadavg()[0]
    machine = f"{machine_label()}, load average {load:.1f} at start"
    print(f"machine: {machine}", flush=True)
    oversubscribed = device.type == "cpu" and torch.get_num_threads() > 1 and load >= 1
    if oversubscribed:
        log.warning("load average %.1f: other jobs share the CPU, and %d torch threads will be oversubscribed "
                    "(several-fold slower, noisier); consider --threads 1", load, torch.get_num_threads())
    data = load_data(config.data)
    texts = data.item_id_texts
    scorer = build(config, data)
    ckpt = scorer.checkpoint
    raw = RawTokenScorer(scorer, config.max_tokens)
    n = len(scorer.config.model.sequence_names)
    print(f"model {config.model}: {ckpt.num_layers} layers ({config.lower_layers} lower), hidden {ckpt.hidden_size}, "
          f"raw side limited to {raw.positions} positions per sequence; {n} sequences per user", flush=True)
    cost = offline_cost(scorer, data, texts)
    print(f"ABE: {cost.unique_behaviors:,} unique behaviors in {cost.seconds:.1f} s ({cost.per_second:,.0f}/s); "
          f"{cost.behavior_events:,} behavior events -> {cost.dedup_ratio:,.0f}x dedup", flush=True)
    points = sweep(config, scorer, raw, texts)
    fitted = slopes(points)
    for name, value in fitted.items():
        print(f"log-log slope, {name}: {value:.2f}")
    for p in points:
        if p.common:
            print(f"break-even at M={p.m}: {break_even_users(cost.seconds, p):,.0f} users")
    training, train_examples = None, 0
    if config.train:
        del raw
        training, train_examples = compare_training(config, data, ckpt, device)
    elapsed = time.perf_counter() - started
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    model_name = Path(config.model).name  # an embedded name (no slash) is its own name
    png = config.out_dir / f"scaling-{model_name}.png"
    plot(points, png, f"BAHE vs raw-token LLM ({config.model}) - {machine}")
    write_csv(config.out_dir / "compare.csv", points, machine, run_id, torch.get_num_threads())
    summary = {
        "run": run_id, "machine": machine, "command": command, "elapsed_s": elapsed,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "points": [{"m": p.m, "users": p.users, "raw_tokens_per_sequence": p.raw_tokens_per_sequence,
                    "raw_longest": p.raw_longest,
                    **{side: {"status": getattr(p, side).status,
                              "samples": [asdict(s) for s in getattr(p, side).samples],
                              "s_per_1k_users": p.per_1k(side) if getattr(p, side).ran else None}
                       for side in ("bahe", "raw")},
                    "time_ratio": p.time_ratio if p.common else None,
                    "memory_ratio": p.memory_ratio if p.common else None,
                    "break_even_users": break_even_users(cost.seconds, p) if p.common else None} for p in points],
        "slopes": fitted, "abe": {**asdict(cost), "per_second": cost.per_second, "dedup_ratio": cost.dedup_ratio},
        "training": None if training is None else {
            "train_examples": train_examples, "rows": [asdict(r) for r in training],
            **{f"{k}_ratio": v for k, v in training_ratios(*training).items()}},
    }
    (config.out_dir / "compare.json").write_text(json.dumps(summary, indent=1, default=float))
    if config.results_md is not None:
        link = os.path.relpath(png, config.results_md.resolve().parent if config.results_md.is_absolute()
                               else config.results_md.parent)
        marker = MARKER.format(model=model_name)
        write_section(config.results_md, marker, report_lines(config, command, machine, points, fitted, cost,
                                                              training, train_examples, elapsed, link, n,
                                                              oversubscribed))
        print(f"wrote {config.results_md} (section <!-- {marker} -->)")
    print(f"wrote {png}, {config.out_dir / 'compare.json'}, {config.out_dir / 'compare.csv'}; "
          f"{elapsed / 60:.1f} min in all")
    return summary


def add_model_arguments(p: argparse.ArgumentParser, d: CompareConfig) -> None:
    """The model, data and run options shared with bench.profile."""
    p.add_argument("--model", default=d.model, help="'minilm', 'smollm2' or a local checkpoint folder")
    p.add_argument("--data", default=d.data, help="'movielens' or a behavior log file")
    p.add_argument("--lower-layers", type=int, default=d.lower_layers)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per behavior / item text")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--work-dir", type=Path, default=d.work_dir, help="cached behavior tables")


def build_parser() -> argparse.ArgumentParser:
    d = CompareConfig()
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(p, d)
    p.add_argument("--ms", type=int, nargs="+", default=list(d.ms), help="behaviors per sequence to sweep")
    p.add_argument("--users", type=int, default=None, help=f"most users per batch (default {d.users}; "
                   f"--large: {LARGE['users']})")
    p.add_argument("--positions", type=int, default=None, help="behavior positions per BAHE batch, about")
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions per side and M (default {d.reps})")
    p.add_argument("--point-budget", type=float, default=None, help="seconds per M before repetitions stop")
    p.add_argument("--raw-budget", type=float, default=None, help="raw side stops after a repetition this long")
    p.add_argument("--no-train", action="store_true", help="skip the training comparison")
    p.add_argument("--train-examples", type=int, default=None)
    p.add_argument("--val-examples", type=int, default=None)
    p.add_argument("--train-behaviors", type=int, default=d.train_behaviors)
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    p.add_argument("--large", action="store_true",
                   help="bigger sizes: " + ", ".join(f"{k}={v}" for k, v in LARGE.items()))
    p.add_argument("--out-dir", type=Path, default=d.out_dir)
    p.add_argument("--results-md", default=str(d.results_md), help="markdown file to update ('' to skip)")
    return p


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    config = CompareConfig(model=args.model, data=args.data, lower_layers=args.lower_layers, max_tokens=args.max_tokens,
                           ms=tuple(sorted(set(args.ms))), train=not args.no_train,
                           train_behaviors=args.train_behaviors, train_batch_size=args.train_batch_size,
                           device=args.device, threads=args.threads, seed=args.seed, work_dir=args.work_dir,
                           out_dir=args.out_dir,
                           results_md=Path(args.results_md) if args.results_md else None, large=args.large)
    if args.large:
        config = replace(config, **LARGE)
    given = {"users": args.users, "positions": args.positions, "reps": args.reps, "point_budget": args.point_budget,
             "raw_budget": args.raw_budget, "train_examples": args.train_examples, "val_examples": args.val_examples}
    return replace(config, **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING)
    config = config_from_args(build_parser().parse_args(argv))
    return run(config, " ".join(["python -m bench.compare", *argv]))


if __name__ == "__main__":
    main()
