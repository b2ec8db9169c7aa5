"""A log's user_id and item_id columns -> int64 codes the log computes with, and the exact keys behind them
(`weights.id_vocabulary`: strings and integers alike; 17 and "17" are one id).

A column whose keys are all integers in canonical decimal form within int64 keeps those integers as codes
(integer logs read as before; no key table needed). Any other column - UUIDs, hashes, SKUs, "017", integers
beyond int64 - gets dense codes 0, 1, ... in order of first appearance, and its keys (code c -> keys[c]).
Either way two cells have the same code exactly when they have the same key."""
from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from weights.id_vocabulary import IdError, IdVocabulary, id_key

_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_INT64 = np.iinfo(np.int64)


def id_codes(values: pd.Series, column: str, where: Callable[[int], str], error: type[ValueError],
             vocabulary: IdVocabulary | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """((N,) int64 codes, (K,) object keys by code or None when the codes are the integer ids themselves);
    `error` (LogFormatError) naming the line (`where(i)`) and column of a cell that is not an id. With a
    `vocabulary` (a log read in parts), every id is numbered through it (extending it), integers too."""
    signed_ints = pd.api.types.is_signed_integer_dtype(values.dtype) and not values.isna().any()
    if vocabulary is None and signed_ints:
        return values.to_numpy(dtype=np.int64), None
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    if (codes < 0).any():
        i = int(np.flatnonzero(codes < 0)[0])
        raise error(f"{where(i)}, column {column!r}: the id is missing (empty cell)")
    keys = []
    for u, value in enumerate(uniques.tolist()):
        try:
            keys.append(id_key(value))
        except IdError as err:
            i = int(np.flatnonzero(codes == u)[0])
            raise error(f"{where(i)}, column {column!r}: {err}") from None
    if vocabulary is None and all(_CANONICAL_INT.fullmatch(k) and _INT64.min <= int(k) <= _INT64.max for k in keys):
        return np.array([int(k) for k in keys], dtype=np.int64)[codes], None
    vocabulary = IdVocabulary() if vocabulary is None else vocabulary
    numbers = vocabulary.extend(keys)  # a key can come twice (17 and "17"): same number
    return numbers[codes], np.array(vocabulary.keys, dtype=object)


def keys_of(codes: np.ndarray, keys: np.ndarray | None) -> list[str]:
    """The keys of `codes` (their decimal text when the codes are the ids)."""
    return [str(c) for c in codes.tolist()] if keys is None else keys[codes].tolist()
