"""Each metric against its reference package on the same weights (random init, real architectures).

- CLIP-T vs torchmetrics ``CLIPScore``: our open_clip model is converted to a transformers
  ``CLIPModel`` (OpenAI layout -> HF layout), saved, loaded back, and scored by torchmetrics.
- CLIP-I / DINO vs a direct open_clip / timm forward; our tensor preprocessing vs the
  reference PIL transforms of open_clip and timm.
- DIV's pairwise LPIPS vs ``lpips.LPIPS.forward`` on every pair.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.images import load_image, open_image, to_tensor
from metrics.backbones import get_clip, get_dino, get_lpips
from metrics.base import MetricSettings, ScoringInputs
from metrics.embeddings import clear_embedding_caches
from metrics.preprocess import CLIP_PREPROCESS, DINO_PREPROCESS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from metrics.registry import build_metric
from metrics.testing import mini_images, mini_scoring_inputs

RANDOM = MetricSettings(weights="random")


@pytest.fixture(autouse=True)
def _fresh_embeddings():
    clear_embedding_caches()
    yield


def open_clip_to_hf(model) -> torch.nn.Module:
    """A transformers CLIPModel holding the weights of an open_clip (OpenAI-layout) CLIP."""
    from transformers import CLIPConfig, CLIPModel

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    vision_width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["token_embedding.weight"].shape[1]
    vision_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    projection = sd["visual.proj"].shape[1]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=text_width,
            intermediate_size=4 * text_width, num_hidden_layers=text_layers,
            num_attention_heads=text_width // 64, max_position_embeddings=sd["positional_embedding"].shape[0],
            hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407, projection_dim=projection,
        ),
        vision_config=dict(
            hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
            num_attention_heads=vision_width // 64, image_size=grid * patch, patch_size=patch,
            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=projection,
        ),
        projection_dim=projection,
    )
    out = {}

    def blocks(source: str, target: str, count: int) -> None:
        renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for i in range(count):
            s, t = f"{source}.{i}", f"{target}.{i}"
            weights = sd[f"{s}.attn.in_proj_weight"].chunk(3)
            biases = sd[f"{s}.attn.in_proj_bias"].chunk(3)
            for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
                out[f"{t}.self_attn.{name}.weight"], out[f"{t}.self_attn.{name}.bias"] = weight, bias
            for old, new in renames.items():
                for p in ("weight", "bias"):
                    out[f"{t}.{new}.{p}"] = sd[f"{s}.{old}.{p}"]

    blocks("transformer.resblocks", "text_model.encoder.layers", text_layers)
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers)
    for p in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{p}"] = sd[f"ln_final.{p}"]
        out[f"vision_model.pre_layrnorm.{p}"] = sd[f"visual.ln_pre.{p}"]
        out[f"vision_model.post_layernorm.{p}"] = sd[f"visual.ln_post.{p}"]
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    out["text_projection.weight"] = sd["text_projection"].T.contiguous()
    out["visual_projection.weight"] = sd["visual.proj"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"]
    hf = CLIPModel(config)
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf.eval()


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory):
    """Our random CLIP ViT-B/32 saved as a transformers model + processor folder."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from methods.backbones import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("hf") / "openai-clip-vit-b-32-random"
    open_clip_to_hf(get_clip(RANDOM).model).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return folder


def _torchmetrics_loader(folder):
    """(model, processor) from ``folder`` for CLIPScore's documented callable form.

    torchmetrics 1.9 calls ``.norm`` on ``get_image_features``'s result, which transformers 5
    wraps in a ModelOutput (Lightning-AI/torchmetrics#3407, fixed upstream by #3408); the
    subclass only unwraps it, exactly like that fix, so the arithmetic is torchmetrics' own.
    """
    from transformers import CLIPModel, CLIPProcessor

    class UnwrappedCLIPModel(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            out = super().get_image_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *args, **kwargs):
            out = super().get_text_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    model = UnwrappedCLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    return lambda: (model, processor)


def _mini_224() -> tuple[torch.Tensor, torch.Tensor]:
    """6 mini images (2 per subject) at 224 px as uint8 and as the same values / 255."""
    from data.subjects import load_subjects

    paths = [p for s in load_subjects("mini") for p in s.images[:2]]
    uint8 = (to_tensor([load_image(p, 224) for p in paths]) * 255).round().to(torch.uint8)
    return uint8, uint8.float() / 255


