"""Shared test setup: offline hub, temp caches, the real DreamBooth copy beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASET = Path(
    os.environ.get("SUBJECTBENCH_TEST_DATASET", REPO_ROOT.parent / "shared" / "datasets" / "dreambooth")
)


@pytest.fixture(scope="session")
def dreambooth_dir() -> Path:
    """The real DreamBooth dataset (CC-BY 4.0) that lies beside the checkout."""
    if not (SHARED_DATASET / "SHA256SUMS").is_file():
        pytest.skip(f"real DreamBooth copy not found at {SHARED_DATASET} (set SUBJECTBENCH_TEST_DATASET)")
    return SHARED_DATASET


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """Caches (tokenizer files, class images, embeddings) go to a per-session temp folder."""
    if "SUBJECTBENCH_CACHE" not in os.environ:
        os.environ["SUBJECTBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models lose nothing on one BLAS thread, and two oversubscribe a shared 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dog():
    """The bundled mini set's live subject."""
    from data.subjects import load_subjects

    return load_subjects("mini", subjects=["dog"])[0]
