"""GPU throughput of the metric backbones: CLIP ViT-B/32, DINO ViT-S/16 and LPIPS (AlexNet).

Scores N random 512-px images (default 3000: the DreamBooth protocol's 30 subjects × 25 prompts
× 4 images) the way the harness does — one ``score`` call per subject batch — with random-init
weights of the real architectures (no download needed), and writes images/s and peak memory per
metric to a JSON file.

Phases:
- ``per_metric``: each metric alone, embedding caches cleared before it (so CLIP-I really
  recomputes the image embeddings CLIP-T made);
- ``combined``: every metric per subject batch in one pass, caches shared as in a real run;
  the target is all three backbones over 3000 images in under 60 s on one H100.

Usage (from the repository root):
    python benchmarks/gpu_metrics.py                      # CUDA, N=3000, JSON to $OUT or .
    python benchmarks/gpu_metrics.py --n 64 --device cpu  # the same code path on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from metrics.base import MetricSettings, ScoringInputs  # noqa: E402
from metrics.embeddings import clear_embedding_caches  # noqa: E402
from metrics.registry import build_metric  # noqa: E402

METRICS = ("clip_t", "clip_i", "dino", "div")
BACKBONE_OF = {"clip_t": "clip", "clip_i": "clip", "dino": "dino", "div": "lpips"}
PROMPTS, IMAGES_PER_PROMPT, REFERENCES = 25, 4, 4


def subject_batches(n: int, size: int, seed: int) -> list[ScoringInputs]:
    """N random images split into subject batches of 25 prompts × 4 images (the last may be short)."""
    per_subject = PROMPTS * IMAGES_PER_PROMPT
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for subject, start in enumerate(range(0, n, per_subject)):
        count = min(per_subject, n - start)
        prompts = [index // IMAGES_PER_PROMPT for index in range(count)]
        batches.append(ScoringInputs(
            images=torch.rand(count, 3, size, size, generator=generator),
            image_keys=[f"s{subject}/p{p}/k{i % IMAGES_PER_PROMPT}" for i, p in enumerate(prompts)],
            texts=[f"a photo of a dog number {p} in a red bucket on the beach" for p in prompts],
            references=[torch.rand(3, size, size, generator=generator) for _ in range(REFERENCES)],
            reference_key=f"subject-{subject}",
            groups=[f"s{subject}/p{p}" for p in prompts],
        ))
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def event_times(function, device: torch.device, repeats: int) -> list[float]:
    """Seconds per call of ``function``, one per repeat (CUDA events on CUDA, host clock elsewhere)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
    return times


def reset_peak(device: torch.device) -> None:
    """Start a stage's peak-memory count (cached blocks of earlier stages released first)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    out = {"cpu_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.type == "cuda":
        out["gpu_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["gpu_max_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return out


SDPA_ORDERS = {
    "default": None,  # torch's own choice (torch 2.11 on an H200 picked cuDNN's attention for SD 1.5: profiled)
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),  # cuDNN's attention left out
}


@contextlib.contextmanager
def sdpa_preference(name: str):
    """Scaled-dot-product attention with the backends of ``SDPA_ORDERS[name]`` tried in that
    order (a shape one backend cannot take falls to the next, never straight to the math kernel);
    ``default`` leaves torch's choice alone."""
    if name not in SDPA_ORDERS:
        raise SystemExit(f"--sdpa {name!r}: choose from {sorted(SDPA_ORDERS)}")
    if SDPA_ORDERS[name] is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, b) for b in SDPA_ORDERS[name]], set_priority=True):
        yield


def fa4_refusal(device: torch.device, through_sdpa: bool = True) -> str | None:
    """Why FlashAttention-4 cannot run on ``device`` (``through_sdpa``: as SDPA's flash backend,
    which needs torch's FA4 registration too), or None when it can."""
    import importlib.util

    if device.type != "cuda":
        return "FA4 needs a CUDA device"
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return f"FA4 needs compute capability 9.x or 10.x, this GPU has {torch.cuda.get_device_capability(device)}"
    try:  # finding it imports flash_attn.cute, which loads the CuTe DSL's libraries
        found = importlib.util.find_spec("flash_attn.cute.interface") is not None
    except Exception as error:  # noqa: BLE001 - installed but broken: say how
        return f"flash_attn.cute does not import: {type(error).__name__}: {str(error)[:300]}"
    if not found:
        return "flash_attn.cute is not installed (pip install flash-attn-4)"
    if not through_sdpa:
        return None
    from torch.nn import attention

    needed = ("list_flash_attention_impls", "activate_flash_attention_impl", "restore_flash_attention_impl")
    if not all(hasattr(attention, name) for name in needed) or "FA4" not in attention.list_flash_attention_impls():
        return f"torch {torch.__version__} has no FA4 registration (torch.nn.attention.activate_flash_attention_impl)"
    return None


