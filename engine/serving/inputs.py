"""Input parsing for `BAHEScorer.score`: users and items checked and cut to the model's limits, and the
first malformed text located for the error (`users[u]['name'] behavior j: ...` or `items[i]: ...`); the
`bahe score` request lines (`read_requests`). The text checks every text passes (and `InputError`) live in
engine.encoding.text_checks, below both the encoder and the scorer; they are imported here for the scorer's use."""
from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from engine.config import ScorerConfig
from engine.encoding.text_checks import InputError, check_visible, has_no_visible_content, text_list
from weights.table import BehaviorTable, TableError
from weights.text_key import normalize_text


def parse_users(users: object, config: ScorerConfig) -> list[list[list[str]]]:
    """users -> per user, per sequence name (config order), the list of texts as passed (whole histories:
    counts and recent events read them; `read_windows` cuts what the upper layers read)."""
    if not isinstance(users, (list, tuple)):
        raise InputError(f"users must be a list of dicts, got {type(users).__name__}")
    return [user_sequences(user, config, f"users[{i}]") for i, user in enumerate(users)]


def user_sequences(user: object, config: ScorerConfig, what: str, texts: str = "behavior texts") -> list[list]:
    """One dict of sequence name -> list of `texts` (`what` names it in errors) -> its lists in config order
    (names left out: empty); InputError for a non-dict, an unknown name (unless scoring.unknown_sequence is
    'ignore') or a sequence that is not a list."""
    names = config.model.sequence_names
    if not isinstance(user, dict):
        raise InputError(f"{what} must be a dict of sequence name -> list of {texts}, got {type(user).__name__}")
    extra = set(user) - set(names)
    if extra and config.scoring.unknown_sequence == "error":
        raise InputError(f"{what} has unknown sequence name(s) {sorted(map(str, extra))}; expected "
                         f"{list(names)} (set scoring.unknown_sequence='ignore' to skip them)")
    out = []
    for name in names:
        seq = user.get(name, ())
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)):
            raise InputError(f"{what}[{name!r}] must be a list of behavior texts, got {type(seq).__name__}")
        out.append(list(seq))
    return out


def read_windows(users: list[list[list]], config: ScorerConfig, originals: Sequence[int]) -> list[list[list]]:
    """Each sequence of each user from its window start on (`ModelConfig.window_start`): at most
    max_behaviors, the most recent, the part the upper layers read. Of the behaviors before it, the last
    recent_events are read by the recent counts, so they must be texts: InputError naming one that is not (the
    lookup checks the window's); older ones are never read. originals[u] is the caller's index of user u."""
    names, model, out = config.model.sequence_names, config.model, []
    recent = model.recent_events if model.count_features else 0
    for u, user in enumerate(users):
        starts = [model.window_start(len(seq)) for seq in user]
        for name, seq, start in zip(names, user, starts):
            read = max(len(seq) - recent, 0)
            bad = next((j for j, text in enumerate(seq[read:start], read) if not isinstance(text, str)), None)
            if bad is not None:
                raise InputError(f"users[{originals[u]}][{name!r}] behavior {bad} (before the window the model "
                                 f"reads): behavior text must be a str, got {type(seq[bad]).__name__}")
        out.append([seq[start:] for seq, start in zip(user, starts)])
    return out


