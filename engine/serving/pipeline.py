"""`ScoringPipeline`: the state a scorer's serving calls share, with one name and public methods - the behavior
and item tables and their placement on the device, the item vectors, the user-vector LRU, host mirrors of the
model's lookup tables, the lock - and the one compute path from host rows to probabilities.

Requests arrive as a `ScoringBatch`: host (numpy) arrays of rows, offsets, the pair -> user map and every side
column (counts, recent shares, categorical rows, rows encoded on the fly), no optional-argument sprawl.
`score` plans the request on the host (user-cache hits, user-tower chunks, similarity groups, each user's
candidate slots), moves everything the device needs in ONE transfer (`to_device`: the arrays packed into one
pinned buffer, one non-blocking copy; on the CPU the arrays are wrapped, not copied), runs the towers and the
head (engine.serving.towers: pure functions of device tensors), and reads the probabilities back once. What
the host needs of the model per request - the items' training counts, the categorical buckets seen in
training - comes from host mirrors, refreshed when the weights change, never from a device read.
`tests/test_layout.py` holds the rule: serving modules reach the device only through engine.serving.transfer.

towers.py stays a module of pure functions, not folded in here: it holds the device math (item vectors, pair
similarity, the batched folded head) on tensors alone, testable without a scorer; this file holds the state
and the host planning (together they would pass 400 lines).

Versions. `version()` is a `PipelineVersion`: the model's weights (every parameter's and buffer's identity
and version counter, the training flag and compute dtype) and the tables' lengths. Everything the pipeline
hands out that outlives a call (a `UserState`, the user-cache entries) carries the version it was computed at;
`PipelineVersion.serves(older)` says whether such state is still valid: same weights, tables that have only
grown since (rows are append-only, so old ids keep their rows). Stale states are refused, stale cache entries
dropped, the item vectors and host mirrors recomputed."""
from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.encoding.abe import AtomicEncoder
from engine.config import ScorerConfig
from engine.features.categorical import category_buckets, category_rows
from engine.features.side_features import count_features
from engine.features.similarity import similarity_features
from engine.model.calibration import calibrate
from engine.model.bahe_model import BAHEModel
from engine.model.head import sequence_item_cosines
from engine.model.stages import stage
from engine.serving import towers
from engine.serving.inputs import InputError, locate_bad_text, lookup_texts, parse_side_features
from engine.serving.item_vectors import ItemVectors, model_version
from engine.serving.placement import place_table, stored_rows
from engine.serving.ranking import distinct_pairs
from engine.serving.scorer_setup import kernel_path
from engine.serving.transfer import place, read_back, to_device
from engine.serving.user_cache import CacheStats, UserStateCache, user_key
from weights.table import MISSING, BehaviorTable, NonFiniteRowError, TableError, UnknownTextError, first_nonfinite_row
from weights.text_key import normalize_text

log = logging.getLogger(__name__)

_SERIALS = itertools.count(1)
PROB_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps]: always strictly inside (0, 1)
SIMILARITY_BLOCK = 1 << 23  # (pairs x behaviors) cosines per similarity product of a group of users


@dataclass(frozen=True)
class PipelineVersion:
    """pipeline: a number unique to the pipeline in this process (tensor ids and data pointers are reused once a
    swapped-out scorer is collected); weights: `model_version` of the model; behaviors, items: table lengths."""
    pipeline: int
    weights: tuple
    behaviors: int
    items: int

    def serves(self, older: PipelineVersion) -> bool:
        """True when state computed at `older` is valid now: the same pipeline and weights, tables only grown."""
        return (older.pipeline == self.pipeline and older.weights == self.weights
                and older.behaviors <= self.behaviors and older.items <= self.items)


