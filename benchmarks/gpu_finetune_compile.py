"""GPU benchmark of ``training.compile=true`` for the fine-tunes: DreamBooth and DreamBooth-LoRA
trained through ``torch.compile`` against the same method trained eagerly (the reference: the
eager step was checked step by step against the diffusers examples), in one process.

For each method, on one subject of the bundled mini set (4 class images, drawn with few sampler
steps: they only feed the prior term, the step time does not depend on them):
- a short eager warm-up training (cuDNN autotuning, latent and class-prior caches), not timed;
- eager: ``prepare`` for ``--steps`` steps: seconds per step after the first (the method's own
  ``state.json`` figure: checkpoint writing excluded) and the first step's seconds;
- compiled: the same, ``MethodContext(compile_finetune=True)``; its first step holds the compile;
- compiled again in the same process (the next subject of a worker): the compiled code is reused,
  so its first step shows what a later subject pays;
- with ``--graphs``: eager and captured (no compile) and compiled and captured
  (``training.cuda_graphs``: each step one replayed CUDA
  graph, ``methods.training.CapturedStep``), its step time, what the state says was captured, and
  its losses against eager's;
- agreement: the first losses of both arms and the final weights' L2 gap as a share of how far
  eager training moved them (DreamBooth: the UNet from the backbone's; LoRA: the up weights, which
  start at zero), the fast mode's tolerance;
- the break-even step count (compile seconds / seconds saved per step) and the per-subject
  training time at the suite's lengths (DreamBooth 1000, LoRA 500) with the compile paid once
  per worker process.

Writes one JSON document (device, versions, settings, results) to ``--out``. A CPU check:
``python benchmarks/gpu_finetune_compile.py --tiny --device cpu --out /tmp/ft.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import (  # noqa: E402
    environment,
    method_parser,
    parse_method_args,
    peak_gib,
    reset_peak,
    synchronize,
)
from data.subjects import load_subjects  # noqa: E402
from methods import sampling  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.base import MethodContext  # noqa: E402
from methods.dreambooth import DreamBooth, DreamBoothLoRA, DreamBoothLoRAParams, DreamBoothParams  # noqa: E402

SUITE_STEPS = {"dreambooth": 1000, "dreambooth_lora": 500}
METHODS = {"dreambooth": (DreamBooth, DreamBoothParams), "dreambooth_lora": (DreamBoothLoRA, DreamBoothLoRAParams)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = method_parser(__doc__, "gpu_finetune_compile")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per training")
    parser.add_argument("--methods", default="dreambooth,dreambooth_lora")
    parser.add_argument("--compile-cache", default=None, help="TORCHINDUCTOR_CACHE_DIR (default: an empty one)")
    parser.add_argument("--graphs", action="store_true", help="also eager + captured and compiled + captured (training.cuda_graphs)")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, 4 steps")
    args = parse_method_args(parser, argv)
    if args.tiny:
        args.backbone, args.resolution, args.steps = "tiny", 64, 4
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    return args


def _l2(pairs) -> float:
    return float(sum(((a.float() - b.float()) ** 2).sum() for a, b in pairs) ** 0.5)


def _max_relative_gap(reference: list[float], other: list[float]) -> float:
    """The largest |other - reference| / |reference| over the steps (zero reference losses skipped)."""
    return max(abs(o - r) / abs(r) for r, o in zip(reference, other) if r)


def train(name: str, context: MethodContext, steps: int, subject, root: Path, label: str, device) -> tuple[dict, list, dict]:
    """One ``prepare``: the state's timing, losses, final weights (CPU) and peak memory."""
    method_class, params_class = METHODS[name]
    params = params_class(steps=steps, class_images=4, class_image_steps=10, collapse_prompts=0)
    workdir = root / f"{name}-{label}"
    workdir.mkdir()
    reset_peak(device)
    synchronize(device)
    method_class(params, context).prepare(subject, workdir, seed=5)
    synchronize(device)
    state = json.loads((workdir / "state.json").read_text())
    final = state["checkpoints"]["final"]
    path = workdir / final["lora"] / "pytorch_lora_weights.safetensors" if "lora" in final else workdir / final["unet"]
    training = state["training"]
    first = training["seconds"] - training["seconds_per_step"] * (steps - 1) - training["checkpoint_seconds"]
    row = {
        "s_per_step": round(training["seconds_per_step"], 5),
        "first_step_s": round(first, 2),
        "seconds": round(training["seconds"], 2),
        "losses_first5": state["losses"][:5],
        "peak_memory_gib": peak_gib(device),
    }
    if "cuda_graphs" in training:
        row["cuda_graphs"], row["uncaptured_steps"] = training["cuda_graphs"], training["uncaptured_steps"]
    weights = load_file(str(path))
    shutil.rmtree(workdir)
    return row, state["losses"], weights


