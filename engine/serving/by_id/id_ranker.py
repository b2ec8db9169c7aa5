"""`IdRanker`: rank and score by user and item ids, the user's history read from a `HistoryStore`, so a request
carries ids, not texts.

Per user the ranker keeps the scorer's incremental `UserState` (engine.serving.incremental: each upper layer's
keys and values, the window's table rows) with the store position it covers, (generation, totals). A request
reads only the events after that position (`store.read(user, start=totals)`): none, and the state serves as it
is; k new ones, and `extend_user` runs just those k rows through the layers (O(k M), the window rebuilt once every
S appends past M); another generation, another scorer version (weights, a table cut short) or no kept state, and
the whole history is built once. `append` writes the store, then extends a kept state at once, so the next rank
pays for no upper layer. States are kept in an LRU bounded by bytes (`UserState.nbytes`).

What a rank does then: one dict lookup per candidate id (`ItemCatalog.numbers`) to its item-table row through a
map of every catalog item built once per table length, the kept window rows, the pooled vectors of the state and
the head (`score_states`, the same code `rank` of a UserState runs) - no text is normalized, hashed or searched.
It equals the text path on the same history and candidates (fp32, 1e-5: the state's pooled vectors against the
packed upper layers).

Items whose text the tables lack. A candidate whose text is not a row of the item table is looked up by text and
handled by `ScoringConfig.unknown_item` ("encode" on the fly, or refused), as the text path does. A behavior (an
appended item) whose text is not a row of the behavior table follows `unknown_behavior`: "error" refuses the
append (InputError naming the event, nothing stored); "encode" (the default) encodes it on the fly when its state
is built or extended, and a user whose window holds such a behavior has its window texts looked up at each rank
(as a text request is); `append_unknown` writes them to the table once instead.

Bidirectional upper layers (attention="family" on BERT) keep no state: the ranker then serves by ids through the
text path (`rank`/`score` on the history's texts), same results, no speed-up."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.encoding.text_checks import InputError
from engine.serving.by_id.history_store import HistoryStore, UserHistory, user_key
from engine.serving.incremental import (StaleStateError, UserState, build_state, check_causal, extend_state,
                                        score_states)
from engine.serving.pipeline import ScoringPipeline
from engine.serving.ranking import ItemCatalog, Ranking, check_top_k, ranking
from weights.table import MISSING

USER_FEATURE = "user_id"  # the categorical feature a request's user id fills when the model takes it


@dataclass(frozen=True)
class KeptState:
    """A user's state and the store position it covers."""
    generation: str
    totals: tuple[int, ...]
    state: UserState


