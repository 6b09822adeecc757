"""methods.attention on the tiny UNet: processors restored, a no-op controller changes nothing,
recorded maps have the right shapes and are distributions over keys, edits take effect."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from methods.attention import (
    AttentionControlError,
    AttentionController,
    AttentionRecorder,
    attention_control,
    attention_layers,
    is_cross_attention_layer,
)
from methods.backbones import load_backbone, resolve_backbone
from methods.diffusion import encode_text, working_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(resolve_backbone("tiny"))


@pytest.fixture(scope="module")
def inputs(backbone):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    text = encode_text(backbone.text_encoder, backbone.tokenizer, ["", "a sks dog"], backbone.device)
    return latents, torch.tensor(500), text


def _run(unet, inputs) -> torch.Tensor:
    latents, timestep, text = inputs
    with torch.no_grad():
        return unet(latents, timestep, text, return_dict=False)[0]


def _processor_ids(unet) -> dict[str, int]:
    return {layer: id(processor) for layer, processor in unet.attn_processors.items()}


def test_processors_are_restored_after_use_and_after_an_exception(backbone, inputs):
    unet = backbone.unet
    before = _processor_ids(unet)
    with attention_control(unet, AttentionController()) as installed:
        assert set(installed) == set(before)
        assert all(id(unet.attn_processors[layer]) == id(installed[layer]) for layer in installed)
        _run(unet, inputs)
    assert _processor_ids(unet) == before

    class Boom(AttentionController):
        def edit(self, call, probs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attention_control(unet, Boom(), select="cross"):
        _run(unet, inputs)
    assert _processor_ids(unet) == before
    with pytest.raises(KeyError), attention_control(unet, AttentionController()):
        raise KeyError("body fails")
    assert _processor_ids(unet) == before


def test_a_no_op_controller_reproduces_the_default_processors(backbone, inputs):
    unet = working_copy(backbone.unet)
    default = _run(unet, inputs)  # diffusers' default (AttnProcessor2_0, fused SDPA)
    with attention_control(unet, AttentionController()):
        controlled = _run(unet, inputs)
    # Same math as SDPA with a different summation order: fp32 rounding only.
    torch.testing.assert_close(controlled, default, rtol=1e-5, atol=1e-5)
    unet.set_attn_processor(AttnProcessor())
    explicit = _run(unet, inputs)  # diffusers' explicit-softmax processor: the same kernels
    with attention_control(unet, AttentionController()):
        assert torch.equal(_run(unet, inputs), explicit)


def test_recorded_maps_have_the_right_shapes_and_sum_to_one(backbone, inputs):
    unet = backbone.unet
    recorder = AttentionRecorder(cross=True, self_attention=True, mean_heads=False)
    recorder.cfg = True
    recorder.step = 3
    with attention_control(unet, recorder):
        _run(unet, inputs)
    layers = attention_layers(unet)
    assert {layer for _, layer in recorder.maps} == set(layers)
    assert {step for step, _ in recorder.maps} == {3}
    for layer, probs in recorder.at_step(3).items():
        call = recorder.calls[layer]
        assert call.is_cross == is_cross_attention_layer(layer)
        height, width = call.resolution
        # tiny UNet: 8x8 latents, its attention blocks sit after one downsampling -> 4x4
        assert (height, width) == (4, 4)
        keys = 77 if call.is_cross else height * width
        assert probs.shape == (1, call.heads, height * width, keys)  # conditional half only
        assert not probs.requires_grad
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), rtol=0, atol=1e-5)


def test_halves_grad_and_selection(backbone, inputs):
    unet = backbone.unet
    cross = [layer for layer in attention_layers(unet) if is_cross_attention_layer(layer)]
    both = AttentionRecorder(conditional_only=False, keep_grad=True)
    both.cfg = True
    latents, timestep, text = inputs
    latents = latents.clone().requires_grad_(True)
    with attention_control(unet, both, select=cross[:1]):
        unet(latents, timestep, text, return_dict=False)
    (recorded,) = both.maps.values()
    assert recorded.shape == (2, 16, 77)  # both halves, heads averaged
    # the two halves see different prompts, so their maps differ
    assert not torch.allclose(recorded[0], recorded[1])
    recorded[1, :, 5].sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(AttentionControlError, match="unknown attention layers"), attention_control(
        unet, AttentionController(), select=["nope"]
    ):
        pass
    with pytest.raises(AttentionControlError, match="'some'"), attention_control(
        unet, AttentionController(), select="some"
    ):
        pass


def test_an_edit_changes_the_output_and_a_bad_edit_names_the_layer(backbone, inputs):
    unet = backbone.unet
    default = _run(unet, inputs)

    class Uniform(AttentionController):
        def edit(self, call, probs):
            return torch.full_like(probs, 1.0 / probs.shape[-1]) if call.is_cross else None

    with attention_control(unet, Uniform()):
        assert not torch.allclose(_run(unet, inputs), default)

    class Wrong(AttentionController):
        def edit(self, call, probs):
            return probs[:, :, :3]

    with pytest.raises(AttentionControlError, match=r"attn1\.processor: the controller returned"):
        with attention_control(unet, Wrong()):
            _run(unet, inputs)


def test_foreign_processors_are_refused(backbone):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    unet = working_copy(backbone.unet)
    layer = next(layer for layer in attention_layers(unet) if is_cross_attention_layer(layer))
    processors = dict(unet.attn_processors)
    processors[layer] = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=64, cross_attention_dim=32)
    unet.set_attn_processor(processors)
    with pytest.raises(AttentionControlError, match="CustomDiffusionAttnProcessor"):
        with attention_control(unet, AttentionController()):
            pass
    with attention_control(unet, AttentionController(), select=lambda key: key != layer):
        pass
