"""benchmarks.shifted_norm: GroupNorm by shifted sums against a float64 reference, and its pre-grad pass
compiled on the tiny UNet against eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.shifted_norm import ShiftedGroupNorm, shifted_group_norm
from tests.test_fused_norm import tiny_unet_through, uncached


@pytest.mark.parametrize("shape,groups", [((2, 64, 8, 8), 32), ((1, 96, 5, 7), 8), ((3, 32, 1, 1), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_float64_group_norm(shape, groups, dtype, affine):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 2).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1]).to(dtype) if affine else None
    bias = torch.randn(shape[1]).to(dtype) if affine else None
    exact = F.group_norm(x.double(), groups, None if weight is None else weight.double(),
                         None if bias is None else bias.double(), 1e-5)
    got = shifted_group_norm(x, groups, weight, bias, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    # fp32: a few ulps; bf16: one rounding of the output
    bound = (1e-5 + 1e-5 * exact.abs()) if dtype == torch.float32 else (1e-3 + 2 ** -8 * exact.abs())
    assert float(((got.double() - exact).abs() / bound).max()) <= 1.0


def test_well_conditioned_far_from_zero():
    # a group whose mean is 3e4 standard deviations from zero: E[x^2] - E[x]^2 in fp32 loses it all
    # (torch's fp32 CPU GroupNorm is off by ~10 here); the shift keeps the variance
    x = torch.randn(2, 64, 16, 16) * 0.01 + 300
    exact = F.group_norm(x.double(), 32, None, None, 1e-5)
    assert float((shifted_group_norm(x, 32).double() - exact).abs().max()) < 0.02


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="4-D"):
        shifted_group_norm(torch.zeros(2, 8, 4), 4)
    with pytest.raises(ValueError, match="10 channels do not split into 4 groups"):
        shifted_group_norm(torch.zeros(1, 10, 2, 2), 4)


def test_pass_on_the_tiny_unet_matches_eager_and_gradients_flow():
    shifted = ShiftedGroupNorm(devices=("cpu",))
    unet, got, expected = tiny_unet_through(shifted)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert shifted.counts() == {"rewritten": sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())}

    def block(h, w, b):
        return F.silu(F.group_norm(h, 4, w, b))

    h, w, b = (torch.randn(1, 8, 4, 4, requires_grad=True), torch.randn(8, requires_grad=True),
               torch.randn(8, requires_grad=True))
    with uncached():
        torch._dynamo.reset()
        other = ShiftedGroupNorm()  # CUDA only: leaves a CPU graph alone
        torch.compile(block, options={"pre_grad_custom_pass": other})(h, w, b)
        torch._dynamo.reset()
        out = torch.compile(block, options={"pre_grad_custom_pass": shifted})(h, w, b)
    torch._dynamo.reset()
    assert other.rewritten == 0 and shifted.rewritten == 1
    grads = torch.autograd.grad(out.square().sum(), (h, w, b))
    expected = torch.autograd.grad(block(h, w, b).square().sum(), (h, w, b))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
