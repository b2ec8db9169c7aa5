"""`BAHEScorer`: the public scoring API over a saved scorer folder. The folder format lives in
engine.serving.scorer_folder, input parsing and error location in engine.serving.inputs; their errors (`ScorerFormatError`,
`InputError`) are importable from here too."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.encoding.abe import AtomicEncoder, ReusingEncoder
from engine.config import CalibrationConfig, ScorerConfig, ScoringConfig
from engine.serving.inputs import InputError, parse_history_counts, parse_items, parse_users, read_windows, text_list
from engine.serving.incremental import UserState, build_state, extend_state, rank_state
from engine.serving.pipeline import ScoringBatch, ScoringPipeline
from engine.serving.ranking import (Ranking, check_top_k, distinct_users, parse_candidate_features,
                                    parse_candidates, ranking)
from engine.serving.user_cache import CacheStats
from engine.model.bahe_model import BAHEModel, PackedBatch
from engine.serving.scorer_setup import (build_encoder, kernel_path, open_or_build_table, resolve_device,
                                        trained_behaviors, trained_items)
from engine.serving.scorer_folder import (BEHAVIORS_FILE, ITEMS_FILE, ScorerFormatError, open_folder, scorer_json_stamp,
                                  write_folder)
from engine.features.side_features import recent_counts
from engine.model.stages import stage
from kernels import ops
from weights.checkpoint import Checkpoint
from weights.id_vocabulary import FILE_NAME as ID_FILE
from weights.id_vocabulary import MAX_FILE_BYTES as ID_MAX_BYTES
from weights.registry import resolve_model
from engine.backbone.split import UpperEncoder, has_layer
from weights.table import EMBEDDING_DTYPES, BehaviorTable

log = logging.getLogger(__name__)

LOAD_TRIES = 3


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
        if kernels not in ops.BACKENDS:
            raise ValueError(f"kernels must be one of {ops.BACKENDS}, got {kernels!r}")
        self.pipeline = ScoringPipeline(config=config, encoder=encoder, model=model, behaviors=behaviors, items=items,
                                        device=resolve_device(device), kernels=kernels)
        self.ids: tuple[Path, bytes] | None = None  # (folder, its ids.json bytes) when opened from a folder with one

    @property
    def model(self) -> BAHEModel:
        """The online model (on `device`), the pipeline's."""
        return self.pipeline.model

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def kernels(self) -> str:
        """The kernel path of the scorer's calls: 'auto', 'torch' or 'triton' (`ops.BACKENDS`)."""
        return self.pipeline.kernels

    @kernels.setter
    def kernels(self, kernels: str) -> None:
        if kernels not in ops.BACKENDS:
            raise ValueError(f"kernels must be one of {ops.BACKENDS}, got {kernels!r}")
        self.pipeline.kernels = kernels

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
        if lower_layers and not has_layer(ckpt, lower_layers - 1):  # scorer.json names another split
            raise ScorerFormatError(f"{path}: encoder.num_lower_layers {lower_layers} does not fit the backbone "
                                    f"saved with the scorer (its layer {lower_layers - 1} is missing)")
        encoder = build_encoder(ckpt, config, "cpu", progress=True)
        model_path = files["model"]
        try:
            state = load_file(str(model_path))
            num_upper = ckpt.num_layers - lower_layers

            def build() -> BAHEModel:
                upper = UpperEncoder(ckpt.config, lower_layers, UpperEncoder.has_bias_from_state(
                    list(state), "upper.layers.", num_upper), causal=config.model.attention == "causal")
                return BAHEModel(upper, config.model, num_items=trained_items(state),
                                 num_behaviors=trained_behaviors(state))
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
        scorer.pipeline.load_item_vectors(files.get("item_vectors"))
        try:  # the id vocabulary as it is now, carried by save_pretrained to another folder (bounded: 1 GiB)
            with open(path / ID_FILE, "rb") as handle:
                scorer.ids = (path, handle.read(ID_MAX_BYTES + 1))
        except FileNotFoundError:
            pass
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
        bahe = BAHEModel(upper, config.model, num_items=len(items), num_behaviors=len(behaviors))
        return cls(config=config, checkpoint=ckpt, encoder=encoder, model=bahe, behaviors=behaviors, items=items,
                   device=device, kernels=kernels)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the scorer folder crash-safely: a crash at any moment leaves the old or the new scorer,
        never a mix (engine.serving.scorer_folder). What the folder keeps is decided from its files at commit
        time: saving an out-of-date scorer over a folder writes this scorer whole. The id vocabulary of the folder
        the scorer was opened from (`ids.json`, as it was then) goes along to another folder, merged append-only
        into one the folder has (IdError naming an id whose text differs there; nothing is written then)."""
        with self.pipeline.lock:
            write_folder(Path(path), config=self.config, checkpoint=self.checkpoint, encoder=self.encoder,
                         model=self.model, behaviors=self.behaviors, items=self.items,
                         item_vectors=self.pipeline.save_item_vectors, ids=self.ids)

    # ----- scoring ------------------------------------------------------------------------
    def set_calibration(self, calibration: CalibrationConfig) -> None:
        """Map every later score and rank through `calibration` (fitted by `bahe calibrate`;
        CalibrationConfig() turns it off); part of the config, so save_pretrained keeps it."""
        self.config.calibration = calibration

    def score(self, users: Sequence[dict[str, Sequence[str]]], items: Sequence[str], *,
              history_counts: Sequence[dict[str, int] | None] | None = None,
              side_features: Sequence[dict | None] | None = None) -> np.ndarray:
        """(B,) float32 click probabilities in (0, 1) of users[i] clicking items[i]. The count features see
        each sequence's length as passed, or history_counts[i][name] (the user's total, for callers that pass
        only the most recent behaviors). side_features[i]: the pair's categorical features, name -> value
        (`ModelConfig.categorical_features`; left out: unknown). A user repeated in the batch (the same texts in
        every sequence) runs the upper layers once (`ScoringConfig.dedupe_users`); known items take their stored
        item vectors."""
        return self._score(users, items, history_counts, side_features, None)

    def score_parts(self, users: Sequence[dict[str, Sequence[str]]], items: Sequence[str], *,
                    history_counts: Sequence[dict[str, int] | None] | None = None,
                    side_features: Sequence[dict | None] | None = None) -> dict[str, np.ndarray | None]:
        """`score`'s pairs (same inputs, checks and errors) with what the head reads of each, as float32 arrays:
        user (P, n, d) pooled sequences, item (P, d), cosines (P, n), similar (P, 2 n k) the similarity columns
        (None without), logits (P,) before calibration, probs (P,) as `score` returns them. The feature block of
        engine.export.online is made of these."""
        parts: dict = {}
        probs = self._score(users, items, history_counts, side_features, parts)
        if not parts:  # no pairs
            n, d = len(self.config.model.sequence_names), self.model.upper.hidden_size
            k = len(self.config.model.similarity_temperatures)
            parts = {"user": np.empty((0, n, d), np.float32), "item": np.empty((0, d), np.float32),
                     "cosines": np.empty((0, n), np.float32), "logits": np.empty(0, np.float32),
                     "similar": np.empty((0, 2 * n * k), np.float32) if k else None}
        return {**parts, "probs": probs}

    def _score(self, users, items, history_counts, side_features, parts: dict | None) -> np.ndarray:
        sequences = parse_users(users, self.config)
        item_texts = parse_items(items, len(sequences))
        user_counts = parse_history_counts(history_counts, users, self.config.model.sequence_names)
        categories = self.pipeline.categories(side_features, len(sequences), "pair")
        if not sequences:
            return np.empty(0, dtype=np.float32)
        if self.config.scoring.dedupe_users:
            first, pair_user = distinct_users(sequences)
        else:
            first, pair_user = list(range(len(sequences))), np.arange(len(sequences))
        return self._score_pairs([sequences[u] for u in first], first, user_counts, pair_user, item_texts,
                                 categories=categories, parts=parts)

    def rank(self, user: dict[str, Sequence[str]] | UserState, candidates: Sequence[str], *,
             top_k: int | None = None, history_counts: dict[str, int] | None = None,
             side_features: dict | None = None,
             candidate_features: Sequence[dict | None] | None = None) -> Ranking:
        """One user against K candidate item texts: its sequences run through the upper layers once, the head
        over the K candidates in one batch. -> Ranking(scores (K,) float32 in candidate order, order (top_k or
        K,) best first). Inputs are checked as `score`'s (InputError naming `candidates[i]`). `user` may be a
        `UserState` (`user_state`, `extend_user`): no upper layer runs, the same scores as its whole user's.
        `side_features`: the user's features, for every candidate; `candidate_features[i]`: candidate i's own (an
        item-level feature such as its genre), under the user's (a name both give: the user's value)."""
        if isinstance(user, UserState):
            if history_counts is not None:
                raise InputError("a UserState carries its counts: pass history_counts to user_state, not rank")
            return rank_state(self, user, candidates, top_k, side_features, candidate_features)
        counts = None if history_counts is None else [history_counts]
        side = None if side_features is None else [side_features]
        return self._rank_many([user], [candidates], top_k, counts, side, label=lambda i: f"candidates[{i}]",
                               candidate_features=None if candidate_features is None else [candidate_features],
                               features_of=lambda u: "candidate_features")[0]

    def rank_many(self, users: Sequence[dict[str, Sequence[str]]], candidates: Sequence[Sequence[str]], *,
                  top_k: int | None = None,
                  history_counts: Sequence[dict[str, int] | None] | None = None,
                  side_features: Sequence[dict | None] | None = None,
                  candidate_features: Sequence[Sequence[dict | None] | None] | None = None) -> list[Ranking]:
        """`rank` for many users, each with its own candidate list (candidates[u]), side features and candidates'
        own features (candidate_features[u][j] for candidates[u][j], or None for a user), in one pass: every
        user's sequences through the upper layers once, each user's candidates through the head."""
        return self._rank_many(users, candidates, top_k, history_counts, side_features,
                               candidate_features=candidate_features)

    def _rank_many(self, users, candidates, top_k, history_counts, side_features, label=None,
                   candidate_features=None, features_of=lambda u: f"candidate_features[{u}]") -> list[Ranking]:
        check_top_k(top_k)
        sequences = parse_users(users, self.config)
        lists = parse_candidates(candidates, len(sequences))
        candidate_features = parse_candidate_features(
            candidate_features, lists, lambda u, own, count: self.pipeline.categories(own, count, "candidate",
                                                                                       features_of(u)))
        user_counts = parse_history_counts(history_counts, users, self.config.model.sequence_names)
        sizes = np.array([len(c) for c in lists], dtype=np.int64)
        pair_user = np.repeat(np.arange(len(lists)), sizes)
        categories = self.pipeline.ranked_categories(side_features, candidate_features, pair_user, len(sequences))
        flat = [text for c in lists for text in c]
        starts = np.cumsum(sizes) - sizes
        if label is None:  # candidates[u][j] of flat index i
            label = lambda i: f"candidates[{pair_user[i]}][{i - starts[pair_user[i]]}]"  # noqa: E731
        probs = (self._score_pairs(sequences, range(len(sequences)), user_counts[pair_user], pair_user, flat,
                                   label=label, per_user=True, categories=categories)
                 if flat else np.empty(0, dtype=np.float32))
        return [ranking(probs[lo:lo + k], top_k) for lo, k in zip(starts, sizes)]

    def user_state(self, user: dict[str, Sequence[str]], *, history_counts: dict[str, int] | None = None) -> UserState:
        """A user's upper-layer keys/values kept (engine.serving.incremental), for `extend_user` and `rank`. Costs one
        `rank` of the user's upper layers; needs causal upper layers (ValueError otherwise)."""
        return build_state(self, user, history_counts)

    def extend_user(self, state: UserState, behaviors: dict[str, Sequence[str]]) -> UserState:
        """`state` with new behaviors appended (sequence name -> texts, oldest first): O(k M) for k new behaviors
        while a window start stands, the sequence's window rebuilt when it moves. A new state; `state` stays valid."""
        return extend_state(self, state, behaviors)

    def score_ids(self, behavior_rows: torch.Tensor, offsets: torch.Tensor, item_rows: torch.Tensor, *,
                  side_features: Sequence[dict | None] | None = None) -> np.ndarray:
        """Id-level API: behavior_rows (T,) int64 table rows; offsets (U*n+1,) int64 cumulative, user-major
        (sequence s of user u is [offsets[u*n+s], offsets[u*n+s+1]), in config.model.sequence_names order,
        each at most max_behaviors long); item_rows (U,) int64; side_features[u]: user u's categorical features,
        name -> value, as `score` takes them (left out: unknown). -> (U,) float32 probabilities."""
        n = len(self.config.model.sequence_names)
        batch = PackedBatch(behavior_rows, offsets, item_rows)
        batch.validate(n, len(self.behaviors), len(self.items))  # the one check of the values, on the host
        longest = batch.max_len
        if longest > self.config.model.max_behaviors:
            raise ValueError(f"a sequence holds {longest} behaviors, more than max_behaviors "
                             f"{self.config.model.max_behaviors}; pass its window (ModelConfig.window_start)")
        offsets_np, rows_np, items_np = offsets.cpu().numpy(), behavior_rows.cpu().numpy(), item_rows.cpu().numpy()
        categories = self.pipeline.categories(side_features, items_np.size, "user")
        sequences = [[rows_np[offsets_np[u * n + s]:offsets_np[u * n + s + 1]].tolist() for s in range(n)]
                     for u in range(items_np.size)]
        with self.pipeline.lock:
            tables = self.pipeline.placed()
        config = self.config.model
        recent = (recent_counts(sequences, config.recent_events, n) if config.count_features and config.recent_events
                  else None)
        return self.pipeline.score(ScoringBatch(rows_np, offsets_np, items_np, np.arange(items_np.size),
                                                np.diff(offsets_np).reshape(-1, n), recent, categories), tables)

    def table_rows(self, which: str) -> torch.Tensor:
        """(N, d) rows of the 'behaviors' or 'items' table where the model runs (`ScoringPipeline.table_rows`)."""
        return self.pipeline.table_rows(which)

    def cache_stats(self) -> CacheStats:
        """Hits, misses, entries and bytes of the pooled-user-vector LRU (ScoringConfig.user_cache_bytes)."""
        return self.pipeline.cache_stats()

    def _score_pairs(self, sequences: list[list[list[str]]], originals: Sequence[int], user_counts: np.ndarray,
                     pair_user: np.ndarray, item_texts: list[str], label=None, per_user: bool = False,
                     categories: np.ndarray | None = None, parts: dict | None = None) -> np.ndarray:
        """(P,) probabilities of pairs (sequences[pair_user[p]], item_texts[p]); user_counts (P, n) and
        categorical feature rows (P, F) per pair; originals[u]: the caller's index of distinct user u (for errors)."""
        n, config, whole = len(self.config.model.sequence_names), self.config.model, sequences
        sequences = read_windows(whole, self.config, originals)
        flat = [text for user in sequences for seq in user for text in seq]
        lengths = np.fromiter((len(seq) for user in sequences for seq in user), dtype=np.int64,
                              count=len(sequences) * n)
        scoring, pipeline = self.config.scoring, self.pipeline
        with pipeline.lock, stage("lookup"), kernel_path(self.kernels):  # unknown texts: ABE on the fly
            behavior_rows, behavior_extra = pipeline.lookup("behaviors", flat, scoring.unknown_behavior, lengths,
                                                            users=originals)
            item_rows, item_extra = pipeline.lookup("items", item_texts, scoring.unknown_item, label=label)
            tables = pipeline.placed()
        recent = (recent_counts(whole, config.recent_events, n)  # of whole histories, as in training
                  if config.count_features and config.recent_events else None)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        batch = ScoringBatch(behavior_rows, offsets, item_rows, pair_user, user_counts, recent, categories,
                             behavior_extra, item_extra)
        return pipeline.score(batch, tables, per_user=per_user, parts=parts)
