"""GPU benchmark of DreamBlend (reconstructed): a 3 x 3 grid for one subject, one training.

On one subject of the bundled mini set (default ``sd15-random`` at 512 px, bf16 on CUDA):

1. **Method level.** One DreamBooth training (``--steps``, checkpoints at the underfit steps);
   then, for each of the 3 x 3 DreamBlend cells (underfit step x guidance weight, overfit =
   the final checkpoint), seconds per guided image after a warm-up call and the peak memory of
   that call, against the overfit checkpoint's unguided DreamBooth sampling of the same prompts
   and seeds. The guidance log (loss at the first and last guided step) shows the guidance acts.
2. **Harness level.** The same grid plus the DreamBooth entry run through ``run_benchmark``
   (no metrics): the trainings planned (``expand``) and the trainings on disk (``DONE`` states),
   both expected to be 1.

Writes one JSON document to ``--out`` (default ``$OUT/gpu_dreamblend.json``) and stdout.
Check it on a CPU with tiny settings:
``python benchmarks/gpu_dreamblend.py --backbone tiny --device cpu --steps 6 --sampling-steps 4``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import (  # noqa: E402
    environment,
    method_parser,
    parse_method_args,
    peak_gib,
    reset_peak,
    timed,
)
from data.subjects import load_subjects  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.base import MethodContext, SamplerConfig  # noqa: E402
from methods.dreamblend import DreamBlend, DreamBlendParams  # noqa: E402
from methods.dreambooth import DreamBooth, DreamBoothParams  # noqa: E402

PROMPTS = ("a sks dog in the jungle", "a sks dog on the beach", "a sks dog in a bucket", "a red sks dog")
WEIGHTS = (0.05, 0.1, 0.2)  # around Pix2Pix-Zero's 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = method_parser(__doc__, "gpu_dreamblend")
    parser.add_argument("--steps", type=int, default=60, help="DreamBooth training steps (overfit = final)")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per generate call (one image each)")
    parser.add_argument("--class-images", type=int, default=2)
    parser.add_argument("--skip-harness", action="store_true", help="only the method-level part")
    args = parse_method_args(parser, argv)
    return args


def underfit_steps(steps: int) -> list[int]:
    """Three early checkpoints, like the paper's 5 of 1000 and our wider sweep."""
    return sorted({max(1, round(steps * fraction)) for fraction in (0.05, 0.1, 0.25)})


def training_params(args) -> dict:
    # Every training field explicit, for both entries: a field left to a suite's or a class's
    # default could differ between the DreamBooth and DreamBlend entries and split the training.
    return {
        "steps": args.steps,
        "learning_rate": 5e-6,  # paper (irrelevant to the timings)
        "checkpoint_steps": tuple(underfit_steps(args.steps)),
        "class_images": args.class_images,
        "class_image_steps": args.sampling_steps,
        "collapse_prompts": 2,
    }


