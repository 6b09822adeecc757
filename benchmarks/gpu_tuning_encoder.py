"""GPU benchmark of ``tuning_encoder`` (reconstructed): pre-training images/s and peak memory on
random images, then per-subject tuning seconds and peak memory for 12 steps (the paper claims
under 30 GB, against about 70 GB for E4T), the 0-step prediction and generation seconds per image.

Default: ``sd15-random`` (full SD 1.5 architecture and a random-init CLIP ViT-L/14 image tower:
the real FLOPs and memory) at 512 px in bf16; pre-training runs ``--pretrain-steps`` steps of
``--pretrain-batch`` random 512 px images; tuning runs on the mini set's dog. Writes one JSON
document to ``--out`` and stdout. Check it on a CPU: ``python benchmarks/gpu_tuning_encoder.py --tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.subjects import load_subjects  # noqa: E402
from methods.backbones import resolve_backbone  # noqa: E402
from methods.base import MethodContext, SamplerConfig  # noqa: E402
from methods.tuning_encoder import TuningEncoder, TuningEncoderParams, slot_token  # noqa: E402
from methods.tuning_encoder_pretrain import PretrainOptions, pretrain  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, a few steps (a CPU check of this script)")
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: the backbone's (512 for sd15-random)")
    parser.add_argument("--pretrain-steps", type=int, default=40)
    parser.add_argument("--pretrain-batch", type=int, default=8, help="images per pre-training step (E4T re-implementation: 16)")
    parser.add_argument("--random-images", type=int, default=64, help="random images written for pre-training")
    parser.add_argument("--tuning-steps", type=int, default=12)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=4, help="images generated from the tuned state (dual path)")
    parser.add_argument("--out", default=None, help="JSON file to write (default: stdout only)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.resolution = "tiny", 64
        args.pretrain_steps, args.pretrain_batch, args.random_images = 6, 2, 8
        args.tuning_steps, args.sampling_steps, args.images = 3, 4, 2
    return args


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec = resolve_backbone(args.backbone)
    resolution = args.resolution or spec.resolution
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    result: dict = {
        "benchmark": "gpu_tuning_encoder",
        "backbone": args.backbone, "resolution": resolution, "device": args.device, "dtype": dtype,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        images = root / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for index in range(args.random_images):
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(images / f"{index:04d}.png")
        encoder = root / "encoder.safetensors"
        options = PretrainOptions(
            images=str(images), out=str(encoder), backbone=args.backbone, steps=args.pretrain_steps,
            batch_size=args.pretrain_batch, resolution=resolution, save_every=args.pretrain_steps,
            device="cuda" if args.device.startswith("cuda") else "cpu",
        )
        stamps: list[float] = []

        def on_step(step: int, total: int, loss: float) -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            print(f"pretrain step {step}/{total} loss {loss:.4f}", flush=True)

        _reset_peak(args.device)
        started = time.perf_counter()
        record = pretrain(options, on_step=on_step).record
        # Steps 2 .. N-1: after the warm-up step and before the final step's checkpoint write.
        timed = max(len(stamps) - 2, 1)
        seconds = (stamps[-2] - stamps[0]) if len(stamps) >= 3 else (stamps[-1] - started)
        result["pretraining"] = {
            "steps": args.pretrain_steps, "batch": args.pretrain_batch,
            "seconds_total": round(time.perf_counter() - started, 2),
            "images_per_second": round(timed * args.pretrain_batch / seconds, 3),
            "peak_memory_mb": _mb(_peak(args.device)),
            "loss_first": record["loss_first"], "loss_last": record["loss_last"],
            "encoder_mb": round(encoder.stat().st_size / 2**20, 1),
        }
        print(json.dumps(result["pretraining"]), flush=True)

        subject = load_subjects("mini", subjects=["dog"])[0]
        context = MethodContext(backbone=spec, device=args.device, dtype=dtype, resolution=resolution, cache_dir=root / "cache")
        for steps in (0, args.tuning_steps):
            method = TuningEncoder(TuningEncoderParams(encoder=str(encoder), tuning_steps=steps), context)
            workdir = root / f"state-{steps}"
            workdir.mkdir()
            _reset_peak(args.device)
            started = time.perf_counter()
            method.prepare(subject, workdir, seed=0)
            prepare_seconds = time.perf_counter() - started
            peak = _peak(args.device)
            state = json.loads((workdir / "state.json").read_text())
            entry = {
                "tuning_steps": steps, "prepare_seconds": round(prepare_seconds, 2), "prepare_peak_memory_mb": _mb(peak),
                "tuning": state["tuning"], "hard_token": state["hard_token"],
                "state_mb": round((workdir / "state.safetensors").stat().st_size / 2**20, 2),
            }
            result[f"tuning_{steps}_steps"] = entry
            print(json.dumps(entry), flush=True)
        loaded = method.load_state(workdir, subject)
        sampler = SamplerConfig(steps=args.sampling_steps)
        prompts = [f"a {slot_token(0)} on the beach"] * args.images
        method.generate(loaded, "final", prompts[:1], [0], sampler)  # warm-up
        _reset_peak(args.device)
        started = time.perf_counter()
        method.generate(loaded, "final", prompts, list(range(args.images)), sampler)
        result["generation"] = {
            "images": args.images, "sampling_steps": args.sampling_steps, "dual_path": True,
            "seconds_per_image": round((time.perf_counter() - started) / args.images, 3),
            "peak_memory_mb": _mb(_peak(args.device)),
        }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return result


if __name__ == "__main__":
    main()