@contextlib.contextmanager
def fa4_sdpa():
    """SDPA's flash backend served by FA4 inside the block (torch's registration), then torch's own."""
    from torch.nn import attention

    attention.activate_flash_attention_impl("FA4")
    try:
        with attention.sdpa_kernel([attention.SDPBackend.FLASH_ATTENTION]):
            yield
    finally:
        attention.restore_flash_attention_impl()


def fa4_sdpa_probe(device: torch.device) -> str | None:
    """Why SDPA under torch's FA4 registration fails on ``device``, found by one small call (torch
    2.11 with flash-attn-4 4.0.0b40, H100: ``ValueError: too many values to unpack (expected 2)``), or
    None when it runs. An arm that would hold the registration is refused with this instead of
    timing whatever SDPA falls back to."""
    if refusal := fa4_refusal(device):
        return refusal
    q = torch.randn(2, 8, 256, 40, device=device, dtype=torch.bfloat16)
    try:
        with torch.no_grad(), fa4_sdpa():
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except Exception as error:  # noqa: BLE001 - the reason is the answer
        return f"SDPA with torch's FA4 registration fails: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
    return None


FA4_KERNEL_NEEDLES = ("flashattentionforward", "flash_fwd_sm")  # CuTe DSL kernel names hold the class name


def is_fa4_kernel(name: str) -> bool:
    return any(needle in name.lower() for needle in FA4_KERNEL_NEEDLES)


FA4_DIRECT_CALLS = [0]  # calls of the FA4 custom op (its eager body runs inside compiled graphs too)
_FA4_OP: list = []


def fa4_output(output):
    """The attention output of FA4's ``flash_attn_func``: 4.0.0b40 returns (output, log-sum-exp);
    a bare tensor (another version) is taken as it is."""
    return output[0] if isinstance(output, tuple) else output


def fa4_attention_op():
    """``flash_attn.cute``'s ``flash_attn_func`` as a torch custom op on (B, L, H, D) tensors, its
    default scale 1/sqrt(D) (SDPA's, which diffusers' processor uses): a compiled UNet keeps one
    graph around it instead of breaking at every attention call. Inference only (no autograd)."""
    if not _FA4_OP:
        from flash_attn.cute.interface import flash_attn_func

        @torch.library.custom_op("subjectbench_bench::fa4_attention", mutates_args=())
        def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            FA4_DIRECT_CALLS[0] += 1
            return fa4_output(flash_attn_func(q, k, v)).contiguous()

        @fa4_attention.register_fake
        def _(q, k, v):
            return q.new_empty((*q.shape[:-1], v.shape[-1]))

        _FA4_OP.append(fa4_attention)
    return _FA4_OP[0]


def fa4_attention_processor(min_kv_tokens: int = 0, op: Callable | None = None):
    """A diffusers attention processor that sends attention with at least ``min_kv_tokens`` keys
    (and a head size FA4 takes, 8-256, bf16/fp16, no mask, no norms inside the attention: SD 1.5's
    UNet transformer blocks) to FlashAttention-4 on the UNet's own (B, L, H, D) layout, and every
    other call to diffusers' ``AttnProcessor2_0`` unchanged. The same arithmetic as SDPA (the same
    projections, scale 1/sqrt(D), softmax, no dropout at inference); another kernel. Benchmarks
    only: ``gpu_unet_kernels.py`` times per shape where FA4 wins (an H100: only the 4096-token
    self-attention at head size 40, so ``min_kv_tokens=2048`` keeps FA4 to those layers).

    ``op`` replaces FA4 by another function of (B, L, H, D) query, key, value (a CPU test passes
    SDPA there to check this processor's projections and layouts against diffusers' own); without
    it, calls off CUDA or in fp32 go to diffusers' processor (FA4 takes bf16/fp16 on SM 9.x/10.x)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    fa4 = op is None
    op = fa4_attention_op() if fa4 else op

    class FA4AttnProcessor(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            plain = (attention_mask is None and attn.spatial_norm is None and attn.group_norm is None
                     and attn.norm_q is None and attn.norm_k is None and attn.norm_cross is None and hidden_states.ndim == 3
                     and (not fa4 or (hidden_states.dtype in (torch.bfloat16, torch.float16) and hidden_states.is_cuda)))
            head_dim = attn.inner_dim // attn.heads if hasattr(attn, "inner_dim") else None
            if not (plain and head_dim and 8 <= head_dim <= 256 and context.shape[1] >= min_kv_tokens):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            batch, length, _ = hidden_states.shape
            query = attn.to_q(hidden_states).view(batch, length, attn.heads, -1)
            key = attn.to_k(context).view(batch, context.shape[1], attn.heads, -1)
            value = attn.to_v(context).view(batch, context.shape[1], attn.heads, -1)
            out = op(query, key, value).reshape(batch, length, -1).to(query.dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            if attn.residual_connection:
                out = out + hidden_states
            return out / attn.rescale_output_factor

    return FA4AttnProcessor()


@contextlib.contextmanager
def fa4_direct(unet, min_kv_tokens: int):
    """Inside the block ``unet``'s attention runs through ``fa4_attention_processor(min_kv_tokens)``
    (set before any compile, so the traced forward calls the FA4 op) and ``FA4_DIRECT_CALLS`` counts
    from 0; then the UNet's own processors are back."""
    processors = unet.attn_processors
    unet.set_attn_processor(fa4_attention_processor(min_kv_tokens))
    FA4_DIRECT_CALLS[0] = 0
    try:
        yield
    finally:
        unet.set_attn_processor(processors)