def bench_method_level(args, context: MethodContext, subject, device: torch.device) -> dict:
    training = training_params(args)
    booth = DreamBooth(DreamBoothParams(**training), context)
    workdir = Path(tempfile.mkdtemp(prefix="bench-blend-"))
    reset_peak(device)
    _, prepare_seconds = timed(lambda: booth.prepare(subject, workdir, seed=0), device)
    state = booth.load_state(workdir, subject)
    sampler = SamplerConfig(steps=args.sampling_steps, guidance=7.5)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    seeds = list(range(len(prompts)))

    booth.generate(state, "final", prompts, seeds, sampler)  # warm-up
    reset_peak(device)
    _, unguided_seconds = timed(lambda: booth.generate(state, "final", prompts, seeds, sampler), device)
    unguided = {"s_per_image": round(unguided_seconds / len(prompts), 4), "peak_memory_gib": peak_gib(device)}
    booth.release()
    print("training", round(prepare_seconds, 2), "unguided", json.dumps(unguided), flush=True)

    cells = []
    warmed = False
    for underfit in underfit_steps(args.steps):
        for weight in WEIGHTS:
            blend = DreamBlend(DreamBlendParams(**training, underfit_step=underfit, overfit_step=args.steps,
                                                guidance_weight=weight), context)
            checkpoint = blend.checkpoints()[0]
            if not warmed:
                blend.generate(state, checkpoint, prompts, seeds, sampler)
                warmed = True
            reset_peak(device)
            _, seconds = timed(lambda blend=blend, checkpoint=checkpoint: blend.generate(state, checkpoint, prompts, seeds, sampler), device)
            log = blend.guidance_log
            cells.append({
                "underfit_step": underfit, "overfit_step": args.steps, "guidance_weight": weight,
                "s_per_image": round(seconds / len(prompts), 4), "peak_memory_gib": peak_gib(device),
                "guided_steps": len(log),
                "loss_first_step": round(log[0]["loss"], 6) if log else None,
                "loss_last_step": round(log[-1]["loss"], 6) if log else None,
            })
            blend.release()
            print("cell", json.dumps(cells[-1]), flush=True)  # partial figures survive a time limit
    guided = [cell["s_per_image"] for cell in cells]
    return {
        "training": {"prepare_seconds": round(prepare_seconds, 3), "trainings": 1,
                     "s_per_step": round(state.data["training"]["seconds_per_step"], 5),
                     "checkpoints": sorted(state.data["checkpoints"])},
        "unguided_overfit_dreambooth": unguided,
        "dreamblend_cells": cells,
        "guided_s_per_image_mean": round(sum(guided) / len(guided), 4),
        "guided_over_unguided": round(sum(guided) / len(guided) / unguided["s_per_image"], 2),
        "peak_memory_gib_max": max((c["peak_memory_gib"] or 0 for c in cells), default=None) if device.type == "cuda" else None,
    }


def bench_harness(args, subject_id: str) -> dict:
    from benchmark.config import load_config
    from benchmark.driver import run_benchmark
    from benchmark.units import expand, method_context

    training = training_params(args)
    overrides = [
        "methods=dreambooth,dreamblend", "metrics.names=[]", f"subjects={subject_id}", f"backbone={args.backbone}",
        f"device={args.device}", f"protocol.resolution={args.resolution}", "protocol.prompts=[0,20]",
        "protocol.images_per_prompt=1", "protocol.prior_images=0", f"protocol.sampler.steps={args.sampling_steps}",
    ]
    for method in ("dreambooth", "dreamblend"):
        for key, value in training.items():
            value = "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else value
            overrides.append(f"methods.{method}.{key}={value}")
    overrides += [
        f"methods.dreamblend.underfit_step=[{','.join(map(str, underfit_steps(args.steps)))}]",
        f"methods.dreamblend.overfit_step={args.steps}",
        f"methods.dreamblend.guidance_weight=[{','.join(map(str, WEIGHTS))}]",
    ]
    config = load_config("default", overrides)
    plan = expand(config, method_context(config, args.device, args.dtype))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-blend-run-"))
    summary, seconds = timed(lambda: run_benchmark(config, run_dir, quiet=True), torch.device(args.device))
    done = sorted((run_dir / "states").glob("*/*/*/DONE"))
    return {
        "cells": len({cell.cell_id for cell in plan.cells}),
        "trainings_planned": len(plan.groups),
        "trainings_on_disk": len(done),
        "state_trainers": sorted({path.parts[-4] for path in done}),
        "images": len(plan.image_units),
        "exit_code": summary.exit_code,
        "run_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    spec = resolve_backbone(args.backbone)
    args.resolution = args.resolution or spec.resolution
    subject = load_subjects("mini", subjects=[args.subject])[0]
    context = MethodContext(backbone=spec, device=args.device, dtype=args.dtype, resolution=args.resolution,
                            cache_dir=Path(tempfile.mkdtemp(prefix="bench-cache-")))
    load_backbone(spec, device, context.torch_dtype)
    report: dict = {"environment": environment(device), "settings": vars(args),
                    "grid": {"underfit_step": underfit_steps(args.steps), "guidance_weight": list(WEIGHTS),
                             "overfit_step": args.steps}}
    report["method_level"] = bench_method_level(args, context, subject, device)
    if not args.skip_harness:
        report["harness"] = bench_harness(args, args.subject)
    text = json.dumps(report, indent=2, default=str)
    Path(args.out).write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
