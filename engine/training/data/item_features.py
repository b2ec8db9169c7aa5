"""Which categorical features of a log are item-level, for the scorer's `ids.json` (scoring by item id fills them
in): a feature with one known value per item on all its events (as an item catalog's cat_ columns are), and not
one value per user (gender, age: a user's, which a catalog of items must not carry). Read in parts (`add`, one
record batch at a time: memory holds one value per item and per user, not the events), so a log loaded whole and
the same log streamed give the same features."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["ItemLevelFeatures", "item_level_features"]

_CLASH = object()  # two values met


class ItemLevelFeatures:
    """Accumulates, per categorical feature, each item's and each user's value; `result` names the item-level ones."""

    def __init__(self) -> None:
        self._items: dict[str, dict] = {}
        self._users: dict[str, dict] = {}

    def add(self, user: np.ndarray, item: np.ndarray, categorical: dict[str, np.ndarray]) -> None:
        """Events (user, item codes, (N,) object values per feature name: str or None for unknown)."""
        for name, values in categorical.items():
            values = np.asarray(values, dtype=object)
            known = np.flatnonzero(values != None)  # noqa: E711 - object array: elementwise
            by_item, by_user = self._items.setdefault(name, {}), self._users.setdefault(name, {})
            for table, keys in ((by_item, item), (by_user, user)):
                pairs = dict.fromkeys(zip(keys[known].tolist(), values[known].tolist()))
                for key, value in pairs:
                    seen = table.setdefault(key, value)
                    if seen is not _CLASH and seen != value:
                        table[key] = _CLASH

    def result(self, item_key: Callable[[np.ndarray], list[str]]) -> dict[str, dict[str, str]]:
        """name -> item key -> value of the item-level features (`item_key`: item codes -> their ids)."""
        out = {}
        for name, by_item in self._items.items():
            per_user = _CLASH not in self._users[name].values()
            if not by_item or _CLASH in by_item.values() or per_user:
                continue
            codes = np.array(list(by_item), dtype=np.int64)
            out[name] = dict(zip(item_key(codes), by_item.values()))
        return out


def item_level_features(log) -> dict[str, dict[str, str]]:
    """A BehaviorLog's item-level features as name -> item key -> value (what `ids.json` stores)."""
    features = ItemLevelFeatures()
    features.add(log.user, log.item, log.categorical)
    return features.result(log.item_key)
