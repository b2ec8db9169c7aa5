"""An item catalog file beside an event log: one row per item (`item_id`, `item_text`, optional `cat_<name>`
columns: the item's categorical features), so events need not repeat the item's text on every row.

`join_catalog` fills the events' `item_text` (and adds the catalog's `cat_` columns) by item id, under the key
rule of `weights.id_vocabulary` (17 and "17" are one item). Refused, naming the file, the line (CSV) or row
(parquet) and the column: a catalog without `item_id`/`item_text`, an item listed twice, an item text that
is missing, blank or of no visible content, an event whose item the catalog lacks, an event `item_text` that
differs from the catalog's, and a `cat_` column in both files."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from engine.serving.inputs import has_no_visible_content
from engine.training.data.log_schema import CATEGORY_PREFIX, LogFormatError, row_places
from weights.id_vocabulary import IdError, id_key

CATALOG_COLUMNS = ("item_id", "item_text")


def _keys(values: pd.Series, where: Callable[[int], str], column: str) -> np.ndarray:
    """(N,) object: the key of each cell (each distinct cell converted once); LogFormatError naming a non-id."""
    codes, uniques = pd.factorize(values.to_numpy(dtype=object), use_na_sentinel=True)
    if (codes < 0).any():
        raise LogFormatError(f"{where(int(np.flatnonzero(codes < 0)[0]))}, column {column!r}: the id is missing")
    keys = np.empty(len(uniques), dtype=object)
    for u, value in enumerate(uniques.tolist()):
        try:
            keys[u] = id_key(value)
        except IdError as err:
            raise LogFormatError(f"{where(int(np.flatnonzero(codes == u)[0]))}, column {column!r}: {err}") from None
    return keys[codes]


def join_catalog(events: pd.DataFrame, events_lines: np.ndarray | None, source: str, catalog: pd.DataFrame,
                 catalog_lines: np.ndarray | None, catalog_source: str) -> pd.DataFrame:
    """`events` with `item_text` and the catalog's `cat_` columns filled from `catalog` by item id."""
    at_catalog, at_event = row_places(catalog_lines), row_places(events_lines)
    missing = [c for c in CATALOG_COLUMNS if c not in catalog.columns]
    if missing:
        raise LogFormatError(f"{catalog_source}: missing column(s) {missing}; an item catalog has "
                             f"{list(CATALOG_COLUMNS)} (+ optional cat_<name>), got {list(catalog.columns)}")
    catalog = catalog.reset_index(drop=True)
    keys = _keys(catalog["item_id"], lambda i: f"{catalog_source}: {at_catalog(i)}", "item_id")
    row_of: dict[str, int] = {}
    for i, key in enumerate(keys.tolist()):
        if key in row_of:
            raise LogFormatError(f"{catalog_source}: {at_catalog(i)}, column 'item_id': item {key!r} is listed twice "
                                 f"(first at {at_catalog(row_of[key])})")
        row_of[key] = i
    texts = catalog["item_text"].tolist()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip() or has_no_visible_content(text):
            what = "missing" if not isinstance(text, str) else "empty" if not text.strip() else "of no visible content"
            raise LogFormatError(f"{catalog_source}: {at_catalog(i)}, column 'item_text': {what} (item_id {keys[i]})")
    events = events.reset_index(drop=True)
    if "item_id" not in events.columns:
        raise LogFormatError(f"{source}: missing column 'item_id'")
    event_keys = _keys(events["item_id"], lambda i: f"{source}: {at_event(i)}", "item_id")
    distinct, inverse = np.unique(event_keys.astype(str), return_inverse=True)
    found = np.array([row_of.get(key, -1) for key in distinct.tolist()], dtype=np.int64)
    rows = found[inverse.reshape(-1)]
    if (rows < 0).any():
        i = int(np.flatnonzero(rows < 0)[0])
        raise LogFormatError(f"{source}: {at_event(i)}, column 'item_id': item {event_keys[i]!r} is not in the "
                             f"catalog {catalog_source}")
    joined = np.array(texts, dtype=object)[rows]
    if "item_text" in events.columns:
        given = events["item_text"].to_numpy(dtype=object)
        differ = np.flatnonzero((given != joined) & pd.notna(given) & (given != ""))
        if differ.size:
            i = int(differ[0])
            raise LogFormatError(f"{source}: {at_event(i)}, column 'item_text': {given[i]!r} differs from the "
                                 f"catalog's text {joined[i]!r} for item {event_keys[i]!r}")
    shared = [c for c in catalog.columns if str(c).startswith(CATEGORY_PREFIX) and c in events.columns]
    if shared:
        raise LogFormatError(f"{source}: column(s) {shared} are in the catalog {catalog_source} too; keep each "
                             "categorical feature in one file")
    extra = {c: catalog[c].to_numpy(dtype=object)[rows] for c in catalog.columns if str(c).startswith(CATEGORY_PREFIX)}
    return events.assign(item_text=joined, **extra)
