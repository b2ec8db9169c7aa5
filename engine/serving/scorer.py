"""`BAHEScorer`: the public scoring API over a saved scorer folder. The folder format lives in
engine.serving.scorer_folder, input parsing and error location in engine.serving.inputs; their errors (`ScorerFormatError`,
`InputError`) are importable from here too."""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.encoding.abe import AtomicEncoder, ReusingEncoder
from engine.config import ScorerConfig, ScoringConfig
from engine.serving.inputs import (InputError, locate_bad_text, lookup_texts, parse_history_counts, parse_items, parse_users,
                           parse_side_features, read_windows, text_list)
from engine.features.categorical import category_buckets, category_rows
from engine.serving.incremental import UserState, build_state, extend_state, rank_state
from engine.serving.item_vectors import ItemVectors
from engine.serving.ranking import Ranking, check_top_k, distinct_users, parse_candidates, ranking
from engine.serving.placement import stored_rows
from engine.serving.towers import dense_features, item_states, pair_logits, pair_similar, per_user_logits, user_states
from engine.serving.user_cache import CacheStats, UserStateCache
from engine.model.bahe_model import BAHEModel, PackedBatch
from engine.serving.scorer_setup import build_encoder, kernel_path, open_or_build_table, resolve_device, trained_items
from engine.serving.scorer_folder import (BEHAVIORS_FILE, ITEMS_FILE, ScorerFormatError, open_folder, scorer_json_stamp,
                                  write_folder)
from engine.features.side_features import recent_counts
from engine.model.stages import stage
from kernels import ops
from weights.checkpoint import Checkpoint
from weights.registry import resolve_model
from engine.backbone.split import UpperEncoder
from weights.table import (EMBEDDING_DTYPES, MISSING, BehaviorTable, NonFiniteRowError, TableError, UnknownTextError,
                           first_nonfinite_row)
from weights.text_key import normalize_text

log = logging.getLogger(__name__)

LOAD_TRIES = 3
PROB_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps]: always strictly inside (0, 1)


