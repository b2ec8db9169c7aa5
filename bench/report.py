"""The outputs of `python -m bench.compare`: the markdown section of bench/RESULTS.md, the rows
appended to compare.csv, the summary written to compare.json and the log-log scaling plot."""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from engine.training.studies.results_sections import append_csv
from engine.training.studies.scaling import MB, OfflineCost, Point, ScalingConfig, TrainRow, break_even_users, training_ratios


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


def report_lines(config: ScalingConfig, command: str, machine: str, points: list[Point], fitted: dict[str, float],
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
        lines += [f"**Training** (`engine.training.loops.train.fit`, 1 epoch, the same {train_examples:,} {config.data} train "
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




def summary(config: ScalingConfig, command: str, machine: str, run: str, elapsed: float, points: list[Point],
            fitted: dict[str, float], cost: OfflineCost, training: list[TrainRow] | None,
            train_examples: int) -> dict:
    """Every number of the run, as written to compare.json."""
    return {
        "run": run, "machine": machine, "command": command, "elapsed_s": elapsed,
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
