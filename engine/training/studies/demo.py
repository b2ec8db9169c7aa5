"""`bahe demo` / `make demo`: MovieLens-100K, a real pretrained LM, all the training data.

On each split (the global time split and a per-user temporal split) the demo trains and tests:
BAHE's full CTR model (text vectors from the upper layers over whole histories, count features, item id,
DCN-v2 head; timeline training), the same CTR model without its text part (the ablation), gradient
boosting and logistic regression on past-only features, and the id-only model. Every AUC comes with a
95% bootstrap interval over test users, and the differences the README claims with paired intervals.
The raw-token LLM, which costs ~20x BAHE per example on a CPU, is compared on a small subset of the
time split, beside BAHE on the same subset. One table, also written to bench/RESULTS.md."""
from __future__ import annotations

import argparse
import datetime
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.backbone.split import UpperEncoder
from engine.config import EncoderConfig, ModelConfig, ScorerConfig
from engine.model.bahe_model import BAHEModel
from engine.serving.scorer import BAHEScorer
from engine.training.baselines.classic import fit_classic
from engine.training.loops.ctr_models import BAHECTR, IdOnlyCTR, RawTokenCTR, SideOnlyCTR
from engine.training.studies.experiment import TableReport, build_scorer, load_data
from engine.training.data.example_features import log_categorical_features
from engine.training.studies.metrics import Interval, auc_interval, log_loss, paired_auc_difference
from engine.training.studies.results_sections import machine, write_section
from engine.training.data.user_split import per_user_split
from engine.training.loops.train import TrainConfig, fit, predict
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
    num_lower_layers: int = 5             # MiniLM 5 + 1: see bench/RESULTS.md (split study)
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
    categorical: bool = True             # user id + the log's cat_ columns as categorical side features
    users_to_show: int = 3               # "top movies": users ranked against the whole item table
    extra_baselines: bool = True         # logistic regression and id-only too (off: the headline rows alone)
    lr_decay: bool = False               # linear learning-rate decay over the planned steps (TrainConfig)
    id_rows: bool = False                # BAHE's upper layers read ABE rows + learned id rows (ModelConfig.id_rows)
    item_id_dropout: float = 0.0         # BAHE's training targets read as unseen ids (ModelConfig.item_id_dropout)

    @classmethod
    def preset(cls, model: str = "minilm", **overrides) -> DemoConfig:
        values: dict = {"model": model}
        if model == "smollm2":  # 30 layers: split chosen by validation AUC vs training time (RESULTS.md)
            values.update(num_lower_layers=SMOLLM2_LOWER_LAYERS, raw_train_examples=200, raw_test_examples=500,
                          raw_tokens=128)
        values.update(overrides)
        return cls(**values)

    def train(self, epochs: int | None = None) -> TrainConfig:
        return TrainConfig(epochs=epochs or self.epochs, patience=1, batch_size=self.batch_size, seed=self.seed,
                           lr_decay=self.lr_decay)

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser, epochs: int) -> None:
        """The flags the demo's benchmarks share (`from_args` reads them; --out-dir is the scripts' own);
        a None default: the model's preset."""
        p.add_argument("--model", default="minilm", help="'minilm', 'smollm2' or a local checkpoint folder")
        p.add_argument("--data", default="movielens", help="'movielens' or a behavior log file")
        p.add_argument("--lower-layers", type=int, default=None, help="frozen lower layers (None: the "
                       f"model's preset, minilm {DemoConfig.num_lower_layers}, smollm2 {SMOLLM2_LOWER_LAYERS})")
        p.add_argument("--epochs", type=int, default=epochs, help="most epochs per model (early stopping on "
                       "validation AUC, patience 1)")
        p.add_argument("--batch-size", type=int, default=DemoConfig.batch_size, help="training examples per batch")
        p.add_argument("--seed", type=int, default=DemoConfig.seed, help="new weights, data order, subsets")
        p.add_argument("--work-dir", type=Path, default=None,
                       help="folder of the cached tables (None: the demo's, artifacts/demo/<model>)")
        p.add_argument("--threads", type=int, default=None, help="torch and scikit-learn CPU threads "
                       "(None: their choice)")
        p.add_argument("--id-rows", action="store_true", help="BAHE's upper layers read each behavior's ABE row plus "
                       "a learned id row (ModelConfig.id_rows; always with --data ml1m)")
        p.add_argument("--out-dir", type=Path, default=Path("bench/results"), help="folder of the JSON (and plot)")
        p.add_argument("--results-md", default="bench/RESULTS.md", help="markdown file to update ('' to skip)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> DemoConfig:
        """The preset of `args.model` with the flags of `add_arguments` (and `overrides`) applied."""
        values = {"data": args.data, "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                  "out": args.work_dir or Path("artifacts/demo") / Path(args.model).name,
                  "results": Path(args.results_md) if args.results_md else None, "id_rows": args.id_rows}
        if args.lower_layers is not None:
            values["num_lower_layers"] = args.lower_layers
        return cls.preset(args.model, **{**values, **overrides})


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


def demo_row(name: str, split: str, data, rows: dict, probs: np.ndarray, seconds: float, note: str = "") -> DemoRow:
    """The table row of `name`'s test probabilities `probs` on rows['test'] (AUC interval over test users, log loss)."""
    test = rows["test"]
    labels, users = data.label[test], data.user[test]
    row = DemoRow(name, split, rows["train"].size, auc_interval(labels, probs, users), log_loss(labels, probs),
                  seconds, note, probs)
    log.info("%s / %s: test AUC %s", split, name, row.auc)
    return row


def neural_row(model, data, rows: dict, config: TrainConfig, split: str, note: str = "") -> DemoRow:
    """`model` trained on rows['train'] (early stopping on rows['val']), its row from rows['test']."""
    result = fit(model, data, rows["train"], rows["val"], config)
    probs = predict(model, data, rows["test"], batch_size=512)
    return demo_row(model.name, split, data, rows, probs, float(np.mean(result.epoch_seconds)), note)


def _classic(kind: str, data, rows: dict, split: str, seed: int) -> DemoRow:
    start = time.perf_counter()
    model = fit_classic(kind, data, rows["train"], rows["val"], seed)
    name = {"gbdt": "gradient boosting (classic)", "logistic": "logistic regression (classic)"}[kind]
    return demo_row(name, split, data, rows, model.predict(data, rows["test"]), time.perf_counter() - start,
                "past-only statistics, genres, year (engine.training.baselines.classic)")


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def run_split(split: str, data, rows: dict, scorer: BAHEScorer, initial: dict, config: DemoConfig) -> list[DemoRow]:
    """Every model of the table on one split, each from its own seed (`config.seed`): BAHE, the ablation
    and gradient boosting, then logistic regression and id-only when `config.extra_baselines`."""
    scorer.model.load_state_dict(initial)
    train = config.train()
    bahe = BAHECTR(scorer, data)
    out = [neural_row(bahe, data, rows, train, split, "text + counts + similarity counts + item id + categorical; timeline training, whole histories")]
    bahe.store_item_counts(data, int(data.timestamp[rows["test"]].min()))
    model_config = scorer.config.model
    ablation = _seeded(config.seed, lambda: SideOnlyCTR(model_config, data))
    out.append(neural_row(ablation, data, rows, train, split, "the same CTR model without the LLM part: no text vectors, no similarity counts (ablation)"))
    out.append(_classic("gbdt", data, rows, split, config.seed))
    if not config.extra_baselines:
        return out
    out.append(_classic("logistic", data, rows, split, config.seed))
    id_config = replace(model_config, max_behaviors=config.id_only_behaviors, window_step=1)  # exactly its last M
    out.append(neural_row(_seeded(config.seed, lambda: IdOnlyCTR(id_config, data)), data, rows, train, split,
                          f"learned item-id embeddings, mean-pooled ({config.id_only_behaviors} most recent)"))
    return out


def demo_splits(data, names: tuple[str, ...] = ("time", "per-user")) -> dict[str, dict[str, np.ndarray]]:
    """split name -> {'train', 'val', 'test'} example rows: 'time' the global time split, 'per-user' each
    user's own temporal split."""
    builders = {"time": data.split, "per-user": lambda: per_user_split(data)}
    unknown = [name for name in names if name not in builders]
    if unknown:
        raise ValueError(f"splits must be among {list(builders)}, got {unknown}")
    return {name: dict(builders[name]().items()) for name in names}


def demo_scorer(config: DemoConfig, data) -> tuple[BAHEScorer, TableReport]:
    """The demo's untrained scorer (full model, `config.max_behaviors`), its weights drawn from `config.seed`;
    tables built in `config.out / 'tables'`, or opened there when a run has built them."""
    scorer_config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=config.num_lower_layers,
                                                       max_tokens=config.max_tokens),
                                 model=ModelConfig(sequence_names=data.sequence_names,
                                                   max_behaviors=config.max_behaviors, id_rows=config.id_rows,
                                                   item_id_dropout=config.item_id_dropout,
                                                   categorical_features=log_categorical_features(
                                                       "all" if config.categorical else "none", data)))
    return _seeded(config.seed, lambda: build_scorer(config.model, data, scorer_config, config.out / "tables",
                                                     device="cpu"))