@dataclass
class ScoringBatch:
    """One request on the host: U users, n sequences each, P (user, item) pairs.
    behavior_rows (T,) int64, ids >= N index behavior_extra; offsets (U*n+1,) int64 cumulative, user-major;
    item_rows (P,) int64, ids >= N index item_extra; pair_user (P,) int64 the pair's user; user_counts (P, n)
    int64 the count features' user side; recent (U, n) int64 recent counts or None; categories (P, F) int64
    hashed categorical buckets (-1: unknown, `ScoringPipeline.categories`) or None; *_extra (X, d) float32 rows
    encoded on the fly, or None."""
    behavior_rows: np.ndarray
    offsets: np.ndarray
    item_rows: np.ndarray
    pair_user: np.ndarray
    user_counts: np.ndarray
    recent: np.ndarray | None = None
    categories: np.ndarray | None = None
    behavior_extra: np.ndarray | None = None
    item_extra: np.ndarray | None = None


@dataclass(frozen=True)
class PlacedTables:
    """What a request reads: on the device the tables' rows and the item vectors; on the host the mirrors of the
    model's item counts (N, n) and seen categorical buckets; the version they are all for."""
    behaviors: torch.Tensor
    items: torch.Tensor
    vectors: torch.Tensor
    version: PipelineVersion
    item_counts: np.ndarray
    category_seen: np.ndarray


