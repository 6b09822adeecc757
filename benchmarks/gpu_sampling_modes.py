"""Issue 17 item 1: which compile settings make the sampling path faster, in one process.

The protocol's sampling (DDIM 50, guidance 7.5, bf16, ``generate_images`` with one CPU generator
per image, PIL images out) at one batch size (``--batch``, 32 = what the suite samples per call),
timed for each arm below after that arm's first call (which holds its compile, reported apart):

- ``eager``: the harness path without compile (``generation.compile=false``), the reference;
- ``compile_default``: ``torch.compile(unet, dynamic=False)``, today's default on CUDA;
- ``..._cudnn_benchmark``: the same compiled code with ``torch.backends.cudnn.benchmark = True``
  (the harness leaves it False in fast mode; inductor's default mode runs convolutions through
  cuDNN, which then picks its kernels by heuristics instead of by timing);
- ``compile_tuned``: inductor options ``conv_1x1_as_mm``, ``coordinate_descent_tuning``,
  ``epilogue_fusion=False`` (the settings diffusers' "accelerate inference" guide uses);
- ``compile_tuned_channels_last``: the same with the UNet in ``channels_last``;
- ``compile_max_autotune``: ``max-autotune-no-cudagraphs`` (Triton/cuBLAS/cuDNN kernels chosen by
  timing) plus the tuned options;
- ``compile_default_vae``: ``compile_default`` with the VAE's decoder compiled too (the decode
  after the loop is eager in the harness: 13 ms of ~220 per image, second session's split); the
  suite's path until the twenty-second session, which added ``ChannelsLastCat`` (the suite's path
  now is ``compile_default_vae_cat_pass``);
- ``compile_default_channels_last[_vae[_fused_qkv]]``: the default compile with the UNet in
  ``channels_last``, then also the compiled decoder, then also diffusers'
  ``fuse_qkv_projections()`` (one matmul for q, k, v of self-attention, one for k, v of
  cross-attention: the same arithmetic on concatenated weights), each undone after its arm;
- ``compile_cudagraphs_channels_last_vae``: as ``compile_default_channels_last_vae`` with
  ``mode="reduce-overhead"`` (the UNet's forward replayed as a CUDA graph: no per-kernel launch
  cost on the host);
- ``compile_frozen_vae[_cudagraphs]`` (as ``compile_default_vae``; H200, eighteenth session:
  0.2112 and 0.2140 s/image against its 0.2107, no gain): inductor's ``freezing`` (inference only: the weights become constants of the compiled graph, so it can fold
  them and lay the convolutions' weights out once instead of at each call), then also CUDA
  graphs (``triton.cudagraphs``, what ``reduce-overhead`` turns on);
- ``compile_default_vae_fa4``: ``compile_default_vae`` with SDPA's flash backend served by
  FlashAttention-4 (torch's FA4 registration; ``gpu_unet_kernels.py`` times it per attention
  shape), item 1's last lever: recorded as refused, with why, where FA4 is not installed, the
  device cannot run it or one small SDPA call under the registration fails (torch 2.11 with
  flash-attn-4 4.0.0b40 does);
- ``compile_default_vae_fa4_direct``: ``compile_default_vae`` with the UNet's attention processor
  calling FA4 directly (a torch custom op on the UNet's (B, L, H, D) layout) for attention with at
  least ``--fa4-min-kv-tokens`` keys (2048: the 4096-token self-attention at head size 40, where FA4
  beat torch's choice per shape), diffusers' processor elsewhere; ``invalid`` if FA4 never ran;
- ``compile_cudagraphs_vae_fa4_direct``: the same FA4 processor with ``mode="reduce-overhead"``
  (CUDA graphs; the FA4 op is captured in them), for ``--batch 64`` where CUDA graphs were fastest;
- ``compile_default_vae_options``: ``compile_default_vae_cat_pass`` (the suite's path) under the
  inductor options given with ``--inductor-option KEY=VALUE`` (repeatable; e.g. ``layout_optimization=False``), to run end to end
  a setting ``gpu_unet_kernels.py``'s ``INDUCTOR_SETTINGS`` arms found faster for the UNet forward;
- ``compile_default_vae_layout_group_norm``: ``compile_default_vae`` with the GroupNorms of the
  UNet and the VAE's decoder stated in channels-last order while compiled
  (``gpu_metrics.layout_group_norms``; the same arithmetic in memory order);
- ``compile_default_vae_cat_pass``: ``compile_default_vae`` with the UNet's channel concatenations
  laid out channels-last (``methods.compile_layout.ChannelsLastCat``, an inductor post-grad pass; the
  same values in another memory order): the suite's path since the twenty-second session;
  ``compile_default_channels_last_vae_cat_pass``: the same with the UNet's weights in channels-last
  (what that session's arm ``compile_default_vae_channels_last_cat`` ran: an arm whose name holds
  ``_channels_last`` converts the UNet, ``unet_channels_last`` in the JSON);
  ``compile_cudagraphs_vae_cat_pass``: the suite's path with CUDA graphs (inductor's
  ``triton.cudagraphs``, all ``mode="reduce-overhead"`` sets; a mode and options cannot be passed
  together), for ``--batch 64``;
  ``compile_default_vae_fused_norm_cat_pass`` / ``compile_cudagraphs_vae_fused_norm_cat_pass``: those
  two with the UNet's GroupNorms (+ SiLU) of 32x32 pixels and more as ``methods.fused_norm``'s Triton
  kernels (an inductor pre-grad pass; counts in ``fused_group_norms``);
  ``compile_default_vae_fused_norm_decoder_cat_pass``: the first with the VAE decoder's GroupNorms of
  32x32 pixels and more as those kernels too (``decoder_fused_group_norms``; its 512x512 GroupNorms
  have groups of 4 channels: 8-byte pieces of each pixel in channels-last); ``--fused-norm-config
  PATH`` sets their kernels' ``KernelConfig`` (e.g. from ``gpu_fused_norm.py --sweep``'s output, so a
  sweep and these arms fit in one GPU call);
  ``compile_default_vae_shifted_norm_cat_pass`` / ``compile_cudagraphs_vae_shifted_norm_cat_pass`` /
  ``compile_default_vae_shifted_norm_decoder_cat_pass``: the same three with every GroupNorm stated
  as shifted sums instead (``benchmarks/shifted_norm.py``: torch ops inductor fuses as before, plain sums
  instead of its Welford reduction; counts in ``fused_group_norms``);
- ``suite``: the suite's own code, ``methods.sampling.build_pipeline(..., compile_unet=True)`` (the
  compiled UNet and decoder exactly as ``generation.compile`` builds them; its inductor options
  and the passes' counts in the JSON), so its figure is the suite's, not a replica's;
- ``diffusers_fp16_reference``: the plain diffusers fp16 pipeline a user would run instead
  (``gpu_speed.reference_arm``: 4 prompts x 4 images).

Every compiled arm starts from ``torch._dynamo.reset()`` and an inductor cache in a fresh
temporary folder (so its first call shows a cold compile). Images of each arm are compared with
the eager arm's at the same seeds (max and mean |difference| in uint8 levels): a fast path may move
pixels only as much as two fast-mode runs differ (13/255, ``benchmarks/results``).

The JSON is rewritten after every arm, so a time limit keeps what finished. CPU check (tiny, a few
seconds plus CPU compiles): ``python benchmarks/gpu_sampling_modes.py --tiny --device cpu
--arms eager,compile_default --out /tmp/sm.json``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import environment, synchronize, timed  # noqa: E402
from benchmarks.gpu_metrics import (  # noqa: E402
    FA4_DIRECT_CALLS,
    describe_options,
    fa4_direct,
    fa4_refusal,
    fa4_sdpa,
    fa4_sdpa_probe,
    layout_group_norms,
    save_partial,
    sdpa_preference,
)
from benchmarks.gpu_speed import PROMPT, as_uint8, reference_arm  # noqa: E402
from benchmarks.shifted_norm import ShiftedGroupNorm  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.base import SamplerConfig  # noqa: E402
from methods.compile_layout import ChannelsLastCat  # noqa: E402
from methods.fused_norm import FusedGroupNorm, KernelConfig, kernel_config, set_kernel_config  # noqa: E402
from methods.sampling import build_pipeline, generate_images  # noqa: E402

TUNED = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False}
ARMS = (
    "eager",
    "diffusers_fp16_reference",
    "compile_default",
    "compile_default_cudnn_benchmark",
    "compile_tuned",
    "compile_tuned_channels_last",
    "compile_max_autotune",
    "eager_cudnn_attention",
    "compile_default_cudnn_attention",
    "compile_default_vae",
    "compile_default_channels_last",
    "compile_default_channels_last_vae",
    "compile_default_channels_last_vae_fused_qkv",
    "compile_cudagraphs_channels_last_vae",
    "compile_frozen_vae",
    "compile_frozen_cudagraphs_vae",
    "compile_default_vae_fa4",
    "compile_default_vae_fa4_direct",
    "compile_cudagraphs_vae_fa4_direct",
    "compile_default_vae_options",
    "compile_default_vae_layout_group_norm",
    "compile_default_vae_cat_pass",
    "compile_default_channels_last_vae_cat_pass",
    "compile_cudagraphs_vae_cat_pass",
    "compile_default_vae_fused_norm_cat_pass",
    "compile_cudagraphs_vae_fused_norm_cat_pass",
    "compile_default_vae_fused_norm_decoder_cat_pass",
    "compile_default_vae_shifted_norm_cat_pass",
    "compile_cudagraphs_vae_shifted_norm_cat_pass",
    "compile_default_vae_shifted_norm_decoder_cat_pass",
    "suite",
)
TARGET_S_PER_IMAGE = 0.20


def norm_pass(arm: str):
    """A new GroupNorm pass for a ``*_fused_norm*`` (``methods.fused_norm``) or ``*_shifted_norm*``
    (``benchmarks.shifted_norm``) arm, else None."""
    if "_fused_norm" in arm:
        return FusedGroupNorm()
    return ShiftedGroupNorm() if "_shifted_norm" in arm else None


def compile_options(arm: str, options_arm: dict | None = None) -> dict | None:
    """The inductor options ``arm`` compiles under (None: not compiled); ``options_arm``: those of
    ``compile_default_vae_options``, from ``--inductor-option``."""
    if arm == "compile_default_vae_options":  # the suite's path (with the channels-last cats) under the options
        return {"post_grad_custom_pre_pass": ChannelsLastCat(), **(options_arm or {})}
    if arm.endswith("_cat_pass"):  # the suite's path: the channel concatenations laid out channels-last
        cudagraphs = {"triton.cudagraphs": True} if arm.startswith("compile_cudagraphs") else {}  # = reduce-overhead
        norm = norm_pass(arm)
        return {**cudagraphs, "post_grad_custom_pre_pass": ChannelsLastCat(),
                **({"pre_grad_custom_pass": norm} if norm else {})}
    if arm.startswith(("compile_default", "compile_cudagraphs")):  # also compile_default_cudnn_attention
        return {}
    if arm.startswith("compile_tuned"):
        return dict(TUNED)
    if arm.startswith("compile_frozen"):  # the UNet's weights as constants of the graph (inference)
        return {"freezing": True, **({"triton.cudagraphs": True} if "_cudagraphs" in arm else {})}
    if arm == "compile_max_autotune":
        from torch._inductor import list_mode_options

        return {**list_mode_options("max-autotune-no-cudagraphs"), **TUNED}
    return None


def run_arm(arm: str, args, backbone, sampler, device, document: dict) -> None:
    out = document["arms"].setdefault(arm, {})
    if arm == "diffusers_fp16_reference":
        if device.type != "cuda":
            out["skipped"] = "CUDA only (fp16)"
            return
        holder: dict = {}
        reference_arm(SimpleNamespace(sampling_steps=args.steps, repeats=args.repeats), backbone, sampler, device, holder)
        out.update(holder["reference_diffusers_fp16_16_images"])
        return
    decoder = backbone.vae.decoder  # an arm may compile it (``_vae``): restored for the next arm
    try:
        if arm.endswith("cudnn_attention"):  # SDPA through cuDNN's fused attention first, FlashAttention-2 next
            out["sdpa_backend"] = "cudnn first"
            with sdpa_preference("cudnn"):
                _run_arm(arm, args, backbone, sampler, device, document, out)
        elif arm.endswith("_fa4"):  # held over the arm: the compiled UNet picks SDPA's backend when traced
            if refusal := fa4_sdpa_probe(device):
                out["refused"] = refusal
                return
            out["sdpa_backend"] = "FlashAttention-4 (torch's FA4 registration)"
            with fa4_sdpa():
                _run_arm(arm, args, backbone, sampler, device, document, out)
        elif arm.endswith("_fa4_direct"):  # the UNet's attention processor calls FA4 (custom op) where it won
            if refusal := fa4_refusal(device, through_sdpa=False):
                out["refused"] = refusal
                return
            out["fa4_min_kv_tokens"] = args.fa4_min_kv_tokens
            with fa4_direct(backbone.unet, args.fa4_min_kv_tokens):
                _run_arm(arm, args, backbone, sampler, device, document, out)
            out["fa4_calls_per_pipeline_call"] = FA4_DIRECT_CALLS[0] / (1 + args.repeats)
            if not FA4_DIRECT_CALLS[0]:
                out["invalid"] = "the FA4 op was never called: this arm's time is not FA4's"
        elif arm.endswith("_layout_group_norm"):  # before compiling: the trace reads the modules' class
            with layout_group_norms(backbone.unet, backbone.vae) as switched:
                out["layout_group_norms"] = switched
                _run_arm(arm, args, backbone, sampler, device, document, out)
        else:
            _run_arm(arm, args, backbone, sampler, device, document, out)
    finally:
        backbone.vae.decoder = decoder
        if out.get("fused_qkv"):
            backbone.unet.unfuse_qkv_projections()


def _run_arm(arm: str, args, backbone, sampler, device, document: dict, out: dict) -> None:
    torch.backends.cudnn.benchmark = arm.endswith("cudnn_benchmark") or (args.cudnn_benchmark and arm != "eager")
    out["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    channels_last = "_channels_last" in arm
    backbone.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out["unet_channels_last"] = channels_last
    options = compile_options(arm, args.inductor_options)
    unet = decoder_pass = None
    # a cold compile per compiled arm, but cudnn_benchmark (it reuses the default arm's compiled code)
    if arm == "suite" or (options is not None and not arm.endswith("cudnn_benchmark")):
        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{arm}-")
    if arm == "suite":  # the suite's own compile path, below through build_pipeline
        from methods.sampling import _compile_options

        options = _compile_options(inference=True).get("options", {})
        out["inductor_options"] = describe_options(options)
        out["vae_decoder_compiled"] = True
    elif options is not None:
        if arm.startswith("compile_cudagraphs") and not options:
            unet = torch.compile(backbone.unet, dynamic=False, mode="reduce-overhead")
            out["compile_mode"] = "reduce-overhead"
        else:
            unet = torch.compile(backbone.unet, dynamic=False, options=options or None)
            out["inductor_options"] = describe_options(options)
        if arm.endswith("_vae") or "_vae_" in arm:  # the VAE's decoder through torch.compile too (after the UNet's reset)
            decoder_pass = norm_pass(arm) if "_norm_decoder" in arm else None  # its GroupNorms too
            backbone.vae.decoder = torch.compile(backbone.vae.decoder, dynamic=False,
                                                 options={"pre_grad_custom_pass": decoder_pass} if decoder_pass else None)
            out["vae_decoder_compiled"] = True
    if arm.endswith("_fused_qkv"):  # before the first call, so the compiled graph sees the fused weights
        backbone.unet.fuse_qkv_projections()
        out["fused_qkv"] = True
    prompts = [f"{PROMPT} {i % 4}" for i in range(args.batch)]
    seeds = list(range(args.batch))
    pipeline = build_pipeline(backbone, sampler, unet=unet, compile_unet=arm == "suite")
    call = lambda: generate_images(pipeline, prompts, seeds, sampler, args.resolution)  # noqa: E731
    _, first = timed(call, device)
    out["first_call_seconds"] = round(first, 2)
    if options and "post_grad_custom_pre_pass" in options:  # the pass ran at that call's compile
        out["channels_last_cats"] = options["post_grad_custom_pre_pass"].rewritten
    if options and "pre_grad_custom_pass" in options:
        out["fused_group_norms"] = options["pre_grad_custom_pass"].counts()
    if decoder_pass is not None:
        out["decoder_fused_group_norms"] = decoder_pass.counts()
    if arm == "suite":
        from methods.sampling import _compile_failed

        if _compile_failed:  # build_pipeline fell back to eager: this arm's time is not the compiled path's
            out["invalid"] = f"compile failed, ran eager: {_compile_failed[0]}"
    print(f"{arm}: first call {first:.1f} s", flush=True)
    times, images = [], None
    for _ in range(args.repeats):
        images, seconds = timed(call, device)
        times.append(seconds / args.batch)
    out["s_per_image"] = round(min(times), 4)
    out["s_per_image_all"] = [round(t, 4) for t in times]
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    pixels = as_uint8(images)
    if arm == "eager":
        document["_eager_pixels"] = pixels
    elif "_eager_pixels" in document:
        difference = np.abs(pixels - document["_eager_pixels"])
        out["vs_eager_max_levels"] = int(difference.max())
        out["vs_eager_mean_levels"] = round(float(difference.mean()), 3)
    backbone.unet.to(memory_format=torch.contiguous_format)
    print(f"{arm}: {out}", flush=True)


def write(document: dict, path: Path) -> None:
    timed_arms = {k: v["s_per_image"] for k, v in document["arms"].items() if "s_per_image" in v and k != "diffusers_fp16_reference"}
    if timed_arms:
        best = min(timed_arms, key=timed_arms.get)
        document["best"] = {"arm": best, "s_per_image": timed_arms[best]}
        settings = document["settings"]
        protocol = (settings["backbone"] != "tiny" and settings["resolution"] >= 512 and settings["ddim_steps"] == 50
                    and document["environment"]["device"].startswith("cuda"))
        document["target"] = {"s_per_image": TARGET_S_PER_IMAGE,
                              "met": bool(protocol and timed_arms[best] <= TARGET_S_PER_IMAGE),
                              "note": "denoising at the suite's batch; PNG writing runs in the writer's threads"}
    save_partial({k: v for k, v in document.items() if not k.startswith("_")}, str(path), path.name)


def inductor_options(parser: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs as inductor options: each key must be one of inductor's settings; values
    are Python literals (False, 3, 0.5) or else strings."""
    from torch._inductor import config as inductor_config

    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            parser.error(f"--inductor-option {pair!r}: write KEY=VALUE, e.g. layout_optimization=False")
        if key not in inductor_config.get_config_copy():
            parser.error(f"--inductor-option {pair!r}: {key!r} is not an inductor setting of torch {torch.__version__}")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch", type=int, default=32, help="images per pipeline call")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per arm after its first (best kept)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list from {', '.join(ARMS)}")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN benchmarking in every compiled arm")
    parser.add_argument("--fa4-min-kv-tokens", type=int, default=2048,
                        help="compile_default_vae_fa4_direct: attention with at least this many keys goes to FA4")
    parser.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                        help="compile_default_vae_options: an inductor option (repeatable), e.g. layout_optimization=False")
    parser.add_argument("--fused-norm-config", metavar="PATH",
                        help="*_fused_norm_* arms: methods.fused_norm's kernel config from this JSON (its fields, "
                             "or gpu_fused_norm.py --sweep output: its best config)")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, 4 steps, batch 4")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_sampling_modes.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.resolution, args.steps, args.batch, args.repeats = "tiny", 64, 4, 4, 1
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    args.inductor_options = inductor_options(parser, args.inductor_option)
    if args.fused_norm_config:
        try:
            set_kernel_config(KernelConfig.from_json(args.fused_norm_config))
        except ValueError as error:
            parser.error(str(error))
    if "compile_default_vae_options" in arms and not args.inductor_options:
        parser.error("compile_default_vae_options needs at least one --inductor-option KEY=VALUE")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = load_backbone(resolve_backbone(args.backbone), args.device, dtype)
    sampler = SamplerConfig(name="ddim", steps=args.steps, guidance=7.5, eta=0.0)
    document: dict = {
        "benchmark": "gpu_sampling_modes",
        "environment": environment(device),
        "settings": {"backbone": args.backbone, "resolution": args.resolution, "ddim_steps": args.steps,
                     "guidance": 7.5, "batch": args.batch, "repeats": args.repeats, "dtype": str(dtype),
                     **({"inductor_options_arm": args.inductor_options} if args.inductor_options else {}),
                     **({"fused_norm_config": dataclasses.asdict(kernel_config())}
                        if any("_fused_norm" in arm for arm in arms) else {})},
        "arms": {},
    }
    # warm-up outside every timing: CUDA context, cuBLAS handles, the text encoder's kernels
    generate_images(build_pipeline(backbone, sampler), [PROMPT] * 2, [0, 1], sampler, args.resolution)
    synchronize(device)
    out = Path(args.out)
    for arm in arms:
        started = time.perf_counter()
        try:
            run_arm(arm, args, backbone, sampler, device, document)
        except Exception as error:  # noqa: BLE001 - keep the other arms
            document["arms"].setdefault(arm, {})["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
            print(f"{arm}: failed: {error}", flush=True)
        document["arms"][arm]["arm_wall_seconds"] = round(time.perf_counter() - started, 1)
        write(document, out)
    torch.backends.cudnn.benchmark = False
    print(json.dumps({k: v for k, v in document.items() if not k.startswith("_")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
