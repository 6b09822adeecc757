"""The data layer's user-facing errors; each message names the file or subject and the fix."""

from __future__ import annotations

from data.common import UserError


class DatasetError(UserError, ValueError):
    """A dataset or subject that cannot be used, naming the file or subject and the fix."""


class ManifestError(DatasetError):
    """A checksum manifest that cannot be parsed (a line that is not ``<sha256>  <path>``)."""