class ScoringPipeline:
    """The scorer's shared serving state and compute path (see the module docstring). Thread-safe: `lock`
    guards the tables (lookups, appends, placement) and the item vectors; compute runs outside it."""

    def __init__(self, *, config: ScorerConfig, encoder: AtomicEncoder, model: BAHEModel, behaviors: BehaviorTable,
                 items: BehaviorTable, device: torch.device, kernels: str) -> None:
        self.config, self.encoder, self.behaviors, self.items = config, encoder, behaviors, items
        self.device, self.kernels = device, kernels
        self.model = place(model, device).eval()
        place(encoder.lower, device)
        encoder.device = device
        self.serial = next(_SERIALS)  # this pipeline's number in the process: PipelineVersion.pipeline
        self.lock = threading.Lock()
        self.user_cache = UserStateCache(config.scoring.user_cache_bytes)
        self.item_vectors = ItemVectors()
        self._placed: dict[str, tuple[int, torch.Tensor]] = {}
        self._vectors: tuple[torch.Tensor, torch.Tensor] | None = None  # (host item vectors, their device copy)
        self._mirrors: tuple[tuple, np.ndarray, np.ndarray] | None = None  # (weights, item counts, seen buckets)
        self._mirror_lock = threading.Lock()

    def version(self) -> PipelineVersion:
        """The pipeline's version now (weights and table lengths)."""
        return PipelineVersion(self.serial, model_version(self.model), len(self.behaviors), len(self.items))

    # ----- tables ---------------------------------------------------------------------------
    def table_rows(self, which: str) -> torch.Tensor:
        """(N, d) rows of the 'behaviors' or 'items' table where the model runs: on CUDA placed once
        per table size (on the device, or pinned host memory when it does not fit); mmapped on CPU."""
        table = self.behaviors if which == "behaviors" else self.items
        cached = self._placed.get(which)
        if cached is not None and cached[0] == len(table):
            return cached[1]
        rows = stored_rows(table)  # an int8 table: QuantizedRows, gathered through the dequantizing ops
        if self.device.type == "cuda":
            rows, placement = place_table(rows, self.device)
            log.info("%s table (%d x %d) placed: %s", which, len(table), table.dim, placement)
        self._placed[which] = (len(table), rows)
        return rows

    def placed(self) -> PlacedTables:
        """The tables and item vectors as they are now, on the device, and the host mirrors; call under `lock`."""
        version = self.version()  # once per request: it reads every parameter's version counter
        with kernel_path(self.kernels):
            items = self.table_rows("items")
            vectors = self.item_vectors.get(self.model, self.items, items)
        kept = self._vectors
        if kept is None or kept[0].data_ptr() != vectors.data_ptr() or kept[0].shape != vectors.shape:
            self._vectors = (vectors, place(vectors, self.device))  # holding `vectors` keeps its address unique
        return PlacedTables(self.table_rows("behaviors"), items, self._vectors[1], version,
                            *self.mirrors(version.weights))

    def lookup(self, which: str, texts: list[str], policy: str, lengths: np.ndarray | None = None,
               users: Sequence[int] | None = None, label=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows of texts in the 'behaviors' or 'items' table; unknown texts encoded on the fly (ids >= N, their
        (X, d) float32 rows returned), appended to the table, or refused, per policy. Call under `lock`."""
        table, what = (self.behaviors, "behavior") if which == "behaviors" else (self.items, "item")
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
            located = locate_bad_text(texts, lambda text: self.encoder.tokenize([normalize_text(text)]), lengths,
                                      names, users, label)
            if located is None:
                raise
            raise InputError(located) from None
        bad = first_nonfinite_row(extra)
        if bad is not None:
            raise NonFiniteRowError(f"encoding {what} text {unknown[bad]!r} gave NaN or Inf")
        slot = {t: len(table) + i for i, t in enumerate(unknown)}
        rows[missing] = [slot[t] for t in normalized]
        return rows, extra.numpy()

    # ----- host mirrors ---------------------------------------------------------------------
    def mirrors(self, weights: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the model's item training counts (N, n) and seen categorical buckets, read from the
        device once per weights version (`weights`: the model's `model_version`, if known)."""
        weights = model_version(self.model) if weights is None else weights
        with self._mirror_lock:
            if self._mirrors is None or self._mirrors[0] != weights:
                side = self.model.side
                self._mirrors = (weights, self.model.item_counts.cpu().numpy(), side.category_seen.cpu().numpy())
            return self._mirrors[1], self._mirrors[2]

    def categories(self, side_features: object, count: int, unit: str,
                   what: str = "side_features") -> np.ndarray | None:
        """(count, F) hashed buckets of the categorical features (engine.features.categorical; -1: unknown), None
        without any; `score` maps them to embedding rows with the seen buckets of its weights."""
        names, config = self.config.model.categorical_features, self.config.model
        columns = parse_side_features(side_features, count, names, unit, what)
        if not names:
            return None
        return category_buckets(names, columns, config.categorical_buckets)

    def ranked_categories(self, side_features: object, candidate_features: object,
                          pair_user: np.ndarray, users: int) -> np.ndarray | None:
        """(P, F) buckets of ranked pairs: user u's `side_features` (one dict or None per user) and, when given,
        pair p's `candidate_features` (one dict or None per pair: an item's own features, such as a catalog's
        genre) under them - a feature the user's dict names wins, as `ItemCatalog.with_features` merges.
        InputError naming `side_features[u]` or `candidate_features[p]`."""
        categories = self.categories(side_features, users, "user")
        if candidate_features is None:
            return None if categories is None else categories[pair_user]
        self.categories(candidate_features, pair_user.size, "candidate", "candidate_features")  # checked
        per_user = side_features if side_features is not None else [None] * users
        merged = [{**(own or {}), **(per_user[u] or {})} or None
                  for own, u in zip(candidate_features, pair_user.tolist())]
        return self.categories(merged, pair_user.size, "pair")

    def dense(self, batch: ScoringBatch, tables: PlacedTables) -> np.ndarray | None:
        """(P, F) count features of the pairs (engine.features.side_features), from the host mirror."""
        if not self.config.model.count_features:
            return None
        stored = tables.item_counts
        known = batch.item_rows < stored.shape[0]
        item_counts = np.zeros((batch.item_rows.size, stored.shape[1]), dtype=np.int64)
        item_counts[known] = stored[batch.item_rows[known]]
        recent = None if batch.recent is None else batch.recent[batch.pair_user]
        return count_features(batch.user_counts, item_counts, recent)

    # ----- the user cache -------------------------------------------------------------------
    def cache_stats(self) -> CacheStats:
        """Hits, misses, entries and bytes of the pooled-user-vector LRU."""
        return self.user_cache.stats()

    def resize_user_cache(self, max_bytes: int) -> None:
        """A fresh, empty user-vector LRU of max_bytes (0: off)."""
        self.user_cache = UserStateCache(max_bytes)

    # ----- scoring --------------------------------------------------------------------------
    def score(self, batch: ScoringBatch, tables: PlacedTables, *, per_user: bool = False,
              user: torch.Tensor | None = None, parts: dict | None = None) -> np.ndarray:
        """(P,) probabilities of the batch's pairs: each user through the user tower once (or its pooled states
        `user` (U, n, d) given: a UserState's), pairs' items from the stored vectors (on the fly for rows past
        them), then the head over all pairs (per_user: each user's pairs contiguous, as rank_many lays them
        out, with the users folded into the head's first layer). One host -> device transfer, one read back.
        `parts` (a dict, `score` only): filled with what the head read, per pair, as float32 host arrays -
        user (P, n, d), item (P, d), cosines (P, n), similar (P, 2 n k) the similarity columns or None, logits (P,)
        before calibration."""
        model, n = self.model, len(self.config.model.sequence_names)
        kept, back = (distinct_pairs(batch.pair_user, batch.item_rows, batch.user_counts, batch.categories)
                      if per_user else (None, None))  # `score` keeps every pair a head row, as the caller sent it
        if kept is not None:
            pick = lambda a: None if a is None else a[kept]  # noqa: E731
            batch = ScoringBatch(batch.behavior_rows, batch.offsets, batch.item_rows[kept], batch.pair_user[kept],
                                 batch.user_counts[kept], batch.recent, pick(batch.categories), batch.behavior_extra,
                                 batch.item_extra)
        users, pairs = (batch.offsets.size - 1) // n, batch.item_rows.size
        arrays, plan = self._plan(batch, tables, users, n, user is None, per_user)
        dev = to_device(arrays, self.device)
        with torch.inference_mode(), kernel_path(self.kernels):
            if user is None:
                user = self._user_tower(tables.behaviors, dev, plan, users, n)
            item = towers.item_states(model, tables.vectors, dev["item_rows"], dev["item_extra"],
                                      dev["fresh_pairs"], dev["fresh_rows"])
            with stage("head"):
                similar = towers.pair_similar(model, tables.behaviors, tables.items, dev, plan["groups"], pairs)
                side = model.side(dev["item_rows"], dev["dense"], model.compute_dtype, similar, dev["categories"])
                if per_user:
                    logits = towers.per_user_logits(model, user, item, dev["pair_user"], dev["slot"],
                                                    plan["widest"], side)
                else:
                    logits = towers.pair_logits(model, user, item, dev["pair_user"], side)
            out = read_back(torch.sigmoid(logits))
            if parts is not None and not per_user:  # the feature block (engine.export): the head's inputs
                pair = user[dev["pair_user"]]
                parts.update(user=read_back(pair), item=read_back(item), logits=read_back(logits),
                             cosines=read_back(sequence_item_cosines(pair, item)),
                             similar=None if similar is None else read_back(similarity_features(similar)))
        if not np.isfinite(out).all():
            raise FloatingPointError("the model produced a non-finite score; the scorer's weights may be corrupt")
        out = calibrate(self.config.calibration, np.clip(out, PROB_EPS, 1 - PROB_EPS))
        return out if back is None else out[back]

    def _plan(self, batch: ScoringBatch, tables: PlacedTables, users: int, n: int, tower: bool,
              per_user: bool) -> tuple[dict[str, np.ndarray | None], dict]:
        """The request's host work: what goes to the device (one dict of arrays) and the host ints to slice it."""
        offsets, pair_user, item_rows = batch.offsets, batch.pair_user, batch.item_rows
        fresh = np.flatnonzero(item_rows >= tables.vectors.shape[0])
        arrays: dict[str, np.ndarray | None] = {
            "behavior_rows": batch.behavior_rows, "offsets": offsets, "item_rows": item_rows,
            "pair_user": pair_user, "dense": self.dense(batch, tables),
            "categories": None if batch.categories is None else category_rows(batch.categories, tables.category_seen),
            "behavior_extra": batch.behavior_extra, "item_extra": batch.item_extra,
            "fresh_pairs": fresh if fresh.size else None,
            "fresh_rows": item_rows[fresh] - tables.vectors.shape[0] if fresh.size else None}
        plan: dict = {"widest": 0, "groups": []}
        if per_user:
            sizes = np.bincount(pair_user, minlength=users)
            arrays["slot"] = np.arange(pair_user.size) - (np.cumsum(sizes) - sizes)[pair_user]
            plan["widest"] = int(sizes.max(initial=0))
        if tower:
            arrays.update(self._tower_plan(batch, tables, users, n, plan))
        if self.config.model.similarity_temperatures and pair_user.size:
            arrays.update(towers.similarity_plan(offsets, pair_user, n, SIMILARITY_BLOCK, plan["groups"]))
        return arrays, plan

    def _tower_plan(self, batch: ScoringBatch, tables: PlacedTables, users: int, n: int,
                    plan: dict) -> dict[str, np.ndarray]:
        """User-cache lookups (host keys) and the chunks of users that run the upper layers, batch_size each:
        their packed rows and offsets, concatenated for the one transfer."""
        rows, offsets, bounds = batch.behavior_rows, batch.offsets, batch.offsets[::n]
        table_size = tables.behaviors.shape[0]
        keys: list[bytes | None] = [None] * users
        if self.user_cache.max_bytes:
            keys = [user_key(rows[bounds[u]:bounds[u + 1]], np.diff(offsets[u * n:(u + 1) * n + 1]))
                    if batch.behavior_extra is None or not (rows[bounds[u]:bounds[u + 1]] >= table_size).any()
                    else None for u in range(users)]
        cached = self.user_cache.get_many(keys, tables.version)
        todo = np.array([u for u in range(users) if cached[u] is None], dtype=np.int64)
        hits = np.array([u for u in range(users) if cached[u] is not None], dtype=np.int64)
        chunks, picked, chunk_offsets, chunk_users = [], [], [], []
        rows_at, offsets_at = 0, 0
        for lo in range(0, todo.size, self.config.scoring.batch_size):
            chunk = todo[lo:lo + self.config.scoring.batch_size]
            seq = (chunk[:, None] * n + np.arange(n)[None, :]).ravel()  # the chunk's sequences, in order
            lengths = offsets[seq + 1] - offsets[seq]
            picked.append(np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in seq]) if lengths.sum()
                          else np.empty(0, dtype=np.int64))
            chunk_offsets.append(np.concatenate([[0], np.cumsum(lengths)]))
            chunk_users.append(chunk)
            total = int(lengths.sum())
            chunks.append((rows_at, total, offsets_at, seq.size + 1, lo, chunk.size,
                           max(int(lengths.max()), 1)))  # the longest: a host int, the forward reads no device value
            rows_at, offsets_at = rows_at + total, offsets_at + seq.size + 1
        plan.update(keys=keys, cached=cached, chunks=chunks, todo=todo, version=tables.version)
        cat = lambda parts: np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)  # noqa: E731
        return {"tower_rows": rows[cat(picked)], "tower_offsets": cat(chunk_offsets), "tower_users": cat(chunk_users),
                "cached_users": hits if hits.size else None}

    def _user_tower(self, table: torch.Tensor, dev: dict, plan: dict, users: int, n: int) -> torch.Tensor:
        """(U, n, d) pooled states: cached ones from the LRU, the rest through the upper layers, chunk by chunk."""
        model, cached, keys = self.model, plan["cached"], plan["keys"]
        out = torch.empty(users, n, model.upper.hidden_size, dtype=model.compute_dtype, device=self.device)
        if dev["cached_users"] is not None:
            out[dev["cached_users"]] = torch.stack([state for state in cached if state is not None])
        for rows_at, total, offsets_at, count, lo, size, longest in plan["chunks"]:
            chunk = dev["tower_users"][lo:lo + size]
            states = model.user_states(table, dev["tower_rows"][rows_at:rows_at + total],
                                       dev["tower_offsets"][offsets_at:offsets_at + count], longest,
                                       dev["behavior_extra"])
            out[chunk] = states
            self.user_cache.put_many([keys[u] for u in plan["todo"][lo:lo + size]], list(states), plan["version"])
        return out

    # ----- item vectors on disk -------------------------------------------------------------
    def load_item_vectors(self, path: Path | None) -> None:
        """Adopt a saved item-vectors file if it is this model's and table's, else compute them now."""
        if path is None or not self.item_vectors.load(path, self.model, self.items):
            with self.lock:  # an older folder, or a stale file: computed now, never read stale
                self.placed()

    def save_item_vectors(self, path: Path) -> None:
        """Write the vectors of every item-table row, signed (engine.serving.item_vectors); call under `lock`."""
        self.item_vectors.save(path, self.model, self.items, self.table_rows("items"))
