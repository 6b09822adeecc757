"""The sweep and single-image suites end to end on a GPU, at reduced scale, through the run path.

Each suite runs through ``run_benchmark`` (prepare -> generate -> score) and ``build_report`` on
``sd15-random`` at 512 px with random metric weights, on one bundled mini subject and one prompt,
with training steps cut so that all four fit in a few minutes. The suites' own grids stay (the
guidance grid, DreamBlend's underfit x overfit x weight cells, the single-image choice), so the
figures that matter here are structural: exit code, trainings planned vs on disk (shared
trainings), images, failures, report files. Prints each suite's line as it finishes.

CPU check: ``python benchmarks/gpu_suites.py --backbone tiny --resolution 64 --sampling-steps 4``.
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
from benchmark.units import expand, method_context  # noqa: E402

DB = {"steps": 20, "learning_rate": 1e-5, "class_images": 2, "class_image_steps": 10}


def suite_overrides(suite: str) -> list[str]:
    def method(name, params):
        out = []
        for key, value in params.items():
            value = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else value
            out.append(f"methods.{name}.{key}={value}")
        return out

    if suite == "dreambooth_sweep":
        return method("dreambooth", {**DB, "checkpoint_steps": [5, 10]})
    if suite == "custom_diffusion_sweep":
        return method("custom_diffusion", {"steps": 20, "class_images": 2, "class_image_steps": 10, "checkpoint_steps": [10]})
    if suite == "dreamblend_pareto":
        shared = {**DB, "checkpoint_steps": [2, 5, 10]}
        return [*method("dreambooth", shared), *method("dreamblend", shared),
                "methods.dreamblend.underfit_step=[2,5]", "methods.dreamblend.overfit_step=[10,20]",
                "methods.dreamblend.guidance_weight=[0.1]",
                *method("custom_diffusion", {"steps": 20, "class_images": 2, "class_image_steps": 10, "checkpoint_steps": [10]})]
    if suite == "single_image":
        return [*method("textual_inversion", {"steps": 20, "learning_rate": 5e-3}), *method("dreambooth", DB),
                *method("dreambooth_lora", {**DB, "learning_rate": 1e-4}),
                *method("two_stage", {"stage1_steps": 10, "steps": 10, "stage1_learning_rate": 1e-5,
                                      "learning_rate": 1e-5, "class_images": 2, "class_image_steps": 10})]
    raise ValueError(suite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--suites", default="dreambooth_sweep,custom_diffusion_sweep,dreamblend_pareto,single_image")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_suites.json"))
    args = parser.parse_args(argv)
    from reports.build import build_report

    results = {"device": environment.device_name(environment.resolve_device("auto")),
               "packages": environment.package_versions(), "suites": {}}
    for suite in args.suites.split(","):
        overrides = [
            f"backbone={args.backbone}", f"protocol.resolution={args.resolution}", "dataset.source=mini",
            "subjects=dog", "protocol.prompts=[0]", "protocol.prior_images=1",
            f"protocol.sampler.steps={args.sampling_steps}", "metrics.weights=random",
            *suite_overrides(suite),
        ]
        config = load_config(suite, overrides)
        device = environment.resolve_device(config.device)
        plan = expand(config, method_context(config, device, environment.resolve_dtype(config.dtype, device)))
        run_dir = Path(tempfile.mkdtemp(prefix=f"suite-{suite}-"))
        started = time.perf_counter()
        summary = run_benchmark(config, run_dir, quiet=True)
        run_seconds = time.perf_counter() - started
        report = build_report(run_dir)
        line = {
            "exit_code": summary.exit_code, "cells": len(plan.cells), "trainings_planned": len(plan.groups),
            "trainings_on_disk": len(list((run_dir / "states").glob("*/*/*/DONE"))),
            "images": summary.done, "scores": summary.scored,
            "failures": [f"{f.get('stage')}: {f.get('message')}" for f in summary.failed][:5],
            "seconds": round(run_seconds, 1),
            "report_files": sorted(p.name for p in Path(report).parent.iterdir()) if report else None,
            "overrides": overrides,
        }
        results["suites"][suite] = line
        print(suite, json.dumps({k: v for k, v in line.items() if k not in ("overrides", "report_files")}), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return max(s["exit_code"] for s in results["suites"].values())


if __name__ == "__main__":
    raise SystemExit(main())
