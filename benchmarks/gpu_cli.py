"""Issue-5 GPU figures through the same path as `subjectbench run`: TI and DreamBooth on one
subject at 512 px (100 training steps each) on `sd15-random`, then 2 prompts x 4 images at 50
DDIM steps, guidance 7.5; scored with random-init metric backbones (no hub here).

Reads the figures back from the store (state.json training summaries, DONE info, image records)
and writes them as JSON with the device named. CPU check:
``python benchmarks/gpu_cli.py --backbone tiny --resolution 64 --steps 3 --out /tmp/f.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import environment  # noqa: E402
from benchmark.config import load_config  # noqa: E402
from benchmark.driver import run_benchmark  # noqa: E402
from benchmark.results import load_records  # noqa: E402
from benchmark.store import Store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="gpu-cli-"))
    overrides = [
        f"backbone={args.backbone}",
        f"protocol.resolution={args.resolution}",
        "subjects=dog",
        "protocol.prompts=[0,1]",
        "protocol.images_per_prompt=4",
        "protocol.prior_images=0",
        "protocol.sampler.steps=50",
        "protocol.sampler.guidance=7.5",
        "methods=textual_inversion,dreambooth",
        f"methods.textual_inversion.steps={args.steps}",
        "methods.textual_inversion.learning_rate=5.0e-3",
        f"methods.dreambooth.steps={args.steps}",
        "methods.dreambooth.learning_rate=5.0e-6",
        f"methods.dreambooth.class_images={args.class_images}",
        "methods.dreambooth.class_image_steps=50",
        "methods.dreambooth.checkpoint_steps=[]",
        f"generation.batch_size={args.batch_size}",
        "metrics.weights=random",
        "metrics.names=[clip_t,clip_i,dino]",
    ]
    config = load_config("default", overrides)
    started = time.perf_counter()
    summary = run_benchmark(config, run_dir, quiet=True)
    wall = time.perf_counter() - started
    store = Store(run_dir)
    records = load_records(store)
    figures = {
        "device": environment.device_name(environment.resolve_device("auto")),
        "packages": environment.package_versions(),
        "overrides": overrides,
        "wall_seconds_total": wall,
        "failures": [f["message"] for f in summary.failed],
        "methods": {},
    }
    for label, rows in records.groupby("label"):
        key = rows["prepare_key"].iloc[0]
        state_dir = store.state_dir(label, "dog", key)
        training = json.loads((state_dir / "state.json").read_text())["training"]
        done = json.loads((state_dir / "DONE").read_text())
        figures["methods"][label] = {
            "training": training,
            "prepare_seconds_total": done["seconds"],
            "prepare_peak_cuda_mb": done.get("peak_cuda_mb"),
            "images": int(len(rows)),
            "seconds_per_image": float(rows["seconds"].mean()),
            "generate_peak_cuda_mb": float(rows["peak_cuda_mb"].max()) if "peak_cuda_mb" in rows else None,
            "state_mb": sum(p.stat().st_size for p in state_dir.rglob("*") if p.is_file()) / 2**20,
        }
    text = json.dumps(figures, indent=1, default=str)
    print(text)
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_cli.json")
    out.write_text(text)
    return summary.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