def initial_weights(scorer: BAHEScorer) -> dict:
    """A copy of the scorer model's untrained weights, for `run_split` to start every split from."""
    return {k: v.detach().clone() for k, v in scorer.model.state_dict().items()}


def model_variant(scorer: BAHEScorer, model_config: ModelConfig, seed: int) -> BAHEScorer:
    """A fresh scorer for `model_config` (e.g. another M, or the text part alone) on `scorer`'s checkpoint,
    lower layers and tables: upper layers from the checkpoint, new head, weights drawn from `seed`."""
    ckpt, lower = scorer.checkpoint, scorer.config.encoder.num_lower_layers
    causal = model_config.attention == "causal"
    model = _seeded(seed, lambda: BAHEModel(UpperEncoder.from_checkpoint(ckpt, lower, causal=causal), model_config,
                                            num_items=len(scorer.items), num_behaviors=len(scorer.behaviors)))
    return BAHEScorer(config=replace(scorer.config, model=model_config), checkpoint=ckpt, encoder=scorer.encoder,
                      model=model, behaviors=scorer.behaviors, items=scorer.items, device="cpu")


def raw_subset(rows: dict, config: DemoConfig) -> dict:
    """The raw-token comparison's examples: `raw_train_examples` of the training rows and `raw_test_examples`
    of the validation and of the test rows, drawn with `config.seed` (sorted)."""
    rng = np.random.default_rng(config.seed)
    sizes = {"train": config.raw_train_examples, "val": config.raw_test_examples, "test": config.raw_test_examples}
    return {name: np.sort(rng.choice(part, min(sizes[name], part.size), replace=False)) for name, part in rows.items()}


