"""Issue 17 item 1: what the sampling path spends after the denoising loop, per image.

After its 50 DDIM steps the pipeline decodes the latents with the VAE (eager), and the images
are converted to PIL on the sampling thread: by diffusers' ``output_type="pil"`` (float on the GPU
→ float numpy on the host → uint8 → PIL) until ``generate_images`` switched to
``methods.sampling.pil_images`` (uint8 made on the device). Both steps sit on the critical path.
This probe times, on one batch of ``--batch`` random latents (``sd15-random`` weights, bf16):

- ``vae_decode_eager``: ``vae.decode`` as the pipeline calls it (the reference);
- ``postprocess_pil``: diffusers' conversion to PIL, as the pipeline does it (the reference);
- ``uint8_on_gpu``: what ``generate_images`` now does (the pipeline's ``"pt"`` output, i.e.
  diffusers' denormalizing on the device, then ``methods.sampling.pil_images``): the same pixels
  made uint8 on the GPU and copied to the host as uint8 (a quarter of the bytes of
  float32), then wrapped as PIL; its largest difference from ``postprocess_pil`` in levels;
- ``vae_decode_compiled``: the VAE's decoder through ``torch.compile`` (first call apart),
  checked against eager in uint8 levels.

The JSON is rewritten after every stage, so a time limit keeps what finished. CPU check:
``python benchmarks/gpu_decode.py --tiny --device cpu --out /tmp/decode.json`` (~25 s of it is the
CPU compile; ``--no-compile`` skips that stage). Not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import environment, timed  # noqa: E402
from benchmarks.gpu_metrics import save_partial  # noqa: E402
from benchmarks.gpu_speed import as_uint8  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.sampling import pil_images  # noqa: E402


def max_levels(first: list, second: list) -> int:
    """Largest difference between two lists of images, in uint8 levels."""
    return int(np.abs(as_uint8(first) - as_uint8(second)).max())


def best_of(call, repeats: int, device: torch.device) -> tuple[object, float, float]:
    """(result, first call seconds, best of ``repeats`` later calls)."""
    result, first = timed(call, device)
    times = []
    for _ in range(repeats):
        result, seconds = timed(call, device)
        times.append(seconds)
    return result, first, min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decoder stage")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, batch 2, 1 repeat")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_decode.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.batch, args.repeats = "tiny", 2, 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = resolve_backbone(args.backbone)
    backbone = load_backbone(spec, args.device, dtype)
    vae = backbone.vae
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    size = spec.resolution // processor.config.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((args.batch, vae.config.latent_channels, size, size), generator=generator).to(device, dtype)
    scale = vae.config.scaling_factor
    document = {"benchmark": "gpu_decode", "environment": environment(device), "settings": vars(args), "stages": {}}
    stages = document["stages"]

    def record(name: str, first: float, best: float, **extra) -> None:
        stages[name] = {"first_call_s": round(first, 4), "s_per_image": round(best / args.batch, 5), **extra}
        print(f"{name}: {stages[name]}", flush=True)
        save_partial(document, args.out, "gpu_decode.json")

    with torch.no_grad():
        decode = lambda: vae.decode(latents / scale, return_dict=False)[0]  # noqa: E731
        decoded, first, best = best_of(decode, args.repeats, device)
        record("vae_decode_eager", first, best)
        images, first, best = best_of(lambda: processor.postprocess(decoded, output_type="pil"), args.repeats, device)
        record("postprocess_pil", first, best)
        def harness_images(pixels: torch.Tensor) -> list:  # generate_images: the pipeline's "pt" output, then pil_images
            return pil_images(processor.postprocess(pixels, output_type="pt"))

        fast, first, best = best_of(lambda: harness_images(decoded), args.repeats, device)
        record("uint8_on_gpu", first, best, vs_postprocess_max_levels=max_levels(images, fast))
        if not args.no_compile:
            vae.decoder = torch.compile(vae.decoder, dynamic=False)
            compiled, first, best = best_of(decode, args.repeats, device)
            record("vae_decode_compiled", first, best,
                   vs_eager_max_levels=max_levels(harness_images(decoded), harness_images(compiled)))
    document["complete"] = True
    save_partial(document, args.out, "gpu_decode.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
