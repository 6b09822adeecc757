"""GroupNorm written in channels-last order for compiled code (issue 17, item 1).

Why: ``torch.compile`` (inductor) decomposes ``nn.GroupNorm`` into a mean/variance reduction over
``(C/G, H, W)`` and an elementwise normalisation, both indexed in NCHW order, while inductor's
layout optimisation keeps a conv net's activations in channels-last (NHWC) memory. The decomposed
GroupNorm then reads and writes across the memory order: on an H100, SD 1.5's compiled UNet ran
its GroupNorm kernels at 0.75-1.5 TB/s (~16 of its 131 ms per 64-latent forward) where the fused
GEGLU kernel next to them reached 3.0 TB/s (``benchmarks/gpu_unet_kernels.py``, arm
``compiled_bandwidth``).

``group_norm_channels_last`` states the same arithmetic over an NHWC view — ``(N, H·W, G, C/G)``,
mean and biased variance over axes 1 and 3 in fp32, then ``(x − mean) · rsqrt(var + eps) · γ + β``
cast back to the input's dtype, as ``torch.nn.functional.group_norm`` computes it — so the
reduction and the elementwise pass walk the memory in order. Only the summation order differs
(results equal within fp32 rounding; ``tests/test_group_norm.py`` checks against
``torch.nn.functional.group_norm``).

``LayoutGroupNorm`` is an ``nn.GroupNorm`` (same parameters, state-dict keys and eager behaviour:
outside a compile it calls ``nn.GroupNorm.forward`` unchanged) that uses this form only while
``torch.compile`` traces it without autograd (sampling; dynamo guards on the grad mode, so a
compiled training step traces torch's own GroupNorm and its fused backward — not measured with
this form). ``use_layout_group_norms(module)`` switches a module tree's plain
GroupNorms to it in place; ``plain_group_norms`` switches them back.
"""

from __future__ import annotations

import torch


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
