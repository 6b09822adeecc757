"""The convention variants (issue 15) against their reference packages, on the same random weights.

- DINO ViT-S/16, ViT-S/8, DINOv2 ViT-S/14 with crop or squash: a fresh timm model holding our
  weights, fed by timm's ``create_transform`` (crop) or torchvision's ``Resize((224, 224))``
  (squash) on PIL images; crop and squash differ on non-square images.
- CLIP-I ViT-B/32 / ViT-L/14: open_clip's own eval transform and ``encode_image``.
- CLIP-T with the identifier: open_clip's tokenizer and ``encode_text`` on the generation prompt.
- CLIPScore (Hessel): torchmetrics' ``CLIPScore`` (100·max(cos, 0)) on the prefixed caption.
- The existing metrics keep their fingerprints (cached scores stay valid), one scoring pass
  decodes each PNG once for every metric, and the Conventions page renders for a tiny run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.images import open_image, to_tensor
from metrics.backbones import DINO_MODELS, get_clip, get_vit
from metrics.base import MetricSettings, ScoringInputs
from metrics.conventions import VARIANTS, variant
from metrics.embeddings import clear_embedding_caches
from metrics.registry import available_metrics, build_metric
from tests.test_metrics_parity import _torchmetrics_loader, hf_clip_folder  # noqa: F401 - fixture

RANDOM = MetricSettings(weights="random")
DINO_VARIANTS = {  # metric -> (model, input)
    "dino": ("s16", "crop"),
    "dino_s16_squash": ("s16", "squash"),
    "dino_s8_crop": ("s8", "crop"),
    "dino_s8_squash": ("s8", "squash"),
    "dinov2_s14_crop": ("v2_s14", "crop"),
    "dinov2_s14_squash": ("v2_s14", "squash"),
}


@pytest.fixture(autouse=True)
def _fresh_embeddings():
    clear_embedding_caches()
    yield


def _pil_images():
    """Two generated stand-ins (one wide, one tall: crop and squash see different pixels) and two
    references of other sizes, from the bundled mini set."""
    from data.subjects import load_subjects

    photos = [open_image(s.images[0]) for s in load_subjects("mini")]
    generated = [photos[0].crop((0, 0, 128, 80)), photos[1].crop((20, 0, 92, 128))]
    references = [photos[2], photos[2].crop((0, 10, 128, 110)).resize((150, 117))]
    return generated, references


def _inputs(generated, references, key: str, texts=None, prompt_texts=None) -> list[ScoringInputs]:
    """One ScoringInputs per generated image (they differ in size, as references may)."""
    return [
        ScoringInputs(to_tensor([image]), [f"{key}-{i}"], [texts[i]] if texts else [], [to_tensor([r])[0] for r in references],
                      f"refs-{key}", prompt_texts=[prompt_texts[i]] if prompt_texts else [])
        for i, image in enumerate(generated)
    ]


def _score_each(name: str, inputs: list[ScoringInputs], settings: MetricSettings = RANDOM) -> np.ndarray:
    metric = build_metric(name, settings)
    return np.concatenate([metric.score(one) for one in inputs])


def _timm_reference(model: str, image_input: str):
    """(timm model with our random weights, PIL transform of the reference packages)."""
    import timm
    import timm.data
    from torchvision import transforms

    spec = DINO_MODELS[model]
    ours = get_vit(RANDOM, model)
    reference = timm.create_model(spec.arch, pretrained=False, num_classes=0, **dict(spec.create_kwargs)).eval()
    reference.load_state_dict(ours.model.state_dict())
    if image_input == "crop":
        transform = timm.data.create_transform(
            input_size=224, crop_pct=224 / spec.crop.resize, interpolation="bicubic", mean=spec.crop.mean, std=spec.crop.std
        )
    else:
        transform = transforms.Compose([
            transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(spec.crop.mean, spec.crop.std),
        ])
    return reference, transform


# PIL resamples uint8 and rounds (tests/test_metrics_parity.py bounds the pixel difference);
# measured here: values differ by < 5e-5.
PIL_TOLERANCE = 5e-4


@pytest.mark.parametrize("name", [n for n in DINO_VARIANTS if n != "dino"])  # dino: test_metrics_parity
def test_dino_variant_matches_timm_with_reference_transforms(name):
    generated, references = _pil_images()
    ours = _score_each(name, _inputs(generated, references, name))
    reference, transform = _timm_reference(*DINO_VARIANTS[name])
    with torch.no_grad():
        def embed(image):
            return F.normalize(reference(transform(image)[None]), dim=-1)[0]

        refs = torch.stack([embed(r) for r in references])
        expected = np.array([float((refs @ embed(g)).mean()) for g in generated])
    np.testing.assert_allclose(ours, expected, atol=PIL_TOLERANCE)
    assert np.ptp(ours) > 0.01  # not a degenerate model (every image embedding alike)


@pytest.mark.parametrize("model", ["s16", "s8", "v2_s14"])
def test_crop_and_squash_differ_on_a_non_square_image(model):
    crop, squash = (n for n, (m, _) in DINO_VARIANTS.items() if m == model)
    generated, references = _pil_images()
    inputs = _inputs(generated[:1], references, f"cs-{model}")
    crop_value, squash_value = _score_each(crop, inputs), _score_each(squash, inputs)
    assert abs(float(crop_value[0] - squash_value[0])) > 1e-3
    a, b = build_metric(crop, RANDOM), build_metric(squash, RANDOM)
    assert a.backbone.model is b.backbone.model  # one model, two inputs
    assert a.fingerprint()["preprocessing"] != b.fingerprint()["preprocessing"]
    assert a.backbone.key(a.preprocessing()) != b.backbone.key(b.preprocessing())  # embeddings cached apart


@pytest.mark.parametrize("name,arch", [("clip_i_b32", "ViT-B-32"), ("clip_i_l14", "ViT-L-14")])
def test_clip_i_fixed_arch_matches_open_clip(name, arch):
    import open_clip

    from metrics.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    other = "ViT-L-14" if arch == "ViT-B-32" else "ViT-B-32"
    settings = MetricSettings(weights="random", clip=other)  # the fixed arch wins over metrics.clip
    generated, references = _pil_images()
    ours = _score_each(name, _inputs(generated, references, name), settings)
    backbone = build_metric(name, settings).backbone
    assert backbone.arch == arch and backbone is get_clip(MetricSettings(weights="random", clip=arch))
    transform = open_clip.image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    with torch.no_grad():
        def embed(image):
            return F.normalize(backbone.model.encode_image(transform(image)[None]), dim=-1)[0]

        refs = torch.stack([embed(r) for r in references])
        expected = np.array([float((refs @ embed(g)).mean()) for g in generated])
    np.testing.assert_allclose(ours, expected, atol=PIL_TOLERANCE)


def test_clip_i_b32_equals_clip_i_at_the_default_arch():
    generated, references = _pil_images()
    inputs = _inputs(generated, references, "b32")
    np.testing.assert_array_equal(_score_each("clip_i_b32", inputs), _score_each("clip_i", inputs))


def test_clip_t_identifier_scores_the_generation_prompt():
    generated, _ = _pil_images()
    texts = ["a dog on the beach", "a dog in the snow"]
    prompts = ["a sks dog on the beach", "a sks dog in the snow"]
    inputs = [ScoringInputs(to_tensor([g]), [f"id-{i}"], [t], [], "", prompt_texts=[p])
              for i, (g, t, p) in enumerate(zip(generated, texts, prompts))]
    ours = _score_each("clip_t_identifier", inputs)
    plain = _score_each("clip_t", inputs)
    backbone = get_clip(RANDOM)
    import open_clip

    from metrics.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    transform = open_clip.image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    with torch.no_grad():
        image = F.normalize(backbone.model.encode_image(torch.stack([transform(g) for g in generated])), dim=-1)
        text = F.normalize(backbone.model.encode_text(open_clip.get_tokenizer("ViT-B-32")(prompts)), dim=-1)
    np.testing.assert_allclose(ours, (image * text).sum(-1).numpy(), atol=PIL_TOLERANCE)
    assert np.abs(ours - plain).max() > 1e-4  # the identifier changes the text embedding
    with pytest.raises(ValueError, match="inputs.prompt_texts"):
        build_metric("clip_t_identifier", RANDOM).score(ScoringInputs(to_tensor([generated[0]]), ["x"], ["a dog"], [], ""))


def test_clip_t_clipscore_matches_torchmetrics_on_the_prefixed_caption(hf_clip_folder):  # noqa: F811
    from torchmetrics.multimodal.clip_score import CLIPScore

    from metrics.clip import CLIPSCORE_PREFIX, CLIPSCORE_WEIGHT

    # 224 px squares: resize and crop are identities for both sides (as in test_metrics_parity).
    from tests.test_metrics_parity import CLIP_TEXTS, _mini_224

    uint8, images = _mini_224()
    inputs = ScoringInputs(images, [f"cs{i}" for i in range(6)], CLIP_TEXTS, [], "")
    ours = build_metric("clip_t_clipscore", MetricSettings(weights="random", clip="ViT-L-14")).score(inputs)
    loader = _torchmetrics_loader(hf_clip_folder)
    theirs = []
    for index in range(6):
        metric = CLIPScore(model_name_or_path=loader)
        metric.update(uint8[index : index + 1], [CLIPSCORE_PREFIX + CLIP_TEXTS[index]])
        theirs.append(float(metric.compute()))  # 100 * max(cos, 0)
    np.testing.assert_allclose(ours, CLIPSCORE_WEIGHT / 100 * np.array(theirs), atol=1e-5)
    assert (ours == 0).any() and (ours > 0).any()  # the clamp is exercised both ways
    plain = build_metric("clip_t", RANDOM).score(inputs)
    assert not np.allclose(ours, CLIPSCORE_WEIGHT * np.maximum(plain, 0), atol=1e-4)  # the prefix matters


# Fingerprint hashes of the metrics that existed before the variants, on random weights; the
# weights' sha256 is in them, so they are checked as structure here and as hashes in the report
# of the change (a changed fingerprint would orphan every cached score).
EXISTING = {
    "dino": {"metric", "version", "role", "higher_is_better", "weights", "backbone", "preprocessing", "convention"},
    "clip_i": {"metric", "version", "role", "higher_is_better", "weights", "backbone", "preprocessing", "convention"},
    "clip_t": {"metric", "version", "role", "higher_is_better", "weights", "backbone", "preprocessing", "convention",
               "text", "truncation"},
}


@pytest.mark.parametrize("name", sorted(EXISTING))
def test_existing_fingerprints_keep_their_fields(name):
    fingerprint = build_metric(name, RANDOM).fingerprint()
    assert set(fingerprint) == EXISTING[name]
    backbone = fingerprint["backbone"]
    assert set(backbone) == {"kind", "arch", "weights", "weights_tag", "weights_source", "weights_sha256", "precision",
                             "library", *(("activation",) if name != "dino" else ("embedding",))}
    if name == "dino":
        assert backbone["arch"] == "vit_small_patch16_224.dino" and backbone["weights_tag"] == "random-init-seed-0"
        assert fingerprint["preprocessing"]["resize"].startswith("shortest side to 248")


def test_every_variant_is_registered_documented_and_fingerprinted_apart():
    registry = available_metrics()
    names = [row.metric for row in VARIANTS]
    assert len(set(names)) == len(names) and set(names) <= set(registry)
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for row in VARIANTS:
        assert f"| `{row.metric}` |" in readme, f"README conventions table lacks {row.metric}"
    hashes = {}
    from benchmark.hashing import stable_hash

    for name in names:
        if name in ("clip_i_l14",):
            continue  # builds ViT-L/14: covered by its own test
        metric = build_metric(name, RANDOM)
        assert variant(name) is not None and metric.name == name
        hashes[name] = stable_hash(metric.fingerprint())
    assert len(set(hashes.values())) == len(hashes)


@pytest.mark.parametrize("model", ["s8", "v2_s14"])
def test_pretrained_path_loads_a_hub_checkpoint_offline(model, monkeypatch, tmp_path):
    """The hub file as timm publishes it (DINOv2: a 518 px, 37 × 37 position grid) loads into the
    224 px model; DINOv2's grid is resampled by timm at load."""
    import timm

    from metrics.backbones import _load_vit
    from tests.test_metrics_cache import _empty_hub_cache, _fake_hub_file

    spec = DINO_MODELS[model]
    published = timm.create_model(spec.arch, pretrained=False, num_classes=0)  # the checkpoint's own size
    previous = _empty_hub_cache(monkeypatch, tmp_path)
    try:
        _fake_hub_file(tmp_path / "hub", spec.hub_id, "model.safetensors", published.state_dict())
        loaded = _load_vit(spec, "pretrained", torch.device("cpu"), "fp32")
    finally:
        torch.hub.set_dir(previous)
    assert loaded.weights == "pretrained" and loaded.weights_source.startswith(f"hf:{spec.hub_id}/model.safetensors")
    state, source = loaded.model.state_dict(), published.state_dict()
    assert torch.equal(state["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    assert state["pos_embed"].shape[1] == 1 + (224 // loaded.model.patch_embed.patch_size[0]) ** 2
    assert loaded.model(torch.zeros(1, 3, 224, 224)).shape == (1, 384)


def test_one_scoring_pass_decodes_each_image_once_and_the_page_renders(tmp_path, monkeypatch):
    """A tiny run scored with several variants: each PNG opened once for all metrics, every
    variant stored, and the Conventions page shows them with the published sources."""
    import benchmark.scoring
    from benchmark.config import load_config
    from benchmark.driver import run_benchmark
    from reports.build import build_report

    opened: list[str] = []
    real_decode = benchmark.scoring._decode

    def counting_decode(store, label, subject, key):
        opened.append(str(store.image_path(label, subject, key)))
        return real_decode(store, label, subject, key)

    monkeypatch.setattr(benchmark.scoring, "_decode", counting_decode)
    names = ["clip_t", "clip_i", "dino", "dino_s16_squash", "clip_t_identifier", "clip_t_clipscore", "clip_i_b32"]
    config = load_config("default", [
        "methods=dummy", "subjects=dog,teapot", "protocol.prompts=[0]", "protocol.images_per_prompt=2",
        "protocol.prior_images=0", f"metrics.names=[{','.join(names)}]", "metrics.weights=random",
    ])
    run_dir = tmp_path / "run"
    run_benchmark(config, run_dir, quiet=True)
    generated = [path for path in opened if path.startswith(str(run_dir / "images"))]
    assert len(generated) == len(set(generated)) == 4  # 2 subjects x 1 prompt x 2 images, each decoded once
    from reports.rundata import read_run

    run = read_run(run_dir)
    assert set(run.long["metric"]) == set(names)
    assert run.long.groupby("metric").size().eq(4).all()

    index = build_report(run_dir, resamples=50)
    page = (index.parent / "conventions.html").read_text(encoding="utf-8")
    for label in ("DINO S/16 squash", "CLIP-T with identifier", "CLIPScore (Hessel)", "CLIP-I B/32"):
        assert label in page
    assert "DreamBench++" in page and "dinov2_s14_crop" in page  # a variant not in the run, with the command
    assert "subjectbench score" in page and "Ruiz" in page
    assert "conventions.html" in (index.parent / "leaderboard.html").read_text(encoding="utf-8")  # in the nav
    markdown = (index.parent / "conventions.md").read_text(encoding="utf-8")
    assert "| entry |" in markdown and "DINO S/16 squash" in markdown


def test_clip_t_tokenizes_each_distinct_text_once_and_matches_open_clip(monkeypatch):
    """A subject batch repeats each prompt once per image: CLIP-T tokenizes each distinct text
    once (BPE runs in Python), and its embeddings and untruncated lengths per text are open_clip's."""
    import open_clip

    from metrics.embeddings import clear_embedding_caches

    clear_embedding_caches()
    metric = build_metric("clip_t", RANDOM)
    tokenizer = metric.backbone.tokenizer
    long = "a dog " + "with a very long red scarf " * 14  # over 77 tokens: truncated
    texts = ["a dog on the beach", long, "a dog in the snow", "a dog on the beach", long, "a dog on the beach"]
    calls = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: calls.append(text) or encode(text))
    rows, lengths = metric.text_embeddings(texts)
    assert sorted(calls) == sorted(set(texts))
    reference = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        expected = F.normalize(metric.backbone.model.encode_text(reference(texts)), dim=-1)
    np.testing.assert_allclose(rows.numpy(), expected.numpy(), atol=1e-5)
    assert lengths == [len(encode(text)) + 2 for text in texts] and lengths[1] > 77
