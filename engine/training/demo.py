"""`bahe demo` / `make demo`: MovieLens-100K, a real pretrained LM, all the training data.

On each split (the global time split and a per-user temporal split) the demo trains and tests:
BAHE's full CTR model (text vectors from the upper layers over whole histories, count features, item id,
DCN-v2 head; timeline training), the same CTR model without its text part (the ablation), gradient
boosting and logistic regression on past-only features, and the id-only model. Every AUC comes with a
95% bootstrap interval over test users, and the differences the README claims with paired intervals.
The raw-token LLM, which costs ~20x BAHE per example on a CPU, is compared on a small subset of the
time split, beside BAHE on the same subset. One table, also written to bench/RESULTS.md."""
from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.backbone.split import UpperEncoder
from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.model import BAHEModel
from engine.scorer import BAHEScorer
from engine.training.classic import fit_classic
from engine.training.ctr_models import BAHECTR, IdOnlyCTR, RawTokenCTR, SideOnlyCTR
from engine.training.experiment import build_scorer, load_data
from engine.training.metrics import Interval, auc_interval, log_loss, paired_auc_difference
from engine.training.report import machine, write_section
from engine.training.splits import per_user_split
from engine.training.train import TrainConfig, fit, predict
from weights.registry import EMBEDDED

log = logging.getLogger(__name__)

SMOLLM2_LOWER_LAYERS = 27


@dataclass
class DemoConfig:
    """Sizes of the comparison. The defaults train on every example in about 20 minutes on 2 CPU cores."""
    model: str = "minilm"
    data: str = "movielens"             # or a CSV/parquet behavior log
    out: Path = Path("artifacts/demo/minilm")
    results: Path | None = Path("bench/RESULTS.md")
    num_lower_layers: int = 3
    max_tokens: int = 32                 # tokens per behavior text (ABE) and per item text
    max_behaviors: int = 1024            # M for BAHE: the whole history of every MovieLens user
    id_only_behaviors: int = 100         # M for the id-only model (per-example batches)
    epochs: int = 3
    batch_size: int = 256
    splits: tuple[str, ...] = ("time", "per-user")
    seed: int = 0
    raw_train_examples: int = 600        # the raw-token comparison (time split subset); 0: skip it
    raw_test_examples: int = 1000
    raw_behaviors: int = 10
    raw_tokens: int = 256
    users_to_show: int = 3
    candidates_per_user: int = 200

    @classmethod
    def preset(cls, model: str = "minilm", **overrides) -> DemoConfig:
        values: dict = {"model": model}
        if model == "smollm2":  # 30 layers: split chosen by validation AUC vs training time (RESULTS.md)
            values.update(num_lower_layers=SMOLLM2_LOWER_LAYERS, raw_train_examples=200, raw_test_examples=500,
                          raw_tokens=128)
        values.update(overrides)
        return cls(**values)

    def train(self, epochs: int | None = None) -> TrainConfig:
        return TrainConfig(epochs=epochs or self.epochs, patience=1, batch_size=self.batch_size, seed=self.seed)


@dataclass
class DemoRow:
    name: str
    split: str
    train_examples: int
    auc: Interval
    logloss: float
    train_seconds: float        # per epoch (fit time for the classic models)
    note: str = ""
    probs: np.ndarray = field(default=None, repr=False)


def _row(name: str, split: str, data, rows: dict, probs: np.ndarray, seconds: float, note: str = "") -> DemoRow:
    test = rows["test"]
    labels, users = data.label[test], data.user[test]
    row = DemoRow(name, split, rows["train"].size, auc_interval(labels, probs, users), log_loss(labels, probs),
                  seconds, note, probs)
    log.info("%s / %s: test AUC %s", split, name, row.auc)
    return row


def _neural(model, data, rows: dict, config: TrainConfig, split: str, note: str = "") -> DemoRow:
    result = fit(model, data, rows["train"], rows["val"], config)
    probs = predict(model, data, rows["test"], batch_size=512)
    return _row(model.name, split, data, rows, probs, float(np.mean(result.epoch_seconds)), note)


