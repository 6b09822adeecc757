"""methods.fused_norm: the GroupNorm (+ SiLU) op, its Triton kernels (run on the CPU by Triton's
interpreter) against a float64 reference, and the pre-grad pass on the tiny UNet against eager."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from methods.fused_norm import (
    FusedGroupNorm,
    KernelConfig,
    group_norm_act,
)

ROOT = Path(__file__).resolve().parents[1]

# Run in a child: TRITON_INTERPRET must be set before triton.jit decorates the kernels.
INTERPRETED = textwrap.dedent("""
    import itertools, torch, torch.nn.functional as F
    from methods.fused_norm import KernelConfig, triton_group_norm_act

    def reference(x, w, b, g, act, cb, sb):  # float64: the exact value the kernels approximate
        h = x.double()
        if cb is not None:
            h = h + cb.double()[None, :, None, None] + sb.double()[:, :, None, None]
        y = F.group_norm(h, g, None if w is None else w.double(), None if b is None else b.double(), 1e-5)
        return F.silu(y) if act else y

    torch.manual_seed(0)
    configs = [KernelConfig(stats="tiles"), KernelConfig(),  # the default is the swept "shifted" one
               KernelConfig(stats="shifted", block_p=16, block_c=32, pixels_per_program=32, apply_block_p=16,
                            apply_block_c=16)]
    worst = {}
    cases = []  # every config x shape, each with four of the sixteen (act, layout, dtype, bias) mixes
    for i, (config, shape) in enumerate(itertools.product(configs, [(2, 64, 8, 8, 32), (1, 96, 5, 7, 8),
                                                                   (1, 64, 20, 20, 16)])):
        for j in range(4):
            cases.append((config, shape, j & 1, bool(j & 2), (torch.float32, torch.bfloat16)[(i + j) % 2],
                          bool((i + j // 2) % 2)))
    for config, (n, c, h, w, g), act, channels_last, dtype, bias in cases:
        x = (torch.randn(n, c, h, w) * 3 + 2).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight, shift = torch.randn(c).to(dtype), torch.randn(c).to(dtype)
        cb = torch.randn(c).to(dtype) if bias else None
        sb = torch.randn(n, c).to(dtype) if bias else None
        y = triton_group_norm_act(x, weight, shift, g, 1e-5, act, cb, sb, config=config)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last), (y.dtype, y.stride())
        r = reference(x, weight, shift, g, act, cb, sb)
        # fp32: a few ulps; bf16: one rounding of the output (the interpreter truncates, so 1 ulp)
        bound = (1e-5 + 1e-5 * r.abs()) if dtype == torch.float32 else (1e-3 + 2 ** -7 * r.abs())
        excess = float(((y.double() - r).abs() / bound).max())
        key = (config.stats, str(dtype))
        worst[key] = max(worst.get(key, 0.0), excess)
        assert excess <= 1.0, (config, (n, c, h, w, g), act, channels_last, dtype, bias, excess)
    # a group whose mean is 3e4 standard deviations from zero: torch's fp32 CPU GroupNorm is off by ~10
    # here (E[x^2] - E[x]^2); both statistics variants stay near the float64 value
    x = (torch.randn(2, 64, 16, 16) * 0.01 + 300).contiguous(memory_format=torch.channels_last)
    exact = F.group_norm(x.double(), 32, None, None, 1e-5)
    for config in configs[:2]:
        error = float((triton_group_norm_act(x, None, None, 32, 1e-5, 0, config=config).double() - exact).abs().max())
        assert error < 0.02, (config.stats, error)
    print("OK", worst)
""")


def test_triton_kernels_match_a_float64_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_op_on_cpu_is_group_norm_then_silu_in_channels_last():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 6, 6)
    weight, bias, cb, sb = torch.randn(64), torch.randn(64), torch.randn(64), torch.randn(2, 64)
    y = group_norm_act(x, weight, bias, 32, 1e-5, "silu", cb, sb)
    expected = F.silu(F.group_norm(x + cb[None, :, None, None] + sb[:, :, None, None], 32, weight, bias, 1e-5))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    plain = group_norm_act(x, None, None, 8, 1e-6)
    torch.testing.assert_close(plain, F.group_norm(x, 8, eps=1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: group_norm_act(torch.randn(2, 64, 9), None, None, 32), "must be 4-D"),
    (lambda: group_norm_act(torch.randn(2, 60, 3, 3), None, None, 32), "60 channels do not split into 32"),
    (lambda: group_norm_act(torch.randn(2, 64, 3, 3), torch.randn(32), None, 32), "weight has shape"),
    (lambda: group_norm_act(torch.randn(2, 64, 3, 3), None, None, 32, sample_bias=torch.randn(64)),
     "sample_bias has shape"),
    (lambda: group_norm_act(torch.randn(2, 64, 3, 3), None, None, 32, act="gelu"), "act 'gelu'"),
    (lambda: KernelConfig(stats="welford"), "stats 'welford'"),
    (lambda: KernelConfig(block_p=48), "power of two"),
    (lambda: KernelConfig(pixels_per_program=100), "not a multiple"),
])
def test_bad_input_names_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_triton_failure_warns_once_and_falls_back_to_the_torch_reference(monkeypatch, caplog):
    """The op's CUDA kernel (called here on CPU tensors): a Triton error (a GPU or Triton version
    the kernels do not build for) warns once and gives the reference's values; any other error raises."""
    import methods.fused_norm as fused_norm

    TritonError = type("CompilationError", (Exception,), {"__module__": "triton.compiler.errors"})
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise TritonError("at 12:4: unsupported")

    assert torch._C._dispatch_has_kernel_for_dispatch_key(fused_norm.OP_NAME, "CUDA")  # this function serves it
    monkeypatch.setattr(fused_norm, "triton_group_norm_act", failing)
    monkeypatch.setattr(fused_norm, "_triton_failed", [])
    x, w, b = torch.randn(2, 64, 4, 4), torch.randn(64), torch.randn(64)
    with caplog.at_level("WARNING", logger="methods.fused_norm"):
        first = fused_norm.cuda_group_norm_act(x, w, b, 32, 1e-5, 1, None, None)
        second = fused_norm.cuda_group_norm_act(x, w, b, 32, 1e-5, 1, None, None)
    torch.testing.assert_close(first, F.silu(F.group_norm(x, 32, w, b)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert len(calls) == 1 and sum("Triton GroupNorm kernels failed" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(fused_norm, "_triton_failed", [])
    monkeypatch.setattr(fused_norm, "triton_group_norm_act", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fused_norm.cuda_group_norm_act(x, w, b, 32, 1e-5, 1, None, None)


def test_fake_tensor_output_is_channels_last():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.subjectbench.group_norm_act(torch.empty(2, 64, 4, 4), None, None, 32, 1e-5, 1, None, None)
    assert y.shape == (2, 64, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def uncached():
    """The pass runs only on a real compile: a warm inductor or AOT cache returns the graph it made
    before without calling it (the counts would read 0)."""
    import torch._functorch.config as functorch_config
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def tiny_unet_through(graph_pass):
    """(the tiny UNet, its output compiled with ``graph_pass`` as inductor's pre-grad pass, eager output)."""
    from methods.backbones import load_backbone, resolve_backbone

    unet = load_backbone(resolve_backbone("tiny")).unet
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    torch._dynamo.reset()
    with torch.no_grad(), uncached():
        expected = unet(x, torch.tensor(10), encoder_hidden_states=text).sample
        got = torch.compile(unet, options={"pre_grad_custom_pass": graph_pass})(
            x, torch.tensor(10), encoder_hidden_states=text).sample
    torch._dynamo.reset()
    return unet, got, expected


def test_pass_on_the_tiny_unet_matches_eager():
    fused = FusedGroupNorm(devices=("cpu",), min_pixels=1)
    unet, got, expected = tiny_unet_through(fused)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
    # every GroupNorm; the SiLU after each resnet norm and norm_out; conv bias + time embedding before norm2
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    assert fused.counts() == {"rewritten": norms, "with_silu": 2 * resnets + 1,
                              "with_channel_bias": resnets, "with_sample_bias": resnets}


def test_pass_leaves_small_group_norms_and_other_devices():
    def block(x, w, b):
        return F.silu(F.group_norm(x, 4, w, b))

    x, w, b = torch.randn(1, 8, 4, 4), torch.randn(8), torch.randn(8)
    with uncached():
        for fused in (FusedGroupNorm(devices=("cpu",), min_pixels=17), FusedGroupNorm()):  # 16 pixels; CUDA only
            torch._dynamo.reset()
            torch.compile(block, options={"pre_grad_custom_pass": fused})(x, w, b)
            assert fused.rewritten == 0
        torch._dynamo.reset()
        fused = FusedGroupNorm(devices=("cpu",), min_pixels=16)
        out = torch.compile(block, options={"pre_grad_custom_pass": fused})(x, w, b)
    torch._dynamo.reset()
    assert fused.counts() == {"rewritten": 1, "with_silu": 1, "with_channel_bias": 0, "with_sample_bias": 0}
    torch.testing.assert_close(out, block(x, w, b), rtol=1e-5, atol=1e-5)


def test_kernel_config_from_json_reads_fields_or_a_sweep_and_names_a_bad_file(tmp_path):
    import json

    from methods.fused_norm import DEFAULT_CONFIG, kernel_config, set_kernel_config

    fields = tmp_path / "fields.json"
    fields.write_text(json.dumps({"stats": "shifted", "block_p": 32}))
    assert KernelConfig.from_json(fields) == KernelConfig(stats="shifted", block_p=32)
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"sweep": {"best_config": {"apply_block_p": 128, "apply_warps": 8}}}))
    assert KernelConfig.from_json(sweep) == KernelConfig(apply_block_p=128, apply_warps=8)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"block_q": 3}))
    with pytest.raises(ValueError, match="bad.json: expected an object with fields"):
        KernelConfig.from_json(bad)
    with pytest.raises(ValueError, match="missing.json: cannot read it"):
        KernelConfig.from_json(tmp_path / "missing.json")
    try:
        set_kernel_config(KernelConfig.from_json(fields))
        assert kernel_config().stats == "shifted"
    finally:
        set_kernel_config(None)
    assert kernel_config() == DEFAULT_CONFIG
