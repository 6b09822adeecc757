"""GPU benchmark of ``ip_adapter``: seconds per image against the plain pipeline, and the load cost.

On one subject of the bundled mini set (default ``sd15-random`` at 512 px, bf16 on CUDA), with
random-init IP-Adapter weights of the real size (``adapter=random``: the ViT-H/14 image encoder
configuration of h94/IP-Adapter, 4 image tokens, ``to_k_ip``/``to_v_ip`` on every attn2 layer)
written in diffusers' format and loaded through ``pipe.load_ip_adapter``:

1. **Plain pipeline.** Seconds per image (after a warm-up call) and peak memory of the backbone's
   ``StableDiffusionPipeline`` for ``--prompts`` prompts, one image each.
2. **IP-Adapter.** The one-time cost (building + writing the random weights, ``load_ip_adapter``),
   then for each scale in ``--scales`` seconds per image and peak memory of ``IPAdapter.generate``
   on the same prompts and seeds (the first scale's call is preceded by a warm-up), and for scale
   0 the largest pixel difference to the plain pipeline's images (0–1 expected; bf16 kernels may
   differ in the last bit).

Writes one JSON document to ``--out`` (default ``$OUT/gpu_ip_adapter.json``) and stdout.
Check it on a CPU: ``python benchmarks/gpu_ip_adapter.py --tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
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
from methods.ip_adapter import IPAdapter, IPAdapterParams, random_adapter_folder  # noqa: E402
from methods.sampling import build_pipeline, generate_images  # noqa: E402

PROMPTS = ("a dog in the jungle", "a dog on the beach", "a dog in a bucket", "a red dog")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = method_parser(__doc__, "gpu_ip_adapter")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per generate call (one image each)")
    parser.add_argument("--scales", default="0,0.5,1.0", help="comma-separated IP-Adapter scales")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, 4 sampling steps, 2 prompts")
    args = parse_method_args(parser, argv)
    if args.tiny:
        args.backbone, args.resolution, args.sampling_steps, args.prompts = "tiny", 64, 4, 2
    args.scales = [float(value) for value in args.scales.split(",")]
    return args


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    spec = resolve_backbone(args.backbone)
    args.resolution = args.resolution or spec.resolution
    subject = load_subjects("mini", subjects=[args.subject])[0]
    context = MethodContext(backbone=spec, device=args.device, dtype=args.dtype, resolution=args.resolution,
                            cache_dir=Path(tempfile.mkdtemp(prefix="bench-cache-")))
    backbone = load_backbone(spec, device, context.torch_dtype)
    sampler = SamplerConfig(steps=args.sampling_steps, guidance=7.5)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    seeds = list(range(len(prompts)))
    report: dict = {"environment": environment(device), "settings": vars(args)}

    def plain_call():
        return generate_images(build_pipeline(backbone, sampler), prompts, seeds, sampler, args.resolution)

    plain_call()  # warm-up
    reset_peak(device)
    plain_images, seconds = timed(plain_call, device)
    report["plain"] = {"s_per_image": round(seconds / len(prompts), 4), "peak_memory_gib": peak_gib(device)}
    print("plain", json.dumps(report["plain"]), flush=True)

    _, build_seconds = timed(lambda: random_adapter_folder(backbone), device)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ipa-"))
    methods = [IPAdapter(IPAdapterParams(scale=scale, adapter="random"), context) for scale in args.scales]
    methods[0].prepare(subject, workdir, seed=0)  # one preparation serves every scale
    state = methods[0].load_state(workdir, subject)

    def generate(method):
        return method.generate(state, "final", prompts, seeds, sampler)

    # the first call loads the adapter (load_ip_adapter) and warms up
    _, first_seconds = timed(lambda: generate(methods[0]), device)
    report["adapter_load"] = {"random_weights_build_seconds": round(build_seconds, 2),
                              "first_call_seconds": round(first_seconds, 2)}
    print("adapter", json.dumps(report["adapter_load"]), flush=True)
    cells = []
    for scale, method in zip(args.scales, methods):
        reset_peak(device)
        images, seconds = timed(lambda method=method: generate(method), device)
        cell = {"scale": scale, "s_per_image": round(seconds / len(prompts), 4), "peak_memory_gib": peak_gib(device),
                "max_pixel_diff_to_plain": int(np.abs(_pixels(images) - _pixels(plain_images)).max())}
        cells.append(cell)
        print("cell", json.dumps(cell), flush=True)  # partial figures survive a time limit
    report["ip_adapter"] = cells
    mean = sum(c["s_per_image"] for c in cells) / len(cells)
    report["ip_adapter_over_plain"] = round(mean / report["plain"]["s_per_image"], 3)
    text = json.dumps(report, indent=2, default=str)
    Path(args.out).write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
