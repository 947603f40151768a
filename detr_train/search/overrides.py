"""Write values back as Hydra command-line overrides, so that a job sees exactly the value sampled."""

from __future__ import annotations

import re
from typing import Any

# Hydra's quoted strings only treat a backslash specially before a quote (or before the
# closing quote), so those backslashes are doubled and the quotes escaped.
_BACKSLASHES_BEFORE_QUOTE = re.compile(r"(\\*)'")
_TRAILING_BACKSLASHES = re.compile(r"(\\+)$")


def quote(text: str) -> str:
    """`text` as a single-quoted Hydra string that parses back to exactly `text`."""
    escaped = _BACKSLASHES_BEFORE_QUOTE.sub(lambda m: m.group(1) * 2 + "\\'", text)
    escaped = _TRAILING_BACKSLASHES.sub(lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def format_value(value: Any) -> str:
    """A Python scalar in Hydra's override grammar.

    Strings are always quoted: an unquoted `1e-3` or `true` would come back as a number
    or a bool. Floats use repr, which round-trips exactly.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a Hydra override value")


def override(key: str, value: Any) -> str:
    """`key=value` with the value in Hydra's grammar."""
    return f"{key}={format_value(value)}"
