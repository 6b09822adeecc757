"""Bad inputs fail with a MetricInputError (a ValueError) naming the argument and what was expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics.base import MetricInputError, MetricSettings, ScoringInputs
from metrics.embeddings import clear_embedding_caches
from metrics.inputs import check_image_tensor
from metrics.lpips_metrics import lpips_distance
from metrics.registry import build_metric

RANDOM = MetricSettings(weights="random")


@pytest.fixture(autouse=True)
def _fresh_embeddings():
    clear_embedding_caches()
    yield


def good_inputs(count: int = 2) -> ScoringInputs:
    generator = torch.Generator().manual_seed(0)
    return ScoringInputs(
        images=torch.rand(count, 3, 32, 32, generator=generator),
        image_keys=[f"bad-input-test/{i}" for i in range(count)],
        texts=["a dog"] * count,
        references=[torch.rand(3, 40, 30, generator=generator)],
        reference_key="ref",
        groups=["g"] * count,
    )


def replaced(**changes) -> ScoringInputs:
    inputs = good_inputs()
    for name, value in changes.items():
        setattr(inputs, name, value)
    return inputs


BAD_IMAGES = [
    ("above one", torch.full((2, 3, 8, 8), 1.5), r"\[0, 1\].*divided by 255"),
    ("negative", torch.full((2, 3, 8, 8), -0.5), r"\[0, 1\].*\(x \+ 1\) / 2"),
    ("nan", torch.full((2, 3, 8, 8), float("nan")), "NaN or infinite"),
    ("inf", torch.full((2, 3, 8, 8), float("inf")), "NaN or infinite"),
    ("uint8", torch.zeros((2, 3, 8, 8), dtype=torch.uint8), "floating.*divide a uint8"),
    ("no batch", torch.zeros(3, 8, 8), r"shape N×3×H×W"),
    ("grey", torch.zeros(2, 1, 8, 8), "3 \\(RGB\\) channels"),
    ("rgba", torch.zeros(2, 4, 8, 8), "3 \\(RGB\\) channels"),
    ("channels last", torch.zeros(2, 8, 8, 3), "3 \\(RGB\\) channels"),
    ("numpy", np.zeros((2, 3, 8, 8)), "torch.Tensor"),
]


@pytest.mark.parametrize("name", ["clip_t", "clip_i", "dino", "pres", "div"])
@pytest.mark.parametrize("label,images,message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_are_refused_by_every_metric(name, label, images, message):
    with pytest.raises(MetricInputError, match=f"inputs.images: .*{message}"):
        build_metric(name, RANDOM).score(replaced(images=images))


@pytest.mark.parametrize("name", ["clip_i", "dino", "pres"])
def test_empty_reference_set(name):
    with pytest.raises(MetricInputError, match="inputs.references: empty reference set"):
        build_metric(name, RANDOM).score(replaced(references=[]))


@pytest.mark.parametrize("name", ["clip_i", "dino"])
def test_bad_reference(name):
    with pytest.raises(MetricInputError, match=r"inputs.references\[0\]: .*\[0, 1\]"):
        build_metric(name, RANDOM).score(replaced(references=[torch.full((3, 8, 8), 2.0)]))
    with pytest.raises(MetricInputError, match=r"inputs.references\[0\]: expected shape 3×H×W"):
        build_metric(name, RANDOM).score(replaced(references=[torch.zeros(1, 3, 8, 8)]))
    with pytest.raises(MetricInputError, match="inputs.reference_key"):
        build_metric(name, RANDOM).score(replaced(reference_key=""))


def test_mismatched_prompt_and_image_counts():
    with pytest.raises(MetricInputError, match="inputs.texts: expected one entry per image \\(2 images; mismatched prompt"):
        build_metric("clip_t", RANDOM).score(replaced(texts=["a dog"]))
    with pytest.raises(MetricInputError, match=r"inputs.texts\[1\]: expected a string"):
        build_metric("clip_t", RANDOM).score(replaced(texts=["a dog", None]))


def test_mismatched_keys_and_groups():
    with pytest.raises(MetricInputError, match="inputs.image_keys: expected one entry per image"):
        build_metric("dino", RANDOM).score(replaced(image_keys=["only-one"]))
    with pytest.raises(MetricInputError, match="inputs.image_keys: keys must be unique"):
        build_metric("dino", RANDOM).score(replaced(image_keys=["same", "same"]))
    with pytest.raises(MetricInputError, match="inputs.groups: expected one entry per image"):
        build_metric("div", RANDOM).score(replaced(groups=[]))


def test_not_scoring_inputs():
    with pytest.raises(MetricInputError, match="inputs: expected a metrics.base.ScoringInputs"):
        build_metric("dino", RANDOM).score({"images": torch.zeros(1, 3, 8, 8)})


def test_only_needed_context_is_checked():
    # CLIP-T needs no references, DIV no texts or references: their absence is not an error.
    assert build_metric("clip_t", RANDOM).score(replaced(references=[], reference_key="")).shape == (2,)
    assert build_metric("div", RANDOM).score(replaced(texts=[], references=[])).shape == (2,)


def test_empty_batch_scores_nothing():
    inputs = ScoringInputs(torch.zeros(0, 3, 8, 8), [], [], [torch.zeros(3, 8, 8)], "r", [])
    for name in ("clip_t", "clip_i", "dino", "div"):
        assert build_metric(name, RANDOM).score(inputs).shape == (0,)


def test_settings_are_validated():
    for field, value in [("weights", "imagenet"), ("clip", "ViT-H-14"), ("lpips_net", "squeeze"),
                         ("precision", "fp16"), ("batch_size", 0)]:
        with pytest.raises(MetricInputError, match=f"MetricSettings.{field}="):
            MetricSettings(**{field: value})


def test_lpips_distance_checks_both_arguments():
    with pytest.raises(MetricInputError, match="second: expected the shape of first"):
        lpips_distance(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 40), RANDOM)
    with pytest.raises(MetricInputError, match="first: values must lie in"):
        lpips_distance(torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32), RANDOM)
    with pytest.raises(MetricInputError, match="first: LPIPS needs images of at least 32x32"):
        lpips_distance(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), RANDOM)
    with pytest.raises(MetricInputError, match="inputs.images: LPIPS needs images of at least 32x32"):
        build_metric("div", RANDOM).score(replaced(images=torch.rand(2, 3, 24, 64)))
    same = torch.rand(2, 3, 32, 48)
    assert np.allclose(lpips_distance(same, same, RANDOM), 0.0, atol=1e-7)


def test_error_is_a_value_error():
    assert issubclass(MetricInputError, ValueError)
    with pytest.raises(ValueError):
        check_image_tensor(torch.zeros(2, 3, 0, 4), "x")


def _shipped() -> list[str]:
    from metrics.registry import available_metrics

    # the VLM judge is left out: it builds an 8B-architecture model (its inputs are copied to
    # uint8 by metrics.vlm_judge.judge_pixels, never written)
    return sorted(name for name in available_metrics() if not name.startswith("vlm_judge"))


@pytest.mark.parametrize("name", _shipped())
def test_metrics_leave_the_shared_images_untouched(name):
    """The scoring pass hands one image tensor to every metric of a subject batch, and one tensor
    per reference photo to every role and metric."""
    generator = torch.Generator().manual_seed(1)
    photos = [torch.rand(3, 64, 48, generator=generator) for _ in range(2)]
    inputs = ScoringInputs(
        images=torch.rand(4, 3, 64, 64, generator=generator),
        image_keys=[f"untouched/{name}/{i}" for i in range(4)],
        texts=["a dog"] * 4,
        references=photos,
        reference_key="ref-untouched",
        groups=["g0", "g0", "g1", "g1"],
        training_images=photos,
        training_key="train-untouched",
        subject_images=photos,
        subject_key="subject-untouched",
        scene_images=[torch.rand(3, 64, 64, generator=generator)],
        prompt_texts=["a sks dog"] * 4,
    )
    before = inputs.images.clone()
    photos_before = [photo.clone() for photo in photos]
    scene_before = inputs.scene_images[0].clone()
    build_metric(name, RANDOM).score(inputs)
    assert torch.equal(inputs.images, before), f"{name} modified ScoringInputs.images in place"
    # the reference photos too: one decoded tensor per path serves every role (references,
    # training images, subject images) of every metric in a scoring pass
    assert all(torch.equal(a, b) for a, b in zip(photos, photos_before)), f"{name} modified a reference photo in place"
    assert torch.equal(inputs.scene_images[0], scene_before), f"{name} modified a scene image in place"


def test_a_checked_tensor_is_not_passed_over_again_until_it_changes(monkeypatch):
    """Every metric of a subject batch is handed the same tensors: their values are checked once,
    and again only after an in-place change (through the tensor or a view of it)."""
    passes = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda value: passes.append(1) or real(value))
    images = torch.rand(2, 3, 8, 8)
    for _ in range(3):
        check_image_tensor(images, "images")
    assert len(passes) == 1
    images[0, 0, 0, 0] = 2.0
    with pytest.raises(MetricInputError, match=r"values must lie in \[0, 1\]"):
        check_image_tensor(images, "images")
    images[0, 0, 0, 0] = 0.5
    check_image_tensor(images, "images")
    images[:1].mul_(-1.0)  # a view shares the version counter
    with pytest.raises(MetricInputError, match=r"values must lie in \[0, 1\]"):
        check_image_tensor(images, "images")
    with torch.inference_mode():  # no version counter: checked every time
        frozen = torch.rand(1, 3, 4, 4)
    passes.clear()
    check_image_tensor(frozen, "frozen")
    check_image_tensor(frozen, "frozen")
    assert len(passes) == 2
