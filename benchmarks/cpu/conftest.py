"""CPU benchmarks run offline, with caches in a temporary folder (as the tests do)."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    if "SUBJECTBENCH_CACHE" not in os.environ:
        os.environ["SUBJECTBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
