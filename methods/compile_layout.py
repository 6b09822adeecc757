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
2. **GroupNorm**: torch's decomposition reduces over ``(C/G, H, W)`` in NCHW index order. Stating
   it over the NHWC view instead (``benchmarks/gpu_metrics.py::layout_group_norms``) measured no gain
   on an H100 (132.9 → 132.6 ms per 64-latent forward, within the spread; sampling 0.2192 → 0.2181
   s/image, ``benchmarks/results``), so the suite does not do it.
"""

from __future__ import annotations

import functools

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


@functools.cache
def channels_last_cat() -> ChannelsLastCat:
    """The one ``ChannelsLastCat()`` of this process: ``torch.compile`` wrappers whose inductor
    options are equal share compiled code, and a new pass object per wrapper would make them unequal
    (a recompile per sampling pipeline; tested)."""
    return ChannelsLastCat()
