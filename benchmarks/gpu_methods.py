"""GPU benchmark of the baseline methods and the shared diffusion plumbing, with references.

Times, on one subject of the bundled mini set:
- Textual Inversion and DreamBooth training (``--steps`` each): seconds per step after the first
  (warm-up) step, checkpoint writing excluded, peak memory, and the projection to the targets
  (TI 3000 steps at batch 4, DreamBooth 1000 steps);
- generation through the methods (``--prompts`` x ``--images`` at 50 DDIM steps, guidance 7.5):
  seconds per image after a warm-up call;
- the references a user would otherwise run on the same GPU: a plain diffusers
  ``StableDiffusionPipeline`` in fp16 with ``num_images_per_prompt`` (s/image), and a minimal
  re-creation of the diffusers DreamBooth example's training step (VAE encode and text encoder
  every step, foreach AdamW, bf16 autocast).

Writes one JSON document (GPU name, versions, settings, results, targets) to ``--out`` and
stdout. Runs on a CPU with tiny settings for checking:
``python benchmarks/gpu_methods.py --backbone tiny --device cpu --steps 3``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_metrics import reset_peak, synchronize  # noqa: E402,F401 (re-exported to the other scripts)
from data.subjects import load_subjects  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.base import MethodContext, SamplerConfig  # noqa: E402
from methods.diffusion import make_noise_scheduler, prediction_target, tokenize  # noqa: E402
from methods.dreambooth import DreamBooth, DreamBoothParams  # noqa: E402
from methods.textual_inversion import TextualInversion, TextualInversionParams  # noqa: E402

TARGETS = {
    "sampling_s_per_image": 0.20,
    "dreambooth_1000_steps_s": 30.0,
    "textual_inversion_3000_steps_batch4_s": 60.0,
}
PROMPTS = ("a sks dog in the jungle", "a sks dog on the beach")


def method_parser(doc: str, name: str, *, subject: str | None = "dog") -> argparse.ArgumentParser:
    """The arguments every method benchmark takes: ``--backbone``, ``--device``, ``--dtype``,
    ``--resolution``, ``--subject`` (a subject of the bundled mini set; ``None``: no such argument)
    and ``--out`` (``$OUT/<name>.json``); the script adds its own after them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="default: the backbone's")
    if subject is not None:
        parser.add_argument("--subject", default=subject, help="a subject of the bundled mini set")
    parser.add_argument(
        "--out",
        default=str(Path(os.environ.get("OUT", ".")) / f"{name}.json"),
        help=f"JSON output (default: $OUT/{name}.json, else ./{name}.json)",
    )
    return parser


def parse_method_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses ``method_parser``'s arguments; ``--dtype`` defaults to bfloat16 on CUDA, float32 elsewhere."""
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = method_parser(__doc__, "gpu_methods")
    parser.add_argument("--steps", type=int, default=100, help="training steps per method")
    parser.add_argument("--ti-batch", type=int, default=4, help="TI batch (paper: 2, target: 4)")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--class-images", type=int, default=4, help="class-prior images for DreamBooth")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of: ti,dreambooth,reference,reference_train")
    return parse_method_args(parser, argv)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def timed(function: Callable[[], object], device: torch.device) -> tuple[object, float]:
    synchronize(device)
    started = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - started


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            capability=f"{properties.major}.{properties.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def bench_generation(method, state, checkpoint: str, args, device: torch.device) -> dict:
    sampler = SamplerConfig(steps=args.sampling_steps, guidance=7.5)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts) for _ in range(args.images)]
    if isinstance(method, TextualInversion):
        token = state.data["placeholder_token"]
        prompts = [p.replace("sks dog", token) for p in prompts]
    seeds = list(range(len(prompts)))
    method.generate(state, checkpoint, prompts, seeds, sampler)  # warm-up (and checkpoint load)
    reset_peak(device)
    images, seconds = timed(lambda: method.generate(state, checkpoint, prompts, seeds, sampler), device)
    return {
        "images": len(images),
        "batch": len(prompts),
        "seconds": round(seconds, 4),
        "s_per_image": round(seconds / len(images), 4),
        "peak_memory_gib": peak_gib(device),
    }


def bench_textual_inversion(args, context: MethodContext, subject, device: torch.device) -> dict:
    params = TextualInversionParams(
        steps=args.steps, batch_size=args.ti_batch, gradient_checkpointing=args.gradient_checkpointing
    )
    method = TextualInversion(params, context)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ti-"))
    reset_peak(device)
    _, seconds = timed(lambda: method.prepare(subject, workdir, seed=0), device)
    state = method.load_state(workdir, subject)
    training = state.data["training"]
    per_step = training["seconds_per_step"]
    return {
        "batch_size": args.ti_batch,
        "prepare_seconds": round(seconds, 3),
        "s_per_step": round(per_step, 5),
        "peak_memory_gib": round(training["peak_memory_bytes"] / 2**30, 3) if training["peak_memory_bytes"] else None,
        "projected_3000_steps_s": round(per_step * 3000 * 4 / args.ti_batch, 1),
        "generation": bench_generation(method, state, "final", args, device),
    }


