"""Hugging Face hub reachability; defined in ``data.common`` (imported by every package) and
re-exported here for existing imports."""

from __future__ import annotations

from data.common import HUB_PROBE_TIMEOUT_S, hub_endpoint, hub_offline_requested, hub_reachable

__all__ = ["HUB_PROBE_TIMEOUT_S", "hub_endpoint", "hub_offline_requested", "hub_reachable"]
