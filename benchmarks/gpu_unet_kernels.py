"""Issue 17 item 1: where one sampling UNet forward spends its GPU time, and which attention
kernel is fastest at the UNet's own attention shapes.

Sampling is ~100 UNet forwards per image (DDIM 50 x CFG), so the forward's kernel time is the
sampling floor. This script, in one process:

1. times one UNet forward (``--latents`` latents of 64x64 = 512 px, 77 text tokens, bf16, no
   grad) for each arm: ``eager`` (the reference), ``compiled`` (``torch.compile``, default layout:
   the harness's sampling UNet), ``compiled_channels_last``, and on request
   ``compiled_max_autotune[_channels_last]`` (``max-autotune-no-cudagraphs``: inductor times
   Triton templates against cuBLAS/cuDNN for every matmul and convolution and keeps the fastest;
   a long compile); median of CUDA-event timings, and each arm's output against eager's;
2. profiles a few forwards of each arm and sums the kernels' device time by kind (attention,
   convolution, matmul, inductor's fused Triton kernels, other), with the top kernels by name and
   every Triton kernel's time; the arm ``compiled_bandwidth`` compiles under inductor's
   ``profile_bandwidth`` (each Triton kernel's bytes per call, and its first call benchmarked
   alone) and calls once; joined by name with the ``compiled`` arm's profile (run it first), it
   gives the GB each kernel moves per forward and the TB/s it reaches in the forward and alone (to
   set beside ``unet_memory_traffic.py``'s floor for those kernels);
   ``compiled_no_layout_optimization`` / ``compiled_no_split_reductions`` /
   ``compiled_aggressive_fusion`` / ``compiled_nd_tiling`` (2-D tiles for pointwise kernels) /
   ``compiled_coordinate_descent`` (each Triton kernel's block sizes tuned by benchmarking) /
   ``compiled_nd_tiling_coordinate_descent`` compile under those inductor settings
   (``INDUCTOR_SETTINGS``); ``compiled_layout_group_norm`` compiles with the UNet's GroupNorms
   stated in channels-last order (``gpu_metrics.layout_group_norms``); ``compiled_channels_last_cat`` with
   the channel concatenations laid out channels-last (``methods.compile_layout.ChannelsLastCat``;
   ``compiled_channels_last_cat_bandwidth`` is ``compiled_bandwidth`` for it, joined with its profile;
   ``compiled_channels_last_cat_coordinate_descent`` adds inductor's block-size tuning, which may
   give a GroupNorm reduction the several groups per program a channels-last read needs;
   ``compiled_channels_last_cat_fused_norm`` also has the GroupNorms (+ SiLU) of 32x32 and more pixels
   run as ``methods.fused_norm``'s Triton kernels, counted apart as ``group_norm_kernels``);
3. records every ``scaled_dot_product_attention`` call one eager forward makes (shape and count)
   and times each shape under each SDPA backend (cuDNN, FlashAttention-2, memory-efficient, and
   ``flex_attention`` compiled), with the achieved TFLOP/s (4·B·H·Lq·Lk·D FLOPs per call) and the
   largest difference from the math backend's output in fp32;
4. with FlashAttention-4 installed (``pip install flash-attn-4``: NVIDIA's CuTe DSL kernels for
   Hopper and Blackwell, head sizes 8-256 on SM 9.0), also FA4 at each shape, both called directly
   (``flash_attn.cute.interface.flash_attn_func`` on the UNet's own (B, L, H, D) layout) and through
   SDPA with torch's FA4 registration active (``torch.nn.attention.activate_flash_attention_impl``),
   and the arms ``eager_fa4`` / ``compiled_fa4``: the whole forward with SDPA's flash backend
   served by FA4 (the same attention, another kernel: it is what item 1 has left to try, as
   the results README says), refused when one small SDPA call under the registration fails
   (``fa4_sdpa_probe``: torch 2.11 with 4.0.0b40 does). The arms ``eager_fa4_direct`` /
   ``compiled_fa4_direct`` swap the UNet's attention processor for one that calls FA4 as a torch
   custom op (``fa4_attention_processor``) where a call has at least ``--fa4-min-kv-tokens`` keys
   (2048: the 4096-token layers, the one shape where FA4 beat torch's choice), ``..._all`` for
   every call. An FA4 arm whose profile holds no FA4 kernel is marked ``invalid`` (the first run's
   ``compiled_fa4`` timed cuDNN's attention). Without FA4 (or on a CPU) these are recorded as
   refused, with why.

A backend that refuses a shape is recorded as refused. The JSON is rewritten after each part, so
a time limit keeps what finished. CPU check (tiny, seconds): ``python benchmarks/gpu_unet_kernels.py
--tiny --device cpu --out /tmp/uk.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import environment  # noqa: E402
from benchmarks.gpu_metrics import (  # noqa: E402
    FA4_DIRECT_CALLS,
    describe_options,
    event_times,
    fa4_direct,
    fa4_output,
    fa4_refusal,
    fa4_sdpa,
    fa4_sdpa_probe,
    is_fa4_kernel,
    layout_group_norms,
    profiled_kernels,
    save_partial,
    synchronize,
)
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.compile_layout import ChannelsLastCat  # noqa: E402
from methods.fused_norm import FusedGroupNorm  # noqa: E402

KINDS = (  # first match wins; lower-case substrings of kernel names. Inductor's fused kernels come
    # first: their names list the ops they fuse (``triton_poi_fused_convolution_native_group_norm_silu``
    # is GroupNorm + SiLU after a convolution, not the convolution), which the first GPU run (results
    # README, tenth session) counted under those ops.
    ("group_norm_kernels", ("group_norm_stats", "group_norm_finalize", "group_norm_apply")),  # methods.fused_norm
    ("inductor_triton", ("triton_",)),
    ("attention", ("attention", "fmha", "flash", "sdpa", "attn")),
    ("convolution", ("conv", "implicit_gemm", "fprop", "dgrad", "wgrad", "xmma_fprop")),
    ("matmul", ("gemm", "nvjet", "cutlass", "matmul", "cublas", "gemv")),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose")),
)
BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
# compiled arms under other inductor settings, for its memory-bound kernels (GroupNorm, SiLU,
# LayerNorm, GEGLU, adds): ~35 of the forward's ~131 ms on an H100, about twice the time their bytes
# need at its bandwidth (unet_memory_traffic.py). Convolutions in channels-last (inductor's layout
# optimization) leave a GroupNorm group's 10 channels as 20-byte pieces of each pixel; a split
# reduction reads a group in more passes; aggressive fusion fuses nodes that share no memory access.
INDUCTOR_SETTINGS = {
    "compiled_bandwidth": {"profile_bandwidth": True, "profile_bandwidth_regex": ""},
    "compiled_no_layout_optimization": {"layout_optimization": False},
    "compiled_no_split_reductions": {"split_reductions": False},
    "compiled_aggressive_fusion": {"aggressive_fusion": True},
    "compiled_nd_tiling": {"triton.prefer_nd_tiling": True},
    "compiled_coordinate_descent": {"coordinate_descent_tuning": True},
    "compiled_nd_tiling_coordinate_descent": {"triton.prefer_nd_tiling": True, "coordinate_descent_tuning": True},
    # the up blocks' channel cats laid out channels-last (methods.compile_layout.ChannelsLastCat)
    "compiled_channels_last_cat": {"post_grad_custom_pre_pass": ChannelsLastCat()},
    "compiled_channels_last_cat_coordinate_descent": {"post_grad_custom_pre_pass": ChannelsLastCat(),
                                                      "coordinate_descent_tuning": True},
    # and the GroupNorms (+ SiLU) as methods.fused_norm's Triton kernels
    "compiled_channels_last_cat_fused_norm": {"post_grad_custom_pre_pass": ChannelsLastCat(),
                                              "pre_grad_custom_pass": FusedGroupNorm()},
}
ARMS = ("eager", "compiled", "compiled_channels_last", "compiled_max_autotune", "compiled_max_autotune_channels_last",
        "compiled_bandwidth", "compiled_no_layout_optimization", "compiled_no_split_reductions",
        "compiled_aggressive_fusion", "compiled_nd_tiling", "compiled_coordinate_descent",
        "compiled_nd_tiling_coordinate_descent", "compiled_layout_group_norm", "compiled_channels_last_cat",
        "compiled_channels_last_cat_bandwidth", "compiled_channels_last_cat_coordinate_descent",
        "compiled_channels_last_cat_fused_norm", "eager_fa4", "compiled_fa4", "eager_fa4_direct", "compiled_fa4_direct", "compiled_fa4_direct_all")


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def kernel_breakdown(function, device: torch.device, calls: int, top: int = 15) -> dict:
    """Device time of ``calls`` calls of ``function`` by kernel kind, per call (CUDA only)."""
    _, _, kernels, attribute = profiled_kernels(function, calls, device)
    by_kind: dict[str, float] = {}
    for event in kernels:
        kind = kind_of(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + getattr(event, attribute, 0.0) / 1e3 / calls
    total = sum(by_kind.values())
    kernels.sort(key=lambda e: getattr(e, attribute, 0.0), reverse=True)
    return {
        "device_ms_per_call": round(total, 3),
        "fa4_kernel_ms_per_call": round(sum(getattr(e, attribute, 0.0) for e in kernels if is_fa4_kernel(e.key)) / 1e3 / calls, 3),
        "ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "share_by_kind": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])} if total else {},
        "top_kernels": [{"kernel": e.key[:140], "kind": kind_of(e.key), "calls_per_forward": e.count / calls,
                         "ms_per_forward": round(getattr(e, attribute, 0.0) / 1e3 / calls, 3)} for e in kernels[:top]],
        "inductor_triton_kernels": [{"kernel": e.key, "calls_per_forward": e.count / calls,
                                     "ms_per_forward": round(getattr(e, attribute, 0.0) / 1e3 / calls, 4)}
                                    for e in kernels if kind_of(e.key) == "inductor_triton"],
    }


def triton_bandwidth(collected: list[tuple], kernels: list[dict] | None) -> dict:
    """Bytes and bandwidth of inductor's Triton kernels. ``collected``: inductor's
    ``profile_bandwidth`` records (ms, GB, GB/s, name) of each kernel's first call, benchmarked
    alone; ``kernels``: the ``compiled`` arm's profile (calls and device ms per forward by name),
    joined by name for what each kernel moves in a forward and at what rate; a profiled kernel
    inductor did not count is reported as unmatched time."""
    alone = {}
    for ms, gb, _, name in collected:
        alone.setdefault(name, (ms, gb))
    result: dict = {"kernels_counted": len(alone)}
    if kernels is None:
        rows = [{"kernel": name, "gb_per_call": round(gb, 4), "ms_alone": round(ms, 4),
                 "tb_per_s_alone": round(gb / ms, 3) if ms else None} for name, (ms, gb) in alone.items()]
        result["note"] = "no compiled arm earlier in this run: per-call figures only"
        result["kernels"] = sorted(rows, key=lambda r: -r["ms_alone"])
        return result
    rows, gb_total, ms_total, unmatched_ms = [], 0.0, 0.0, 0.0
    for row in kernels:
        if row["kernel"] not in alone:
            unmatched_ms += row["ms_per_forward"]
            continue
        ms, gb = alone[row["kernel"]]
        gb_forward = gb * row["calls_per_forward"]
        gb_total += gb_forward
        ms_total += row["ms_per_forward"]
        rows.append({**row, "gb_per_call": round(gb, 4), "gb_per_forward": round(gb_forward, 3),
                     "tb_per_s": round(gb_forward / row["ms_per_forward"], 3) if row["ms_per_forward"] else None,
                     "tb_per_s_alone": round(gb / ms, 3) if ms else None})
    rows.sort(key=lambda r: -r["ms_per_forward"])
    result.update({"kernels_matched": len(rows), "ms_unmatched": round(unmatched_ms, 3), "ms_per_forward": round(ms_total, 3),
                   "gb_per_forward": round(gb_total, 2), "tb_per_s": round(gb_total / ms_total, 3) if ms_total else None,
                   "kernels": rows})
    return result


def bandwidth_arm(unet, inputs, device: torch.device, document: dict, arm: str = "compiled_bandwidth") -> dict:
    """``compiled_bandwidth``: compile under inductor's ``profile_bandwidth`` and call once (in that
    mode a Triton kernel runs only at its first, benchmarked call: the arm's outputs and times are
    not the forward's, so it is neither timed nor profiled), then join with the ``compiled`` arm.
    ``<base>_bandwidth`` (e.g. ``compiled_channels_last_cat_bandwidth``): the same under the base
    arm's inductor settings too, joined with that arm's profile (run it first)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.runtime import triton_heuristics

    torch._dynamo.reset()
    triton_heuristics.collected_calls.clear()
    base = "compiled" if arm == "compiled_bandwidth" else arm[: -len("_bandwidth")]
    settings = {**INDUCTOR_SETTINGS.get(base, {}), **INDUCTOR_SETTINGS["compiled_bandwidth"]}
    with inductor_config.patch(settings), torch.no_grad():
        torch.compile(unet, dynamic=False)(*inputs[:2], encoder_hidden_states=inputs[2])
    synchronize(device)
    collected = list(triton_heuristics.collected_calls)
    torch._dynamo.reset()  # its compiled code launches nothing after the first call: never reuse it
    compiled = document["arms"].get(base, {}).get("kernels", {}).get("inductor_triton_kernels")
    return {"inductor_settings": describe_options(settings), "joined_with_arm": base,
            "triton_bandwidth": triton_bandwidth(collected, compiled)}


