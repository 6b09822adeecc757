"""GPU benchmark of multi-subject Textual Inversion: N subjects' vectors in one batched pass.

Measures, on ``sd15-random`` at 512 px in the method's precision (bf16 on CUDA):
- the reference a user runs today: ``TextualInversion.prepare`` on one subject (the single-subject
  path, batch 2), steps/s and seconds per step after the first (warm-up) step;
- ``TextualInversion.prepare_many`` with 4, 8 and 16 subjects in one pass (each at batch 2):
  steps/s of the pass, seconds per subject-step (amortized), peak memory;
- the projection of the paper's 5000 steps per subject, amortized over the pass, against the
  issue's target (<= 60 s per subject); projected from ``--steps`` measured steps (few steps, to
  keep the run short: the per-step time of a frozen-UNet pass does not change with the step);
- agreement: subject 0 trained alone vs inside each pass (max |difference| of its vectors after
  ``--steps`` steps, beside how far training moved them), the bf16 tolerance of the batched path.

Subjects: the bundled mini set's 3 subjects, repeated under distinct ids (own placeholder token,
own seed) to reach 16; the training images repeat, which changes no timing.

Writes one JSON document (device, versions, settings, results, target) to ``--out``. A CPU check:
``python benchmarks/gpu_ti_multi.py --tiny --device cpu --out /tmp/ti_multi.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import (  # noqa: E402
    environment,
    method_parser,
    parse_method_args,
    reset_peak,
    synchronize,
)
from benchmarks.gpu_metrics import SDPA_ORDERS, sdpa_preference  # noqa: E402
from data.subjects import load_subjects  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.base import MethodContext  # noqa: E402
from methods.textual_inversion import TextualInversion, TextualInversionParams  # noqa: E402

TARGET_S_PER_SUBJECT_5000 = 60.0
PAPER_STEPS = 5000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = method_parser(__doc__, "gpu_ti_multi", subject=None)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per training")
    parser.add_argument("--counts", default="4,8,16", help="subjects per pass")
    parser.add_argument("--compile", action="store_true",
                        help="training.compile: the frozen UNet through torch.compile (the warm-up pass compiles)")
    parser.add_argument("--sdpa", default="default", choices=sorted(SDPA_ORDERS),
                        help="attention backend order (gpu_metrics.SDPA_ORDERS): cudnn tries cuDNN's fused attention first")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, 4 steps, passes of 2 and 3")
    parser.add_argument("--skip-reference", action="store_true",
                        help="no single-subject warm-up and reference (each as long as a pass): the passes start at "
                             "once, without their subject-0-vs-alone check (for timing a pass beside other processes)")
    args = parse_method_args(parser, argv)
    if args.tiny:
        args.backbone, args.resolution, args.steps, args.counts = "tiny", 64, 4, "2,3"
    args.counts = [int(c) for c in str(args.counts).split(",")]
    return args


def many_subjects(count: int):
    """``count`` subjects: the mini set's, then copies under new ids (new tokens and seeds)."""
    base = load_subjects("mini")
    return [
        dataclasses.replace(base[i % len(base)], id=f"{base[i % len(base)].id}{'' if i < len(base) else i}")
        for i in range(count)
    ]


def train(method: TextualInversion, subjects, seeds, device: torch.device) -> tuple[list[Path], float, dict]:
    """One pass (``prepare`` for one subject, ``prepare_many`` for several): workdirs, wall
    seconds and the pass's training summary."""
    root = Path(tempfile.mkdtemp(prefix="bench-ti-multi-"))
    workdirs = [root / f"{i}" for i in range(len(subjects))]
    for workdir in workdirs:
        workdir.mkdir()
    reset_peak(device)
    synchronize(device)
    started, clock_start = time.perf_counter(), time.time()
    if len(subjects) == 1:
        method.prepare(subjects[0], workdirs[0], seeds[0])
    else:
        method.prepare_many(subjects, workdirs, seeds)
    synchronize(device)
    seconds = time.perf_counter() - started
    summary = json.loads((workdirs[0] / "state.json").read_text())["training"]
    # epoch seconds of the whole pass (its first step's compile included): to set beside another
    # process's timed window when both ran at once (MPS)
    summary["clock_window"] = [round(clock_start, 3), round(time.time(), 3)]
    return workdirs, seconds, summary


