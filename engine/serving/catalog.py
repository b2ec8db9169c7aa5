"""Score and rank by item id: the item ids a scorer was trained on (the `ids.json` vocabulary `bahe train`
keeps in the scorer folder: weights.id_vocabulary) mapped to their texts, then the scorer's own `score` and
`rank`, so a request need not carry a thousand texts. Ids follow the key rule (17 and "17" are one item).

The catalog is read once, when opened: a later `bahe train` into the same folder extends the file
(append-only) and a catalog opened again sees the new items; one already open keeps answering from its copy."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.serving.inputs import InputError
from engine.serving.ranking import Ranking
from weights.id_vocabulary import FILE_NAME, IdError, VocabularyFile, id_key


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
        if isinstance(item_ids, (str, bytes)) or not isinstance(item_ids, (Sequence, np.ndarray)):
            raise InputError(f"{name} must be a list of item ids, got {type(item_ids).__name__}")
        return [self.text(value, f"{name}[{i}]") for i, value in enumerate(item_ids)]

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


    def features(self, item_id: object, names: Sequence[str]) -> dict[str, str]:
        """The catalog's categorical features of `item_id` among `names` (those a model was trained with)."""
        return {k: v for k, v in self.vocabulary.features_of(id_key(item_id)).items() if k in names}

    def with_features(self, item_ids: Sequence[object], side_features: object, names: Sequence[str]) -> object:
        """`side_features` (None or one dict or None per item) with each item's catalog features filled in
        where the caller gave none (an item id of None: an item given by text, left as it is); anything else
        is returned as it came, for `score` to refuse."""
        if side_features is None:
            side_features = [None] * len(item_ids)
        if not isinstance(side_features, (list, tuple)) or len(side_features) != len(item_ids):
            return side_features
        filled = []
        for item_id, given in zip(item_ids, side_features):
            known = {} if item_id is None else self.features(item_id, names)  # None: an item given by text
            filled.append({**known, **given} if isinstance(given, dict) else given if given is not None else
                          known or None)
        return filled


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
    """`scorer.rank(user, texts of candidate_ids, top_k=top_k, **options)`: a Ranking in candidate order."""
    return scorer.rank(user, catalog.texts(candidate_ids, "candidates"), top_k=top_k, **options)