def _classic(kind: str, data, rows: dict, split: str, seed: int) -> DemoRow:
    start = time.perf_counter()
    model = fit_classic(kind, data, rows["train"], rows["val"], seed)
    name = {"gbdt": "gradient boosting (classic)", "logistic": "logistic regression (classic)"}[kind]
    return _row(name, split, data, rows, model.predict(data, rows["test"]), time.perf_counter() - start,
                "past-only statistics, genres, year (engine.training.classic)")


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def run_split(split: str, data, rows: dict, scorer: BAHEScorer, initial: dict, config: DemoConfig) -> list[DemoRow]:
    """Every model of the table on one split, each from its own seed."""
    scorer.model.load_state_dict(initial)
    train = config.train()
    bahe = BAHECTR(scorer, data)
    out = [_neural(bahe, data, rows, train, split, "text + counts + item id; timeline training, whole histories")]
    bahe.store_item_counts(data, int(data.timestamp[rows["test"]].min()))
    model_config = scorer.config.model
    out.append(_neural(_seeded(config.seed, lambda: SideOnlyCTR(model_config, data)), data, rows, train, split,
                       "the same CTR model without the text vectors (ablation)"))
    out += [_classic("gbdt", data, rows, split, config.seed), _classic("logistic", data, rows, split, config.seed)]
    id_config = replace(model_config, max_behaviors=config.id_only_behaviors)
    out.append(_neural(_seeded(config.seed, lambda: IdOnlyCTR(id_config, data)), data, rows, train, split,
                       f"learned item-id embeddings, mean-pooled ({config.id_only_behaviors} most recent)"))
    return out


def raw_token_rows(data, rows: dict, scorer: BAHEScorer, config: DemoConfig) -> list[DemoRow]:
    """BAHE vs the raw-token LLM on the same small subset (both with `raw_behaviors` per sequence, no side features)."""
    rng = np.random.default_rng(config.seed)
    subset = {name: np.sort(rng.choice(part, min(size, part.size), replace=False))
              for (name, part), size in zip(rows.items(), (config.raw_train_examples, config.raw_test_examples,
                                                           config.raw_test_examples))}
    text_only = replace(scorer.config.model, max_behaviors=config.raw_behaviors).text_only()
    ckpt, lower = scorer.checkpoint, config.num_lower_layers
    raw = _seeded(config.seed, lambda: RawTokenCTR(ckpt, lower, text_only, max_tokens_per_sequence=config.raw_tokens,
                                                   item_max_tokens=config.max_tokens))
    out = [_neural(raw, data, subset, config.train(2), "time (subset)",
                   f"all layers over the concatenated tokens of {config.raw_behaviors} behaviors/sequence")]
    model = _seeded(config.seed, lambda: BAHEModel(UpperEncoder.from_checkpoint(ckpt, lower, causal=True), text_only))
    small = BAHEScorer(config=replace(scorer.config, model=text_only), checkpoint=ckpt, encoder=scorer.encoder,
                       model=model, behaviors=scorer.behaviors, items=scorer.items, device="cpu")
    out.append(_neural(BAHECTR(small, data), data, subset, config.train(2), "time (subset)",
                       f"BAHE text part alone, {config.raw_behaviors} behaviors/sequence, same examples"))
    out[-1].name = "BAHE (text only)"
    return out


def _fmt_table(rows: list[DemoRow]) -> list[str]:
    lines = ["| split | model | train examples | test AUC [95% CI] | test users | log loss | train s/epoch | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.split} | {r.name} | {r.train_examples:,} | {r.auc.value:.4f} [{r.auc.low:.4f}, "
                     f"{r.auc.high:.4f}] | {r.auc.users} | {r.logloss:.4f} | {r.train_seconds:.1f} | {r.note} |")
    return lines


def _paired(rows: list[DemoRow], data, test_rows: dict[str, np.ndarray]) -> list[str]:
    """Paired user-bootstrap intervals of BAHE minus the ablation and minus gradient boosting, per split."""
    lines = []
    for split, test in test_rows.items():
        by_name = {r.name: r for r in rows if r.split == split}
        bahe = by_name["BAHE"]
        for other in ("CTR model without text", "gradient boosting (classic)"):
            diff = paired_auc_difference(data.label[test], bahe.probs, by_name[other].probs, data.user[test])
            verdict = "above 0" if diff.low > 0 else "below 0" if diff.high < 0 else "inside the noise"
            lines.append(f"- {split} split: AUC(BAHE) - AUC({other}) = {diff.value:+.4f} "
                         f"[{diff.low:+.4f}, {diff.high:+.4f}], {diff.users} test users: {verdict}")
    return lines


