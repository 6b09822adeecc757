"""Memory-layout fixes for inductor-compiled convolution nets (issue 17, item 1).

Inductor's layout optimisation keeps a conv net's activations in channels-last (NHWC) memory, but
two kinds of op in SD 1.5's UNet cross that layout when compiled:

1. **Channel concatenations** (the up blocks' ``torch.cat([hidden, skip], dim=1)``). Inductor gives
   a cat's output the contiguous NCHW layout unless an input is already a channels-last buffer, so
   each up-block cat is written NCHW by a transposing kernel and read back into channels-last by the
   next GroupNorm's kernel, which on an H100 ran at 0.75-0.94 TB/s (7.7 of the 131 ms of a 64-latent
   forward; GEGLU's kernel beside it reached 3.0 TB/s; ``benchmarks/gpu_unet_kernels.py``, arm
   ``compiled_bandwidth``; the seven NCHW buffers of the compiled forward are exactly the seven
   largest up-block cats). ``ChannelsLastCat`` is an inductor post-grad graph pass that states such a
   cat over the NHWC views — ``cat([x.permute(0, 2, 3, 1), ...], dim=3).permute(0, 3, 1, 2)`` — so its
   buffer is channels-last. A cat copies values exactly: the result is the same tensor, bit for bit,
   in another memory order (tested on CPU against the eager net).
2. **GroupNorm**: torch's decomposition reduces over ``(C/G, H, W)`` in NCHW index order.
   ``group_norm_channels_last`` states the same arithmetic over the NHWC view and
   ``LayoutGroupNorm`` uses it while compiled without autograd. Measured on an H100: no gain
   (132.9 → 132.6 ms per 64-latent forward, within the spread; sampling 0.2192 → 0.2181 s/image,
   ``benchmarks/results``), so the suite does not use it; it stays for the benchmark arms that
   measured it.

GroupNorm details: ``group_norm_channels_last`` views the input as ``(N, H·W, G, C/G)``, takes the mean
and biased variance over axes 1 and 3 in fp32, then ``(x − mean) · rsqrt(var + eps) · γ + β`` cast
back to the input's dtype, as ``torch.nn.functional.group_norm`` computes it; only the summation
order differs (equal within fp32 rounding; ``tests/test_compile_layout.py`` checks against
``torch.nn.functional.group_norm``). ``LayoutGroupNorm`` is an ``nn.GroupNorm`` (same parameters,
state-dict keys and eager behaviour: outside a compile it calls ``nn.GroupNorm.forward`` unchanged)
that uses this form only while ``torch.compile`` traces it without autograd (dynamo guards on the
grad mode, so a compiled training step traces torch's own GroupNorm). ``use_layout_group_norms``
switches a module tree's plain GroupNorms to it in place; ``plain_group_norms`` switches them back.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class ChannelsLastCat(CustomGraphPass):
    """Inductor post-grad pass: each 4-D ``aten.cat`` along channels (dim 1) on one of ``devices``
    becomes the same cat over NHWC views, permuted back, so inductor lays its buffer out
    channels-last. Pass it as ``torch.compile(..., options={"post_grad_custom_pre_pass":
    ChannelsLastCat()})``. ``rewritten`` counts the cats changed by the last call."""

    def __init__(self, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.devices = tuple(devices)
        self.rewritten = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        self.rewritten = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.cat.default:
                continue
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor) or value.dim() != 4 or dim not in (1, -3) \
                    or value.device.type not in self.devices or value.shape[2] * value.shape[3] == 1:
                continue
            if not all(isinstance(t, torch.fx.Node) and isinstance(t.meta.get("val"), torch.Tensor)
                       and t.meta["val"].dim() == 4 for t in tensors):
                continue
            with graph.inserting_before(node):
                views = []
                for tensor in tensors:
                    view = graph.call_function(aten.permute.default, (tensor, [0, 2, 3, 1]))
                    view.meta["val"] = aten.permute.default(tensor.meta["val"], [0, 2, 3, 1])
                    views.append(view)
                joined = graph.call_function(aten.cat.default, (views, 3))
                joined.meta["val"] = aten.cat.default([v.meta["val"] for v in views], 3)
                back = graph.call_function(aten.permute.default, (joined, [0, 3, 1, 2]))
                back.meta["val"] = aten.permute.default(joined.meta["val"], [0, 3, 1, 2])
            node.replace_all_uses_with(back)
            graph.erase_node(node)
            self.rewritten += 1

    def uuid(self):
        return (get_hash_for_files((__file__,)), self.devices)


_SHARED: list[ChannelsLastCat] = []


def channels_last_cat() -> ChannelsLastCat:
    """The one ``ChannelsLastCat()`` of this process: ``torch.compile`` wrappers whose inductor
    options are equal share compiled code, and a new pass object per wrapper would make them unequal
    (a recompile per sampling pipeline)."""
    if not _SHARED:
        _SHARED.append(ChannelsLastCat())
    return _SHARED[0]


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


def use_layout_group_norms(module: torch.nn.Module) -> int:
    """Make every plain ``nn.GroupNorm`` in ``module`` a ``LayoutGroupNorm`` in place (the same
    object and parameters; only its class changes). Returns how many changed."""
    changed = 0
    for sub in module.modules():
        if type(sub) is torch.nn.GroupNorm:
            sub.__class__ = LayoutGroupNorm
            changed += 1
    return changed


def plain_group_norms(module: torch.nn.Module) -> int:
    """Undo ``use_layout_group_norms``. Returns how many changed back."""
    changed = 0
    for sub in module.modules():
        if type(sub) is LayoutGroupNorm:
            sub.__class__ = torch.nn.GroupNorm
            changed += 1
    return changed
