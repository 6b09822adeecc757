"""Issue 17 item 1: ``methods.fused_norm``'s GroupNorm (+ SiLU) kernels beside the GroupNorm a user
gets from torch, at the SD 1.5 UNet's GroupNorm shapes (64 latents = 32 images with CFG, 512 px).

Per shape (N, C, H, W), bf16, channels-last input (inductor's layout for a conv net), in one process:

- ``eager``: ``F.silu(F.group_norm(x, 32, w, b))`` (torch's CUDA kernels);
- ``compiled``: the same function through ``torch.compile`` (inductor's GroupNorm kernels, as in
  the compiled UNet);
- ``fused``: ``torch.ops.subjectbench.group_norm_act`` (three Triton kernels);
- ``shifted``: ``benchmarks.shifted_norm.shifted_group_norm`` + SiLU through ``torch.compile`` (the
  GroupNorm as shifted sums in torch ops: inductor's kernels without its Welford reduction);

with each one's median GPU time (calls replayed from a CUDA graph, so the host's launch path is not
counted: the first H100 run timed each call with events around it, which for the op includes three
Triton launches through Python; ``timing`` in the JSON says which), the bytes a GroupNorm + SiLU must move (read x once, write
y once) over that time, and the largest difference from an fp32 reference (``F.group_norm`` on the
fp32 copy), and the fused op's three kernels timed one at a time (``stages_ms``). ``--sweep`` times
each kernel under a grid of ``KernelConfig`` tile sizes, warps and statistics variants at the
first shape (``stats`` then ``apply``; each config checked against the reference), and the best
pair beside inductor's. ``--with-bias`` also adds a per-channel and a per-sample bias before the norm (the
ResnetBlock2D ``conv1 + temb`` the pass folds in). ``--tiny`` runs small shapes on any device.

    python benchmarks/gpu_fused_norm.py --out benchmarks/results/h200-gpu_fused_norm.json
    python benchmarks/gpu_fused_norm.py --sweep --with-bias --shapes 320x64x64
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import environment  # noqa: E402
from benchmarks.gpu_metrics import event_times, save_partial, synchronize  # noqa: E402
from benchmarks.shifted_norm import shifted_group_norm  # noqa: E402
from methods.fused_norm import (  # noqa: E402
    DEFAULT_CONFIG,
    KernelConfig,
    group_norm_act,
    group_norm_stages,
    kernel_config,
    reference_group_norm_act,
    set_kernel_config,
    triton_interpreting,
)

# SD 1.5 at 512 px: (C, H, W) of the GroupNorms the pass rewrites (32x32 and 64x64 levels)
SHAPES = ((320, 64, 64), (640, 64, 64), (960, 64, 64), (640, 32, 32), (960, 32, 32), (1280, 32, 32),
          (1920, 32, 32))
TINY_SHAPES = ((64, 8, 8), (96, 5, 7))


GRAPH_CALLS = 10  # calls captured in one CUDA graph per timing


def timed(function, device: torch.device, repeats: int) -> tuple[float, str]:
    """(median seconds per call after two warm-up calls, how it was timed). On CUDA the calls are
    captured in a CUDA graph of ``GRAPH_CALLS`` and the replays timed, so the figure is the GPU's
    time, not the host's launch path (three Triton launches through Python can outlast a GroupNorm's
    kernels); if capture fails, each call is timed with events around it."""
    for _ in range(2):
        function()
    if device.type != "cuda":
        return statistics.median(event_times(function, device, repeats)), "host_clock"
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            function()  # warm on the capture stream
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                function()
        return (statistics.median(event_times(graph.replay, device, repeats)) / GRAPH_CALLS,
                f"cuda_graph_of_{GRAPH_CALLS}")
    except Exception as error:  # noqa: BLE001 - fall back to per-call events
        mode = f"events_per_call (capture failed: {type(error).__name__}: {str(error)[:200]})"
        return statistics.median(event_times(function, device, repeats)), mode


def stats_configs() -> list[KernelConfig]:
    return [dataclasses.replace(DEFAULT_CONFIG, stats=variant, block_p=bp, block_c=bc, stats_warps=warps,
                                pixels_per_program=ppp)
            for variant, (bp, bc), warps, ppp in itertools.product(
                ("tiles", "shifted"), ((32, 64), (64, 64), (128, 64), (64, 32), (32, 128), (16, 128)), (4, 8),
                (512, 2048))]


def apply_configs() -> list[KernelConfig]:
    return [dataclasses.replace(DEFAULT_CONFIG, apply_block_p=bp, apply_block_c=bc, apply_warps=warps)
            for (bp, bc), warps in itertools.product(((64, 64), (128, 64), (32, 128), (16, 256), (256, 32), (128, 128)),
                                                     (4, 8))]


def stage_times(inputs: tuple, config: KernelConfig, device: torch.device, repeats: int,
                reference: torch.Tensor) -> dict:
    """Each kernel's median ms under ``config`` (after one full run, which compiles them) and the
    full result's largest difference from ``reference``."""
    x, weight, bias, cb, sb = inputs
    y, stages = group_norm_stages(x, weight, bias, 32, 1e-5, 1, cb, sb, config)
    for launch in stages.values():
        launch()
    synchronize(device)
    times = {name: round(timed(launch, device, repeats)[0] * 1e3, 4) for name, launch in stages.items()}
    return {"stages_ms": times, "total_ms": round(sum(times.values()), 4),
            "max_abs_vs_fp32": round(float((y.float() - reference).abs().max()), 5)}