def vectors(workdir: Path) -> torch.Tensor:
    return next(iter(load_file(str(workdir / "learned_embeds.safetensors")).values()))


def row(count: int, seconds: float, summary: dict, steps: int) -> dict:
    per_step = summary["seconds_per_step"]
    peak = summary.get("peak_memory_bytes")
    return {
        "subjects": count,
        "samples_per_step": 2 * count,
        "wall_seconds": round(seconds, 3),
        "s_per_step": round(per_step, 5),
        "steps_per_s": round(1 / per_step, 3) if per_step else None,
        "s_per_subject_step": round(per_step / count, 5),
        "projected_5000_steps_s_per_subject": round(per_step * PAPER_STEPS / count, 1),
        "peak_memory_gib": round(peak / 2**30, 3) if peak else None,
        "clock_window": summary.get("clock_window"),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with sdpa_preference(args.sdpa):
        return _main(args)


def _main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    spec = resolve_backbone(args.backbone)
    context = MethodContext(
        backbone=spec, device=args.device, dtype=args.dtype, resolution=args.resolution or spec.resolution,
        compile_training=args.compile,
    )
    print(f"loading {args.backbone} on {device} ({args.dtype}) ...", flush=True)
    load_backbone(spec, args.device, context.torch_dtype)
    params = TextualInversionParams(steps=args.steps)
    method = TextualInversion(params, context)
    subjects = many_subjects(max(args.counts))
    seeds = [1000 + i for i in range(len(subjects))]

    reference, alone, moved = None, None, None
    if not args.skip_reference:
        # warm-up: kernels, autotuning and the latent cache, outside every timing
        train(method, subjects[:1], seeds[:1], device)
        print("reference: single-subject prepare ...", flush=True)
        alone_dirs, seconds, summary = train(method, subjects[:1], seeds[:1], device)
        reference = row(1, seconds, summary, args.steps)
        alone = vectors(alone_dirs[0])
        initial, _ = method.initial_vectors(method._backbone(), subjects[0])
        moved = float((alone.float().cpu() - initial.float().cpu()).abs().max())
        print(f"  {reference}", flush=True)

    passes = []
    for count in args.counts:
        print(f"prepare_many with {count} subjects ...", flush=True)
        try:
            workdirs, seconds, summary = train(method, subjects[:count], seeds[:count], device)
        except torch.cuda.OutOfMemoryError as error:
            passes.append({"subjects": count, "error": f"out of memory: {str(error).splitlines()[0]}"})
            torch.cuda.empty_cache()
            continue
        result = row(count, seconds, summary, args.steps)
        if reference is not None:
            difference = (vectors(workdirs[0]) - alone).abs()
            result["subject0_vs_alone_max_abs"] = float(difference.max())
            result["subject0_vs_alone_relative_to_training_move"] = float(difference.max()) / moved if moved else None
            result["speedup_vs_reference_per_subject"] = round(reference["s_per_step"] / result["s_per_subject_step"], 2)
        passes.append(result)
        print(f"  {result}", flush=True)

    best = min((p for p in passes if "error" not in p), key=lambda p: p["s_per_subject_step"], default=None)
    document = {
        "benchmark": "gpu_ti_multi",
        "environment": environment(device),
        "settings": {
            "backbone": args.backbone,
            "resolution": context.resolution,
            "dtype": args.dtype,
            "batch_size_per_subject": params.batch_size,
            "measured_steps": args.steps,
            "compile_training": args.compile,
            "sdpa": args.sdpa,
            "note": f"{PAPER_STEPS}-step figures are projected from {args.steps} measured steps "
            "(seconds per step after the first, checkpoint writing excluded)",
        },
        "reference_single_subject": reference and {**reference, "training_move_max_abs": moved},
        "passes": passes,
        "target": {
            "projected_5000_steps_s_per_subject": TARGET_S_PER_SUBJECT_5000,
            "best": best and best["projected_5000_steps_s_per_subject"],
            "met": bool(best and best["projected_5000_steps_s_per_subject"] <= TARGET_S_PER_SUBJECT_5000),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1))
    print(json.dumps(document, indent=1))
    return document


if __name__ == "__main__":
    main()
