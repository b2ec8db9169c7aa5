"""Ranking helpers of `BAHEScorer.rank`/`rank_many`: the result type, the repeated users of a batch
(`score` computes each distinct user once) and the repeated candidates of a ranked user (scored once).

And scoring and ranking by item id (`ItemCatalog`, `score_items`, `rank_items`): the item ids a scorer was
trained on (the `ids.json` vocabulary `bahe train` keeps in the scorer folder: weights.id_vocabulary) mapped
to their texts, then the scorer's own `score` and `rank`, so a request need not carry a thousand texts. Ids
follow the key rule (17 and "17" are one item). The catalog is read once, when opened: a later `bahe train`
into the same folder extends the file (append-only) and a catalog opened again sees the new items."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.serving.inputs import InputError
from weights.id_vocabulary import FILE_NAME, IdError, VocabularyFile, id_key


@dataclass(frozen=True)
class Ranking:
    """One user's candidates scored: scores (K,) float32 click probabilities in candidate order; order (k,)
    int64 candidate indices, best first (k = top_k, or K), ties broken by candidate order."""
    scores: np.ndarray
    order: np.ndarray

    @property
    def top_scores(self) -> np.ndarray:
        """(k,) the scores in `order`."""
        return self.scores[self.order]


def ranking(scores: np.ndarray, top_k: int | None) -> Ranking:
    order = np.argsort(-scores, kind="stable")
    return Ranking(scores, order if top_k is None else order[:top_k])


def check_top_k(top_k: object) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InputError(f"top_k must be None or an int >= 1, got {top_k!r}")


def parse_candidates(candidates: object, num_users: int) -> list[list[str]]:
    """candidates: one list of item texts per user (texts are checked at lookup, as score's items)."""
    if not isinstance(candidates, (list, tuple)):
        raise InputError(f"candidates must be a list with one list of item texts per user, got "
                         f"{type(candidates).__name__}")
    if len(candidates) != num_users:
        raise InputError(f"candidates has {len(candidates)} lists but users has {num_users}: one list per user")
    out = []
    for u, items in enumerate(candidates):
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
            raise InputError(f"candidates[{u}] must be a list of item texts, got {type(items).__name__}")
        out.append(list(items))
    return out


def parse_candidate_features(candidate_features: object, lists: list[list[str]],
                             check: Callable[[int, object, int], object]) -> list | None:
    """rank_many's candidate_features - None, or per user None or one dict (or None) per candidate of
    candidates[u] - flattened to one entry per ranked pair. User u's entry is checked by `check(u, entry,
    len(candidates[u]))`, the pipeline's categorical parser, whose errors name it."""
    if candidate_features is None:
        return None
    if not isinstance(candidate_features, (list, tuple)) or len(candidate_features) != len(lists):
        raise InputError(f"candidate_features must be a list with one entry (a list or None) per user, "
                         f"{len(lists)} here")
    flat = []
    for u, (own, items) in enumerate(zip(candidate_features, lists)):
        own = [None] * len(items) if own is None else own
        check(u, own, len(items))
        flat += list(own)
    return flat


def distinct_users(sequences: list[list[list[str]]]) -> tuple[list[int], np.ndarray]:
    """(first, inverse): the index of each distinct user's first occurrence, and each user's distinct index,
    users being equal when every sequence holds the same texts. A user with unhashable behaviors (malformed,
    refused later with its own index) is kept apart."""
    seen: dict[tuple, int] = {}
    first, inverse = [], np.empty(len(sequences), dtype=np.int64)
    for u, user in enumerate(sequences):
        try:
            key = tuple(tuple(seq) for seq in user)
            index = seen.setdefault(key, len(first))
        except TypeError:
            index = len(first)
        if index == len(first):
            first.append(u)
        inverse[u] = index
    return first, inverse


def distinct_pairs(pair_user: np.ndarray, item_rows: np.ndarray,
                   *columns: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(kept, back): the pairs to score, each repeated pair (same user, item row and per-pair side `columns`
    (P, F)) kept once in first-occurrence order (a user's pairs stay contiguous), and each original pair's
    index among them; (None, None) when nothing repeats. Ranking takes it: a repeated candidate costs nothing
    and scores exactly as its twin, so ties stay ties in rank and rank_many alike (GEMM rows are rounded by
    their position in the product)."""
    key = np.concatenate([pair_user[:, None], item_rows[:, None], *(c for c in columns if c is not None)], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    if first.size == key.shape[0]:
        return None, None
    order = np.argsort(first)
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    return first[order], position[inverse.reshape(-1)]


class ItemCatalog:
    """Item id -> text of a scorer folder (its `ids.json`)."""

    def __init__(self, vocabulary: VocabularyFile, source: str) -> None:
        self.vocabulary, self.source = vocabulary, source

    @classmethod
    def open(cls, scorer_folder: str | Path) -> ItemCatalog:
        """The catalog of `scorer_folder`; InputError when it has none (a scorer saved by `save_pretrained`
        alone, not by `bahe train`) or the file is damaged."""
        path = Path(scorer_folder) / FILE_NAME
        try:
            return cls(VocabularyFile.read(path), str(path))
        except FileNotFoundError:
            raise InputError(f"{scorer_folder}: no item catalog ({FILE_NAME}); it is written by `bahe train`, so "
                             "score this scorer by item texts") from None
        except IdError as err:
            raise InputError(str(err)) from None

    def __len__(self) -> int:
        return len(self.vocabulary.items)

    def texts(self, item_ids: Sequence[object], name: str = "item_ids") -> list[str]:
        """The texts of `item_ids` (str or int each); InputError naming `name[i]` for a value that is not an id
        or an id the catalog does not hold."""
        texts = self.vocabulary.item_texts
        return [texts[number] for number in self.numbers(item_ids, name)]

    def numbers(self, item_ids: Sequence[object], name: str = "item_ids") -> np.ndarray:
        """(K,) int64 numbers of `item_ids` in the vocabulary (their index in `vocabulary.item_texts`), checked
        as `texts` checks them: the id-keyed path's one dict lookup per id, no text touched."""
        if isinstance(item_ids, (str, bytes)) or not isinstance(item_ids, (Sequence, np.ndarray)):
            raise InputError(f"{name} must be a list of item ids, got {type(item_ids).__name__}")
        try:  # a str is its own key (a blank one is in no vocabulary): id_key only for the other types
            numbers = self.vocabulary.items.numbers([v if type(v) is str else id_key(v) for v in item_ids])
        except IdError:
            numbers = None
        if numbers is None or (numbers < 0).any():
            for i, value in enumerate(item_ids):
                self.text(value, f"{name}[{i}]")  # raises at the first value that is not an id or not held
        return numbers

    def text(self, item_id: object, where: str = "item_id") -> str:
        """The text of one item id; InputError starting with `where` for a non-id or an id not held."""
        try:
            key = id_key(item_id)
        except IdError as err:
            raise InputError(f"{where}: {err}") from None
        text = self.vocabulary.text_of(key)
        if text is None:
            raise InputError(f"{where}: item id {key!r} is not in the catalog {self.source} ({len(self)} items)")
        return text

    def features_of_numbers(self, numbers: np.ndarray, names: Sequence[str]) -> list[dict | None] | None:
        """The catalog's features among `names` of the items numbered `numbers` (`numbers`' result), one dict or
        None each; None when no item has any - at once, with no per-item work, when the catalog stores none of
        `names` (the id-keyed rank's common case)."""
        columns = {n: v for n, v in self.vocabulary.item_features.items() if n in names}
        if not columns:
            return None
        out = [{n: v[k] for n, v in columns.items() if v[k] is not None} or None for k in numbers.tolist()]
        return out if any(f is not None for f in out) else None

    def with_features(self, item_ids: Sequence[object], side_features: object, names: Sequence[str]) -> object:
        """`side_features` (None or one dict or None per item) with each item's catalog features filled in
        where the caller gave none (an item id of None: an item given by text, left as it is); anything else
        is returned as it came, for `score` to refuse. InputError naming item_ids[i] for an id not held."""
        if side_features is None:
            side_features = [None] * len(item_ids)
        if not isinstance(side_features, (list, tuple)) or len(side_features) != len(item_ids):
            return side_features
        held = [i for i, item_id in enumerate(item_ids) if item_id is not None]
        known: list[dict | None] = [None] * len(item_ids)
        found = self.features_of_numbers(self.numbers([item_ids[i] for i in held]), names) if held else None
        for i, features in zip(held, found or ()):
            known[i] = features
        return [{**(k or {}), **given} if isinstance(given, dict) else given if given is not None else k
                for k, given in zip(known, side_features)]


def score_items(scorer, catalog: ItemCatalog, users: Sequence[dict], item_ids: Sequence[object],
                **options) -> np.ndarray:
    """`scorer.score(users, texts of item_ids, **options)`: (B,) float32 click probabilities. The items'
    categorical features stored in the catalog (a training catalog's cat_ columns) fill `side_features`
    where the caller left them out."""
    texts = catalog.texts(item_ids, "items")
    names = scorer.config.model.categorical_features
    options["side_features"] = catalog.with_features(item_ids, options.get("side_features"), names)
    return scorer.score(users, texts, **options)


def rank_items(scorer, catalog: ItemCatalog, user: dict, candidate_ids: Sequence[object], *,
               top_k: int | None = None, **options) -> Ranking:
    """`scorer.rank(user, texts of candidate_ids, top_k=top_k, **options)`: a Ranking in candidate order. Each
    candidate's categorical features stored in the catalog go to `rank` as its `candidate_features` (the
    user's `side_features` win where they name the same feature), so a ranking by id scores as the same request
    carrying the items' texts and features."""
    numbers = catalog.numbers(candidate_ids, "candidates")
    if "candidate_features" not in options:
        options["candidate_features"] = catalog.features_of_numbers(numbers,
                                                                   scorer.config.model.categorical_features)
    texts = catalog.vocabulary.item_texts
    return scorer.rank(user, [texts[k] for k in numbers.tolist()], top_k=top_k, **options)
