"""methods.compile_layout: the channels-last concatenation pass, against the eager net (a cat is
exact, so the compiled result must equal it within fp32 rounding)."""

from __future__ import annotations

import copy

import torch

from methods.compile_layout import ChannelsLastCat, channels_last_cat


@torch.no_grad()
def test_channels_last_cat_pass_keeps_the_tiny_unets_output():
    """The pass (allowed on the CPU here; the suite runs it on CUDA only) rewrites the tiny UNet's
    up-block concatenations, and inductor's result equals the eager UNet within fp32 rounding: a
    concatenation copies values exactly, only the memory order changes."""
    from torch._inductor import config as inductor_config

    from methods.backbones import load_backbone, resolve_backbone

    unet = load_backbone(resolve_backbone("tiny")).unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)
    reference = unet(latents, 10, encoder_hidden_states=text).sample
    rewrite = ChannelsLastCat(devices=("cpu",))
    torch._dynamo.reset()
    try:
        with inductor_config.patch(fx_graph_cache=False):  # the pass runs only on a real compile
            compiled = torch.compile(unet, dynamic=False, options={"post_grad_custom_pre_pass": rewrite})
            out = compiled(latents, 10, encoder_hidden_states=text).sample
    finally:
        torch._dynamo.reset()
    cats = sum(len(block.resnets) for block in unet.up_blocks)  # one cat per up-block resnet
    assert rewrite.rewritten == cats > 0
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_channels_last_cat_leaves_other_cats_alone():
    """Only 4-D cats along channels on the pass's devices change; its cache key names the devices."""
    def net(a, b, c, d):
        return torch.cat([a, b], dim=1), torch.cat([a, b], dim=0), torch.cat([c, d], dim=1)

    inputs = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3), torch.randn(2, 5))
    graph_module = torch.fx.experimental.proxy_tensor.make_fx(net, tracing_mode="fake")(*inputs)
    for rewrite, expected in ((ChannelsLastCat(devices=("cpu",)), 1), (ChannelsLastCat(), 0)):
        module = copy.deepcopy(graph_module)
        rewrite(module.graph)
        module.recompile()
        assert rewrite.rewritten == expected
        for ours, theirs in zip(module(*inputs), net(*inputs)):
            assert torch.equal(ours, theirs)
    assert ChannelsLastCat().uuid() != ChannelsLastCat(devices=("cpu",)).uuid()
    assert channels_last_cat() is channels_last_cat()


@torch.no_grad()
def test_one_shared_pass_lets_pipelines_share_compiled_code():
    """Why ``channels_last_cat()`` hands out one instance: wrappers whose options hold equal passes
    share one compiled graph; a new pass object per wrapper compiles again each time."""
    from torch._dynamo.utils import counters

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    x = torch.randn(1, 3, 4, 4)

    def graphs(make_pass) -> int:
        torch._dynamo.reset()
        counters.clear()
        for _ in range(2):
            torch.compile(net, dynamic=False, options={"post_grad_custom_pre_pass": make_pass()})(x)
        return counters["stats"]["unique_graphs"]

    try:
        assert graphs(channels_last_cat) == 1
        assert graphs(ChannelsLastCat) == 2
    finally:
        torch._dynamo.reset()
