"""Prompt-to-Prompt on the tiny backbone: identity edits reproduce the source, processors come back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.attention import AttentionCall
from methods.backbones import load_backbone, resolve_backbone
from methods.base import SamplerConfig
from methods.diffusion import encode_text
from methods.prompt_to_prompt import (
    EditError,
    EditSettings,
    PromptToPrompt,
    run_edit,
    token_alignment,
)
from methods.sampling import build_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 6


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(resolve_backbone("tiny"))


def _edit(backbone, source: str, target: str, settings: EditSettings, start: torch.Tensor | None = None):
    pipeline = build_pipeline(backbone, SamplerConfig(steps=STEPS))
    mapper, own = token_alignment(backbone.tokenizer, source, target, settings.mode)
    controller = PromptToPrompt(STEPS, mapper, own, settings)
    with torch.no_grad():
        cond = encode_text(backbone.text_encoder, backbone.tokenizer, [source, target], backbone.device)
        null = encode_text(backbone.text_encoder, backbone.tokenizer, ["", ""], backbone.device)
    if start is None:
        start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = run_edit(pipeline, controller, start.expand(2, -1, -1, -1), lambda step: cond, [null] * STEPS,
                      STEPS, 7.5, 64, output_type="np")
    return images, controller


def test_identical_prompts_reproduce_the_source(backbone):
    before = {k: type(v) for k, v in backbone.unet.attn_processors.items()}
    images, controller = _edit(backbone, "a photo of a cat", "a photo of a cat", EditSettings(self_replace_steps=1.0))
    assert controller.step == STEPS
    assert {k: type(v) for k, v in backbone.unet.attn_processors.items()} == before  # restored after sampling
    # Equal up to float rounding: the two rows sit at different positions of the same GEMMs, and
    # some BLAS builds round rows by position (found with a fresh install: ~1e-6 in the
    # unconditional half's to_k), far below one 8-bit level (3.9e-3).
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=1e-5)
    # The controlled source equals the pipeline's own sampling (explicit softmax vs SDPA: rounding).
    pipeline = build_pipeline(backbone, SamplerConfig(steps=STEPS))
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = pipeline(prompt=["a photo of a cat"], latents=start, num_inference_steps=STEPS, guidance_scale=7.5,
                     height=64, width=64, output_type="np").images
    np.testing.assert_allclose(images[0], plain[0], atol=1e-4)


def _call(is_cross: bool, step: int, queries_side: int = 8) -> AttentionCall:
    return AttentionCall(layer="x", is_cross=is_cross, resolution=(queries_side, queries_side), step=step,
                         batch=4, heads=2, cfg=True)


def test_controller_edits_only_the_conditional_edited_maps_in_its_windows():
    mapper = torch.arange(5)
    mapper[3] = 2  # target token 3 reads source token 2
    own = torch.zeros(5, dtype=torch.bool)
    own[4] = True  # token 4 keeps its own map
    equalizer = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0])
    controller = PromptToPrompt(10, mapper, own, EditSettings(cross_replace_steps=0.5, self_replace_steps=0.3),
                                equalizer=equalizer)
    probs = torch.rand(4 * 2, 64, 5, generator=torch.Generator().manual_seed(0))
    out = controller.edit(_call(True, step=4), probs).view(4, 2, 64, 5)
    images = probs.view(4, 2, 64, 5)  # [uncond source, uncond edit, cond source, cond edit]
    torch.testing.assert_close(out[:3], images[:3])  # unconditional half and the source untouched
    expected = images[2][..., mapper] * equalizer
    expected[..., 4] = images[3][..., 4]  # own
    torch.testing.assert_close(out[3], expected)
    assert controller.edit(_call(True, step=5), probs) is None  # int(0.5 * 10) = 5 steps only
    self_probs = torch.rand(4 * 2, 64, 64, generator=torch.Generator().manual_seed(1))
    out = controller.edit(_call(False, step=2), self_probs).view(4, 2, 64, 64)
    torch.testing.assert_close(out[3], self_probs.view(4, 2, 64, 64)[2])
    assert controller.edit(_call(False, step=3), self_probs) is None
    big = torch.rand(4 * 2, 32 * 32, 32 * 32)
    assert controller.edit(_call(False, step=0, queries_side=32), big) is None  # > 16x16: untouched


def test_processors_restored_after_an_exception(backbone):
    pipeline = build_pipeline(backbone, SamplerConfig(steps=STEPS))
    before = {k: type(v) for k, v in pipeline.unet.attn_processors.items()}
    mapper, own = token_alignment(backbone.tokenizer, "a cat", "a dog")

    class Failing(PromptToPrompt):
        def edit(self, call: AttentionCall, probs):
            raise RuntimeError("boom")

    with torch.no_grad():
        cond = encode_text(backbone.text_encoder, backbone.tokenizer, ["a cat", "a dog"], backbone.device)
    with pytest.raises(RuntimeError, match="boom"):
        run_edit(pipeline, Failing(STEPS, mapper, own), torch.zeros(2, 4, 16, 16), lambda step: cond,
                 [torch.zeros_like(cond)] * STEPS, STEPS, 7.5, 64)
    assert {k: type(v) for k, v in pipeline.unet.attn_processors.items()} == before


def test_token_alignment(backbone):
    tokenizer = backbone.tokenizer
    mapper, own = token_alignment(tokenizer, "a photo of a cat", "a photo of a dog", "replace")
    assert torch.equal(mapper, torch.arange(77)) and not own.any()
    mapper, own = token_alignment(tokenizer, "a photo of a cat", "a photo of a fluffy cat", "refine")
    # BOS a photo of a [fluffy] cat EOS: "fluffy" (position 5) is new, "cat" reads the source's 5.
    assert own[:8].tolist() == [False, False, False, False, False, True, False, False]
    assert mapper[6] == 5 and mapper[7] == 6
    with pytest.raises(EditError, match="equal token length"):
        token_alignment(tokenizer, "a cat", "a fluffy cat", "replace")
