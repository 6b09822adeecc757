"""GroupNorm (+ SiLU) as three Triton kernels, in inductor-compiled sampling on CUDA (issue 17, item 1).

Why: in the compiled SD 1.5 UNet (64 latents, bf16, H200; ``benchmarks/gpu_unet_kernels.py``, arm
``compiled_channels_last_cat_bandwidth``) inductor's GroupNorm kernels run at 1.0-1.8 TB/s while its
GEGLU kernels reach 3.5. Their generated code suggests per-element work, not memory, bounds them (not
measured): the statistics use a Welford update per element (an fp32 division each), and the
normalising kernel recomputes ``rsqrt(m2 / n + eps)`` and gathers six per-channel or
per-group values for every element. Brought to 3.5 TB/s they would take ~6.9 of the forward's
124 ms (``benchmarks/results``). Block-size tuning (``coordinate_descent_tuning``) did not help
(124.2 against 124.3 ms).

What, per GroupNorm of an ``(N, C, H, W)`` tensor ``x`` with ``G`` groups (any of the two dense
layouts; channels-last is inductor's for a conv net; the kernels are in ``methods/fused_norm_kernels.py``,
imported on first use so this module needs no Triton):

| step | where | value / source |
|---|---|---|
| ``h = x + channel_bias[c] + sample_bias[n, c]`` (the conv bias and the time embedding that inductor peels off the convolution and adds before ResnetBlock2D's ``norm2``) | the statistics kernels (``channel_add``), ``group_norm_finalize_kernel`` | folded by ``FusedGroupNorm``; ours, because inductor's own kernels fuse these adds too and an opaque op would otherwise cost a pass |
| per-channel sums of ``x - x[first pixel of the program]`` and their squares, one reduction per program (``KernelConfig.stats="shifted"``, default: the H100 sweep's fastest), or mean and centred sum of squares per tile of pixels, tiles merged by Chan et al.'s pairwise update (``"tiles"``) | ``group_norm_stats_shifted_kernel`` / ``group_norm_stats_kernel`` | ours; both within 0.02 of float64 on a group whose mean is 3e4 standard deviations from zero, where torch's own fp32 CPU GroupNorm is off by ~10 (tested) |
| per-group mean / variance (biased, as ``F.group_norm``), ``rstd = 1 / sqrt(var + eps)`` | ``group_norm_finalize_kernel`` | ``torch.nn.GroupNorm`` |
| ``y = h * scale[n, c] + shift[n, c]`` with ``scale = rstd * weight``, ``shift = bias + (add - mean) * scale`` | ``group_norm_apply_kernel`` | ``F.group_norm``'s affine, reassociated (≤ 1 fp32 ulp per element) |
| ``y / (1 + exp(-y))`` when the GroupNorm's only user is a SiLU | ``group_norm_apply_kernel`` | ``F.silu``, on the fp32 value as inductor's fused kernel does (no bf16 rounding between) |

The result is written channels-last in ``x``'s dtype. ``reference_group_norm_act`` is the same
computation in torch ops (fp32): the op's CPU kernel. The Triton kernels are tested on a CPU under
``TRITON_INTERPRET=1`` against ``F.group_norm`` in float64 (``tests/test_fused_norm.py``).

``FusedGroupNorm`` is an inductor pre-grad graph pass: each ``F.group_norm`` of a 4-D tensor on one of
its devices becomes ``torch.ops.subjectbench.group_norm_act``, taking the SiLU after it when that is
the GroupNorm's only user (GroupNorms of fewer than ``MIN_PIXELS`` pixels are left to inductor),
and the bias of a convolution (or the ``conv + temb[:, :, None, None]`` add) before it when nothing
else reads them. Inference only: the op has no backward.

**On by default in compiled sampling on CUDA** (``methods.sampling._compile_options(inference=True)``;
``generation.compile=false`` or ``--deterministic`` turn compiling off, and this with it). Measured on an
H100 (``benchmarks/results``, twenty-fourth session), the kernels under the swept default ``KernelConfig``
(``shifted`` statistics, 32 x 64 tiles, 2048 pixels per statistics program, 8 warps): per GroupNorm +
SiLU at 64 x 320 x 64 x 64 bf16 0.198 ms against inductor's 0.287 (statistics 2.3 TB/s of reading, apply
2.8 TB/s of its 3.35; the first, ``tiles`` version took 0.251); end to end, one process, the suite's own
``build_pipeline(compile_unet=True)`` against the same path without this pass: 0.2082 against 0.2128 s per
image at 32 per call (and 0.2072 against 0.2125 in a second process), 0.2049 against 0.2092 at 64; images vs eager max 14 uint8 levels, mean 1.015
(without the pass: 14, 1.004; two fast-mode runs differ by up to 13). Stating GroupNorm as shifted sums
in torch ops instead (``benchmarks/shifted_norm.py``) gained about half as much (0.2073 against 0.2099). The
VAE decoder's GroupNorms through the op as well: 0.2067 against 0.2072, within the spread, so the decoder
keeps inductor's. If Triton fails on a GPU, the op warns once and runs ``reference_group_norm_act``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import os

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

log = logging.getLogger(__name__)

OP_NAME = "subjectbench::group_norm_act"
ACTIVATIONS = {"none": 0, "silu": 1}

torch.library.define(
    OP_NAME,
    "(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, int act, Tensor? channel_bias, "
    "Tensor? sample_bias) -> Tensor",
    tags=(torch.Tag.flexible_layout,),  # inductor may hand over its channels-last buffers as they are
)


def _check(x, weight, bias, groups, channel_bias, sample_bias) -> None:
    if x.dim() != 4:
        raise ValueError(f"group_norm_act: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if groups <= 0 or c % groups:
        raise ValueError(f"group_norm_act: {c} channels do not split into {groups} groups")
    for name, value, shape in (("weight", weight, (c,)), ("bias", bias, (c,)),
                               ("channel_bias", channel_bias, (c,)), ("sample_bias", sample_bias, (n, c))):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"group_norm_act: {name} has shape {tuple(value.shape)}, expected {shape}")


def reference_group_norm_act(x, weight, bias, groups: int, eps: float, act: int = 0,
                             channel_bias=None, sample_bias=None) -> torch.Tensor:
    """The op's semantics in torch ops, in fp32: ``silu?(group_norm(x + channel_bias + sample_bias))``,
    returned channels-last in ``x``'s dtype."""
    _check(x, weight, bias, groups, channel_bias, sample_bias)
    h = x.float()
    if channel_bias is not None:
        h = h + channel_bias.float()[None, :, None, None]
    if sample_bias is not None:
        h = h + sample_bias.float()[:, :, None, None]
    y = F.group_norm(h, groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if act == ACTIVATIONS["silu"]:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake(OP_NAME)
def _fake(x, weight, bias, groups, eps, act, channel_bias, sample_bias):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.impl(OP_NAME, "CompositeExplicitAutograd")
def _cpu_or_other(x, weight, bias, groups, eps, act, channel_bias, sample_bias):
    return reference_group_norm_act(x, weight, bias, groups, eps, act, channel_bias, sample_bias)


_triton_failed: list[str] = []  # the first Triton failure of this process: the op runs as torch ops after it


def cuda_group_norm_act(x, weight, bias, groups, eps, act, channel_bias, sample_bias):
    """The Triton kernels; if Triton fails (a GPU or Triton version they do not build for), one
    warning and the torch reference from then on: slower, the same values within the tolerance."""
    if not _triton_failed:
        try:
            return triton_group_norm_act(x, weight, bias, groups, eps, act, channel_bias, sample_bias)
        except Exception as error:  # noqa: BLE001 - only Triton's own errors are absorbed
            if not type(error).__module__.startswith("triton"):
                raise
            first_line = next(iter(str(error).strip().splitlines()), "")
            _triton_failed.append(f"{type(error).__name__}: {first_line[:300]}")
            log.warning("methods.fused_norm: the Triton GroupNorm kernels failed (%s); GroupNorm runs as torch "
                        "ops from now on (same values within the stated tolerance, slower). Set "
                        "generation.compile=false to compile nothing.", _triton_failed[0])
    return reference_group_norm_act(x, weight, bias, groups, eps, act, channel_bias, sample_bias)


# (the decorator form returns None: registered by call, so the function keeps its name)
torch.library.impl(OP_NAME, "CUDA")(lambda *args, **kwargs: cuda_group_norm_act(*args, **kwargs))


def group_norm_act(x, weight=None, bias=None, groups: int = 32, eps: float = 1e-5, act: str = "none",
                   channel_bias=None, sample_bias=None) -> torch.Tensor:
    """``torch.ops.subjectbench.group_norm_act`` with the activation by name (``none`` / ``silu``)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"group_norm_act: act {act!r} is not one of {sorted(ACTIVATIONS)}")
    return torch.ops.subjectbench.group_norm_act(x, weight, bias, groups, eps, ACTIVATIONS[act],
                                                  channel_bias, sample_bias)


# --- the Triton kernels --------------------------------------------------------------------------

# GroupNorms of fewer pixels stay inductor's: their kernels take microseconds, and the op's host
# work (three launches through Python, ~0.1 ms) would then set the pace; SD 1.5 at 512 px: the
# 64x64 and 32x32 levels are rewritten, 16x16 and 8x8 are not
MIN_PIXELS = 1024


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and variants of the three kernels (``benchmarks/gpu_fused_norm.py --sweep`` times
    them one stage at a time). ``stats``: ``tiles`` = mean and centred squares per tile of
    ``block_p`` pixels, tiles merged by Chan's update (two in-register reductions per tile);
    ``shifted`` = per-thread sums of ``x - x[first pixel]`` and their squares over the whole
    program, one reduction at its end (``m2 = s2 - s1^2 / k``; the shift keeps that subtraction
    well conditioned: a shift inside the data's range leaves at most a few fp32 ulps of the
    variance)."""

    # defaults: the fastest of gpu_fused_norm.py --sweep on an H100 at 64 x 320 x 64 x 64 (+ biases),
    # bf16: statistics 0.0726 ms (2.3 TB/s of reading), finalize 0.0032, apply 0.1218 (2.8 TB/s),
    # 0.198 ms in all against inductor's 0.287 (benchmarks/results: h100-gpu_fused_norm_sweep.json)
    stats: str = "shifted"
    block_p: int = 32
    block_c: int = 64
    pixels_per_program: int = 2048
    stats_warps: int = 8
    apply_block_p: int = 64
    apply_block_c: int = 64
    apply_warps: int = 8

    def __post_init__(self) -> None:
        if self.stats not in ("tiles", "shifted"):
            raise ValueError(f"KernelConfig.stats {self.stats!r} is not 'tiles' or 'shifted'")
        for name in ("block_p", "block_c", "apply_block_p", "apply_block_c", "stats_warps", "apply_warps"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} = {value} must be a power of two")
        if self.pixels_per_program % self.block_p:
            raise ValueError(f"KernelConfig.pixels_per_program {self.pixels_per_program} is not a multiple "
                             f"of block_p {self.block_p}")


    @classmethod
    def from_json(cls, path: str | os.PathLike) -> KernelConfig:
        """A config from a JSON file: its fields, or ``benchmarks/gpu_fused_norm.py --sweep``'s output
        (its ``sweep.best_config``)."""
        import json

        try:
            document = json.loads(open(path).read())
        except (OSError, ValueError) as error:
            raise ValueError(f"fused-norm config {path}: cannot read it as JSON ({error})") from error
        fields = document.get("sweep", {}).get("best_config", document) if isinstance(document, dict) else None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not set(fields) <= names:
            raise ValueError(f"fused-norm config {path}: expected an object with fields from {sorted(names)} "
                             f"or gpu_fused_norm.py --sweep output, got {str(fields)[:200]}")
        return cls(**fields)


DEFAULT_CONFIG = KernelConfig()
_active_config = [DEFAULT_CONFIG]


def set_kernel_config(config: KernelConfig | None) -> None:
    """The config the op's CUDA kernel launches with from now on in this process (None: the default)."""
    _active_config[0] = config or DEFAULT_CONFIG


def kernel_config() -> KernelConfig:
    return _active_config[0]


@functools.cache
def _kernels():
    from methods import fused_norm_kernels as k  # triton imported here, on first use

    return {"tiles": k.group_norm_stats_kernel, "shifted": k.group_norm_stats_shifted_kernel,
            "finalize": k.group_norm_finalize_kernel, "apply": k.group_norm_apply_kernel}


def _pixel_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride of n, of c, of the flattened pixel index h * W + w), or None when the pixels are not
    one strided run (neither dense layout)."""
    s_n, s_c, s_h, s_w = x.stride()
    if x.shape[2] > 1 and s_h != x.shape[3] * s_w:
        return None
    return s_n, s_c, s_w


def group_norm_stages(x, weight, bias, groups: int, eps: float, act: int = 0, channel_bias=None,
                      sample_bias=None, config: KernelConfig | None = None):
    """``(y, {"stats": launch, "finalize": launch, "apply": launch})``: the output buffer and the three
    kernel launches that fill it, in that order (``triton_group_norm_act`` runs them once; the GPU
    benchmark times each alone). ``config`` None: ``kernel_config()``."""
    _check(x, weight, bias, groups, channel_bias, sample_bias)
    config = config or kernel_config()
    import triton

    kernels = _kernels()
    if _pixel_strides(x) is None:
        x = x.contiguous(memory_format=torch.channels_last)
    s_n, s_c, s_p = _pixel_strides(x)
    n, c, h, w = x.shape
    hw = h * w
    y = torch.empty_like(x, memory_format=torch.channels_last)
    # at most 256 partial results per channel (the finalize kernel holds them in one tile)
    ppp = max(config.pixels_per_program, triton.cdiv(hw, 256 * config.block_p) * config.block_p)
    n_pblocks = triton.cdiv(hw, ppp)
    partial_mean = torch.empty((n, n_pblocks, c), device=x.device, dtype=torch.float32)
    partial_m2 = torch.empty_like(partial_mean)
    scale = torch.empty((n, c), device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    dummy = scale  # the pointer passed where an input is absent (never read)
    sbias = sample_bias.contiguous() if sample_bias is not None else None
    cbias = channel_bias.contiguous() if channel_bias is not None else None
    sb_n = sbias.stride(0) if sbias is not None else 0
    flags = {"HAS_CBIAS": cbias is not None, "HAS_SBIAS": sbias is not None}
    cbias = cbias if cbias is not None else dummy
    sbias = sbias if sbias is not None else dummy
    y_n, y_c, y_p = _pixel_strides(y)
    apply_pblocks = triton.cdiv(hw, config.apply_block_p)

    def stats():
        kernels[config.stats][(n * n_pblocks, triton.cdiv(c, config.block_c))](
            x, cbias, sbias, partial_mean, partial_m2, c, hw, s_n, s_c, s_p, sb_n, ppp, n_pblocks, **flags,
            BLOCK_P=config.block_p, BLOCK_C=config.block_c, num_warps=config.stats_warps)

    def finalize():
        kernels["finalize"][(n * groups,)](
            partial_mean, partial_m2,
            weight.contiguous() if weight is not None else dummy, bias.contiguous() if bias is not None else dummy,
            cbias, sbias, scale, shift, c, hw, groups, c // groups, n_pblocks, ppp, sb_n, float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **flags,
            BLOCK_B=triton.next_power_of_2(n_pblocks), BLOCK_G=triton.next_power_of_2(c // groups), num_warps=4)

    def apply():
        kernels["apply"][(n * apply_pblocks, triton.cdiv(c, config.apply_block_c))](
            x, y, scale, shift, c, hw, apply_pblocks, s_n, s_c, s_p, y_n, y_c, y_p, ACT=int(act),
            BLOCK_P=config.apply_block_p, BLOCK_C=config.apply_block_c, num_warps=config.apply_warps)

    return y, {"stats": stats, "finalize": finalize, "apply": apply}


def triton_group_norm_act(x, weight, bias, groups: int, eps: float, act: int = 0,
                          channel_bias=None, sample_bias=None, config: KernelConfig | None = None) -> torch.Tensor:
    """The op's CUDA kernel (also runs on CPU tensors under ``TRITON_INTERPRET=1``, for tests)."""
    y, stages = group_norm_stages(x, weight, bias, groups, eps, act, channel_bias, sample_bias, config)
    if y.numel():
        for launch in stages.values():
            launch()
    return y


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --- the graph pass ------------------------------------------------------------------------------