def _keyed_entries(value: object, count: int, names: Sequence[str], what: str, unit: str, mapping: str,
                   unknown_kind: str, expected: str) -> Iterator[tuple[int, dict]]:
    """(i, dict) for each entry of `value`, a list with one dict (or None, skipped) per `unit` whose keys are
    some of `names`; InputError naming `what` (and the entry) otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) != count:
        got = f" of {len(value)}" if isinstance(value, (list, tuple)) else ""
        raise InputError(f"{what} must be a list with one dict (or None) per {unit} ({count}), got "
                         f"{type(value).__name__}{got}")
    for i, entry in enumerate(value):
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise InputError(f"{what}[{i}] must be a dict of {mapping}, got {type(entry).__name__}")
        unknown = set(entry) - set(names)
        if unknown:
            raise InputError(f"{what}[{i}] has unknown {unknown_kind} {sorted(map(str, unknown))}; {expected}")
        yield i, entry


def parse_history_counts(history_counts: object, users: Sequence[dict], names: tuple[str, ...]) -> np.ndarray:
    """(U, n) int64 past-event counts per user and sequence, the count features' input: the length of each
    sequence passed, or, where `history_counts[u][name]` is given, that total (a caller that sends only the
    most recent behaviors states how many the user has in all). Call after `parse_users`."""
    given = np.array([[len(user.get(name, ())) for name in names] for user in users], dtype=np.int64)
    given = given.reshape(len(users), len(names))
    if history_counts is None:
        return given
    for u, counts in _keyed_entries(history_counts, len(users), names, "history_counts", "user",
                                    "sequence name -> count", "sequence name(s)", f"expected some of {list(names)}"):
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
    """table.lookup(texts, on_missing='mark'); a malformed text (not a str, blank, no visible content, a lone
    surrogate) is an InputError that locates it (see `locate_bad_text`); table errors (corrupt file, hash
    collision) pass through as they are."""
    try:
        rows = table.lookup(texts, on_missing="mark")
    except TableError:
        raise
    except (TypeError, ValueError) as err:
        located = locate_bad_text(texts, normalize_text, lengths, names, users, label)
        raise InputError(located or f"{what} texts: {err}") from None
    if any(has_no_visible_content(text) for text in texts):
        raise InputError(locate_bad_text(texts, check_visible, lengths, names, users, label))
    return rows


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
            return f"users[{user}][{names[seq]!r}] behavior {position} of its window: {bad}"
    return None


@dataclass(frozen=True)
class ItemById:
    """A `bahe score` line's item given by id (`"item_id"`), to be looked up in the scorer's catalog."""
    id: object


def read_requests(data: bytes, source: str) -> tuple[list[object], list[object], list[object], list[int]]:
    """`bahe score` input: JSON lines {"user": {...}, "item": "..."[, "side_features": {...}]} -> users, items,
    side features (None where a line has none) and the line number of each (1-based; blank lines are skipped). InputError naming the source and line for bytes that are not
    UTF-8 (a byte order mark included), a line that is not one JSON object (truncated, trailing garbage,
    `null`), or a missing key. The values are checked by `score` (see `at_line` for its errors)."""
    users, items, sides, numbers = [], [], [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{source}: line {number}"
        if raw.startswith(codecs.BOM_UTF8):
            raise InputError(f"{where}: starts with a UTF-8 byte order mark; expected plain UTF-8 JSON lines")
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise InputError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON: {err.msg} at column {err.colno}") from None
        except ValueError as err:  # what the parser itself refuses: an integer of over 4300 digits
            raise InputError(f"{where}: not valid JSON: {str(err).split(';')[0]}") from None
        except RecursionError:
            raise InputError(f"{where}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object {{\"user\": {{...}}, \"item\": \"...\"}}, got "
                             f"{json.dumps(record)[:40]}")
        missing = [key for key in ("user", "item") if key not in record and (key == "user" or "item_id" not in record)]
        if missing:
            raise InputError(f"{where}: missing key(s) {missing}; expected {{\"user\": {{...}}, \"item\": \"...\"}}"
                             " (or \"item_id\" in place of \"item\")")
        if "item" in record and "item_id" in record:
            raise InputError(f"{where}: both \"item\" and \"item_id\"; give one")
        users.append(record["user"])
        items.append(record["item"] if "item" in record else ItemById(record["item_id"]))
        sides.append(record.get("side_features"))
        numbers.append(number)
    return users, items, sides, numbers


def at_line(message: str, numbers: Sequence[int]) -> str:
    """A `score` error about users[i], items[i] or side_features[i] retold for request lines: 'line N: user...',
    'line N: item...', 'line N: side_features...'."""
    found = re.match(r"(users|items|side_features)\[(\d+)\]", message)
    if found is None or int(found.group(2)) >= len(numbers):
        return message
    key = found.group(1) if found.group(1) == "side_features" else found.group(1)[:-1]
    return f"line {numbers[int(found.group(2))]}: {key}{message[found.end():]}"


def parse_side_features(side_features: object, count: int, names: tuple[str, ...], unit: str,
                        what: str = "side_features") -> list[list]:
    """Per categorical feature (in `names` order) the `count` values of `side_features`: None (every value
    unknown) or a list with one dict (or None) per `unit` of feature name -> str, int or None (unknown); a name
    left out is unknown. InputError naming the entry and feature for anything else."""
    columns: list[list] = [[None] * count for _ in names]
    if side_features is None:
        return columns
    for i, features in _keyed_entries(side_features, count, names, what, unit, "feature name -> value",
                                      "feature(s)", f"this model takes {list(names)}"):
        for f, name in enumerate(names):
            value = features.get(name)
            if isinstance(value, bool) or not isinstance(value, (str, int, np.integer, type(None))):
                raise InputError(f"{what}[{i}][{name!r}] must be a str, an int or None, got "
                                 f"{type(value).__name__}")
            columns[f][i] = int(value) if isinstance(value, np.integer) else value
    return columns
