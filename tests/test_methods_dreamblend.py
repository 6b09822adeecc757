"""DreamBlend (reconstructed) on the tiny backbone: it reuses DreamBooth's training, weight 0 is
the overfit checkpoint's DreamBooth sampling bit for bit, guidance pulls the attention maps toward
the reference, processors come back, bad knobs are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from methods.backbones import resolve_backbone
from methods.base import (
    MethodContext,
    ParamsError,
    SamplerConfig,
    expand_params,
    generation_param_names,
)
from methods.dreamblend import DreamBlend, DreamBlendParams
from methods.dreambooth import DreamBooth, DreamBoothParams
from methods.registry import get_method
from tests.helpers import without_volatile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLER = SamplerConfig(steps=6, guidance=7.5)
# lr well above the paper's so that 20 steps on the random tiny UNet separate the checkpoints.
TRAINING = {"steps": 20, "learning_rate": 1e-3, "checkpoint_steps": (2, 10), "class_images": 2, "class_image_steps": 3}
BLEND = {"underfit_step": 2, "overfit_step": 10}
PROMPTS, SEEDS = ["a sks dog in the jungle", "a sks dog on the beach"], [11, 12]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> MethodContext:
    return MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path_factory.mktemp("blend-cache"))


@pytest.fixture(scope="module")
def trained(context, dog, tmp_path_factory):
    method = DreamBlend(DreamBlendParams(**TRAINING, **BLEND), context)
    workdir = tmp_path_factory.mktemp("blend-state")
    method.prepare(dog, workdir, seed=0)
    return workdir


def _blend(context, **knobs) -> DreamBlend:
    return DreamBlend(DreamBlendParams(**TRAINING, **{**BLEND, **knobs}), context)


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


def test_registered_and_labelled_as_a_reconstruction():
    assert get_method("dreamblend") is DreamBlend
    assert DreamBlend.description.startswith("DreamBlend (reconstructed)")
    assert "DreamBlend (reconstructed)" in (__import__("methods.dreamblend").dreamblend.__doc__ or "")
    assert DreamBlend.trains_as is DreamBooth


def test_training_is_dreamboths_and_knobs_are_generation_only(context, trained, dog, tmp_path):
    blend, booth = _blend(context), DreamBooth(DreamBoothParams(**TRAINING), context)
    assert blend.training_fingerprint() == booth.training_fingerprint()
    other = _blend(context, guidance_weight=0.5, guidance_window=(0.2, 0.8), guided_tokens="subject")
    assert other.training_fingerprint() == blend.training_fingerprint()
    assert other.fingerprint() != blend.fingerprint()
    assert set(generation_param_names(DreamBlendParams)) == {
        "underfit_step", "overfit_step", "guidance_weight", "guidance_window",
        "guided_blocks", "guided_resolutions", "guided_tokens",
    }
    booth.prepare(dog, tmp_path, seed=0)  # the same files, byte for byte
    ours = sorted(p.name for p in trained.iterdir())
    assert ours == sorted(p.name for p in tmp_path.iterdir())
    for name in ours:
        if name.endswith(".safetensors"):
            a, b = load_file(str(trained / name)), load_file(str(tmp_path / name))
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    read = [without_volatile(json.loads((folder / "state.json").read_text())) for folder in (trained, tmp_path)]
    for entry in read:  # the first training generated the shared class images, the second reused them
        entry.pop("class_images_generated")
    assert read[0] == read[1]


def test_weight_zero_is_the_overfit_checkpoint_bit_for_bit(context, trained, dog):
    blend = _blend(context, guidance_weight=0.0)
    state = blend.load_state(trained, dog)
    (checkpoint,) = blend.checkpoints()
    assert checkpoint == "blend-2-to-10"
    blended = blend.generate(state, checkpoint, PROMPTS, SEEDS, SAMPLER)
    assert [entry["step"] for entry in blend.guidance_log] == list(range(SAMPLER.steps))  # it did run
    booth = DreamBooth(DreamBoothParams(**TRAINING), context)
    overfit = booth.generate(booth.load_state(trained, dog), "step-10", PROMPTS, SEEDS, SAMPLER)
    underfit = booth.generate(booth.load_state(trained, dog), "step-2", PROMPTS, SEEDS, SAMPLER)
    for a, b, c in zip(_pixels(blended), _pixels(overfit), _pixels(underfit)):
        assert np.array_equal(a, b)
        assert not np.array_equal(b, c)  # the two checkpoints really differ


def test_guidance_lowers_the_attention_distance_to_the_reference(context, trained, dog):
    # The tiny UNet's cross-attention barely depends on the latent (gradient norms ~5e-3), hence a
    # step size far above Pix2Pix-Zero's 0.1 for SD.
    totals = {}
    images = {}
    for weight in (0.0, 1000.0):
        blend = _blend(context, guidance_weight=weight)
        images[weight] = blend.generate(blend.load_state(trained, dog), blend.checkpoints()[0], PROMPTS, SEEDS, SAMPLER)
        losses = [entry["loss"] for entry in blend.guidance_log]
        assert losses[0] > 0
        # step 0's loss is measured before any guidance: identical in both runs
        totals[weight] = (losses[0], sum(losses[1:]))
    assert totals[1000.0][0] == pytest.approx(totals[0.0][0], rel=1e-6)
    assert totals[1000.0][1] < 0.9 * totals[0.0][1], totals
    assert any(not np.array_equal(a, b) for a, b in zip(_pixels(images[0.0]), _pixels(images[1000.0])))


def test_window_tokens_and_layers(context, trained, dog):
    blend = _blend(context, guidance_window=(0.5, 1.0), guided_tokens="subject", guided_blocks=("up",))
    images = blend.generate(blend.load_state(trained, dog), blend.checkpoints()[0], PROMPTS, SEEDS, SAMPLER)
    assert len(images) == 2
    assert [entry["step"] for entry in blend.guidance_log] == [3, 4, 5]
    # a class-prior prompt has no subject token: not guided, so the overfit checkpoint's image
    strong = _blend(context, guided_tokens="subject", guidance_weight=1000.0)
    prior = strong.generate(strong.load_state(trained, dog), strong.checkpoints()[0], ["a dog"], [1], SAMPLER)
    assert all(entry["loss"] == 0 for entry in strong.guidance_log)
    booth = DreamBooth(DreamBoothParams(**TRAINING), context)
    unguided = booth.generate(booth.load_state(trained, dog), "step-10", ["a dog"], [1], SAMPLER)
    assert np.array_equal(_pixels(prior)[0], _pixels(unguided)[0])
    nothing = _blend(context, guided_resolutions=(64,))
    with pytest.raises(ValueError, match=r"no cross-attention layer matches .*guided_resolutions=\[64\]"):
        nothing.generate(nothing.load_state(trained, dog), nothing.checkpoints()[0], PROMPTS, SEEDS, SAMPLER)


def test_processors_are_restored_after_sampling_and_after_an_exception(context, trained, dog):
    blend = _blend(context, guidance_weight=1.0)
    state = blend.load_state(trained, dog)
    blend.generate(state, blend.checkpoints()[0], PROMPTS[:1], SEEDS[:1], SAMPLER)
    unets = [blend._underfit._generation[1], blend._overfit._generation[1], blend._overfit._backbone().unet]
    before = [{k: id(v) for k, v in unet.attn_processors.items()} for unet in unets]
    assert {type(v).__name__ for v in unets[1].attn_processors.values()} == {"AttnProcessor2_0"}
    blend.generate(state, blend.checkpoints()[0], PROMPTS[:1], SEEDS[:1], SAMPLER)
    assert [{k: id(v) for k, v in unet.attn_processors.items()} for unet in unets] == before

    class Failing(DreamBlend):
        def _guidance_loss(self, maps, reference, step, mask):
            if step == 2:
                raise RuntimeError("guidance failed at step 2")
            return super()._guidance_loss(maps, reference, step, mask)

    failing = Failing(blend.params, context)
    with pytest.raises(RuntimeError, match="step 2"):
        failing.generate(state, blend.checkpoints()[0], PROMPTS[:1], SEEDS[:1], SAMPLER)
    overfit_unet = failing._overfit._generation[1]
    assert {type(v).__name__ for v in overfit_unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_a_state_without_the_checkpoints_names_the_fix(context, trained, dog):
    blend = DreamBlend(DreamBlendParams(**{**TRAINING, "checkpoint_steps": (2, 10, 15)}, underfit_step=2, overfit_step=15), context)
    with pytest.raises(ValueError, match="no checkpoint 'step-15'.*15 in checkpoint_steps"):
        blend.load_state(trained, dog)
    with pytest.raises(ValueError, match="unknown checkpoint 'final'"):
        _blend(context).generate(_blend(context).load_state(trained, dog), "final", PROMPTS, SEEDS, SAMPLER)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"underfit_step": 7}, r"underfit_step=7 is not a saved DreamBooth checkpoint.*add 7 to checkpoint_steps"),
        ({"underfit_step": 250, "overfit_step": 5}, "must be earlier than overfit_step=5"),
        ({"guidance_weight": -1}, "guidance_weight must be >= 0"),
        ({"guidance_window": [0.5, 0.2]}, r"guidance_window must be \[start, end\)"),
        ({"guided_blocks": ["middle"]}, "each must be one of"),
        ({"guided_tokens": "class"}, "'class' is not one of"),
    ],
)
def test_bad_knobs_fail_at_config_validation(raw, message):
    with pytest.raises(ParamsError, match=message):
        expand_params(DreamBlendParams, raw, "methods.dreamblend.params")


def test_defaults_and_grid_cells():
    defaults = DreamBlendParams()
    assert (defaults.underfit_step, defaults.overfit_step, defaults.steps) == (5, 250, 1000)
    assert defaults.checkpoint_steps == (5, 250) and defaults.guidance_weight == 0.1
    cells = expand_params(DreamBlendParams, {"guidance_weight": [0.0, 0.1], "overfit_step": [250, 1000]}, "x")
    assert len(cells) == 4


def test_mixed_precision_path_runs_in_bfloat16(dog, tmp_path):
    """The GPU recipe on a CPU: bf16 modules, guidance gradients through a bf16 UNet."""
    context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, dtype="bfloat16", cache_dir=tmp_path / "cache")
    blend = DreamBlend(DreamBlendParams(**{**TRAINING, "steps": 10, "collapse_prompts": 1}, **BLEND), context)
    blend.prepare(dog, tmp_path, seed=0)
    state = blend.load_state(tmp_path, dog)
    images = blend.generate(state, blend.checkpoints()[0], PROMPTS[:1], SEEDS[:1], SAMPLER)
    assert images[0].size == (64, 64)
    assert len(blend.guidance_log) == SAMPLER.steps and all(np.isfinite(e["grad_norm"]) for e in blend.guidance_log)
    assert all(np.isfinite(row["entropy"]) for rows in state.data["attention_collapse"]["rows"].values() for row in rows)
