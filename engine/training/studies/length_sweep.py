"""Test AUC as the behaviors per sequence M grow, on the global time split (`python -m bench.history`).

At each M: BAHE's full CTR model (the demo's: text + counts + similarity counts + item id + categorical, timeline training) with
`max_behaviors = M`, trained on every training example and tested on the whole test set; and, while
the concatenated tokens of M behaviors fit the backbone's positions (BERT: 512 per sequence), the
raw-token LLM beside BAHE's text part (`ModelConfig.text_only()`, the same M) on one fixed subset of
the examples (`raw_subset`). The raw side stops at the first M whose longest sequence over that subset
needs more tokens than there are positions. "all" is the default `ModelConfig.max_behaviors` (1024), or the
log's longest user history where that is longer (MovieLens-1M: 2,314): every user's whole history. Every AUC and
GAUC comes with its 95% user-bootstrap interval.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.config import ModelConfig
from engine.training.loops.ctr_models import BAHECTR
from engine.training.studies.demo import (DemoConfig, DemoRow, demo_row, demo_scorer, longest_sequence_tokens,
                                          model_variant, neural_row, raw_subset, raw_token_model, raw_vs_text_part)
from engine.training.studies.demo_ml1m import RowCache
from engine.training.studies.experiment import load_data
from engine.training.studies.metrics import Interval, gauc_interval, undefined_as_nan

log = logging.getLogger(__name__)

ALL = "all"
DEFAULT_MS: tuple[str, ...] = ("5", "10", "20", "50", "100", "200", ALL)
ALL_BEHAVIORS = ModelConfig.__dataclass_fields__["max_behaviors"].default  # every MovieLens-100K user's history


def whole_history(data) -> int:
    """M for 'all': the default max_behaviors, or the log's longest user history where that is longer."""
    return max(ALL_BEHAVIORS, int(np.unique(data.user, return_counts=True)[1].max()))


def m_label(m: int | None) -> str:
    return ALL if m is None else str(m)


def parse_m(value: str | int) -> int | None:
    """An M of the sweep: a positive int, or None for 'all'."""
    if str(value) == ALL:
        return None
    m = int(value)
    if m < 1:
        raise ValueError(f"M must be a positive number of behaviors or '{ALL}', got {value!r}")
    return m


@dataclass
class HistoryRow:
    m: int | None          # behaviors per sequence; None: all (HistoryResult.all_behaviors)
    row: DemoRow
    subset: bool           # trained and tested on the raw-token subset
    gauc: Interval         # per-user AUC, impression-weighted, with its 95% user-bootstrap interval

    @property
    def label(self) -> str:
        return m_label(self.m)


@dataclass
class HistoryResult:
    rows: list[HistoryRow]
    positions: int = 0                      # the raw side's tokens per sequence (the backbone's positions)
    raw_longest: dict[str, int] = field(default_factory=dict)  # M label -> longest sequence's tokens, counted
                                                               # up to positions + 1 (the Ms checked)
    raw_stop: str | None = None             # the first M that did not fit; None: every M ran (or none was tried)
    subset_sizes: dict[str, int] = field(default_factory=dict)
    train_examples: int = 0
    test_examples: int = 0
    elapsed: float = 0.0
    all_behaviors: int = ALL_BEHAVIORS      # M for 'all' (whole_history)

    def behaviors(self, m: int | None) -> int:
        """Behaviors per sequence of the sweep's M (None: all)."""
        return self.all_behaviors if m is None else m


def full_model_row(config: DemoConfig, data, rows: dict, scorer, behaviors: int, cache: RowCache) -> DemoRow:
    """BAHE's full model at M = `behaviors` on the time split: reused from `cache` when a run with the same
    settings finished it (a sweep stopped part-way resumes at its next M), else trained, scored and kept."""
    note = f"full model, {behaviors} behaviors/sequence"
    key = {"model": f"BAHE-M{behaviors}", "split": "time", "sweep": "history", "backbone": config.model,
           "data": str(config.data), "seed": config.seed, "epochs": config.epochs, "batch_size": config.batch_size,
           "lower_layers": config.num_lower_layers, "lr_decay": config.lr_decay, "id_rows": config.id_rows,
           "rows": RowCache.rows_key(rows)}
    cached = cache.load(key)
    if cached is not None:
        log.info("M = %d: reused from %s", behaviors, cache.folder)
        return demo_row("BAHE", "time", data, rows, cached[0], cached[1]["seconds"], note)
    full = BAHECTR(model_variant(scorer, replace(scorer.config.model, max_behaviors=behaviors), config.seed), data)
    row = neural_row(full, data, rows, config.train(), "time", note)
    cache.store(key, row.probs, {"seconds": row.train_seconds})
    return row