def measure(name: str, args, spec, device, subject, root: Path) -> dict:
    def context(compiled: bool, graphs: bool = False) -> MethodContext:
        return MethodContext(
            backbone=spec, device=args.device, dtype=args.dtype, resolution=args.resolution or spec.resolution,
            cache_dir=root / "cache", compile_finetune=compiled, graph_finetune=graphs,
        )

    print(f"{name}: warm-up (eager, 2 steps; class images) ...", flush=True)
    train(name, context(False), 2, subject, root, "warmup", device)
    print(f"{name}: eager {args.steps} steps ...", flush=True)
    eager, eager_losses, eager_weights = train(name, context(False), args.steps, subject, root, "eager", device)
    print(f"  {eager}", flush=True)
    eager_captured = None
    if args.graphs:
        print(f"{name}: eager and captured (training.cuda_graphs, no compile) ...", flush=True)
        eager_captured, eager_captured_losses, _ = train(
            name, context(False, graphs=True), args.steps, subject, root, "eager-captured", device)
        eager_captured["max_relative_loss_difference_vs_eager"] = _max_relative_gap(eager_losses, eager_captured_losses)
        eager_captured["speedup_per_step_vs_eager"] = (
            round(eager["s_per_step"] / eager_captured["s_per_step"], 3) if eager_captured["s_per_step"] else None)
        print(f"  {eager_captured}", flush=True)
    print(f"{name}: compiled {args.steps} steps (compiles in its first step) ...", flush=True)
    compiled, compiled_losses, compiled_weights = train(name, context(True), args.steps, subject, root, "compiled", device)
    compiled["compile_failed"] = bool(sampling._compile_failed)
    print(f"  {compiled}", flush=True)
    print(f"{name}: compiled again (the next subject of the same worker) ...", flush=True)
    again, _, _ = train(name, context(True), args.steps, subject, root, "compiled-again", device)
    print(f"  {again}", flush=True)
    captured = None
    if args.graphs:
        print(f"{name}: compiled and captured (training.cuda_graphs) ...", flush=True)
        captured, captured_losses, _ = train(name, context(True, graphs=True), args.steps, subject, root, "captured", device)
        captured["max_relative_loss_difference_vs_eager"] = _max_relative_gap(eager_losses, captured_losses)
        captured["speedup_per_step_vs_compiled"] = (
            round(again["s_per_step"] / captured["s_per_step"], 3) if captured["s_per_step"] else None)
        print(f"  {captured}", flush=True)

    if name == "dreambooth":
        initial = {k: v.detach().cpu() for k, v in load_backbone(spec, args.device, torch.float32).unet.state_dict().items()}
        move = _l2((eager_weights[k], initial[k]) for k in eager_weights)
        move_basis = "UNet weights from the backbone's"
    else:
        move = _l2((v, torch.zeros_like(v)) for k, v in eager_weights.items() if ".lora.up." in k)
        move_basis = "LoRA up weights (start at zero)"
    gap = _l2((compiled_weights[k], eager_weights[k]) for k in eager_weights)
    saved = eager["s_per_step"] - compiled["s_per_step"]
    compile_s = compiled["first_step_s"] - eager["first_step_s"]
    steps = SUITE_STEPS[name]
    return {
        "eager": eager,
        "compiled": compiled,
        "compiled_again": again,
        **({"eager_captured": eager_captured} if eager_captured is not None else {}),
        **({"compiled_captured": captured} if captured is not None else {}),
        "speedup_per_step": round(eager["s_per_step"] / compiled["s_per_step"], 3) if compiled["s_per_step"] else None,
        "compile_seconds": round(compile_s, 1),
        "break_even_steps": round(compile_s / saved) if saved > 0 else None,
        "agreement": {
            "max_relative_loss_difference": _max_relative_gap(eager_losses, compiled_losses),
            "weights_gap_share_of_move": gap / move if move else None,
            "move_basis": move_basis,
        },
        "suite": {
            "steps": steps,
            "eager_s_per_subject": round(eager["s_per_step"] * steps, 1),
            "compiled_s_per_subject_after_first": round(compiled["s_per_step"] * steps + again["first_step_s"], 1),
            "compile_once_per_worker_s": round(compile_s, 1),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cache = Path(args.compile_cache) if args.compile_cache else Path(tempfile.mkdtemp(prefix="inductor-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.resolve())
    device = torch.device(args.device)
    spec = resolve_backbone(args.backbone)
    print(f"loading {args.backbone} on {device} ({args.dtype}) ...", flush=True)
    load_backbone(spec, args.device, MethodContext(backbone=spec, dtype=args.dtype).torch_dtype)
    subject = load_subjects("mini", subjects=[args.subject])[0]
    root = Path(tempfile.mkdtemp(prefix="bench-ft-compile-"))
    results = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        results[name] = measure(name, args, spec, device, subject, root)
        out.write_text(json.dumps(_document(args, spec, device, results), indent=1))  # kept if a later method times out
    document = _document(args, spec, device, results)
    shutil.rmtree(root, ignore_errors=True)
    out.write_text(json.dumps(document, indent=1))
    print(json.dumps(document, indent=1))
    return document


def _document(args, spec, device, results: dict) -> dict:
    return {
        "benchmark": "gpu_finetune_compile",
        "environment": environment(device),
        "settings": {
            "backbone": args.backbone,
            "resolution": args.resolution or spec.resolution,
            "dtype": args.dtype,
            "timed_steps": args.steps,
            "subject": args.subject,
            "batch": "1 instance + 1 class latent per step (the methods' defaults)",
            "inductor_cache": "given" if args.compile_cache else "empty (cold compile)",
            "note": "one process, one run each: GPU timings here vary by about ±30 % between runs",
        },
        "results": results,
    }


if __name__ == "__main__":
    main()
