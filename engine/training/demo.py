"""`bahe demo` / `make demo`: MovieLens-100K, a real pretrained LM, BAHE vs the raw-token LLM vs
id-only, trained the same way on the same examples; one table, also written to bench/RESULTS.md."""
from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.training.ctr_models import BAHECTR, IdOnlyCTR, RawTokenCTR
from engine.training.experiment import ModelReport, SampleConfig, build_scorer, load_data, sample_split, train_and_test
from engine.training.report import machine, write_section
from engine.scorer import BAHEScorer
from engine.training.train import TrainConfig
from weights.registry import EMBEDDED

log = logging.getLogger(__name__)

@dataclass
class DemoConfig:
    """Sizes of the comparison. The defaults run in minutes on 2 CPU cores; `preset` gives the
    per-model defaults and the `--full` run (every example, longer sequences, more epochs)."""
    model: str = "minilm"
    data: str = "movielens"             # or a CSV/parquet behavior log
    out: Path = Path("artifacts/demo/minilm")
    results: Path | None = Path("bench/RESULTS.md")
    full: bool = False
    num_lower_layers: int = 3
    max_tokens: int = 32                 # tokens per behavior text (ABE) and per item text
    raw_tokens: int = 256                # raw-token baseline: tokens per concatenated sequence
    max_behaviors: int = 10              # M, for BAHE and (concatenated) for the raw-token baseline
    train_examples: int | None = 3000
    val_examples: int | None = 300
    test_examples: int | None = 1000
    # The raw-token baseline costs ~20x BAHE per training example on a CPU: it trains on a subset,
    # and BAHE is trained on that same subset too, so their AUCs compare like for like.
    raw_train_examples: int = 600
    epochs: int = 2
    users_to_show: int = 3
    candidates_per_user: int = 200

    @classmethod
    def preset(cls, model: str = "minilm", full: bool = False, **overrides) -> DemoConfig:
        values: dict = {"model": model, "full": full}
        if model == "smollm2":  # 30 layers: split chosen by validation AUC vs training time (RESULTS.md)
            values.update(num_lower_layers=SMOLLM2_LOWER_LAYERS, train_examples=2000, val_examples=200,
                          test_examples=500, raw_train_examples=200, raw_tokens=128)
        if full:
            values.update(max_behaviors=50, train_examples=None, val_examples=None, test_examples=None,
                          raw_train_examples=5000, epochs=4)
        values.update(overrides)
        return cls(**values)

    def sample(self) -> SampleConfig:
        return SampleConfig(self.train_examples, self.val_examples, self.test_examples)

    def train(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, patience=1, batch_size=64)


SMOLLM2_LOWER_LAYERS = 27


@dataclass
class DemoRow:
    report: ModelReport
    train_examples: int
    score_ms_per_1k: float
    note: str = ""


@dataclass
class DemoResult:
    rows: list[DemoRow] = field(default_factory=list)


