"""Issue-17 speed probe: where sampling and training time goes, and what each fast path buys.

Sampling (DDIM 50, guidance 7.5, the project's ``generate_images`` path, one CPU generator per
image) at several batch sizes, with each candidate fast path measured beside the current path
and beside the plain diffusers fp16 pipeline a user would run instead, in the same process:
``channels_last`` UNet/VAE, fused QKV projections, ``torch.compile`` of the UNet (compile time
reported apart), plus a breakdown (text encoding, UNet loop, VAE decode, PIL conversion, PNG
encoding at the store's settings). Each variant's images are compared with the current path's
(max |Δ| in uint8 levels over the same seeds) — a fast path may move pixels only within the
batch/kernel noise the sampling module documents.

Training: the DreamBooth step (fp32 master UNet, bf16 autocast, 1 instance + 1 class latent,
fused AdamW) through the project's ``train_loop``: seconds per step with pageable host copies
(the old behaviour) and with the pinned asynchronous copies, with and without
``torch.compile``; the first 5 losses of each variant are kept so that a fast path can be
checked against eager. ``--train-layout harness`` trains every compiled variant (and every
compiled concurrency child) the way the harness now does: the fp32 copy's weights in
channels-last before ``torch.compile`` (``methods.sampling.maybe_compiled(...,
channels_last=True)``); ``default`` keeps the layout these figures were first measured in.
``--concurrency 1,2,4`` runs that many DreamBooth trainings at once, one process each (what
``--workers-per-gpu`` runs; start an MPS daemon around the call to time them as MPS clients);
``--train-graphs`` makes those children capture their steps (``training.cuda_graphs``), and
``--train-method dreambooth_lora`` makes them train DreamBooth-LoRA's adapters instead (rank 4 on
the UNet's attention, built by ``DreamBoothLoRA`` itself; rows under
``training_concurrency_dreambooth_lora``).

Writes one JSON document to ``--out``. CPU check:
``python benchmarks/gpu_speed.py --backbone tiny --device cpu --resolution 64 --quick --out /tmp/s.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import synchronize as sync  # noqa: E402
from benchmarks.gpu_methods import timed  # noqa: E402
from methods import diffusion  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.base import SamplerConfig  # noqa: E402
from methods.diffusion import fp32_trainable_copy, make_noise_scheduler  # noqa: E402
from methods.sampling import build_pipeline, generate_images  # noqa: E402
from methods.training import TrainBatch, TrainingParams, train_loop  # noqa: E402

PROMPT = "a photo of a sks dog on the beach"


def png_seconds(images) -> float:
    start = time.perf_counter()
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # the store's settings: PIL defaults
    return (time.perf_counter() - start) / max(len(images), 1)


def as_uint8(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def sampling(args, backbone, device, results):
    sampler = SamplerConfig(name="ddim", steps=args.sampling_steps, guidance=7.5, eta=0.0)
    out = results.setdefault("sampling", {})
    baseline_images = {}

    def run_variant(name, unet=None, batches=tuple(args.sampling_batches)):
        rows = {}
        for batch in batches:
            prompts = [f"{PROMPT} {i % 4}" for i in range(batch)]
            seeds = list(range(batch))
            pipeline = build_pipeline(backbone, sampler, unet=unet)
            generate_images(pipeline, prompts[:2], seeds[:2], sampler, args.resolution)  # warm-up
            times = []
            images = None
            for _ in range(args.repeats):
                images, seconds = timed(lambda p=pipeline, q=prompts, r=seeds: generate_images(p, q, r, sampler, args.resolution), device)
                times.append(seconds / batch)
            row = {"s_per_image": min(times), "s_per_image_all": times}
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            if name == "current":
                baseline_images[batch] = as_uint8(images)
            elif batch in baseline_images:
                row["max_abs_diff_levels_vs_current"] = int(np.abs(as_uint8(images) - baseline_images[batch]).max())
                row["mean_abs_diff_levels_vs_current"] = float(np.abs(as_uint8(images) - baseline_images[batch]).mean())
            rows[str(batch)] = row
            out[name] = rows
            print(name, batch, row, flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))  # keep what was measured
        return images

    if args.compile_child:  # a later run on a warm inductor cache: only the compiled arm
        compile_arm(args, backbone, sampler, device, out, run_variant, tuple(args.compile_batches))
        return
    images = run_variant("current")
    out["png_encode_s_per_image"] = png_seconds(images)

    # Breakdown at batch 16: text, unet loop, vae decode, to PIL.
    batch = 16 if not args.quick else 2
    pipeline = build_pipeline(backbone, sampler)
    with torch.no_grad():
        _, text_s = timed(lambda: pipeline.encode_prompt([PROMPT] * batch, device, 1, True), device)
        latents = torch.randn(batch, 4, args.resolution // 8, args.resolution // 8, device=device, dtype=backbone.dtype)
        _, unet_s = timed(
            lambda: pipeline(prompt=[PROMPT] * batch, num_inference_steps=args.sampling_steps, guidance_scale=7.5,
                             height=args.resolution, width=args.resolution, latents=latents, output_type="latent"),
            device,
        )
        decoded, vae_s = timed(lambda: backbone.vae.decode(latents / backbone.vae.config.scaling_factor).sample, device)
        _, pil_s = timed(lambda: pipeline.image_processor.postprocess(decoded, output_type="pil"), device)
    out["breakdown_batch16_s_per_image"] = {
        "text": text_s / batch, "denoise_incl_text": unet_s / batch, "vae_decode": vae_s / batch, "to_pil": pil_s / batch,
    }
    print("breakdown", out["breakdown_batch16_s_per_image"], flush=True)

    if args.quick:
        batches = (2,)
    else:
        batches = tuple(args.compile_batches)
    if args.layout_arms:
        # channels_last, fused QKV (measured slower by ~10 % on H200 / torch 2.11; kept for re-checks)
        backbone.unet.to(memory_format=torch.channels_last)
        backbone.vae.to(memory_format=torch.channels_last)
        run_variant("channels_last", batches=batches)
        try:
            backbone.unet.fuse_qkv_projections()
            run_variant("channels_last+fused_qkv", batches=batches)
            backbone.unet.unfuse_qkv_projections()
        except Exception as error:  # noqa: BLE001
            out["fused_qkv_error"] = repr(error)
        backbone.unet.to(memory_format=torch.contiguous_format)
        backbone.vae.to(memory_format=torch.contiguous_format)
    if args.reference:
        reference_arm(args, backbone, sampler, device, out)
    if args.compile:
        compile_arm(args, backbone, sampler, device, out, run_variant, batches)
        if args.compile_cache and not args.quick:
            # The same compile in a fresh process on the now-warm cache: what a later run pays.
            child_out = Path(args.compile_cache) / "warm_child.json"
            command = [sys.executable, __file__, "--skip", "training", "--compile", "--compile-child",
                       "--compile-mode", args.compile_mode, "--compile-cache", args.compile_cache,
                       "--compile-batches", ",".join(map(str, batches)), "--repeats", str(args.repeats),
                       "--backbone", args.backbone, "--resolution", str(args.resolution), "--out", str(child_out)]
            started = time.perf_counter()
            completed = subprocess.run(command, check=False, timeout=args.child_timeout)
            out["warm_cache_process"] = {"returncode": completed.returncode,
                                         "wall_seconds_incl_start": time.perf_counter() - started}
            if child_out.exists():
                out["warm_cache_process"].update(json.loads(child_out.read_text()).get("sampling", {}))


def compile_arm(args, backbone, sampler, device, out, run_variant, batches):
    """``torch.compile`` of the UNet, compile seconds per batch shape reported apart.

    The inductor cache lives in ``--compile-cache`` (TORCHINDUCTOR_CACHE_DIR); a second process on
    the same cache (``--compile-child``) measures what a later run pays once the artifacts exist.
    """
    compiled = torch.compile(backbone.unet, mode=args.compile_mode, fullgraph=False)
    key = f"compile[{args.compile_mode}]" + ("_warm_cache_process" if args.compile_child else "")
    first_calls = {}
    for batch in batches:
        start = time.perf_counter()
        pipeline = build_pipeline(backbone, sampler, unet=compiled)
        generate_images(pipeline, [PROMPT] * batch, list(range(batch)), sampler, args.resolution)
        sync(device)
        first_calls[str(batch)] = time.perf_counter() - start
        out[f"{key}_first_call_seconds"] = first_calls
        print(key, "first call", batch, first_calls[str(batch)], flush=True)
    run_variant(key, unet=compiled, batches=batches)


def reference_arm(args, backbone, sampler, device, out):
    """The reference a user runs: the plain diffusers pipeline in fp16, 4 images per prompt."""
    if device.type == "cuda":
        from diffusers import StableDiffusionPipeline

        reference = StableDiffusionPipeline(
            vae=backbone.vae.to(torch.float16), text_encoder=backbone.text_encoder.to(torch.float16),
            tokenizer=backbone.tokenizer, unet=backbone.unet.to(torch.float16),
            scheduler=build_pipeline(backbone, sampler).scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        reference.set_progress_bar_config(disable=True)
        reference(prompt=[PROMPT], num_images_per_prompt=2, num_inference_steps=args.sampling_steps)
        times = []
        for _ in range(args.repeats):
            _, seconds = timed(lambda: reference(prompt=[PROMPT] * 4, num_images_per_prompt=4,
                                                 num_inference_steps=args.sampling_steps, guidance_scale=7.5), device)
            times.append(seconds / 16)
        out["reference_diffusers_fp16_16_images"] = {"s_per_image": min(times), "s_per_image_all": times}
        for module in (backbone.vae, backbone.text_encoder, backbone.unet):
            module.to(backbone.dtype)
        print("reference", out["reference_diffusers_fp16_16_images"], flush=True)


def training(args, backbone, device, results):
    out = results.setdefault("training_dreambooth_step", {})
    scheduler = make_noise_scheduler(backbone)
    size = args.resolution // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size, size, generator=generator).to(device)
    with torch.no_grad():
        hidden = diffusion.encode_text(backbone.text_encoder, backbone.tokenizer, [PROMPT, "a photo of dog"], device)
    params = TrainingParams(steps=args.train_steps, learning_rate=5e-6, adam_weight_decay=1e-2)
    weights = torch.tensor([1.0, 1.0])

    def variant(name, *, pinned: bool, compile_unet: bool):
        unet = fp32_trainable_copy(backbone, "unet")
        model = compiled_for_training(unet, args) if compile_unet else unet
        original = diffusion.to_device
        if not pinned:
            diffusion.to_device = lambda t, d, dtype=None: t.to(device=d, dtype=dtype) if dtype is not None else t.to(d)
        try:
            result = train_loop(
                unet=model, noise_scheduler=scheduler, parameters=list(unet.parameters()), params=params,
                learning_rate=params.learning_rate,
                next_batch=lambda step: TrainBatch(latents, [PROMPT, "dog"], weights),
                encode_prompts=lambda prompts: hidden, generator=torch.Generator().manual_seed(1),
                device=device, dtype=backbone.dtype,
            )
        finally:
            diffusion.to_device = original
        row = {
            "s_per_step": result.seconds_per_step,
            "first_step_s": result.seconds - result.seconds_per_step * (params.steps - 1),
            "peak_gib": (result.peak_memory_bytes or 0) / 2**30,
            "losses_first5": result.losses[:5],
        }
        out[name] = row
        print(name, row, flush=True)
        del unet, model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    variant("pageable_copies(old)", pinned=False, compile_unet=False)
    variant("pinned_async_copies", pinned=True, compile_unet=False)
    if args.compile:
        variant(f"pinned+compile[{args.train_compile_mode}]", pinned=True, compile_unet=True)
        # a second subject's training in the same process: a new fp32 copy, the compiled code reused?
        # (its first_step_s against the first's says what the next training pays)
        variant(f"pinned+compile[{args.train_compile_mode}] second copy", pinned=True, compile_unet=True)


def compiled_for_training(unet: torch.nn.Module, args) -> torch.nn.Module:
    """``torch.compile(unet)`` in ``--train-compile-mode``; with ``--train-layout harness`` the
    weights go to channels-last first, as ``methods.sampling.maybe_compiled(..., channels_last=True)``
    does for the harness's compiled fine-tunes (``diffusion_loss`` then feeds that layout)."""
    if args.train_layout == "harness":
        unet.to(memory_format=torch.channels_last)
    return torch.compile(unet, mode=args.train_compile_mode)