def _targets():
    return {
        "group_norm": (F.group_norm, torch.group_norm),
        "silu": (F.silu, torch._C._nn.silu),
        "conv2d": (torch.conv2d, F.conv2d),
        "add": (operator.add, torch.add),
    }


def _value(node):
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


class FusedGroupNorm(CustomGraphPass):
    """Inductor pre-grad pass: each 4-D ``F.group_norm`` on one of ``devices`` becomes
    ``subjectbench::group_norm_act`` (with the SiLU that is its only user, and the bias / time
    embedding added before it, as the module docstring says). Pass it as ``torch.compile(...,
    options={"pre_grad_custom_pass": FusedGroupNorm()})``, for inference only. ``rewritten``,
    ``with_silu``, ``with_channel_bias`` and ``with_sample_bias`` count the last call's changes."""

    def __init__(self, devices: tuple[str, ...] = ("cuda",), min_pixels: int = MIN_PIXELS) -> None:
        self.devices = tuple(devices)
        self.min_pixels = int(min_pixels)
        self.rewritten = self.with_silu = self.with_channel_bias = self.with_sample_bias = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        targets = _targets()
        self.rewritten = self.with_silu = self.with_channel_bias = self.with_sample_bias = 0
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in targets["group_norm"]:
                self._rewrite(graph, node, targets)

    def _rewrite(self, graph, node, targets) -> None:
        names = ("input", "num_groups", "weight", "bias", "eps")
        args = dict(zip(names, node.args))
        args.update({k: v for k, v in node.kwargs.items() if k in names})
        x = args.get("input")
        value = _value(x)
        groups = args.get("num_groups")
        eps = args.get("eps", 1e-5)
        if value is None or value.dim() != 4 or value.device.type not in self.devices or not isinstance(groups, int) \
                or value.shape[2] * value.shape[3] < self.min_pixels \
                or not isinstance(eps, float) or value.shape[1] % groups or value.dtype not in (
                    torch.float32, torch.float16, torch.bfloat16):
            return
        weight, bias = args.get("weight"), args.get("bias")
        if any(p is not None and not isinstance(p, torch.fx.Node) for p in (weight, bias)):
            return
        act, out = 0, node
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in targets["silu"] \
                and not users[0].kwargs.get("inplace", False) and not (len(users[0].args) > 1 and users[0].args[1]):
            act, out = 1, users[0]
        channel_bias = sample_bias = None
        source = x
        if self._is_add_of_conv_and_embedding(x, targets, value):
            conv, embedding = x.args if self._is_conv_with_bias(x.args[0], targets) else x.args[::-1]
            channel_bias = self._take_conv_bias(conv)
            with graph.inserting_before(node):
                sample_bias = graph.call_function(torch.flatten, (embedding, 1))
            source = conv
        elif self._is_conv_with_bias(x, targets) and len(x.users) == 1:
            channel_bias = self._take_conv_bias(x)
        with graph.inserting_before(out):
            fused = graph.call_function(torch.ops.subjectbench.group_norm_act.default,
                                        (source, weight, bias, groups, eps, act, channel_bias, sample_bias))
        fused.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        out.replace_all_uses_with(fused)
        if out is not node:
            graph.erase_node(out)
        graph.erase_node(node)
        if source is not x:
            graph.erase_node(x)
        self.rewritten += 1
        self.with_silu += act
        self.with_channel_bias += channel_bias is not None
        self.with_sample_bias += sample_bias is not None

    def counts(self) -> dict:
        """The last call's changes, for benchmark records."""
        return {"rewritten": self.rewritten, "with_silu": self.with_silu,
                "with_channel_bias": self.with_channel_bias, "with_sample_bias": self.with_sample_bias}

    @staticmethod
    def _is_conv_with_bias(node, targets) -> bool:
        return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets["conv2d"]
                and len(node.args) >= 3 and isinstance(node.args[2], torch.fx.Node) and "bias" not in node.kwargs
                and (_value(node.args[2]) is not None and _value(node.args[2]).dim() == 1))

    def _is_add_of_conv_and_embedding(self, node, targets, value) -> bool:
        if not (node.op == "call_function" and node.target in targets["add"] and len(node.args) == 2
                and not node.kwargs and len(node.users) == 1):
            return False
        for conv, embedding in (node.args, node.args[::-1]):
            emb = _value(embedding)
            if self._is_conv_with_bias(conv, targets) and len(conv.users) == 1 and emb is not None \
                    and tuple(emb.shape) == (value.shape[0], value.shape[1], 1, 1) and emb.dtype == value.dtype:
                return True
        return False

    @staticmethod
    def _take_conv_bias(conv):
        bias = conv.args[2]
        conv.args = (*conv.args[:2], None, *conv.args[3:])
        return bias

    def uuid(self):
        return (get_hash_for_files((__file__,)), self.devices, self.min_pixels)


@functools.cache
def fused_group_norm() -> FusedGroupNorm:
    """The one ``FusedGroupNorm()`` of this process (so compiled wrappers with equal options share
    compiled code, as ``compile_layout.channels_last_cat``)."""
    return FusedGroupNorm()
