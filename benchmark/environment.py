"""What a manifest row records about where it ran: code version, packages, device, memory."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PACKAGES = (
    "torch", "diffusers", "transformers", "peft", "accelerate", "open_clip_torch", "timm",
    "lpips", "numpy", "pillow", "safetensors",
)


@lru_cache(maxsize=1)
def git_hash() -> str:
    """The commit of the subjectbench checkout (with '+dirty' for local changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from benchmark.errors import ConfigError

        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    if requested == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return requested


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak CUDA memory since the last reset (GPU) and the process's peak RSS (always)."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out


def free_cuda_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def configure_cpu_threads(processes: int = 1) -> int:
    """Size this process's torch thread pools to its share of the available cores.

    The rule (docs/architecture.md): ``processes`` workers x intra-op threads <= the cores this
    process may use (affinity and cgroup quota, ``data.common.available_cores``); one inter-op
    thread, since nothing here runs independent ops in parallel. Oversubscribed OpenMP threads
    spin against each other and against any other program on the machine. Returns the thread count.
    """
    import os

    from data.common import threads_per_process

    # Only ever lowered: a smaller count set by the user (OMP_NUM_THREADS, torch.set_num_threads)
    # stays.
    threads = min(threads_per_process(processes), torch.get_num_threads())
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        threads = min(threads, int(explicit))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process: keep it
        pass
    return threads


CUBLAS_WORKSPACE = ":4096:8"


def apply_determinism(enabled: bool) -> None:
    """Deterministic kernels for bit-reproducible runs (``deterministic: true`` / ``--deterministic``).

    What it sets, and why each is needed on a GPU:
    - ``torch.use_deterministic_algorithms(True)``: every op takes its deterministic kernel, or
      raises instead of silently varying (scatter-add, index_put, some attention backwards);
    - ``CUBLAS_WORKSPACE_CONFIG=:4096:8``: cuBLAS needs a fixed workspace for reproducible
      reductions (set before the first cuBLAS call of the process; a worker sets it on start);
    - cuDNN deterministic and not benchmarking (the VAE's convolutions otherwise pick kernels by
      timing, run to run).
    Seeds are already fixed by the protocol; this removes the kernels' own nondeterminism. The
    cost is measured in ``benchmarks/gpu_determinism.py``. On a CPU, runs are reproducible either way.
    """
    import os

    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False