def run_history(config: DemoConfig, ms: Sequence[int | None]) -> HistoryResult:
    """The sweep on the time split: `config` gives the model, data, epochs, seed and raw-token subset sizes
    (`config.out / 'tables'` holds the cached tables); `ms` the behaviors per sequence (None: all)."""
    started = time.perf_counter()
    data = load_data(config.data)
    rows = dict(data.split().items())
    scorer, _ = demo_scorer(config, data)
    subset = raw_subset(rows, config)
    subset_rows = np.concatenate(list(subset.values()))
    result = HistoryResult([], subset_sizes={k: int(v.size) for k, v in subset.items()},
                           train_examples=int(rows["train"].size), test_examples=int(rows["test"].size),
                           all_behaviors=whole_history(data))

    def history_row(m: int | None, row: DemoRow, test: np.ndarray, on_subset: bool) -> HistoryRow:
        gauc = undefined_as_nan(gauc_interval, data.label[test], row.probs, data.user[test])
        return HistoryRow(m, row, on_subset, gauc)

    cache = RowCache(config.out / "history-rows")
    for m in sorted(ms, key=result.behaviors):
        behaviors, label = result.behaviors(m), m_label(m)
        result.rows.append(history_row(m, full_model_row(config, data, rows, scorer, behaviors, cache), rows["test"],
                                       False))
        if not config.raw_train_examples or result.raw_stop is not None:
            continue
        raw = raw_token_model(scorer, behaviors, config, sys.maxsize)  # cut at the model's positions
        result.positions = raw.max_tokens
        result.raw_longest[label] = longest = longest_sequence_tokens(raw, data, subset_rows)
        if longest > raw.max_tokens:
            result.raw_stop = label
            log.info("raw-token LLM stops at M = %s: a sequence needs %d tokens > %d positions", label, longest,
                     raw.max_tokens)
            continue
        result.rows += [history_row(m, r, subset["test"], True)
                        for r in raw_vs_text_part(data, subset, scorer, raw, config, config.epochs, "time (subset)")]
    result.elapsed = time.perf_counter() - started
    return result


# the plot's series: (row name, on the subset) -> label, color
SERIES = {("BAHE", False): ("BAHE, full model (all training examples)", "tab:blue"),
          ("BAHE (text only)", True): ("BAHE text part (subset)", "tab:green"),
          ("raw-token LLM", True): ("raw-token LLM (subset)", "tab:red")}


def table_lines(result: HistoryResult) -> list[str]:
    """The markdown table: one row per (M, model)."""
    lines = ["| M | model | train examples | test AUC [95% CI] | test GAUC [95% CI] | test users | s/epoch |",
             "|---|---|---|---|---|---|---|"]
    for h in result.rows:
        r, g = h.row, h.gauc
        name = f"{r.name}, subset" if h.subset else r.name
        lines.append(f"| {h.label} | {name} | {r.train_examples:,} | {r.auc.value:.4f} [{r.auc.low:.4f}, "
                     f"{r.auc.high:.4f}] | {g.value:.4f} [{g.low:.4f}, {g.high:.4f}] | {r.auc.users} | "
                     f"{r.train_seconds:.1f} |")
    return lines


def raw_stop_line(result: HistoryResult) -> str:
    if not result.raw_longest:
        return "The raw-token LLM was not run."
    if result.raw_stop is None:
        return (f"The raw-token LLM ran at every M tried (longest sequence {max(result.raw_longest.values()):,} "
                f"tokens, {result.positions:,} positions).")
    return (f"The raw-token LLM stops at M = {result.raw_stop}: the longest concatenated sequence of the subset "
            f"needs more tokens than the model's {result.positions:,} positions.")


def plot(result: HistoryResult, path: Path, title: str) -> None:
    """Test AUC vs M (log x; 'all' at the whole history), each series with its 95% interval as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (name, subset), (label, color) in SERIES.items():
        points = [h for h in result.rows if h.row.name == name and h.subset == subset]
        if not points:
            continue
        xs = [result.behaviors(h.m) for h in points]
        ax.plot(xs, [h.row.auc.value for h in points], marker="o", color=color, label=label)
        ax.fill_between(xs, [h.row.auc.low for h in points], [h.row.auc.high for h in points], color=color,
                        alpha=0.15, linewidth=0)
    if result.raw_stop is not None:
        stop = result.behaviors(parse_m(result.raw_stop))
        ax.axvline(stop, color="tab:red", linestyle=":", linewidth=1)
        ax.text(stop, 0.03, " raw-token LLM stops here", transform=ax.get_xaxis_transform(), color="tab:red",
                fontsize=8)
    ms = sorted({h.m for h in result.rows}, key=result.behaviors)
    ax.set_xscale("log")
    ax.set_xticks([result.behaviors(m) for m in ms], [m_label(m) for m in ms])
    ax.minorticks_off()
    ax.set(xlabel="behaviors per sequence M", ylabel="test AUC (95% user-bootstrap interval)", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: HistoryResult, config: DemoConfig, command: str, machine: str) -> dict:
    """Every number of the run, as written to the JSON file."""
    return {
        "command": command, "machine": machine, "elapsed_s": result.elapsed,
        "config": {"model": config.model, "data": config.data, "lower_layers": config.num_lower_layers,
                   "max_tokens": config.max_tokens, "epochs": config.epochs, "batch_size": config.batch_size,
                   "seed": config.seed, "raw_train_examples": config.raw_train_examples,
                   "raw_test_examples": config.raw_test_examples, "lr_decay": config.lr_decay,
                   "id_rows": config.id_rows},
        "train_examples": result.train_examples, "test_examples": result.test_examples,
        "subset": result.subset_sizes, "raw_positions": result.positions, "raw_longest_tokens": result.raw_longest,
        "raw_stop": result.raw_stop, "all_behaviors": result.all_behaviors,
        "rows": [{"m": h.label, "max_behaviors": result.behaviors(h.m), "model": h.row.name, "subset": h.subset,
                  "train_examples": h.row.train_examples, "auc": h.row.auc.value, "auc_low": h.row.auc.low,
                  "auc_high": h.row.auc.high, "gauc": h.gauc.value, "gauc_low": h.gauc.low,
                  "gauc_high": h.gauc.high, "test_users": h.row.auc.users, "logloss": h.row.logloss,
                  "s_per_epoch": h.row.train_seconds} for h in result.rows],
    }
