"""User-facing errors of the harness; the definitions live in ``data.common`` (the floor of the
import graph) and are re-exported here for existing imports."""

from __future__ import annotations

from data.common import ConfigError, UserError, did_you_mean

__all__ = ["ConfigError", "UserError", "did_you_mean"]