# GroupNorm stated in channels-last order while compiled: a measured dead end for the suite (H100:
# no gain over torch's decomposition; benchmarks/results), kept for the arms that measured it
# (gpu_unet_kernels' compiled_layout_group_norm, gpu_sampling_modes' compile_default_vae_layout_group_norm).
# The same arithmetic as F.group_norm (mean and biased variance in fp32 over each group, then the
# affine map, cast back to the input's dtype), over the NHWC view (N, H·W, G, C/G) instead of NCHW.
def group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` for a 4-D ``x``, stated over its
    channels-last view. Returns an NCHW-shaped tensor in channels-last memory."""
    n, c, h, w = x.shape
    grouped = x.permute(0, 2, 3, 1).reshape(n, h * w, num_groups, c // num_groups).float()
    var, mean = torch.var_mean(grouped, dim=(1, 3), keepdim=True, correction=0)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(n, h, w, c)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).permute(0, 3, 1, 2)


class LayoutGroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` that, while ``torch.compile`` traces it, is stated in channels-last order
    (``group_norm_channels_last``) when no gradient is recorded; otherwise it is ``nn.GroupNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.dim() == 4:
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


@contextlib.contextmanager
def layout_group_norms(*modules: torch.nn.Module):
    """Inside the block every plain ``nn.GroupNorm`` of ``modules`` is a ``LayoutGroupNorm`` (the
    same object and parameters, only its class changes; switch before any compile, the trace reads
    the class); then they are plain again. Yields how many were switched."""
    switched = [sub for module in modules for sub in module.modules() if type(sub) is torch.nn.GroupNorm]
    for sub in switched:
        sub.__class__ = LayoutGroupNorm
    try:
        yield len(switched)
    finally:
        for sub in switched:
            sub.__class__ = torch.nn.GroupNorm


def describe_options(options: dict) -> dict:
    """Inductor options for a JSON record: plain values as they are, objects (a graph pass) by class name."""
    return {key: value if isinstance(value, (bool, int, float, str)) else type(value).__name__
            for key, value in options.items()}