def sweep(inputs: tuple, reference: torch.Tensor, device: torch.device, repeats: int, gb_moved: float) -> dict:
    """Each stats config (with the default apply), then each apply config (with the best stats)."""
    rows, best = [], {}
    for stage, configs in (("stats", stats_configs()), ("apply", apply_configs())):
        for config in configs:
            if stage == "apply" and "stats" in best:
                config = dataclasses.replace(config, **{k: getattr(best["stats"], k) for k in (
                    "stats", "block_p", "block_c", "stats_warps", "pixels_per_program")})
            try:
                row = {"stage": stage, "config": dataclasses.asdict(config),
                       **stage_times(inputs, config, device, repeats, reference)}
            except Exception as error:  # noqa: BLE001 - keep the other configs
                row = {"stage": stage, "config": dataclasses.asdict(config), "error": f"{type(error).__name__}: {error}"[:500]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            good = "stages_ms" in row and row["max_abs_vs_fp32"] < 0.1
            if good and (stage not in best or row["stages_ms"][stage] < best[stage + "_ms"]):
                best[stage], best[stage + "_ms"] = config, row["stages_ms"][stage]
    chosen = best.get("apply", best.get("stats", DEFAULT_CONFIG))
    final = stage_times(inputs, chosen, device, repeats, reference)
    return {"rows": rows, "best_config": dataclasses.asdict(chosen), "best": final,
            "best_tb_per_s": round(gb_moved / final["total_ms"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latents", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--with-bias", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time KernelConfig variants at the first shape")
    parser.add_argument("--config", metavar="PATH", help="the op's KernelConfig from this JSON (fields, or --sweep output)")
    parser.add_argument("--shapes", default="", help="comma list of CxHxW (default: all of SHAPES)")
    parser.add_argument("--tiny", action="store_true", help="small shapes, 2 latents")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_fused_norm.json"))
    args = parser.parse_args(argv)
    if args.config:
        try:
            set_kernel_config(KernelConfig.from_json(args.config))
        except ValueError as error:
            parser.error(str(error))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    latents = 2 if args.tiny else args.latents
    document = {"benchmark": "gpu_fused_norm", "environment": environment(device),
                "settings": {"latents": latents, "dtype": str(dtype), "repeats": args.repeats,
                             "with_bias": args.with_bias, "groups": 32, "act": "silu",
                             "kernel_config": dataclasses.asdict(kernel_config())}, "shapes": []}

    def biased_norm_silu(group_norm):
        """``silu(group_norm(x + channel bias + sample bias))``, the computation every arm times."""
        def function(x, w, b, cb, sb):
            h = x if cb is None else x + cb[None, :, None, None] + sb[:, :, None, None]
            return F.silu(group_norm(h, 32, w, b, 1e-5))
        return function

    eager = biased_norm_silu(F.group_norm)
    compiled = torch.compile(eager, dynamic=False)
    compiled_shifted = torch.compile(biased_norm_silu(shifted_group_norm), dynamic=False)
    triton_runs = device.type == "cuda" or triton_interpreting()  # the kernels need a GPU or the interpreter
    generator = torch.Generator(device="cpu").manual_seed(0)
    for c, h, w in shapes:
        x = (torch.randn(latents, c, h, w, generator=generator) * 2 + 0.5).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, generator=generator).to(device, dtype)
        bias = torch.randn(c, generator=generator).to(device, dtype)
        cb = torch.randn(c, generator=generator).to(device, dtype) if args.with_bias else None
        sb = torch.randn(latents, c, generator=generator).to(device, dtype) if args.with_bias else None
        reference = reference_group_norm_act(x.float(), weight.float(), bias.float(), 32, 1e-5, 1,
                                             None if cb is None else cb.float(), None if sb is None else sb.float())
        inputs = (x, weight, bias, cb, sb)
        arms = {"eager": functools.partial(eager, *inputs), "compiled": functools.partial(compiled, *inputs),
                "fused": functools.partial(group_norm_act, x, weight, bias, 32, 1e-5, "silu", cb, sb),
                "shifted": functools.partial(compiled_shifted, *inputs)}
        row = {"shape": [latents, c, h, w], "gb_moved": round(2 * x.numel() * x.element_size() / 1e9, 4)}
        for name, function in arms.items():
            try:
                out = function()
                synchronize(device)
                seconds, timing = timed(function, device, args.repeats)
                row[name] = {"ms": round(seconds * 1e3, 4), "tb_per_s": round(row["gb_moved"] / seconds / 1e3, 3),
                             "max_abs_vs_fp32": round(float((out.float() - reference).abs().max()), 5),
                             "timing": timing}
            except Exception as error:  # noqa: BLE001 - keep the other arms
                row[name] = {"error": f"{type(error).__name__}: {str(error)[:1500]}"}
        if "ms" in row["fused"] and triton_runs:
            row["fused"].update(stage_times(inputs, kernel_config(), device, args.repeats, reference))
        document["shapes"].append(row)
        print(json.dumps(row), flush=True)
        save_partial(document, args.out, Path(args.out).name)
        if args.sweep and triton_runs:
            document["sweep"] = {"shape": row["shape"], "compiled_ms": row["compiled"].get("ms"),
                                 **sweep(inputs, reference, device, args.repeats, row["gb_moved"])}
            save_partial(document, args.out, Path(args.out).name)
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