def _show_users(scorer: BAHEScorer, data, test_rows: np.ndarray, config: DemoConfig) -> list[str]:
    """Top movies for a few real test users, scored with the saved-and-reloaded scorer."""
    rng = np.random.default_rng(1)
    lines = []
    for row in rng.choice(test_rows, config.users_to_show, replace=False):
        user = data.sequence_texts([row], None)[0]
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


def run_demo(config: DemoConfig) -> list[DemoRow]:
    started = time.perf_counter()
    model_desc = EMBEDDED.get(config.model, f"local checkpoint {config.model}")
    print(f"BAHE demo on {config.data} with {model_desc}\nmachine: {machine()}")
    data = load_data(config.data)
    splits = {"time": data.split(), "per-user": per_user_split(data)}
    splits = {name: dict(splits[name].items()) for name in config.splits}
    print(f"data: {data.num_events:,} events, {np.unique(data.user).size} users, {data.item_ids.size} items; "
          f"sequences {list(data.sequence_names)}")
    for name, rows in splits.items():
        print(f"  {name} split: " + ", ".join(f"{part} {r.size:,}" for part, r in rows.items()))
    scorer_config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=config.num_lower_layers,
                                                       max_tokens=config.max_tokens),
                                 model=ModelConfig(sequence_names=data.sequence_names,
                                                   max_behaviors=config.max_behaviors))
    scorer, tables = _seeded(config.seed, lambda: build_scorer(config.model, data, scorer_config,
                                                              config.out / "tables", device="cpu"))
    print(f"ABE: {tables.behavior_events:,} behaviors in the log -> {tables.unique_behaviors:,} unique rows "
          f"({tables.dedup_ratio:.0f}x dedup); tables built in {tables.seconds:.1f} s "
          f"({config.num_lower_layers} of {scorer.checkpoint.num_layers} layers frozen for ABE)")
    initial = {k: v.detach().clone() for k, v in scorer.model.state_dict().items()}
    rows: list[DemoRow] = []
    for name in reversed(list(splits)):  # the time split last: its BAHE model is the one saved
        rows += run_split(name, data, splits[name], scorer, initial, config)
    if config.raw_train_examples and "time" in splits:
        rows += raw_token_rows(data, splits["time"], scorer, config)
    table = _fmt_table(rows)
    paired = _paired(rows, data, {name: r["test"] for name, r in splits.items()})
    print("\n" + "\n".join(table) + "\n\n" + "\n".join(paired))
    scorer.save_pretrained(config.out / "scorer")
    reloaded = BAHEScorer.from_pretrained(config.out / "scorer", device="cpu")
    print(f"\nscorer (time split) saved to {config.out / 'scorer'}; reloaded with BAHEScorer.from_pretrained. "
          "Top movies:")
    test_rows = splits["time" if "time" in splits else next(iter(splits))]["test"]
    print("\n".join(_show_users(reloaded, data, test_rows, config)))
    elapsed = time.perf_counter() - started
    print(f"\ndemo finished in {elapsed / 60:.1f} min")
    if config.results is not None:
        _write_results(config, table, paired, model_desc, tables, elapsed)
    return rows


def _write_results(config: DemoConfig, table: list[str], paired: list[str], model_desc: str, tables,
                   elapsed: float) -> None:
    """This model's demo section of RESULTS.md."""
    write_section(config.results, f"demo:{config.model}:default", [
        f"### Demo: {model_desc}", "",
        f"`bahe demo --model {config.model}` on {datetime.date.today().isoformat()}, {machine()}; "
        f"{elapsed / 60:.1f} min in all, seed {config.seed}.",
        f"Data: {config.data}; all training examples; the whole test set of each split. ABE: "
        f"{tables.behavior_events:,} behaviors -> {tables.unique_behaviors:,} unique rows ({tables.dedup_ratio:.0f}x "
        f"dedup); {config.num_lower_layers} lower layers frozen. AUC intervals: 95% bootstrap over test users "
        f"(1,000 resamples).", "", *table, "", *paired])