def raw_token_model(scorer: BAHEScorer, behaviors: int, config: DemoConfig, max_tokens: int) -> RawTokenCTR:
    """The raw-token LLM on `scorer`'s checkpoint with the text part of its model config, `behaviors` per
    sequence, each sequence cut to `max_tokens` (at most the model's positions), weights from `config.seed`."""
    text_only = replace(scorer.config.model, max_behaviors=behaviors).text_only()
    ckpt, lower = scorer.checkpoint, scorer.config.encoder.num_lower_layers
    return _seeded(config.seed, lambda: RawTokenCTR(ckpt, lower, text_only, max_tokens_per_sequence=max_tokens,
                                                    item_max_tokens=config.max_tokens))


def longest_sequence_tokens(raw: RawTokenCTR, data, rows: np.ndarray, chunk: int = 256) -> int:
    """The token count of the longest concatenated sequence `raw` would see over the examples at `rows`,
    counted up to `raw.max_tokens + 1` (more than `raw.max_tokens`: the sequence does not fit its positions)."""
    n, longest = len(raw.config.sequence_names), 0
    for start in range(0, rows.size, chunk):
        part = rows[start:start + chunk]
        batch = raw.pack(data.sequence_texts(part, raw.config.max_behaviors, raw.config.history_step), data.target_texts(part),
                         max_tokens=raw.max_tokens + 1)
        lengths = np.diff(batch.offsets[:part.size * n + 1].numpy())
        longest = max(longest, int(lengths.max(initial=0)))
    return longest


def raw_vs_text_part(data, subset: dict, scorer: BAHEScorer, raw: RawTokenCTR, config: DemoConfig, epochs: int,
                     split: str) -> list[DemoRow]:
    """The raw-token LLM `raw` and BAHE's text part (the same model config: M, no side features) trained and
    tested on the same examples `subset`, each from `config.seed`."""
    m = raw.config.max_behaviors
    out = [neural_row(raw, data, subset, config.train(epochs), split,
                       f"all layers over the concatenated tokens of (at most) {m} behaviors/sequence, "
                       "the window BAHE reads")]
    text_part = BAHECTR(model_variant(scorer, raw.config, config.seed), data)
    out.append(neural_row(text_part, data, subset, config.train(epochs), split,
                          f"BAHE text part alone, (at most) {m} behaviors/sequence, same examples"))
    out[-1].name = "BAHE (text only)"
    return out