# Chosen so that 3 of the 6 random-weight cosines are positive (CLIPScore clamps the others).
CLIP_TEXTS = ["a photo of a dog on the beach", "a photo of a dog on the beach", "a dog",
              "a toy in the snow", "a toy", "a teapot on the grass"]


def test_clip_t_matches_torchmetrics_clipscore(hf_clip_folder):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore

    uint8, images = _mini_224()  # 224 px in: resize and crop are identities on both sides
    inputs = ScoringInputs(images, [f"k{i}" for i in range(6)], CLIP_TEXTS, [], "")
    ours = build_metric("clip_t", RANDOM).score(inputs)
    loader = _torchmetrics_loader(hf_clip_folder)
    clamped = []
    for index in range(6):
        metric = CLIPScore(model_name_or_path=loader)
        metric.update(uint8[index : index + 1], CLIP_TEXTS[index : index + 1])
        clamped.append(float(metric.compute()))
    # CLIPScore returns max(100 cos, 0): compare on that scale, and make sure the comparison
    # is not vacuous (random weights give cosines of both signs).
    np.testing.assert_allclose(clamped, np.maximum(100 * ours, 0), atol=1e-4)
    assert sum(value > 0 for value in clamped) >= 2
    raw, _ = _clip_score_update(list(uint8), CLIP_TEXTS, *loader())
    np.testing.assert_allclose(raw.detach().numpy(), 100 * ours, atol=1e-4)


def test_clip_tokenization_matches_open_clip_including_truncation():
    backbone = get_clip(RANDOM)
    from metrics.clip import tokenize

    texts = ["a sks dog", "A Photo of a   dog &amp; a cat!", "word " * 100]
    ids, lengths = tokenize(backbone.tokenizer, texts)
    assert torch.equal(ids, backbone.tokenizer(texts))
    assert lengths[2] == 102 and max(lengths[:2]) <= 77
    assert ids[2, -1].item() == backbone.tokenizer.eot_token_id


def test_clip_t_truncates_explicitly_and_matches_open_clip_forward(caplog):
    backbone = get_clip(RANDOM)
    images, keys, _ = mini_images(per_subject=1)
    long_text = "a dog " + "with a very long description " * 20
    texts = ["a dog", "a teapot", long_text]
    metric = build_metric("clip_t", RANDOM)
    with caplog.at_level("WARNING"):
        ours = metric.score(ScoringInputs(images, keys, texts, [], ""))
    assert metric.notes[:2] == ["", ""] and "truncated" in metric.notes[2]
    assert "truncated" in caplog.text
    with torch.no_grad():
        text = F.normalize(backbone.model.encode_text(backbone.tokenizer(texts)), dim=-1)
        image = F.normalize(backbone.model.encode_image(CLIP_PREPROCESS(images)), dim=-1)
    np.testing.assert_allclose(ours, (text * image).sum(-1).numpy(), atol=1e-5)


def test_clip_i_matches_direct_open_clip_forward():
    backbone = get_clip(RANDOM)
    inputs = mini_scoring_inputs("teapot", per_subject=1)
    ours = build_metric("clip_i", RANDOM).score(inputs)
    with torch.no_grad():
        images = F.normalize(backbone.model.encode_image(CLIP_PREPROCESS(inputs.images)), dim=-1)
        refs = F.normalize(backbone.model.encode_image(CLIP_PREPROCESS(torch.stack(inputs.references))), dim=-1)
    np.testing.assert_allclose(ours, (images @ refs.T).mean(1).numpy(), atol=1e-5)


def test_dino_matches_direct_timm_forward():
    import timm

    reference_model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0).eval()
    reference_model.load_state_dict(get_dino(RANDOM).model.state_dict())
    images = torch.rand(3, 3, 248, 248, generator=torch.Generator().manual_seed(1))
    references = [torch.rand(3, 248, 248, generator=torch.Generator().manual_seed(2))]
    inputs = ScoringInputs(images, ["a", "b", "c"], [], references, "synthetic")
    ours = build_metric("dino", RANDOM).score(inputs)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():  # 248 px in: the resize is the identity, the crop takes 12 px a side
        embed = lambda x: F.normalize(reference_model((x[..., 12:236, 12:236] - mean) / std), dim=-1)  # noqa: E731
        expected = (embed(images) @ embed(torch.stack(references)).T).mean(1)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)


