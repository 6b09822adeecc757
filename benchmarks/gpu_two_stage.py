"""GPU benchmark of ``two_stage`` (two-stage single-image personalization, reconstructed): one
subject, trained on ONE photo, through both stages; seconds, seconds per step and peak memory
per stage, state size, and seconds per generated image.

Default: ``sd15-random`` (full SD 1.5 architecture, random init: the real FLOPs and memory) at
512 px in bf16, the mini set's dog, 200 + 200 steps with prior preservation (class images are
generated first and not timed as a stage; their time is reported apart). Writes one JSON
document to ``--out`` and stdout. Check it on a CPU with tiny settings:
``python benchmarks/gpu_two_stage.py --backbone tiny --device cpu --stage1-steps 3 --stage2-steps 3``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import method_parser, parse_method_args  # noqa: E402
from data.single_image import training_view  # noqa: E402
from data.subjects import load_subjects  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.base import MethodContext, SamplerConfig  # noqa: E402
from methods.class_prior import class_prior_images  # noqa: E402
from methods.single_image import TwoStage, TwoStageParams  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = method_parser(__doc__, "gpu_two_stage")
    parser.add_argument("--image", type=int, default=0, help="the one training photo's index")
    parser.add_argument("--stage1-steps", type=int, default=200)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--class-images", type=int, default=8, help="per class (scene and instance); 0: no prior")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=4, help="images generated from the final checkpoint")
    return parse_method_args(parser, argv)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec = resolve_backbone(args.backbone)
    resolution = args.resolution or spec.resolution
    subject = training_view(load_subjects("mini", subjects=[args.subject])[0], args.image).subject
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        context = MethodContext(backbone=spec, device=args.device, dtype=args.dtype, resolution=resolution, cache_dir=root / "cache")
        params = TwoStageParams(
            stage1_steps=args.stage1_steps, steps=args.stage2_steps, class_images=args.class_images,
            prior_loss_weight=1.0 if args.class_images else 0.0,
        )
        method = TwoStage(params, context)
        started = time.perf_counter()
        backbone = load_backbone(spec, args.device, context.torch_dtype)
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if args.class_images:  # generated (and cached) before timing the stages
            for noun in (params.scene_class, subject.class_noun):
                class_prior_images(backbone, noun, args.class_images, cache_dir=context.cache_dir,
                                   seed=params.class_image_seed, resolution=resolution, sampler=method.class_sampler())
        class_seconds = time.perf_counter() - started
        workdir = root / "state"
        workdir.mkdir()
        started = time.perf_counter()
        method.prepare(subject, workdir, seed=0)
        prepare_seconds = time.perf_counter() - started
        state = method.load_state(workdir, subject)
        sampler = SamplerConfig(steps=args.sampling_steps)
        prompts = [f"a {context.identifier} {subject.class_noun} on the beach"] * args.images
        method.generate(state, "final", prompts[:1], [0], sampler)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        method.generate(state, "final", prompts, list(range(1, args.images + 1)), sampler)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        per_image = (time.perf_counter() - started) / max(args.images, 1)
        generate_peak = _mb(torch.cuda.max_memory_allocated()) if args.device.startswith("cuda") else None
        stages = {
            name: {
                "steps": len(state.data["losses"][name]),
                "seconds": round(summary["seconds"], 3),
                "seconds_per_step": round(summary["seconds_per_step"], 4),
                "checkpoint_seconds": round(summary["checkpoint_seconds"], 3),
                "peak_memory_mb": _mb(summary["peak_memory_bytes"]),
                "loss_first": summary["loss_first"],
                "loss_last": summary["loss_last"],
            }
            for name, summary in state.data["stages"].items()
        }
        state_mb = sum(p.stat().st_size for p in workdir.iterdir()) / 2**20
    result = {
        "benchmark": "gpu_two_stage",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {**vars(args), "resolution": resolution},
        "backbone_load_seconds": round(load_seconds, 2),
        "class_images_seconds": round(class_seconds, 2),
        "prepare_seconds": round(prepare_seconds, 2),
        "stages": stages,
        "state_mb": round(state_mb, 1),
        "generate_seconds_per_image": round(per_image, 4),
        "generate_peak_memory_mb": generate_peak,
        "note": "two_stage is a reconstruction of an unpublished write-up; peak memory is per stage "
                "(train_loop resets the CUDA peak at each stage's start); null on CPU",
    }
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
