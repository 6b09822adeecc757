"""User-facing errors: each names the culprit (file, key, value) and the fix."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config key or value that is not valid."""


def did_you_mean(value: str, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