class BAHEScorer:
    """Scores (user, item) pairs: p = sigmoid(head(BA(user's sequences), item)).

    A user is a dict mapping sequence names (config.model.sequence_names) to behavior texts, oldest
    first; the upper layers read each sequence from its window start (at most `max_behaviors`, the most
    recent: engine.features.history_window), counts read the whole. Behavior and item texts not in the tables are encoded on the fly with the frozen
    lower layers (or refused, per ScoringConfig). Safe to call from several threads."""

    def __init__(self, *, config: ScorerConfig, checkpoint: Checkpoint, encoder: AtomicEncoder, model: BAHEModel,
                 behaviors: BehaviorTable, items: BehaviorTable, device: str | torch.device = "auto",
                 kernels: str = "auto") -> None:
        self.config = config
        self.checkpoint, self.encoder, self.behaviors, self.items = checkpoint, encoder, behaviors, items
        self.device = resolve_device(device)
        if kernels not in ops.BACKENDS:
            raise ValueError(f"kernels must be one of {ops.BACKENDS}, got {kernels!r}")
        self.kernels = kernels
        self.model = model.to(self.device).eval()
        self.encoder.lower.to(self.device)
        self.encoder.device = self.device
        self._tables_lock = threading.Lock()
        self._placed: dict[str, tuple[int, torch.Tensor]] = {}
        self._item_vectors = ItemVectors()
        self._user_cache = UserStateCache(config.scoring.user_cache_bytes)

    # ----- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "auto", kernels: str = "auto",
                        dtype: str = "float32", scoring: ScoringConfig | None = None) -> BAHEScorer:
        """Open a folder written by `save_pretrained` (tables memory-mapped, not read). A save into the
        folder while it is read (its scorer.json replaced meanwhile) makes the load start again, so the
        parts always come from one save; after LOAD_TRIES such races, the last error is raised."""
        path = Path(path)
        for attempt in range(1, LOAD_TRIES + 1):
            stamp = scorer_json_stamp(path)
            try:
                scorer = cls._load(path, device, kernels, dtype, scoring)
            except (OSError, ValueError):  # a part removed or replaced by the save: ScorerFormatError, TableError...
                if attempt == LOAD_TRIES or scorer_json_stamp(path) == stamp:
                    raise
                continue
            if scorer_json_stamp(path) == stamp:
                return scorer
            log.info("%s was saved over while loading; loading it again", path)
        raise ScorerFormatError(f"{path} was saved over {LOAD_TRIES} times while loading; try again")

    @classmethod
    def _load(cls, path: Path, device: str | torch.device, kernels: str, dtype: str,
              scoring: ScoringConfig | None) -> BAHEScorer:
        config, files = open_folder(path)
        if scoring is not None:
            config.scoring = scoring
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}")
        ckpt = Checkpoint(files["backbone"])
        lower_layers = config.encoder.num_lower_layers
        if lower_layers > ckpt.num_layers:
            raise ScorerFormatError(f"{path}: encoder.num_lower_layers {lower_layers} is more than the "
                                    f"{ckpt.num_layers} layers of its backbone")
        encoder = build_encoder(ckpt, config, "cpu", progress=True)
        model_path = files["model"]
        try:
            state = load_file(str(model_path))
            num_upper = ckpt.num_layers - lower_layers

            def build() -> BAHEModel:
                upper = UpperEncoder(ckpt.config, lower_layers, UpperEncoder.has_bias_from_state(
                    list(state), "upper.layers.", num_upper), causal=config.model.attention == "causal")
                return BAHEModel(upper, config.model, num_items=trained_items(state))
            with torch.device("meta"):  # shapes checked against the weights before any memory is taken:
                build().load_state_dict(state, assign=True)  # an absurd config is refused without allocating for it
            model = build()
            model.load_state_dict(state)
        except (SafetensorError, RuntimeError, ValueError, IndexError, KeyError) as err:
            raise ScorerFormatError(f"{model_path}: not the weights of this scorer's model ({err})") from None
        model.to(EMBEDDING_DTYPES[dtype])
        behaviors = BehaviorTable.open(files["behaviors"], encoder)
        items = BehaviorTable.open(files["items"], encoder)
        scorer = cls(config=config, checkpoint=ckpt, encoder=encoder, model=model, behaviors=behaviors, items=items,
                     device=device, kernels=kernels)
        if "item_vectors" not in files or not scorer._item_vectors.load(files["item_vectors"], scorer.model, items):
            with scorer._tables_lock:  # an older folder, or a stale file: computed now, never read stale
                scorer._tables()
        return scorer

    @classmethod
    def create(cls, model: str | Path, *, behavior_texts: Sequence[str], item_texts: Sequence[str],
               tables_dir: str | Path, config: ScorerConfig | None = None, device: str | torch.device = "auto",
               kernels: str = "auto", progress: bool = True) -> BAHEScorer:
        """A fresh (untrained) scorer on a base model ('minilm', 'smollm2' or a local folder): builds the
        behavior and item tables in `tables_dir` with ABE, or opens them there and appends only the
        texts they lack, and takes the upper layers from the checkpoint."""
        config = config or ScorerConfig()
        behavior_texts, item_texts = text_list(behavior_texts, "behavior_texts"), text_list(item_texts, "item_texts")
        ckpt = Checkpoint(resolve_model(model))
        lower_layers = config.encoder.num_lower_layers
        encoder = build_encoder(ckpt, config, resolve_device(device), progress)
        tables_dir = Path(tables_dir)
        dtype = config.encoder.table_dtype
        behaviors = open_or_build_table(tables_dir / BEHAVIORS_FILE, behavior_texts, encoder, dtype, "behavior")
        items = open_or_build_table(tables_dir / ITEMS_FILE, item_texts, ReusingEncoder(encoder, behaviors), dtype,
                                    "item")
        upper = UpperEncoder.from_checkpoint(ckpt, lower_layers, causal=config.model.attention == "causal")
        bahe = BAHEModel(upper, config.model, num_items=len(items))
        return cls(config=config, checkpoint=ckpt, encoder=encoder, model=bahe, behaviors=behaviors, items=items,
                   device=device, kernels=kernels)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the scorer folder crash-safely: a crash at any moment leaves the old or the new scorer,
        never a mix (engine.serving.scorer_folder). What the folder keeps is decided from its files at commit
        time: saving an out-of-date scorer over a folder writes this scorer whole."""
        with self._tables_lock:
            items = self.table_rows("items")
            write_folder(Path(path), config=self.config, checkpoint=self.checkpoint, encoder=self.encoder,
                         model=self.model, behaviors=self.behaviors, items=self.items,
                         item_vectors=lambda target: self._item_vectors.save(target, self.model, self.items, items))

    # ----- scoring ------------------------------------------------------------------------
    def score(self, users: Sequence[dict[str, Sequence[str]]], items: Sequence[str], *,
              history_counts: Sequence[dict[str, int] | None] | None = None,
              side_features: Sequence[dict | None] | None = None) -> np.ndarray:
        """(B,) float32 click probabilities in (0, 1) of users[i] clicking items[i]. The count features see
        each sequence's length as passed, or history_counts[i][name] (the user's total, for callers that pass
        only the most recent behaviors). side_features[i]: the pair's categorical features, name -> value
        (`ModelConfig.categorical_features`; left out: unknown). A user repeated in the batch (the same texts in
        every sequence) runs the upper layers once (`ScoringConfig.dedupe_users`); known items take their stored
        item vectors."""
        sequences = parse_users(users, self.config)
        item_texts = parse_items(items, len(sequences))
        user_counts = parse_history_counts(history_counts, users, self.config.model.sequence_names)
        categories = self._categories(side_features, len(sequences), "pair")
        if not sequences:
            return np.empty(0, dtype=np.float32)
        if self.config.scoring.dedupe_users:
            first, pair_user = distinct_users(sequences)
        else:
            first, pair_user = list(range(len(sequences))), np.arange(len(sequences))
        return self._score_pairs([sequences[u] for u in first], first, user_counts, pair_user, item_texts,
                                 categories=categories)

    def rank(self, user: dict[str, Sequence[str]] | UserState, candidates: Sequence[str], *,
             top_k: int | None = None, history_counts: dict[str, int] | None = None,
             side_features: dict | None = None) -> Ranking:
        """One user against K candidate item texts: its sequences run through the upper layers once, the head
        over the K candidates in one batch. -> Ranking(scores (K,) float32 in candidate order, order (top_k or
        K,) best first). Inputs are checked as `score`'s (InputError naming `candidates[i]`). `user` may be a
        `UserState` (`user_state`, `extend_user`): no upper layer runs, the same scores as its whole user's."""
        if isinstance(user, UserState):
            if history_counts is not None:
                raise InputError("a UserState carries its counts: pass history_counts to user_state, not rank")
            return rank_state(self, user, candidates, top_k, side_features)
        counts = None if history_counts is None else [history_counts]
        side = None if side_features is None else [side_features]
        return self._rank_many([user], [candidates], top_k, counts, side, label=lambda i: f"candidates[{i}]")[0]

    def rank_many(self, users: Sequence[dict[str, Sequence[str]]], candidates: Sequence[Sequence[str]], *,
                  top_k: int | None = None,
                  history_counts: Sequence[dict[str, int] | None] | None = None,
                  side_features: Sequence[dict | None] | None = None) -> list[Ranking]:
        """`rank` for many users, each with its own candidate list (candidates[u]) and side features, in one
        pass: every user's sequences through the upper layers once, each user's candidates through the head."""
        return self._rank_many(users, candidates, top_k, history_counts, side_features)

    def _rank_many(self, users, candidates, top_k, history_counts, side_features, label=None) -> list[Ranking]:
        check_top_k(top_k)
        sequences = parse_users(users, self.config)
        lists = parse_candidates(candidates, len(sequences))
        user_counts = parse_history_counts(history_counts, users, self.config.model.sequence_names)
        categories = self._categories(side_features, len(sequences), "user")
        sizes = np.array([len(c) for c in lists], dtype=np.int64)
        pair_user = np.repeat(np.arange(len(lists)), sizes)
        flat = [text for c in lists for text in c]
        starts = np.cumsum(sizes) - sizes
        if label is None:  # candidates[u][j] of flat index i
            label = lambda i: f"candidates[{pair_user[i]}][{i - starts[pair_user[i]]}]"  # noqa: E731
        probs = (self._score_pairs(sequences, range(len(sequences)), user_counts[pair_user], pair_user, flat,
                                   label=label, per_user=True, categories=None if categories is None else
                                   categories[pair_user]) if flat else np.empty(0, dtype=np.float32))
        return [ranking(probs[lo:lo + k], top_k) for lo, k in zip(starts, sizes)]

    def user_state(self, user: dict[str, Sequence[str]], *, history_counts: dict[str, int] | None = None) -> UserState:
        """A user's upper-layer keys/values kept (engine.serving.incremental), for `extend_user` and `rank`. Costs one
        `rank` of the user's upper layers; needs causal upper layers (ValueError otherwise)."""
        return build_state(self, user, history_counts)

    def extend_user(self, state: UserState, behaviors: dict[str, Sequence[str]]) -> UserState:
        """`state` with new behaviors appended (sequence name -> texts, oldest first): O(k M) for k new behaviors
        while a window start stands, the sequence's window rebuilt when it moves. A new state; `state` stays valid."""
        return extend_state(self, state, behaviors)

    def score_ids(self, behavior_rows: torch.Tensor, offsets: torch.Tensor, item_rows: torch.Tensor) -> np.ndarray:
        """Id-level API: behavior_rows (T,) int64 table rows; offsets (U*n+1,) int64 cumulative, user-major
        (sequence s of user u is [offsets[u*n+s], offsets[u*n+s+1]), in config.model.sequence_names order,
        each at most max_behaviors long); item_rows (U,) int64. -> (U,) float32 probabilities."""
        n = len(self.config.model.sequence_names)
        batch = PackedBatch(behavior_rows, offsets, item_rows)
        batch.validate(n, len(self.behaviors), len(self.items))  # the one check of the values, on the host
        longest = batch.max_len
        if longest > self.config.model.max_behaviors:
            raise ValueError(f"a sequence holds {longest} behaviors, more than max_behaviors "
                             f"{self.config.model.max_behaviors}; pass its window (ModelConfig.window_start)")
        offsets_np, rows_np, items_np = offsets.cpu().numpy(), behavior_rows.cpu().numpy(), item_rows.cpu().numpy()
        sequences = [[rows_np[offsets_np[u * n + s]:offsets_np[u * n + s + 1]].tolist() for s in range(n)]
                     for u in range(items_np.size)]
        with self._tables_lock:
            tables = self._tables()
        config = self.config.model
        recent = (recent_counts(sequences, config.recent_events, n) if config.count_features and config.recent_events
                  else None)
        return self._score_rows(tables, rows_np, offsets_np, None, items_np, None, recent,
                                np.diff(offsets_np).reshape(-1, n), np.arange(items_np.size))

    def cache_stats(self) -> CacheStats:
        """Hits, misses, entries and bytes of the pooled-user-vector LRU (ScoringConfig.user_cache_bytes)."""
        return self._user_cache.stats()

    def _score_pairs(self, sequences: list[list[list[str]]], originals: Sequence[int], user_counts: np.ndarray,
                     pair_user: np.ndarray, item_texts: list[str], label=None, per_user: bool = False,
                     categories: np.ndarray | None = None) -> np.ndarray:
        """(P,) probabilities of pairs (sequences[pair_user[p]], item_texts[p]); user_counts (P, n) and
        categorical feature rows (P, F) per pair; originals[u]: the caller's index of distinct user u (for errors)."""
        n, config, whole = len(self.config.model.sequence_names), self.config.model, sequences
        sequences = read_windows(whole, self.config, originals)
        flat = [text for user in sequences for seq in user for text in seq]
        lengths = np.fromiter((len(seq) for user in sequences for seq in user), dtype=np.int64,
                              count=len(sequences) * n)
        scoring = self.config.scoring
        with self._tables_lock, stage("lookup"), kernel_path(self.kernels):  # unknown texts: ABE on the fly
            behavior_rows, behavior_extra = self._rows(self.behaviors, flat, scoring.unknown_behavior, "behavior",
                                                       lengths, users=originals)
            item_rows, item_extra = self._rows(self.items, item_texts, scoring.unknown_item, "item", label=label)
            tables = self._tables()
        recent = (recent_counts(whole, config.recent_events, n)  # of whole histories, as in training
                  if config.count_features and config.recent_events else None)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return self._score_rows(tables, behavior_rows, offsets, behavior_extra, item_rows, item_extra, recent,
                                user_counts, pair_user, per_user, categories)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(behavior rows, item rows, item vectors) for the tables as they are now; call under the tables lock."""
        with kernel_path(self.kernels):
            items = self.table_rows("items")
            return self.table_rows("behaviors"), items, self._item_vectors.get(self.model, self.items, items)

    def _score_rows(self, tables: tuple[torch.Tensor, ...], behavior_rows: np.ndarray, offsets: np.ndarray,
                    behavior_extra: torch.Tensor | None, item_rows: np.ndarray, item_extra: torch.Tensor | None,
                    recent: np.ndarray | None, user_counts: np.ndarray, pair_user: np.ndarray,
                    per_user: bool = False, categories: np.ndarray | None = None,
                    user: torch.Tensor | None = None) -> np.ndarray:
        """Users (packed rows, U*n+1 offsets) through the user tower once each (or their pooled states `user`
        (U, n, d) given: a UserState's), pairs' items from the stored vectors (on the fly for rows past them),
        then the head: over the P pairs, or (per_user: each user's pairs contiguous, as rank_many lays them out)
        over each user's candidates with the user folded into the head's first layer (towers.per_user_logits)."""
        behavior_table, item_table, vectors = tables
        config, pairs = self.config.model, item_rows.shape[0]
        out = np.empty(pairs, dtype=np.float32)
        dense = dense_features(self.model, user_counts, None if recent is None else recent[pair_user], item_rows)
        with torch.inference_mode(), kernel_path(self.kernels):
            if user is None:
                user = user_states(self.model, behavior_table, behavior_rows, offsets, behavior_extra,
                                   self._user_cache, self.config.scoring.batch_size)
            item = item_states(self.model, vectors, item_rows, item_extra)
            with stage("head"):
                similar = pair_similar(self.model, behavior_table, behavior_rows, offsets, behavior_extra, item_table,
                                       item_rows, item_extra, pair_user)
                logits = (per_user_logits if per_user else pair_logits)(self.model, user, item, pair_user, item_rows,
                                                                        dense, similar, categories)
            out[:] = torch.sigmoid(logits).float().cpu().numpy()
        if not np.isfinite(out).all():
            raise FloatingPointError("the model produced a non-finite score; the scorer's weights may be corrupt")
        return np.clip(out, PROB_EPS, 1 - PROB_EPS)

    # ----- helpers --------------------------------------------------------------------------
    def _categories(self, side_features: object, count: int, unit: str) -> np.ndarray | None:
        """(count, F) embedding rows of the categorical features (engine.features.categorical), None without any."""
        names, config = self.config.model.categorical_features, self.config.model
        columns = parse_side_features(side_features, count, names, unit)
        if not names:
            return None
        buckets = category_buckets(names, columns, config.categorical_buckets)
        return category_rows(buckets, self.model.side.category_seen.cpu().numpy())

    def table_rows(self, which: str) -> torch.Tensor:
        """(N, d) rows of the 'behaviors' or 'items' table where the model runs: on CUDA placed once
        per table size (on the device, or pinned host memory when it does not fit); mmapped on CPU."""
        table = self.behaviors if which == "behaviors" else self.items
        cached = self._placed.get(which)
        if cached is not None and cached[0] == len(table):
            return cached[1]
        rows = stored_rows(table)  # an int8 table: QuantizedRows, gathered through the dequantizing ops
        if self.device.type == "cuda":
            from engine.serving.placement import place_table
            rows, placement = place_table(rows, self.device)
            log.info("%s table (%d x %d) placed: %s", which, len(table), table.dim, placement)
        self._placed[which] = (len(table), rows)
        return rows

    def _rows(self, table: BehaviorTable, texts: list[str], policy: str, what: str, lengths: np.ndarray | None = None,
              users: Sequence[int] | None = None, label=None) -> tuple[np.ndarray, torch.Tensor | None]:
        """Table rows of texts; unknown texts encoded on the fly (ids >= N, returned as extra rows),
        appended to the table, or refused, per policy. Locates malformed texts for the error; table
        errors (corrupt file, hash collision) pass through as they are."""
        names = self.config.model.sequence_names
        rows = lookup_texts(table, texts, what, lengths, names, users, label)
        missing = np.nonzero(rows == MISSING)[0]
        if not missing.size:
            return rows, None
        normalized = [normalize_text(texts[i]) for i in missing]
        unknown = list(dict.fromkeys(normalized))
        if policy == "error":
            raise UnknownTextError(f"{len(unknown)} {what} text(s) not in {table.path}, e.g. {unknown[0]!r} "
                                   f"(unknown_{what}='error')")
        try:
            if self.config.scoring.append_unknown:
                table.append(unknown)  # rows only ever get appended: the known texts' rows stand
                rows[missing] = table.lookup(normalized, on_missing="raise")
                return rows, None
            extra = self.encoder.encode(unknown)
        except TableError:
            raise
        except ValueError:  # a text the tokenizer turns into no tokens at all
            located = locate_bad_text(texts, self._check_encodable, lengths, names, users, label)
            if located is None:
                raise
            raise InputError(located) from None
        bad = first_nonfinite_row(extra)
        if bad is not None:
            raise NonFiniteRowError(f"encoding {what} text {unknown[bad]!r} gave NaN or Inf")
        slot = {t: len(table) + i for i, t in enumerate(unknown)}
        rows[missing] = [slot[t] for t in normalized]
        return rows, extra.to(self.device)

    def _check_encodable(self, text: str) -> None:
        self.encoder.tokenize([normalize_text(text)])
