"""The checks every text passes before it is encoded or scored - a list of texts, not a bare str; visible
content - and `InputError`, the error that names a malformed user, item or text. They sit in the encoding room,
below both the encoder (which refuses such texts at table build and append) and the scorer (which refuses them in
requests), so neither reaches up into the other."""
from __future__ import annotations

import re
from collections.abc import Sequence


class InputError(ValueError):
    """Users or items passed to `score` are malformed; the message names the offending field."""


# Characters that show nothing: whitespace, controls (Cc) and Unicode's Default_Ignorable_Code_Point set (zero-width
# space and joiners, BOM, bidi marks, soft hyphen, variation selectors, Hangul fillers, tag characters).
_INVISIBLE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f"
                        r"\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
                        r"\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]*")


def has_no_visible_content(text: str) -> bool:
    return _INVISIBLE.fullmatch(text) is not None


def check_visible(text: object) -> None:
    """ValueError for a str with no visible content (only whitespace, control characters or the invisible
    ones above), which a table would store as a distinct but meaningless text. Other values pass (the
    table's checks name them)."""
    if isinstance(text, str) and _INVISIBLE.fullmatch(text):
        raise ValueError(f"text has no visible content (only whitespace, control or zero-width characters): "
                         f"{text!r}")


def text_list(texts: object, what: str) -> list:
    """`texts` as a list; TypeError for a bare str or bytes (it would be read as its characters) or a value
    that is not a list, tuple or other sequence."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{what} must be a list of texts, got a bare {type(texts).__name__} {texts[:40]!r}; "
                        f"wrap it in a list: [{texts[:40]!r}]")
    if not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a list of texts, got {type(texts).__name__}")
    return list(texts)
