"""Hugging Face hub reachability, decided in seconds (an unreachable hub otherwise hangs ~47 s).

Deliberately free of torch/diffusers imports: the data commands call it too.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> tuple[str, int]:
    parsed = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """False at once under HF_HUB_OFFLINE; else a TCP connect to the endpoint, bounded by ``timeout``."""
    if hub_offline_requested():
        return False
    host, port = hub_endpoint()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
