"""Helpers shared by tests: run the CLI in a subprocess, snapshot a run directory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {
    "seconds", "time", "peak_rss_mb", "peak_cuda_mb", "device", "git", "packages",
    # wall-clock fields of the training summaries methods keep in state.json
    "seconds_per_step", "checkpoint_seconds", "peak_memory_bytes",
    # how the training was run: resumed after an interruption, time spent saving resume points
    "resumed_from_step", "resume_point_seconds",
}


def without_volatile(value):
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark", *args]


def run_cli(*args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cli_command(*args), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"CLI {args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def snapshot(run_dir: Path) -> dict:
    """Everything a run produced that must not depend on how it was run: image bytes, the
    records without timing/host fields, the published states, and the scores."""
    out: dict[str, object] = {}
    for path in sorted((run_dir / "images").rglob("*.png")):
        out[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in sorted((run_dir / "images").rglob("*.json")):
        record = json.loads(path.read_text())
        out[str(path.relative_to(run_dir))] = without_volatile(record)
    for path in sorted((run_dir / "states").rglob("*")):
        if not path.is_file() or path.name == "DONE":
            continue
        if path.suffix == ".json":
            out[str(path.relative_to(run_dir))] = without_volatile(json.loads(path.read_text()))
        else:
            out[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    scores = run_dir / "scores"
    if scores.exists():
        from benchmark.results import load_scores
        from benchmark.store import Store

        frame = load_scores(Store(run_dir)).sort_values(["metric", "key"])
        out["scores"] = [(m, k, round(float(v), 9)) for m, k, v in zip(frame["metric"], frame["key"], frame["value"])]
    return out


def leftovers(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob(".tmp-*")]


def descendant_processes(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of process ``root`` (read from /proc; Linux):
    how tests and benchmarks find the worker processes a run started, to kill one."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = commands[pid]
                frontier.append(pid)
    return found


def assert_same_scores(run_a: Path, run_b: Path, metrics) -> None:
    """Each metric's stored values of two run directories are identical, image for image (NaN
    equal to NaN), and there are some."""
    import numpy as np
    import pandas as pd

    from benchmark.results import read_score_parts

    for name in metrics:
        a, b = (pd.concat(read_score_parts(p) for p in (run / "scores" / name).iterdir()) for run in (run_a, run_b))
        merged = a.merge(b, on="image_key", suffixes=("", "_b"))
        assert len(merged) == len(a) == len(b) > 0, name
        assert np.array_equal(merged["value"].to_numpy(), merged["value_b"].to_numpy(), equal_nan=True), name