class IdRanker:
    """Rank/score by ids over `store`, for `scorer` (a BAHEScorer) and its folder's `catalog`. Thread-safe."""

    def __init__(self, scorer, store: HistoryStore, catalog: ItemCatalog, *,
                 state_cache_bytes: int = 256 << 20) -> None:
        names = scorer.config.model.sequence_names
        if tuple(store.sequence_names) != tuple(names):
            raise ValueError(f"the store's sequences {list(store.sequence_names)} are not the scorer's {list(names)}")
        if state_cache_bytes < 0:
            raise ValueError(f"state_cache_bytes must be >= 0, got {state_cache_bytes}")
        self.scorer, self.store, self.catalog, self.max_bytes = scorer, store, catalog, state_cache_bytes
        try:
            check_causal(scorer.model)
            self.incremental = True
        except ValueError:
            self.incremental = False
        self._states: OrderedDict[str, KeptState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[int, np.ndarray]] = {}  # 'items'/'behaviors' -> (table length, row per item)
        self._rows_lock = threading.Lock()

    # ----- appends ---------------------------------------------------------------------------
    def append(self, user_id: object, events: Mapping[str, Sequence[object]]) -> tuple[int, ...]:
        """Append events (sequence name -> item ids, oldest first) to the user's history, all or nothing; a kept
        state is extended at once (O(new rows)). -> the user's totals. InputError naming the event for an id the
        catalog lacks, or (unknown_behavior='error') an item whose text is not in the behavior table."""
        key = user_key(user_id)
        checked = self.store.check_events(events, self.catalog.vocabulary.items)
        if self.scorer.config.scoring.unknown_behavior == "error":
            with self.scorer.pipeline.lock:
                rows = self.catalog_rows("behaviors")
            for s, keys in checked.items():
                numbers = self.catalog.vocabulary.items.numbers(keys)
                bad = np.flatnonzero(rows[numbers] == MISSING)
                if bad.size:
                    name = self.store.sequence_names[s]
                    raise InputError(f"events[{name!r}][{bad[0]}]: item {keys[bad[0]]!r}'s text is not in the "
                                     "behavior table (unknown_behavior='error')")
        totals = self.store.append(key, events)
        if self.incremental and self.kept(key) is not None:
            self.user_state(key)
        return totals

    # ----- states ----------------------------------------------------------------------------
    def kept(self, user_id: object) -> tuple[int, ...] | None:
        """The store totals the user's kept state covers, None when none is kept."""
        with self._lock:
            entry = self._states.get(user_key(user_id))
        return None if entry is None else entry.totals

    def user_state(self, user_id: object) -> UserState:
        """The user's state at the store's current history: kept, extended by the events since, or built."""
        return self._state(user_key(user_id), verify=True)

    def _state(self, key: str, verify: bool) -> UserState:
        """user_state; verify=False skips the check of the scorer's version for a kept state with no new events
        (`score_states` checks it with the tables it reads, and the request builds it again if stale)."""
        generation = self.store.generation
        with self._lock:
            entry = self._states.get(key)
            if entry is not None:
                self._states.move_to_end(key)
        if entry is not None and entry.generation == generation:
            history = self.store.read(key, entry.totals)
            current = not verify or self.scorer.pipeline.version().serves(entry.state.version)
            if history.totals == entry.totals and current:
                return entry.state
            if current:
                state = extend_state(self.scorer, entry.state, self._texts(history))
                self._keep(key, KeptState(generation, history.totals, state))
                return state
        history = self.store.read(key)
        state = build_state(self.scorer, self._texts(history), None)
        self._keep(key, KeptState(generation, history.totals, state))
        return state

    def _scored(self, keys: list[str], run) -> np.ndarray:
        """run(states of `keys`) with the kept states; once more with states checked (rebuilt) if one was stale."""
        try:
            return run([self._state(k, verify=False) for k in keys])
        except StaleStateError:
            return run([self._state(k, verify=True) for k in keys])

    def _keep(self, key: str, entry: KeptState) -> None:
        with self._lock:
            old = self._states.get(key)
            if old is not None:
                if old.generation == entry.generation and any(a > b for a, b in zip(old.totals, entry.totals)):
                    return  # another thread kept a later state meanwhile
                self._bytes -= old.state.nbytes
            self._states[key] = entry
            self._states.move_to_end(key)
            self._bytes += entry.state.nbytes
            while self._states and self._bytes > self.max_bytes:
                _, dropped = self._states.popitem(last=False)
                self._bytes -= dropped.state.nbytes

    def _texts(self, history: UserHistory) -> dict[str, list[str]]:
        """Sequence name -> the texts of the history's items (InputError for an id the catalog lacks)."""
        texts = self.catalog.vocabulary.item_texts
        return {name: [texts[i] for i in self.catalog.numbers(items, f"history[{name!r}]")]
                for name, items in zip(self.store.sequence_names, history.items) if items}

    # ----- item rows -------------------------------------------------------------------------
    def catalog_rows(self, which: str) -> np.ndarray:
        """(C,) int64 the row of each catalog item's text in the scorer's 'items' or 'behaviors' table (MISSING
        where absent), looked up once per table length (rows are append-only); call under the pipeline's lock."""
        table = self.scorer.pipeline.items if which == "items" else self.scorer.pipeline.behaviors
        with self._rows_lock:
            size, rows = self._rows.get(which, (-1, None))
            if size == len(table):
                return rows
            texts = self.catalog.vocabulary.item_texts
            rows = np.full(len(texts), MISSING, dtype=np.int64) if rows is None else rows.copy()
            todo = np.flatnonzero(rows[:len(texts)] == MISSING)
            if todo.size:
                rows[todo] = table.lookup([texts[i] for i in todo], on_missing="mark")
            self._rows[which] = (len(table), rows)
            return rows

    def _item_rows(self, numbers: np.ndarray, name: str):
        """The resolver `score_states` calls under the pipeline's lock: item rows of catalog numbers from the map,
        a text lookup (unknown_item) only for items whose text the item table lacks."""
        def resolve(pipeline: ScoringPipeline) -> tuple[np.ndarray, np.ndarray | None]:
            rows = self.catalog_rows("items")[numbers]
            missing = np.flatnonzero(rows == MISSING)
            if not missing.size:
                return rows, None
            texts = self.catalog.vocabulary.item_texts
            found, extra = pipeline.lookup("items", [texts[numbers[i]] for i in missing],
                                           self.scorer.config.scoring.unknown_item,
                                           label=lambda j: f"{name}[{missing[j]}]")
            rows[missing] = found
            return rows, extra
        return resolve

    # ----- requests --------------------------------------------------------------------------
    def _side(self, key: str, side_features: object) -> object:
        """side_features with the request's user id as the `user_id` feature, if the model takes one and the
        caller gave none; anything else as it came (for `categories` to refuse)."""
        if USER_FEATURE not in self.scorer.config.model.categorical_features:
            return side_features
        if side_features is None:
            return {USER_FEATURE: key}
        if isinstance(side_features, dict) and USER_FEATURE not in side_features:
            return {**side_features, USER_FEATURE: key}
        return side_features

    def rank(self, user_id: object, candidate_item_ids: Sequence[object], *, top_k: int | None = None,
             side_features: dict | None = None) -> Ranking:
        """One user against K candidate item ids: a Ranking in candidate order, as `BAHEScorer.rank` of the user's
        history texts and the candidates' texts gives (InputError naming candidates[i] for an unknown id,
        UnknownUserError for a user with no history). side_features: the user's categorical features (`user_id`
        filled in from the request when the model takes it)."""
        check_top_k(top_k)
        key = user_key(user_id)
        numbers = self.catalog.numbers(candidate_item_ids, "candidates")
        side = self._side(key, side_features)
        candidate_features = self.catalog.features_of_numbers(  # the catalog's, as rank_items fills them
            numbers, self.scorer.config.model.categorical_features)
        if not self.incremental:
            texts = self.catalog.vocabulary.item_texts
            return self.scorer.rank(self._texts(self.store.read(key)), [texts[i] for i in numbers], top_k=top_k,
                                    side_features=side, candidate_features=candidate_features)
        pair_user = np.zeros(numbers.size, dtype=np.int64)
        categories = self.scorer.pipeline.ranked_categories(None if side is None else [side], candidate_features,
                                                            pair_user, 1)
        if not numbers.size:
            self._state(key, verify=False)  # an unknown user is refused all the same
            return ranking(np.empty(0, dtype=np.float32), top_k)
        return ranking(self._scored([key], lambda states: score_states(
            self.scorer, states, pair_user, self._item_rows(numbers, "candidates"), categories, per_user=True)), top_k)

    def score(self, user_ids: Sequence[object], item_ids: Sequence[object], *,
              side_features: Sequence[dict | None] | None = None) -> np.ndarray:
        """(B,) float32 click probabilities of user_ids[i] clicking item_ids[i], as `BAHEScorer.score` of their
        texts gives; each distinct user's state read once. side_features[i]: the pair's categorical features."""
        if isinstance(user_ids, (str, bytes)) or not isinstance(user_ids, (Sequence, np.ndarray)):
            raise InputError(f"user_ids must be a list of user ids, got {type(user_ids).__name__}")
        numbers = self.catalog.numbers(item_ids, "items")
        if len(user_ids) != numbers.size:
            raise InputError(f"item_ids has {numbers.size} entries but user_ids has {len(user_ids)}: one item per user")
        keys = []
        for i, value in enumerate(user_ids):
            try:
                keys.append(user_key(value))
            except InputError as err:
                raise InputError(f"user_ids[{i}]{str(err)[len('user_id'):]}") from None
        if side_features is None:
            side_features = [None] * len(keys)
        if isinstance(side_features, (list, tuple)) and len(side_features) == len(keys):
            side_features = [self._side(k, s) for k, s in zip(keys, side_features)]
        side_features = self.catalog.with_features(list(item_ids), side_features,
                                                   self.scorer.config.model.categorical_features)
        distinct = list(dict.fromkeys(keys))
        if not self.incremental:
            texts = self.catalog.vocabulary.item_texts
            histories = {k: self._texts(self.store.read(k)) for k in distinct}
            return self.scorer.score([histories[k] for k in keys], [texts[i] for i in numbers],
                                     history_counts=None, side_features=side_features)
        categories = self.scorer.pipeline.categories(side_features, len(keys), "pair")
        if not keys:
            return np.empty(0, dtype=np.float32)
        where = {k: u for u, k in enumerate(distinct)}
        pair_user = np.array([where[k] for k in keys], dtype=np.int64)
        return self._scored(distinct, lambda states: score_states(
            self.scorer, states, pair_user, self._item_rows(numbers, "items"), categories, per_user=False))