def record_attention_shapes(unet, inputs) -> dict[tuple, int]:
    """Every SDPA call of one eager forward: (q shape, k shape, dtype) -> count."""
    seen: dict[tuple, int] = {}
    original = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        signature = (tuple(query.shape), tuple(key.shape), str(query.dtype))
        seen[signature] = seen.get(signature, 0) + 1
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            unet(*inputs)
    finally:
        F.scaled_dot_product_attention = original
    return seen


def time_attention_shape(q_shape, k_shape, dtype, device, repeats: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(q_shape, device=device, dtype=dtype, generator=generator)
    k = torch.randn(k_shape, device=device, dtype=dtype, generator=generator)
    v = torch.randn(k_shape, device=device, dtype=dtype, generator=generator)
    batch, heads, lq, dim = q_shape
    flops = 4 * batch * heads * lq * k_shape[2] * dim
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    result: dict = {"flops": flops}
    candidates = {b: (lambda b=b: _sdpa_with(sdpa_kernel, getattr(SDPBackend, b), q, k, v)) for b in BACKENDS}
    candidates["DEFAULT"] = lambda: F.scaled_dot_product_attention(q, k, v)
    contexts = {}  # a candidate's setting, held over its warm-up and timed calls
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention

            compiled_flex = torch.compile(flex_attention, dynamic=False)
            candidates["FLEX_COMPILED"] = lambda: compiled_flex(q, k, v)
        except Exception as error:  # noqa: BLE001 - recorded, the others still run
            result["FLEX_COMPILED"] = {"refused": f"{type(error).__name__}: {str(error)[:300]}"}
    if refusal := fa4_refusal(device, through_sdpa=False):
        result["FA4"] = {"refused": refusal}
    else:
        from flash_attn.cute.interface import flash_attn_func

        # the UNet's own layout: diffusers makes (B, L, H, D) and hands SDPA a transposed view
        q4, k4, v4 = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        candidates["FA4"] = lambda: fa4_output(flash_attn_func(q4, k4, v4)).transpose(1, 2)
    if refusal := fa4_refusal(device):
        result["FA4_SDPA"] = {"refused": refusal}
    else:
        candidates["FA4_SDPA"] = lambda: F.scaled_dot_product_attention(q, k, v)
        contexts["FA4_SDPA"] = fa4_sdpa
    for name, call in candidates.items():
        try:
            with torch.no_grad(), contexts.get(name, contextlib.nullcontext)():
                out = call()
                for _ in range(3):
                    call()
                times = event_times(call, device, repeats)
        except Exception as error:  # noqa: BLE001 - a backend that refuses a shape
            result[name] = {"refused": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"}
            continue
        median = statistics.median(times)
        result[name] = {"ms": round(median * 1e3, 4), "tflops": round(flops / median / 1e12, 1),
                        "max_abs_vs_fp32_math": float((out.float() - reference).abs().max())}
    timed = {n: r["ms"] for n, r in result.items() if isinstance(r, dict) and "ms" in r}
    if timed:
        result["fastest"] = min(timed, key=timed.get)
    return result


def _sdpa_with(sdpa_kernel, backend, q, k, v):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--latents", type=int, default=64, help="latents per forward (32 images per call x CFG = 64)")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per arm (median kept)")
    parser.add_argument("--profile-calls", type=int, default=3)
    parser.add_argument("--arms", default="eager,compiled,compiled_channels_last")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--fa4-min-kv-tokens", type=int, default=2048,
                        help="the *_fa4_direct arms send attention with at least this many keys to FA4 (the _all arm: every call)")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, 2 latents, 2 repeats")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_unet_kernels.json"))
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - set(ARMS)):
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if args.tiny:
        args.backbone, args.resolution, args.latents, args.repeats = "tiny", 64, 2, 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = load_backbone(resolve_backbone(args.backbone), args.device, dtype)
    unet = backbone.unet
    size = args.resolution // 8
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(args.latents, unet.config.in_channels, size, size, device=device, dtype=dtype, generator=generator)
    text = torch.randn(args.latents, 77, unet.config.cross_attention_dim, device=device, dtype=dtype, generator=generator)
    timestep = torch.full((args.latents,), 500, device=device, dtype=torch.long)
    document: dict = {
        "benchmark": "gpu_unet_kernels", "environment": environment(device),
        "settings": {"backbone": args.backbone, "resolution": args.resolution, "latents_per_forward": args.latents,
                     "repeats": args.repeats, "dtype": str(dtype)},
        "arms": {},
    }
    out = Path(args.out)
    with torch.no_grad():
        reference = unet(latents, timestep, encoder_hidden_states=text).sample.float()
    for arm in arms:
        entry = document["arms"].setdefault(arm, {})
        started = time.perf_counter()
        direct = "_fa4_direct" in arm
        if arm.endswith("_fa4"):  # torch's registration: one small SDPA call says whether it works at all
            refusal = fa4_sdpa_probe(device)
        else:
            refusal = fa4_refusal(device, through_sdpa=False) if direct else None
        if arm.endswith("_bandwidth") and device.type != "cuda":
            refusal = "inductor's bandwidth profile times Triton kernels: CUDA only"
        if refusal:
            entry["refused"] = refusal
            print(arm, entry, flush=True)
            save_partial(document, str(out), out.name)
            continue
        if arm.endswith("_bandwidth"):
            try:
                entry.update(bandwidth_arm(unet, (latents, timestep, text), device, document, arm))
            except Exception as error:  # noqa: BLE001 - keep the other arms
                entry["error"] = f"{type(error).__name__}: {str(error)[:1500]}"
            entry["arm_wall_s"] = round(time.perf_counter() - started, 1)
            summary = {k: v for k, v in entry.get("triton_bandwidth", {}).items() if k != "kernels"}
            print(arm, summary, [(r["kernel"][:60], r.get("ms_per_forward"), r.get("tb_per_s"), r.get("tb_per_s_alone"))
                                 for r in entry.get("triton_bandwidth", {}).get("kernels", [])[:25]], flush=True)
            save_partial(document, str(out), out.name)
            continue
        # FA4 is held over the whole arm: a compiled forward picks SDPA's backend when it is traced
        held = contextlib.ExitStack()
        try:
            if arm.endswith("_fa4"):
                held.enter_context(fa4_sdpa())
            if arm in INDUCTOR_SETTINGS:  # held over the arm: inductor reads them when the first call compiles
                from torch._inductor import config as inductor_config

                held.enter_context(inductor_config.patch(INDUCTOR_SETTINGS[arm]))
                entry["inductor_settings"] = describe_options(INDUCTOR_SETTINGS[arm])
            if arm.endswith("_layout_group_norm"):  # before compiling: the trace reads the module's class
                entry["layout_group_norms"] = held.enter_context(layout_group_norms(unet))
            if direct:  # before compiling: the traced forward calls the FA4 op where the processor does
                threshold = 0 if arm.endswith("_all") else args.fa4_min_kv_tokens
                held.enter_context(fa4_direct(unet, threshold))
                entry["fa4_min_kv_tokens"] = threshold
            channels_last = arm.endswith("channels_last")
            unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            x = latents.contiguous(memory_format=torch.channels_last) if channels_last else latents
            model = unet
            if arm.startswith("compiled"):
                torch._dynamo.reset()
                mode = "max-autotune-no-cudagraphs" if "max_autotune" in arm else "default"
                model = torch.compile(unet, dynamic=False, mode=mode)

            def forward(model=model, x=x):
                with torch.no_grad():
                    return model(x, timestep, encoder_hidden_states=text).sample

            first = event_times(forward, device, 1)[0]
            for _ in range(2):
                forward()
            times = event_times(forward, device, args.repeats)
            median = statistics.median(times)
            entry.update({"first_call_s": round(first, 2), "ms_per_forward": round(median * 1e3, 3),
                          "ms_per_forward_spread": [round(min(times) * 1e3, 3), round(max(times) * 1e3, 3)],
                          "ms_per_latent_forward": round(median * 1e3 / args.latents, 4),
                          "sampling_floor_s_per_image": round(median / args.latents * 100, 4),
                          "max_abs_vs_eager": float((forward().float() - reference).abs().max())})
            if "post_grad_custom_pre_pass" in INDUCTOR_SETTINGS.get(arm, {}):  # the pass ran at the first call's compile
                entry["channels_last_cats"] = INDUCTOR_SETTINGS[arm]["post_grad_custom_pre_pass"].rewritten
            if "pre_grad_custom_pass" in INDUCTOR_SETTINGS.get(arm, {}):
                entry["fused_group_norms"] = INDUCTOR_SETTINGS[arm]["pre_grad_custom_pass"].counts()
            if direct:
                FA4_DIRECT_CALLS[0] = 0
                forward()
                entry["fa4_calls_per_forward"] = FA4_DIRECT_CALLS[0]
            if device.type == "cuda":
                entry["kernels"] = kernel_breakdown(forward, device, args.profile_calls)
                if "fa4" in arm and not entry["kernels"]["fa4_kernel_ms_per_call"]:
                    # the arm timed some other kernel (first run, H100: compiled_fa4 traced cuDNN's attention)
                    entry["invalid"] = "no FA4 kernel in the arm's profile: its time is not FA4's"
        except Exception as error:  # noqa: BLE001 - keep the other arms
            entry["error"] = f"{type(error).__name__}: {str(error)[:1500]}"
        finally:
            held.close()
            unet.to(memory_format=torch.contiguous_format)
        entry["arm_wall_s"] = round(time.perf_counter() - started, 1)
        print(arm, {k: v for k, v in entry.items() if k != "kernels"}, entry.get("kernels", {}).get("ms_by_kind"), flush=True)
        save_partial(document, str(out), out.name)
    if not args.skip_attention:
        shapes = record_attention_shapes(unet, (latents, timestep, text))
        attention = document.setdefault("attention_shapes", [])
        for (q_shape, k_shape, dtype_name), count in sorted(shapes.items(), key=lambda kv: -kv[0][0][2] * kv[0][1][2]):
            row = {"q": list(q_shape), "k": list(k_shape), "dtype": dtype_name, "calls_per_forward": count}
            row.update(time_attention_shape(q_shape, k_shape, dtype, device, max(args.repeats, 5)))
            attention.append(row)
            print("attention", {k: v for k, v in row.items()}, flush=True)
            save_partial(document, str(out), out.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