def bench_dreambooth(args, context: MethodContext, subject, device: torch.device) -> dict:
    params = DreamBoothParams(
        steps=args.steps,
        class_images=args.class_images,
        class_image_steps=args.sampling_steps,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    method = DreamBooth(params, context)
    workdir = Path(tempfile.mkdtemp(prefix="bench-db-"))
    reset_peak(device)
    _, seconds = timed(lambda: method.prepare(subject, workdir, seed=0), device)
    state = method.load_state(workdir, subject)
    training = state.data["training"]
    per_step = training["seconds_per_step"]
    result = {
        "batch": "1 instance + 1 class image",
        "prepare_seconds": round(seconds, 3),
        "class_images_generated": state.data["class_images_generated"],
        "s_per_step": round(per_step, 5),
        "checkpoint_write_seconds": round(training["checkpoint_seconds"], 3),
        "peak_memory_gib": round(training["peak_memory_bytes"] / 2**30, 3) if training["peak_memory_bytes"] else None,
        "projected_1000_steps_s": round(per_step * 1000, 1),
        "generation": bench_generation(method, state, "final", args, device),
    }
    method.release()
    return result


def bench_reference_pipeline(args, backbone_fp32, device: torch.device) -> dict:
    """Plain diffusers: StableDiffusionPipeline, fp16 (fp32 on CPU), num_images_per_prompt."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipeline = StableDiffusionPipeline(
        vae=copy.deepcopy(backbone_fp32.vae),
        text_encoder=copy.deepcopy(backbone_fp32.text_encoder),
        tokenizer=backbone_fp32.tokenizer,
        unet=copy.deepcopy(backbone_fp32.unet),
        scheduler=DDIMScheduler.from_config(backbone_fp32.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]

    def run():
        generator = torch.Generator(device).manual_seed(0)
        return pipeline(
            prompts,
            height=args.resolution,
            width=args.resolution,
            num_images_per_prompt=args.images,
            num_inference_steps=args.sampling_steps,
            guidance_scale=7.5,
            generator=generator,
        ).images

    run()
    reset_peak(device)
    images, seconds = timed(run, device)
    result = {
        "dtype": str(dtype).removeprefix("torch."),
        "images": len(images),
        "s_per_image": round(seconds / len(images), 4),
        "peak_memory_gib": peak_gib(device),
    }
    return result


def bench_reference_dreambooth_step(args, backbone, backbone_fp32, subject, device: torch.device) -> dict:
    """The diffusers example's step: VAE encode + text encoder every step, foreach AdamW."""
    from data.images import load_image, to_tensor

    unet = copy.deepcopy(backbone_fp32.unet).to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-6, weight_decay=1e-2, foreach=True)
    scheduler = make_noise_scheduler(backbone)
    image = to_tensor([load_image(subject.images[0], args.resolution)]) * 2 - 1
    pixels = torch.cat([image, image]).to(device, backbone.dtype)  # instance + (stand-in) class image
    input_ids = tokenize(backbone.tokenizer, ["a sks dog", "a dog"]).to(device)
    autocast = torch.autocast(device.type, dtype=backbone.dtype, enabled=backbone.dtype != torch.float32)

    def step():
        with torch.no_grad():
            latents = backbone.vae.encode(pixels).latent_dist.sample() * backbone.vae.config.scaling_factor
            hidden = backbone.text_encoder(input_ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = unet(noisy, timesteps, hidden).sample
        target = prediction_target(scheduler, latents, noise, timesteps)
        instance, prior = prediction.float().chunk(2), target.float().chunk(2)
        loss = torch.nn.functional.mse_loss(instance[0], prior[0]) + torch.nn.functional.mse_loss(
            instance[1], prior[1]
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    reset_peak(device)
    _, seconds = timed(lambda: [step() for _ in range(max(args.steps - 1, 1))], device)
    per_step = seconds / max(args.steps - 1, 1)
    return {"s_per_step": round(per_step, 5), "peak_memory_gib": peak_gib(device)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    spec = resolve_backbone(args.backbone)
    args.resolution = args.resolution or spec.resolution
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    subject = load_subjects("mini", subjects=[args.subject])[0]
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    context = MethodContext(
        backbone=spec, device=args.device, dtype=args.dtype, resolution=args.resolution, cache_dir=cache_dir
    )
    report: dict = {"environment": environment(device), "settings": vars(args), "targets": TARGETS}
    backbone, load_seconds = timed(lambda: load_backbone(spec, device, context.torch_dtype), device)
    fp32, fp32_seconds = timed(lambda: load_backbone(spec, "cpu", torch.float32), torch.device("cpu"))
    results: dict = {"backbone_load_s": round(load_seconds, 2), "fp32_cpu_backbone_load_s": round(fp32_seconds, 2)}
    if "ti" not in skip:
        results["textual_inversion"] = bench_textual_inversion(args, context, subject, device)
    if "dreambooth" not in skip:
        results["dreambooth"] = bench_dreambooth(args, context, subject, device)
    if "reference" not in skip:
        results["reference_diffusers_pipeline"] = bench_reference_pipeline(args, fp32, device)
    if "reference_train" not in skip:
        results["reference_diffusers_dreambooth_step"] = bench_reference_dreambooth_step(
            args, backbone, fp32, subject, device
        )
    report["results"] = results
    report["meets_targets"] = {
        "sampling": results.get("dreambooth", {}).get("generation", {}).get("s_per_image", float("inf"))
        <= TARGETS["sampling_s_per_image"],
        "dreambooth": results.get("dreambooth", {}).get("projected_1000_steps_s", float("inf"))
        <= TARGETS["dreambooth_1000_steps_s"],
        "textual_inversion": results.get("textual_inversion", {}).get("projected_3000_steps_s", float("inf"))
        <= TARGETS["textual_inversion_3000_steps_batch4_s"],
    }
    text = json.dumps(report, indent=2, default=str)
    Path(args.out).write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