def _fmt_table(rows: list[DemoRow]) -> list[str]:
    lines = ["| model | train examples | test AUC | test log loss | train s/epoch | epochs (best) | "
             "peak train memory (MB) | scoring s / 1k users | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fit = row.report.fit
        lines.append(
            f"| {row.report.name} | {row.train_examples:,} | {row.report.test['auc']:.4f} | "
            f"{row.report.test['logloss']:.4f} | {np.mean(fit.epoch_seconds):.1f} | {len(fit.epoch_seconds)} "
            f"({fit.best_epoch}) | {fit.peak_memory_bytes / 2**20:,.0f} (+{fit.added_memory_bytes / 2**20:,.0f}) | "
            f"{row.score_ms_per_1k / 1000:.2f} | {row.note} |")
    return lines


def _bahe_scoring_time(scorer: BAHEScorer, data, rows: np.ndarray) -> float:
    """Milliseconds per 1,000 users through the public text API (lookup + BA + head)."""
    rows = rows[:1000]
    users = data.sequence_texts(rows, scorer.config.model.max_behaviors)
    items = data.target_texts(rows)
    scorer.score(users[:8], items[:8])  # warm-up
    start = time.perf_counter()
    scorer.score(users, items)
    return 1e6 * (time.perf_counter() - start) / rows.size


def _show_users(scorer: BAHEScorer, data, test_rows: np.ndarray, config: DemoConfig) -> list[str]:
    """Top movies for a few real test users, scored with the saved-and-reloaded scorer."""
    rng = np.random.default_rng(1)
    lines = []
    for row in rng.choice(test_rows, config.users_to_show, replace=False):
        user = data.sequence_texts([row], scorer.config.model.max_behaviors)[0]
        seen = set(data.item[(data.user == data.user[row])].tolist())
        unseen = np.array([i for i in data.item_ids if i not in seen])
        candidates = rng.choice(unseen, min(config.candidates_per_user, unseen.size), replace=False)
        texts = [data.item_texts[int(i)] for i in candidates]
        probs = scorer.score([user] * len(texts), texts)
        top = np.argsort(-probs)[:5]
        liked = user.get("liked", [])[-3:]
        lines.append(f"user {data.user[row]} (recently liked: {'; '.join(liked) or '-'})")
        lines += [f"    {probs[i]:.3f}  {texts[i]}" for i in top]
    return lines


def run_demo(config: DemoConfig) -> DemoResult:
    started = time.perf_counter()
    torch.manual_seed(0)  # the new parameters (head, empty-sequence vectors) start the same every run
    lower, max_tokens, raw_tokens = config.num_lower_layers, config.max_tokens, config.raw_tokens
    model_desc = EMBEDDED.get(config.model, f"local checkpoint {config.model}")
    print(f"BAHE demo on {config.data} with {model_desc}\nmachine: {machine()}")
    data = load_data(config.data)
    split = data.split()
    rows = sample_split(split, config.sample())
    summary = data.summary(split)
    print(f"data: {summary['events']:,} ratings, {summary['users']} users, {summary['items']} movies; "
          f"sequences {list(data.sequence_names)}; label = rating >= 4")
    for name, part in summary["splits"].items():
        print(f"  {name:5s}: {part['examples']:,} examples (positive rate {part['positive_rate']:.3f}); "
              f"used: {rows[name].size:,} (positive rate {data.label[rows[name]].mean():.3f})")
    scorer_config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=lower, max_tokens=max_tokens),
                                 model=ModelConfig(sequence_names=data.sequence_names,
                                                   max_behaviors=config.max_behaviors))
    scorer, tables = build_scorer(config.model, data, scorer_config, config.out / "tables", device="cpu")
    print(f"ABE: {tables.behavior_events:,} behaviors in the log -> {tables.unique_behaviors:,} unique rows "
          f"({tables.dedup_ratio:.0f}x dedup), {tables.items:,} items; tables built in {tables.seconds:.1f} s "
          f"({lower} of {scorer.checkpoint.num_layers} layers frozen for ABE)")
    train_config = config.train()
    subset = dict(rows, train=rows["train"][np.sort(np.random.default_rng(0).choice(
        rows["train"].size, min(config.raw_train_examples, rows["train"].size), replace=False))])
    result = DemoResult()
    initial = {k: v.detach().clone() for k, v in scorer.model.state_dict().items()}
    bahe_subset = train_and_test(BAHECTR(scorer, data), data, subset, train_config)
    result.rows.append(DemoRow(bahe_subset, subset["train"].size, bahe_subset.test["seconds_per_1k"] * 1000,
                               "same examples as the raw-token row; scored through its forward"))
    scorer.model.load_state_dict(initial)
    bahe = train_and_test(BAHECTR(scorer, data), data, rows, train_config)
    result.rows.append(DemoRow(bahe, rows["train"].size, _bahe_scoring_time(scorer, data, rows["test"]),
                               "scoring through BAHEScorer.score (texts in)"))
    raw = RawTokenCTR(scorer.checkpoint, lower, scorer_config.model, max_tokens_per_sequence=raw_tokens, item_max_tokens=max_tokens)
    raw_report = train_and_test(raw, data, subset, train_config)
    result.rows.append(DemoRow(raw_report, subset["train"].size, raw_report.test["seconds_per_1k"] * 1000,
                               f"all layers over the same {config.max_behaviors} behaviors/sequence, concatenated "
                               f"(<= {raw_tokens} tokens)"))
    ids = train_and_test(IdOnlyCTR(scorer_config.model, data), data, rows, train_config)
    result.rows.append(DemoRow(ids, rows["train"].size, ids.test["seconds_per_1k"] * 1000,
                               "learned item-id embeddings, mean-pooled"))
    table = _fmt_table(result.rows)
    print("\n" + "\n".join(table))
    scorer.save_pretrained(config.out / "scorer")
    reloaded = BAHEScorer.from_pretrained(config.out / "scorer", device="cpu")
    print(f"\nscorer saved to {config.out / 'scorer'}; reloaded with BAHEScorer.from_pretrained. Top movies:")
    shown = _show_users(reloaded, data, rows["test"], config)
    print("\n".join(shown))
    elapsed = time.perf_counter() - started
    print(f"\ndemo finished in {elapsed / 60:.1f} min")
    if config.results is not None:
        _write_results(config, table, model_desc, tables, rows, elapsed, lower)
    return result


def _write_results(config: DemoConfig, table: list[str], model_desc: str, tables, rows, elapsed: float,
                   lower: int) -> None:
    """This model's demo section of RESULTS.md."""
    command = f"bahe demo --model {config.model}{' --full' if config.full else ''}"
    write_section(config.results, f"demo:{config.model}:{'full' if config.full else 'default'}", [
        f"### Demo: {model_desc}{' (full run)' if config.full else ''}", "",
        f"`{command}` on {datetime.date.today().isoformat()}, {machine()}; {elapsed / 60:.1f} min in all.",
        f"Data: {config.data}, time split; examples used: train {rows['train'].size:,}, validation "
        f"{rows['val'].size:,}, test {rows['test'].size:,}. ABE: {tables.behavior_events:,} behaviors -> "
        f"{tables.unique_behaviors:,} unique rows ({tables.dedup_ratio:.0f}x dedup); {lower} lower layers frozen. "
        f"Scoring time: per 1,000 test users, through each model's forward, except the second BAHE row: the "
        f"public `BAHEScorer.score` (texts in, lookup included). Peak memory: process RSS during training "
        f"(+ what training added).",
        "", *table])