def _dataset_images(dreambooth_dir, count: int = 6):
    return [open_image(p) for p in sorted(dreambooth_dir.glob("*/00.jpg"))[:count]]


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_tensor_preprocessing_matches_reference_pil_transform(kind, dreambooth_dir):
    """Ours on float tensors vs open_clip's / timm's transform on PIL images.

    Tolerances: PIL resamples uint8 in two separable passes, rounding and clipping to uint8
    after each, while we stay in float; the output rounding alone makes a mean absolute
    difference of 0.25/255, and the clipped intermediate moves single pixels at sharp edges
    by a few levels. So: mean < 0.5/255, max < 8/255 (pixel space), and embeddings of the two
    inputs agree to cosine > 0.9999 on the random backbone.
    """
    import open_clip
    import timm.data

    backbone = get_clip(RANDOM) if kind == "clip" else get_dino(RANDOM)
    if kind == "clip":
        reference = open_clip.image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        ours_pipeline = CLIP_PREPROCESS
    else:
        reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=backbone.model))
        ours_pipeline = DINO_PREPROCESS
    pil_images = _dataset_images(dreambooth_dir) + [open_image(p) for p in sorted(_mini_paths())[:2]]
    pil_images.append(pil_images[0].crop((0, 0, pil_images[0].width, pil_images[0].height * 2 // 3)))
    std = torch.tensor(ours_pipeline.std).view(3, 1, 1)
    ours, theirs = [], []
    for image in pil_images:
        ours.append(ours_pipeline(to_tensor([image]))[0])
        theirs.append(reference(image))
        difference = ((ours[-1] - theirs[-1]) * std).abs() * 255
        assert difference.mean() < 0.5 and difference.max() < 8, (image.size, difference.mean(), difference.max())
    with torch.no_grad():
        a = F.normalize(backbone.encode_image(torch.stack(ours)), dim=-1)
        b = F.normalize(backbone.encode_image(torch.stack(theirs)), dim=-1)
    assert (a * b).sum(-1).min() > 0.9999


def _mini_paths():
    from data.subjects import mini_dataset_dir

    return mini_dataset_dir().glob("*/00.png")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_div_pairwise_lpips_matches_lpips_forward(net):
    import lpips

    settings = MetricSettings(weights="random", lpips_net=net)
    backbone = get_lpips(settings)
    reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    reference.load_state_dict(backbone.model.state_dict())
    images, keys, _ = mini_images()
    images = images[:5]
    groups = ["g"] * 4 + ["alone"]
    metric = build_metric("div", settings)
    ours = metric.score(ScoringInputs(images, keys[:5], [], [], "", groups))
    with torch.no_grad():
        pairs = {(i, j): float(reference(images[i : i + 1], images[j : j + 1], normalize=True))
                 for i in range(4) for j in range(4) if i != j}
    expected = [np.mean([pairs[i, j] for j in range(4) if j != i]) for i in range(4)]
    np.testing.assert_allclose(ours[:4], expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(ours[4]) and "alone" in metric.notes[4] and metric.notes[:4] == [""] * 4
    # The mean over a group's images is its mean pairwise LPIPS.
    assert ours[:4].mean() == pytest.approx(np.mean(list(pairs.values())), rel=1e-5)


@pytest.mark.parametrize("batch_size", [3, 4, 32])
def test_div_packs_groups_and_matches_lpips_forward(batch_size):
    """Several interleaved groups of 2-4 images and a singleton, packed into shared trunk and pair
    batches (and a group larger than the batch on its own): each image's value is its mean
    ``lpips.LPIPS.forward`` to its siblings."""
    import lpips

    settings = MetricSettings(weights="random", lpips_net="alex", batch_size=batch_size)
    backbone = get_lpips(settings)
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    reference.load_state_dict(backbone.model.state_dict())
    images, keys, _ = mini_images()
    images = torch.cat([images, images.flip(-1)])[:10]
    groups = ["a", "b", "a", "c", "b", "a", "lone", "c", "a", "c"]  # a: 4, b: 2, c: 3
    metric = build_metric("div", settings)
    ours = metric.score(ScoringInputs(images, [f"k{i}" for i in range(10)], [], [], "", groups))
    with torch.no_grad():
        for index, group in enumerate(groups):
            siblings = [j for j, g in enumerate(groups) if g == group and j != index]
            if not siblings:
                assert np.isnan(ours[index]) and "alone" in metric.notes[index]
                continue
            expected = np.mean([float(reference(images[index : index + 1], images[j : j + 1], normalize=True))
                                for j in siblings])
            assert ours[index] == pytest.approx(expected, rel=1e-5, abs=1e-6), (index, group)
