"""methods.compile_layout: the channels-last concatenation pass (against the eager net: a cat is exact)
and GroupNorm stated in channels-last order (against torch's own ``F.group_norm``, the independent
reference, and for what the compiler traces)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from methods.compile_layout import (
    ChannelsLastCat,
    LayoutGroupNorm,
    channels_last_cat,
    group_norm_channels_last,
    plain_group_norms,
    use_layout_group_norms,
)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("channels", "groups", "affine"), [(64, 32, True), (96, 32, True), (12, 3, False)])
def test_equals_torch_group_norm_in_fp32(channels, groups, affine, channels_last):
    generator = torch.Generator().manual_seed(channels + groups)
    x = torch.randn(3, channels, 9, 7, generator=generator) * 4 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, generator=generator) if affine else None
    bias = torch.randn(channels, generator=generator) if affine else None
    ours = group_norm_channels_last(x, groups, weight, bias, 1e-5)
    reference = F.group_norm(x, groups, weight, bias, 1e-5)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert ours.is_contiguous(memory_format=torch.channels_last)


def test_bf16_within_torchs_own_rounding():
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 64, 8, 8, generator=generator) * 3 + 1).to(torch.bfloat16)
    weight, bias = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    exact = F.group_norm(x.float(), 32, weight, bias, 1e-5)
    ours = group_norm_channels_last(x, 32, weight.bfloat16(), bias.bfloat16(), 1e-5)
    torchs = F.group_norm(x, 32, weight.bfloat16(), bias.bfloat16(), 1e-5)
    assert ours.dtype == torch.bfloat16
    # both round the same fp32 result to bf16 once: no more error than torch's own bf16 GroupNorm
    assert (ours.float() - exact).abs().max() <= (torchs.float() - exact).abs().max() + 1e-6


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.GroupNorm(32, 64), torch.nn.SiLU(),
                               torch.nn.Conv2d(64, 8, 1), torch.nn.GroupNorm(4, 8, affine=False))


def test_swap_is_in_place_and_eagerly_identical():
    net = _net()
    x = torch.randn(2, 4, 10, 10)
    before, keys = net(x), list(net.state_dict())
    norm = net[1]
    assert use_layout_group_norms(net) == 2
    assert net[1] is norm and isinstance(norm, torch.nn.GroupNorm) and type(norm) is LayoutGroupNorm
    assert list(net.state_dict()) == keys
    assert torch.equal(net(x), before)  # eagerly: nn.GroupNorm.forward itself, bit for bit
    assert use_layout_group_norms(net) == 0  # already switched
    assert plain_group_norms(net) == 2 and type(net[1]) is torch.nn.GroupNorm


@torch.no_grad()
def test_compiled_trace_uses_the_channels_last_form_and_matches_eager():
    """The graph dynamo hands the compiler (no autograd, as sampling runs) has no group_norm call
    once switched, and inductor's compiled result equals the eager nn.GroupNorm net within fp32
    rounding; with autograd on (a training step) the trace keeps torch's GroupNorm."""
    seen: list[set[str]] = []

    def recording_backend(graph_module, example_inputs):
        seen.append({str(node.target) for node in graph_module.graph.nodes if node.op in ("call_function", "call_method")})
        return graph_module.forward

    net = _net()
    x = torch.randn(2, 4, 10, 10)
    reference = net(x)
    torch._dynamo.reset()
    torch.compile(net, backend=recording_backend)(x)
    assert any("group_norm" in target for target in seen[-1])
    use_layout_group_norms(net)
    try:
        torch._dynamo.reset()
        torch.compile(net, backend=recording_backend)(x)
        assert not any("group_norm" in target for target in seen[-1])
        assert any("var_mean" in target for target in seen[-1])
        with torch.enable_grad():
            torch.compile(net, backend=recording_backend)(x)
        assert any("group_norm" in target for target in seen[-1])
        torch._dynamo.reset()
        compiled = torch.compile(net)(x)
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    finally:
        plain_group_norms(net)
        torch._dynamo.reset()


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
