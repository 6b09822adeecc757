"""GroupNorm stated as shifted sums, for inductor-compiled sampling on CUDA (issue 17, item 1).

Why: inductor lowers ``F.group_norm`` through ``var_mean``, which it generates as a Welford
reduction: per element an fp32 division (``mean += delta / count``) and two dependent
multiply-adds. In the compiled SD 1.5 UNet (64 latents, bf16, H200) its GroupNorm kernels ran at
1.0-1.8 TB/s while the GEGLU kernels beside them reached 3.5 (``benchmarks/results``), so per-element
work, not memory, plausibly bounds them (read from the generated code, not measured). Stated as
plain sums the reduction costs a subtraction and two adds per element; the normalisation becomes one
multiply-add per element with a per-(sample, channel) scale and shift; inductor still fuses what it
fused before (the conv bias and time-embedding add in front, the SiLU and the bf16 cast after), as
the graph stays torch ops. No custom kernel, so the compiled artifact caches as any other.

| step, per GroupNorm of ``h`` (N, C, H, W), G groups, K = H * W | where | value / source |
|---|---|---|
| ``d = h - h[:, :, 0, 0]`` (a per-(sample, channel) shift inside the data's range keeps ``s2 - s1^2 / K`` well conditioned) | ``shifted_group_norm`` | ours (the shifted-data variance algorithm, e.g. Chan, Golub & LeVeque 1983) |
| ``s1 = sum d``, ``s2 = sum d^2`` over H, W in fp32 | ``shifted_group_norm`` | ours |
| per channel ``mean_c = shift + s1 / K``, ``m2_c = s2 - s1^2 / K`` (clamped at 0) | ``shifted_group_norm`` | ours |
| per group ``mean = avg mean_c``, ``m2 = sum m2_c + K * sum (mean_c - mean)^2`` (Chan's merge), ``var = m2 / (K * C / G)`` (biased, as ``F.group_norm``), ``rstd = rsqrt(var + eps)`` | ``shifted_group_norm`` | ``torch.nn.GroupNorm`` |
| ``y = h * scale + shift'`` with ``scale = rstd * weight``, ``shift' = bias - mean * scale``, in fp32, cast to ``h``'s dtype | ``shifted_group_norm`` | ``F.group_norm``'s affine, reassociated (≤ 1 fp32 ulp per element before the cast) |

``ShiftedGroupNorm`` is an inductor pre-grad graph pass that replaces each 4-D ``F.group_norm`` on
one of its devices by a call of ``shifted_group_norm`` (AOTAutograd traces through it). It is
differentiable (gradients tested). Tested on a CPU against ``F.group_norm`` in
float64, on groups whose mean is far from zero, and compiled on the tiny UNet against eager
(``tests/test_shifted_norm.py``). **Not used by the suite**: on an H100 (32 images per call, one
process; ``benchmarks/results``, twenty-fourth session) it took sampling from 0.2099 to 0.2073 s per
image, while ``methods.fused_norm``'s kernels (the suite's path) took 0.2103 to 0.2050 (each against
the path without it, in its own process); per GroupNorm +
SiLU it ran at inductor's pace (64 x 320 x 64 x 64: 0.261 against 0.288 ms). Kept as the measured
alternative that needs no custom kernel (``benchmarks/gpu_fused_norm.py`` arm ``shifted``,
``gpu_sampling_modes.py`` arms ``*_shifted_norm_*``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


def shifted_group_norm(h: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm(h, groups, weight, bias, eps)`` for a 4-D ``h``, by shifted sums (module docstring)."""
    if h.dim() != 4:
        raise ValueError(f"shifted_group_norm: h must be 4-D (N, C, H, W), got shape {tuple(h.shape)}")
    n, c, height, width = h.shape
    if groups <= 0 or c % groups:
        raise ValueError(f"shifted_group_norm: {c} channels do not split into {groups} groups")
    k = height * width
    x = h.float()
    origin = x[:, :, :1, :1]
    d = x - origin
    s1 = d.sum(dim=(2, 3))
    s2 = (d * d).sum(dim=(2, 3))
    mean_c = origin.reshape(n, c) + s1 / k
    m2_c = (s2 - s1 * s1 / k).clamp_min(0.0)
    mean_c, m2_c = mean_c.reshape(n, groups, c // groups), m2_c.reshape(n, groups, c // groups)
    mean = mean_c.mean(dim=2, keepdim=True)
    m2 = m2_c.sum(dim=2, keepdim=True) + k * ((mean_c - mean) ** 2).sum(dim=2, keepdim=True)
    rstd = torch.rsqrt(m2 / (k * (c // groups)) + eps)
    scale = rstd.expand(n, groups, c // groups).reshape(n, c)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.expand(n, groups, c // groups).reshape(n, c) * scale
    if bias is not None:
        shift = shift + bias.float()
    return (x * scale[:, :, None, None] + shift[:, :, None, None]).to(h.dtype)


class ShiftedGroupNorm(CustomGraphPass):
    """Inductor pre-grad pass: each 4-D ``F.group_norm`` on one of ``devices`` (of ``min_pixels``
    pixels or more) becomes ``shifted_group_norm``. Pass it as ``torch.compile(..., options=
    {"pre_grad_custom_pass": ShiftedGroupNorm()})``. ``rewritten`` counts the last call's changes."""

    def __init__(self, devices: tuple[str, ...] = ("cuda",), min_pixels: int = 1) -> None:
        self.devices = tuple(devices)
        self.min_pixels = int(min_pixels)
        self.rewritten = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.rewritten = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (F.group_norm, torch.group_norm):
                continue
            names = ("input", "num_groups", "weight", "bias", "eps")
            args = dict(zip(names, node.args))
            args.update({k: v for k, v in node.kwargs.items() if k in names})
            source = args.get("input")
            value = source.meta.get("example_value", source.meta.get("val")) \
                if isinstance(source, torch.fx.Node) else None
            if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.device.type not in self.devices \
                    or not isinstance(args.get("num_groups"), int) or value.shape[1] % args["num_groups"] \
                    or value.shape[2] * value.shape[3] < self.min_pixels \
                    or value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                continue
            with graph.inserting_before(node):
                replacement = graph.call_function(
                    shifted_group_norm, (source, args["num_groups"], args.get("weight"), args.get("bias"),
                                         float(args.get("eps", 1e-5))))
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            self.rewritten += 1

    def counts(self) -> dict:
        return {"rewritten": self.rewritten}

    def uuid(self):
        return (get_hash_for_files((__file__,)), self.devices, self.min_pixels)


@functools.cache
def shifted_group_norm_pass() -> ShiftedGroupNorm:
    """The one ``ShiftedGroupNorm()`` of this process (equal options share compiled code)."""
    return ShiftedGroupNorm()