def _lora_unet(backbone, generator: torch.Generator):
    """DreamBooth-LoRA's trainable UNet, as the method builds it (a copy with fp32 rank-4 adapters)."""
    from methods.base import MethodContext
    from methods.dreambooth import DreamBoothLoRA, DreamBoothLoRAParams

    method = DreamBoothLoRA(DreamBoothLoRAParams(), MethodContext(backbone=backbone.spec))
    unet, _, parameters = method._trainable_modules(backbone, generator)
    return unet, parameters


def train_child(args) -> int:
    """One DreamBooth (or DreamBooth-LoRA) training in this process, timed after a start barrier
    shared with its peers."""
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    backbone = load_backbone(resolve_backbone(args.backbone), device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    scheduler = make_noise_scheduler(backbone)
    size = args.resolution // 8
    latents = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        hidden = diffusion.encode_text(backbone.text_encoder, backbone.tokenizer, [PROMPT, "a photo of dog"], device)
    if args.train_method == "dreambooth_lora":
        unet, parameters = _lora_unet(backbone, torch.Generator().manual_seed(2))
        learning_rate = 1e-4
    else:
        unet = fp32_trainable_copy(backbone, "unet")
        parameters, learning_rate = list(unet.parameters()), 5e-6
    # --compile: this child trains through torch.compile (the warm-up below pays the compile, before
    # the barrier, so the timed window holds compiled steps only; compile seconds are reported)
    model = compiled_for_training(unet, args) if args.compile else unet
    weights = torch.tensor([1.0, 1.0])

    def run(steps):
        params = TrainingParams(steps=steps, learning_rate=learning_rate, adam_weight_decay=1e-2)
        return train_loop(
            unet=model, noise_scheduler=scheduler, parameters=parameters, params=params,
            learning_rate=params.learning_rate, next_batch=lambda step: TrainBatch(latents, [PROMPT, "dog"], weights),
            encode_prompts=lambda prompts: hidden, generator=torch.Generator().manual_seed(1),
            device=device, dtype=backbone.dtype, cuda_graphs=args.train_graphs,
        )

    warm_start = time.time()
    run(3)  # warm-up: cuDNN autotuning, allocator (and the compile, with --compile)
    warm_seconds = time.time() - warm_start
    barrier = Path(args.barrier)
    (barrier / f"ready-{os.getpid()}").touch()
    deadline = time.time() + 600
    while len(list(barrier.glob("ready-*"))) < args.barrier_count and time.time() < deadline:
        time.sleep(0.02)
    start = time.time()
    result = run(args.train_steps)
    end = time.time()
    Path(args.out).write_text(json.dumps({
        "start": start, "end": end, "s_per_step": result.seconds_per_step,
        "peak_gib": (result.peak_memory_bytes or 0) / 2**30, "warmup_seconds": warm_seconds,
        "losses_first5": result.losses[:5], "cuda_graphs": result.cuda_graphs,
    }))
    return 0


def concurrency(args, backbone, device, results):
    """N DreamBooth trainings at once on one GPU, one process each (what ``--workers-per-gpu N`` runs).

    Aggregate throughput = N × steps / (last end − first start) over the barrier-aligned timed
    windows; the amortized seconds per 1000 steps per subject is 1000 / that.
    """
    out = results.setdefault("training_concurrency" + ("" if args.train_method == "dreambooth" else f"_{args.train_method}"), {})
    arms = [(count, compiled) for compiled in args.concurrency_arms for count in args.concurrency]
    for count, compiled in arms:
        work = Path(tempfile.mkdtemp(prefix=f"conc{count}-"))
        command = [sys.executable, __file__, "--child-train", "--barrier", str(work), "--barrier-count", str(count),
                   "--train-steps", str(args.train_steps), "--backbone", args.backbone,
                   "--resolution", str(args.resolution), "--device", args.device, "--train-method", args.train_method]
        if compiled:
            command += ["--compile", "--train-compile-mode", args.train_compile_mode, "--train-layout", args.train_layout]
        if args.train_graphs:
            command.append("--train-graphs")
        started = time.perf_counter()
        processes = [subprocess.Popen([*command, "--out", str(work / f"child{i}.json")]) for i in range(count)]
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(timeout=args.child_timeout))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append("timeout")
        children = [json.loads(path.read_text()) for path in sorted(work.glob("child*.json"))]
        row = {"processes": count, "compiled": compiled, "captured": args.train_graphs, "returncodes": codes,
               "wall_seconds_incl_start": time.perf_counter() - started}
        if len(children) == count:
            window = max(c["end"] for c in children) - min(c["start"] for c in children)
            aggregate = count * args.train_steps / window
            row.update({
                "steps_each": args.train_steps, "timed_window_s": window, "aggregate_steps_per_s": aggregate,
                "amortized_s_per_1000_steps_per_subject": 1000 / aggregate,
                "s_per_step_each": [c["s_per_step"] for c in children],
                # epoch seconds of each child's timed steps: set beside another process's (overlap)
                "clock_windows_each": [[c["start"], c["end"]] for c in children],
                "peak_gib_each": [c["peak_gib"] for c in children],
                "warmup_seconds_each": [c.get("warmup_seconds") for c in children],
                "losses_first5_each": [c.get("losses_first5") for c in children],
                "cuda_graphs_each": [c.get("cuda_graphs") for c in children],
            })
        out[f"{count}{'+compile' if compiled else ''}{'+graphs' if args.train_graphs else ''}"] = row
        print("concurrency", row, flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


def _arms(text: str) -> list[bool]:
    names = [part for part in text.split(",") if part]
    unknown = sorted(set(names) - {"eager", "compiled"})
    if unknown:
        raise argparse.ArgumentTypeError(f"--concurrency-arms: unknown {unknown}; use eager and/or compiled")
    return [name == "compiled" for name in names]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--skip", default="", help="comma list: sampling,training")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sampling-batches", type=_ints, default=[8, 16, 32])
    parser.add_argument("--train-compile-mode", default="default", help="e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--train-layout", choices=("default", "harness"), default="default",
                        help="harness: compiled trainings in channels-last, as the harness's fine-tunes")
    parser.add_argument("--compile-batches", type=_ints, default=[16, 32])
    parser.add_argument("--compile-cache", default=None, help="TORCHINDUCTOR_CACHE_DIR for the compiled arms")
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout-arms", action="store_true", help="also time channels_last and fused QKV")
    parser.add_argument("--concurrency", type=_ints, default=[], help="e.g. 1,2,4,8: DreamBooth trainings at once")
    parser.add_argument("--concurrency-arms", type=_arms, default=[False],
                        help="comma list of eager,compiled: how the --concurrency children train (default eager)")
    parser.add_argument("--train-graphs", action="store_true",
                        help="the concurrency children train with training.cuda_graphs (each step one replayed CUDA graph)")
    parser.add_argument("--train-method", choices=("dreambooth", "dreambooth_lora"), default="dreambooth",
                        help="what the --concurrency children train (default: DreamBooth's full UNet)")
    parser.add_argument("--child-timeout", type=int, default=400)
    parser.add_argument("--child-train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--barrier-count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.compile_cache).resolve())
    if args.child_train:
        return train_child(args)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    backbone = load_backbone(resolve_backbone(args.backbone), device, dtype)
    import diffusers
    import transformers

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "packages": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": vars(args),
        "dtype": str(dtype),
    }
    skip = set(filter(None, args.skip.split(",")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name, fn in (("concurrency", concurrency), ("training", training), ("sampling", sampling)):
        if name == "concurrency" and not args.concurrency:
            continue
        if name in skip:
            continue
        try:
            fn(args, backbone, device, results)
        except Exception:  # noqa: BLE001 - keep what was measured
            import traceback

            results[f"{name}_error"] = traceback.format_exc()
            print(results[f"{name}_error"], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
