"""Issue-17 item 6 on a GPU: run one config twice in the default fast mode and twice with
``--deterministic``, through the CLI (one process per run, as a user runs it), and report
whether states and images are bit-identical, the largest pixel difference, the per-metric
differences between the two fast runs, whether `subjectbench compare` passes the fast rerun at
its default tolerance, and what deterministic kernels cost (prepare seconds, seconds per image).

CPU check: ``python benchmarks/gpu_determinism.py --backbone tiny --resolution 64 --steps 2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import environment  # noqa: E402
from benchmark.results import load_records  # noqa: E402
from benchmark.store import Store  # noqa: E402


def overrides(args) -> list[str]:
    return [
        f"backbone={args.backbone}", f"protocol.resolution={args.resolution}", "subjects=dog",
        "protocol.prompts=[0,1]", "protocol.images_per_prompt=2", "protocol.prior_images=0",
        "protocol.sampler.steps=50", "protocol.sampler.guidance=7.5",
        "methods=textual_inversion,dreambooth",
        f"methods.textual_inversion.steps={args.steps}", "methods.textual_inversion.learning_rate=5.0e-3",
        f"methods.dreambooth.steps={args.steps}", "methods.dreambooth.learning_rate=5.0e-6",
        "methods.dreambooth.class_images=2", "methods.dreambooth.checkpoint_steps=[]",
        "metrics.weights=random", "metrics.names=[clip_t,clip_i,dino]",
    ]


def run(run_dir: Path, args, deterministic: bool) -> float:
    command = [sys.executable, "-m", "benchmark", "run", *overrides(args), "--out", str(run_dir), "--quiet", "--no-report"]
    if deterministic:
        command.append("--deterministic")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def state_hashes(run_dir: Path) -> dict[str, str]:
    """trainer/subject/file -> sha256 (the key folder left out: fast and deterministic keys differ)."""
    out = {}
    for path in sorted((run_dir / "states").rglob("*.safetensors")):
        trainer, subject, _key, *rest = path.relative_to(run_dir / "states").parts
        out["/".join([trainer, subject, *rest])] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def images(run_dir: Path) -> dict[tuple, np.ndarray]:
    records = load_records(Store(run_dir))
    out = {}
    for row in records.itertuples():
        path = run_dir / "images" / row.label / row.subject / f"{row.key}.png"
        out[(row.label, row.template, row.k)] = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return out


def costs(run_dir: Path) -> dict:
    records = load_records(Store(run_dir))
    out = {}
    for label, rows in records.groupby("label"):
        done = json.loads((next((run_dir / "states" / label).rglob("DONE"))).read_text())
        out[label] = {"prepare_seconds": done["seconds"], "seconds_per_image": float(rows["seconds"].mean())}
    return out


def scores(run_dir: Path):
    from reports.rundata import read_run

    long = read_run(run_dir).long
    return long.set_index(["method", "template", "k", "metric"])["value"]


def pair(a: Path, b: Path) -> dict:
    ha, hb = state_hashes(a), state_hashes(b)
    ia, ib = images(a), images(b)
    diffs = {key: int(np.abs(ia[key] - ib[key]).max()) for key in ia}
    sa, sb = scores(a), scores(b)
    delta = (sb - sa).groupby(level="metric").agg(lambda d: float(np.abs(d).max()))
    mean_delta = (sb - sa).groupby(level="metric").mean()
    return {
        "states_identical": ha == hb,
        "state_files": len(ha),
        "images_identical": sum(d == 0 for d in diffs.values()),
        "images": len(diffs),
        "max_pixel_difference": max(diffs.values()),
        "metric_max_abs_difference": delta.to_dict(),
        "metric_mean_difference": mean_delta.to_dict(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-det-"))
    walls = {}
    for name, deterministic in (("fast_a", False), ("fast_b", False), ("det_a", True), ("det_b", True)):
        walls[name] = run(work / name, args, deterministic)
        print(name, f"{walls[name]:.1f} s", flush=True)
    from reports.compare import compare_runs

    comparison = compare_runs(work / "fast_a", work / "fast_b")
    figures = {
        "device": environment.device_name(environment.resolve_device("auto")),
        "packages": environment.package_versions(),
        "overrides": overrides(args),
        "wall_seconds": walls,
        "fast_rerun": pair(work / "fast_a", work / "fast_b"),
        "deterministic_rerun": pair(work / "det_a", work / "det_b"),
        "fast_vs_deterministic": pair(work / "fast_a", work / "det_a"),
        "compare_fast_rerun": {
            "exit_code": comparison.exit_code,
            "verdicts": comparison.rows[["entry", "metric", "delta", "ci_low", "ci_high", "verdict"]].to_dict("records"),
        },
        "costs": {name: costs(work / name) for name in walls},
        "note": "the first run also generates the shared class-prior images (cached for the others)",
    }
    text = json.dumps(figures, indent=1, default=str)
    print(text)
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_determinism.json")
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