def profiled_kernels(step: Callable[[], object], steps: int, device: torch.device):
    """``steps`` calls of ``step`` under ``torch.profiler``: (wall seconds, every row of its
    ``key_averages()``, the rows that are device kernels, the name of the rows' self device-time
    attribute — renamed across torch versions; CPU time on a CPU). Count kernels only: an
    operator row's device time restates its kernels'."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    attribute = "self_cpu_time_total"
    if device.type == "cuda":
        attribute = next((a for a in ("self_device_time_total", "self_cuda_time_total")
                          if events and hasattr(events[0], a)), "self_device_time_total")
    kernels = [e for e in events if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU]
    return wall, events, kernels, attribute


def profile_steps(step: Callable[[], object], steps: int, device: torch.device, top: int = 25) -> dict:
    """Where ``steps`` calls of ``step`` spend their time, under ``torch.profiler``: the device's
    busy seconds (its kernels only: an operator row's device time restates its kernels') beside the
    wall time, and the top rows (operators and kernels) by self device time (CPU time on a CPU)."""
    wall, events, kernels, attribute = profiled_kernels(step, steps, device)
    rows = sorted(events, key=lambda e: getattr(e, attribute, 0.0), reverse=True)
    busy_us = sum(getattr(e, attribute, 0.0) for e in (kernels if device.type == "cuda" else events))
    host = [e for e in events if e.key.startswith("aten::")]  # operators (kernels are named otherwise)
    return {
        "steps": steps, "wall_s": wall, "device_busy_s": busy_us / 1e6,
        "device_busy_s_per_step": busy_us / 1e6 / steps,
        "device_busy_share": busy_us / 1e6 / wall if wall else None,
        "note": "wall includes the profiler's own overhead; compare device_busy_s_per_step with the unprofiled time",
        "top_ops_by_device_time": [{"op": e.key[:160], "calls": e.count, "ms": getattr(e, attribute, 0.0) / 1e3}
                                   for e in rows[:top]],
        # the host's side: aten operator calls (nested ones counted too: aten::to calls
        # aten::_to_copy calls aten::copy_), a proxy for dispatches and kernel launches, and where
        # the host's own time goes, per operator (self time: nested calls not counted twice)
        "host_op_calls": sum(e.count for e in host),
        "top_ops_by_host_time": [{"op": e.key[:160], "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3}
                                 for e in sorted(host, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]],
    }


def result_path(out: str | None, name: str) -> Path:
    """``out``, else ``$OUT/<name>``, else ``./<name>``."""
    return Path(out) if out else Path(os.environ.get("OUT") or ".") / name


def save_partial(result: dict, out: str | None, name: str) -> Path:
    """Write what a benchmark has measured so far (a call cut off by its time limit keeps it)."""
    path = result_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    os.replace(temporary, path)
    return path


def write_result(result: dict, out: str | None, name: str) -> Path:
    """Write a benchmark's JSON to ``out`` (default: ``$OUT/<name>``, else ``./<name>``) and print it."""
    path = save_partial(result, out, name)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def timed_pass(metrics: dict, batches: list[ScoringInputs], device: torch.device) -> tuple[dict, float]:
    """Score every batch with every metric; seconds spent per metric and in total."""
    seconds = dict.fromkeys(metrics, 0.0)
    started = time.perf_counter()
    for inputs in batches:
        for name, metric in metrics.items():
            synchronize(device)
            t0 = time.perf_counter()
            values = metric.score(inputs)
            synchronize(device)
            seconds[name] += time.perf_counter() - t0
            assert values.shape == (inputs.images.shape[0],), (name, values.shape)
    return seconds, time.perf_counter() - started


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = MetricSettings(weights="random", batch_size=args.batch_size, device=args.device,
                              precision=args.precision)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "n_images": args.n,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "weights": "random (real architectures; throughput only, values are not measurements)",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
        "cpu_threads": torch.get_num_threads(),
    }
    for package in ("open_clip_torch", "timm", "lpips", "transformers", "numpy"):
        try:
            result["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            result["versions"][package] = None

    t0 = time.perf_counter()
    batches = subject_batches(args.n, args.size, args.seed)
    result["generate_images_seconds"] = round(time.perf_counter() - t0, 2)

    metrics, build = {}, {}
    for name in METRICS:
        t0 = time.perf_counter()
        metrics[name] = build_metric(name, settings)
        fingerprint = metrics[name].fingerprint()  # builds the backbone and hashes its weights
        synchronize(device)
        build[name] = round(time.perf_counter() - t0, 2)
    result["build_seconds"] = build
    result["precision"] = fingerprint["backbone"]["precision"]

    # Warm-up on a few images (CUDA context, cuDNN autotuning, allocator), excluded from timings.
    warm = subject_batches(min(8, args.n), args.size, args.seed + 1)
    t0 = time.perf_counter()
    timed_pass(metrics, warm, device)
    result["warmup_seconds"] = round(time.perf_counter() - t0, 2)

    per_metric = {}
    for name, metric in metrics.items():
        clear_embedding_caches()
        reset_peak(device)
        seconds, _ = timed_pass({name: metric}, batches, device)
        per_metric[name] = {
            "backbone": BACKBONE_OF[name],
            "seconds": round(seconds[name], 3),
            "images_per_second": round(args.n / seconds[name], 1),
            **peak_memory(device),
        }
    result["per_metric"] = per_metric

    clear_embedding_caches()
    reset_peak(device)
    seconds, total = timed_pass(metrics, batches, device)
    result["combined"] = {
        "seconds": round(total, 3),
        "images_per_second": round(args.n / total, 1),
        "seconds_per_metric": {name: round(value, 3) for name, value in seconds.items()},
        **peak_memory(device),
    }
    result["target"] = {"seconds": 60.0, "n_images": 3000, "met": bool(args.n >= 3000 and total < 60.0)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="number of images (default 3000)")
    parser.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_metrics.json, else ./gpu_metrics.json)")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 256 if args.device.startswith("cuda") else 16
    write_result(run(args), args.out, "gpu_metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