def raw_token_rows(data, rows: dict, scorer: BAHEScorer, config: DemoConfig) -> list[DemoRow]:
    """BAHE vs the raw-token LLM on the same small subset (both with `raw_behaviors` per sequence, no side features)."""
    raw = raw_token_model(scorer, config.raw_behaviors, config, config.raw_tokens)
    return raw_vs_text_part(data, raw_subset(rows, config), scorer, raw, config, 2, "time (subset)")


def _fmt_table(rows: list[DemoRow]) -> list[str]:
    lines = ["| split | model | train examples | test AUC [95% CI] | test users | log loss | train s/epoch | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.split} | {r.name} | {r.train_examples:,} | {r.auc.value:.4f} [{r.auc.low:.4f}, "
                     f"{r.auc.high:.4f}] | {r.auc.users} | {r.logloss:.4f} | {r.train_seconds:.1f} | {r.note} |")
    return lines


PAIRED_BASELINES = ("CTR model without text", "gradient boosting (classic)")


def paired_differences(rows: list[DemoRow], data, test_rows: dict[str, np.ndarray]) -> list[tuple[str, str, Interval]]:
    """(split, other, AUC(BAHE) - AUC(other) with its paired user-bootstrap interval) for the ablation and
    gradient boosting, per split of `test_rows`."""
    out = []
    for split, test in test_rows.items():
        by_name = {r.name: r for r in rows if r.split == split}
        for other in PAIRED_BASELINES:
            out.append((split, other, paired_auc_difference(data.label[test], by_name["BAHE"].probs,
                                                            by_name[other].probs, data.user[test])))
    return out


def verdict(diff: Interval) -> str:
    return "above 0" if diff.low > 0 else "below 0" if diff.high < 0 else "inside the noise"


def _paired(rows: list[DemoRow], data, test_rows: dict[str, np.ndarray]) -> list[str]:
    """Paired user-bootstrap intervals of BAHE minus the ablation and minus gradient boosting, per split."""
    return [f"- {split} split: AUC(BAHE) - AUC({other}) = {diff.value:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}], "
            f"{diff.users} test users: {verdict(diff)}"
            for split, other, diff in paired_differences(rows, data, test_rows)]


def _show_users(scorer: BAHEScorer, data, test_rows: np.ndarray, config: DemoConfig) -> list[str]:
    """Top movies for a few real test users: each user ranked against the whole item table (`BAHEScorer.rank`,
    the user's sequences through the upper layers once, the stored item vectors), the 5 best it has not rated."""
    rng = np.random.default_rng(1)
    ids = data.item_ids
    texts = [data.item_texts[int(i)] for i in ids]
    lines = []
    for row in rng.choice(test_rows, config.users_to_show, replace=False):
        user = data.sequence_texts([row], None)[0]
        seen = set(data.item[(data.user == data.user[row])].tolist())
        ranked = scorer.rank(user, texts)
        top = [int(i) for i in ranked.order if int(ids[i]) not in seen][:5]
        liked = user.get("liked", [])[-3:]
        lines.append(f"user {data.user[row]} (recently liked: {'; '.join(liked) or '-'}), ranked against all "
                     f"{len(texts):,} movies")
        lines += [f"    {ranked.scores[i]:.3f}  {texts[i]}" for i in top]
    return lines


def run_demo(config: DemoConfig) -> list[DemoRow]:
    started = time.perf_counter()
    model_desc = EMBEDDED.get(config.model, f"local checkpoint {config.model}")
    print(f"BAHE demo on {config.data} with {model_desc}\nmachine: {machine()}")
    data = load_data(config.data)
    splits = demo_splits(data, config.splits)
    print(f"data: {data.num_events:,} events, {np.unique(data.user).size} users, {data.item_ids.size} items; "
          f"sequences {list(data.sequence_names)}")
    for name, rows in splits.items():
        print(f"  {name} split: " + ", ".join(f"{part} {r.size:,}" for part, r in rows.items()))
    scorer, tables = demo_scorer(config, data)
    print(f"ABE: {tables.behavior_events:,} behaviors in the log -> {tables.unique_behaviors:,} unique rows "
          f"({tables.dedup_ratio:.0f}x dedup); tables built in {tables.seconds:.1f} s "
          f"({config.num_lower_layers} of {scorer.checkpoint.num_layers} layers frozen for ABE)")
    initial = initial_weights(scorer)
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
