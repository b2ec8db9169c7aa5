"""Input parsing for `BAHEScorer.score`: users and items checked and cut to the model's limits, and the
first malformed text located for the error (`users[u]['name'] behavior j: ...` or `items[i]: ...`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from engine.config import ScorerConfig
from weights.table import BehaviorTable, TableError
from weights.text_key import normalize_text


class InputError(ValueError):
    """Users or items passed to `score` are malformed; the message names the offending field."""


def parse_users(users: object, config: ScorerConfig) -> list[list[list[str]]]:
    """users -> per user, per sequence name (config order), the most recent max_behaviors texts."""
    if not isinstance(users, (list, tuple)):
        raise InputError(f"users must be a list of dicts, got {type(users).__name__}")
    names, limit = config.model.sequence_names, config.model.max_behaviors
    known = set(names)
    parsed = []
    for i, user in enumerate(users):
        if not isinstance(user, dict):
            raise InputError(f"users[{i}] must be a dict of sequence name -> list of behavior texts, got "
                             f"{type(user).__name__}")
        extra = set(user) - known
        if extra and config.scoring.unknown_sequence == "error":
            raise InputError(f"users[{i}] has unknown sequence name(s) {sorted(map(str, extra))}; expected "
                             f"{list(names)} (set scoring.unknown_sequence='ignore' to skip them)")
        row = []
        for name in names:
            seq = user.get(name, ())
            if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)):
                raise InputError(f"users[{i}][{name!r}] must be a list of behavior texts, got {type(seq).__name__}")
            row.append(list(seq[-limit:]))
        parsed.append(row)
    return parsed


def parse_history_counts(history_counts: object, users: Sequence[dict], names: tuple[str, ...]) -> np.ndarray:
    """(U, n) int64 past-event counts per user and sequence, the count features' input: the length of each
    sequence passed, or, where `history_counts[u][name]` is given, that total (a caller that sends only the
    most recent behaviors states how many the user has in all). Call after `parse_users`."""
    given = np.array([[len(user.get(name, ())) for name in names] for user in users], dtype=np.int64)
    given = given.reshape(len(users), len(names))
    if history_counts is None:
        return given
    if not isinstance(history_counts, (list, tuple)) or len(history_counts) != len(users):
        raise InputError(f"history_counts must be a list with one dict (or None) per user ({len(users)}), got "
                         f"{type(history_counts).__name__}"
                         f"{f' of {len(history_counts)}' if isinstance(history_counts, (list, tuple)) else ''}")
    for u, counts in enumerate(history_counts):
        if counts is None:
            continue
        if not isinstance(counts, dict):
            raise InputError(f"history_counts[{u}] must be a dict of sequence name -> count, got {type(counts).__name__}")
        unknown = set(counts) - set(names)
        if unknown:
            raise InputError(f"history_counts[{u}] has unknown sequence name(s) {sorted(map(str, unknown))}; "
                             f"expected some of {list(names)}")
        for s, name in enumerate(names):
            if name not in counts:
                continue
            value = counts[name]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"history_counts[{u}][{name!r}] must be an int, got {type(value).__name__}")
            if value < given[u, s] or value > np.iinfo(np.int64).max:
                raise InputError(f"history_counts[{u}][{name!r}] is {value}, but users[{u}][{name!r}] holds "
                                 f"{given[u, s]} behaviors: the total cannot be smaller")
            given[u, s] = value
    return given


def parse_items(items: object, num_users: int) -> list[str]:
    if not isinstance(items, (list, tuple)):
        raise InputError(f"items must be a list of item texts, got {type(items).__name__}")
    if len(items) != num_users:
        raise InputError(f"items has {len(items)} entries but users has {num_users}: one item per user")
    return list(items)


def lookup_texts(table: BehaviorTable, texts: list[str], what: str, lengths: np.ndarray | None = None,
                 names: Sequence[str] = (), users: Sequence[int] | None = None,
                 label: Callable[[int], str] | None = None) -> np.ndarray:
    """table.lookup(texts, on_missing='mark'); a malformed text is an InputError that locates it (see
    `locate_bad_text`); table errors (corrupt file, hash collision) pass through as they are."""
    try:
        return table.lookup(texts, on_missing="mark")
    except TableError:
        raise
    except (TypeError, ValueError) as err:
        located = locate_bad_text(texts, normalize_text, lengths, names, users, label)
        raise InputError(located or f"{what} texts: {err}") from None


def locate_bad_text(texts: list[str], check: Callable[[object], object], lengths: np.ndarray | None = None,
                    names: Sequence[str] = (), users: Sequence[int] | None = None,
                    label: Callable[[int], str] | None = None) -> str | None:
    """'users[u][name] behavior j: <why>' (or 'items[i]: <why>', `label(i)` if given) for the first text `check`
    refuses. Item texts: lengths None. Behavior texts: user-major, sequence s of user u holds lengths[u*S+s]
    texts, S = len(names) in config order; `users[u]` is the caller's index of user u (repeated users
    scored once), u itself if None."""
    for i, text in enumerate(texts):
        try:
            check(text)
        except (TypeError, ValueError) as bad:
            if lengths is None:
                return f"{label(i) if label else f'items[{i}]'}: {bad}"
            seq_index = int(np.searchsorted(np.cumsum(lengths), i, side="right"))
            user, seq = divmod(seq_index, len(names))
            user = users[user] if users is not None else user
            position = i - int(np.sum(lengths[:seq_index]))
            return f"users[{user}][{names[seq]!r}] behavior {position} (after truncation to the most recent): {bad}"
    return None
