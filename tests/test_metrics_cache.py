"""Backbones shared per process, embeddings computed once, random weights identical everywhere,
pretrained weights failing fast offline, derived report columns."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data.common import UserError
from metrics import embeddings
from metrics.backbones import MetricWeightsError, _load_dino, get_clip, get_dino
from metrics.base import MetricSettings
from metrics.conventions import add_derived_columns, clipscore, derived_columns
from metrics.embeddings import clear_embedding_caches
from metrics.registry import build_metric
from metrics.testing import mini_scoring_inputs

RANDOM = MetricSettings(weights="random")


@pytest.fixture(autouse=True)
def _fresh_embeddings():
    clear_embedding_caches()
    yield


@pytest.fixture
def encode_counter(monkeypatch):
    """Counts the images that actually go through a backbone (the real encoder still runs)."""
    counts = {"images": 0}
    real = embeddings.encode_batch

    def counting(backbone, images, **options):
        counts["images"] += images.shape[0]
        return real(backbone, images, **options)

    monkeypatch.setattr(embeddings, "encode_batch", counting)
    return counts


def test_clip_t_and_clip_i_share_one_clip_model():
    clip_t, clip_i = build_metric("clip_t", RANDOM), build_metric("clip_i", RANDOM)
    assert clip_t.backbone is clip_i.backbone is get_clip(RANDOM)
    bf16 = get_clip(MetricSettings(weights="random", precision="bf16"))
    assert bf16.precision == "bf16" and bf16.fp32_model is clip_t.backbone.model  # its cast copy
    assert bf16 is get_clip(MetricSettings(weights="random", precision="bf16"))
    assert build_metric("dino", RANDOM).backbone is build_metric("pres", RANDOM).backbone


def test_image_embeddings_are_shared_in_process(encode_counter):
    inputs = mini_scoring_inputs(per_subject=1)
    build_metric("clip_t", RANDOM).score(inputs)
    assert encode_counter["images"] == 3
    build_metric("clip_i", RANDOM).score(inputs)  # same CLIP, same keys: only the 4 references
    assert encode_counter["images"] == 3 + 4
    build_metric("clip_i", RANDOM).score(inputs)  # references are cached per reference_key
    assert encode_counter["images"] == 7


@pytest.mark.parametrize("get_backbone", [get_clip, get_dino])
def test_references_of_one_size_encode_as_one_batch_in_their_order(get_backbone, monkeypatch):
    """Same-size references share one encode call; the rows keep the given order and equal each
    reference encoded alone (the per-image path they replaced)."""
    backbone = get_backbone(RANDOM)
    generator = torch.Generator().manual_seed(0)
    sizes = [(96, 128), (80, 80), (96, 128), (80, 80), (64, 100)]
    references = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    calls = []
    real = embeddings.encode_batch
    monkeypatch.setattr(embeddings, "encode_batch", lambda b, images, **options: calls.append(images.shape[0]) or real(b, images, **options))
    rows = embeddings.reference_embeddings(backbone, references, "mixed-sizes")
    assert sorted(calls) == [1, 2, 2]
    alone = torch.cat([real(backbone, reference.unsqueeze(0)) for reference in references])
    torch.testing.assert_close(rows, alone, rtol=1e-4, atol=1e-5)


def test_disk_cache_recomputes_only_what_is_missing(tmp_path, encode_counter):
    settings = MetricSettings(weights="random", cache_dir=tmp_path)
    inputs = mini_scoring_inputs(per_subject=2)
    first = build_metric("dino", settings).score(inputs)
    assert encode_counter["images"] == 6 + 4
    folders = list((tmp_path / "embeddings").iterdir())
    assert len(folders) == 1 and (folders[0] / "backbone.json").is_file()
    assert not list(folders[0].glob(".*.tmp"))

    clear_embedding_caches()  # as a new process would start
    extra = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    inputs.images = torch.cat([inputs.images[:, :, :64, :64], extra])  # new pixels ...
    inputs.image_keys = [*inputs.image_keys, "new-image"]  # ... but only one new key
    inputs.texts, inputs.groups = [*inputs.texts, "x"], [*inputs.groups, "x"]
    second = build_metric("dino", settings).score(inputs)
    assert encode_counter["images"] == 10 + 1 + 4  # the new image and the in-memory references
    np.testing.assert_allclose(second[:6], first, atol=1e-7)  # read back, keyed by image key
    assert len(list(folders[0].glob("*.safetensors"))) == 2

    build_metric("clip_i", settings).score(inputs)  # another backbone: another folder
    assert len(list((tmp_path / "embeddings").iterdir())) == 2


def test_random_weights_are_identical_in_every_process_and_leave_the_rng_alone():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    rebuilt = _load_dino("random", torch.device("cpu"), "fp32")
    assert torch.equal(torch.get_rng_state(), state)
    shared = get_dino(RANDOM)
    assert rebuilt.model is not shared.model and rebuilt.weights_sha256() == shared.weights_sha256()
    code = (
        "import torch; torch.manual_seed(99)\n"
        "from metrics.backbones import get_dino\nfrom metrics.base import MetricSettings\n"
        "print(get_dino(MetricSettings(weights='random')).weights_sha256())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip().splitlines()[-1] == shared.weights_sha256()


def _empty_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    return previous


@pytest.mark.parametrize("name", ["clip_t", "dino", "div"])
def test_pretrained_weights_offline_fail_fast_with_the_fix(name, monkeypatch, tmp_path):
    previous = _empty_hub_cache(monkeypatch, tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(MetricWeightsError, match="metrics.weights=random") as caught:
            build_metric(name, MetricSettings(weights="pretrained")).fingerprint()
        assert time.monotonic() - started < 30  # a hang guard, not a speed test: no download attempt
    finally:
        torch.hub.set_dir(previous)
    assert isinstance(caught.value, UserError)  # the CLI prints it without a traceback
    assert "HF_HUB_OFFLINE" in str(caught.value)


def test_bf16_autocast_path_runs_and_stays_close():
    inputs = mini_scoring_inputs(per_subject=1)
    fp32 = build_metric("dino", RANDOM).score(inputs)
    bf16_metric = build_metric("dino", MetricSettings(weights="random", precision="bf16"))
    bf16 = bf16_metric.score(inputs)
    assert bf16_metric.fingerprint()["backbone"]["precision"] == "bf16-autocast"
    np.testing.assert_allclose(bf16, fp32, atol=0.05)
    assert not np.allclose(bf16, fp32, atol=1e-7)  # really ran in bf16, not from the fp32 cache


def test_derived_columns():
    cosines = np.array([0.3, -0.1, np.nan])
    np.testing.assert_allclose(clipscore(cosines), [0.75, 0.0, np.nan])
    derived = derived_columns("clip_t", cosines)
    np.testing.assert_allclose(derived["x100"], [30.0, -10.0, np.nan])
    assert set(derived_columns("clip_i", cosines)) == {"x100"} and derived_columns("div", cosines) == {}
    import pandas as pd

    frame = pd.DataFrame({"metric": ["clip_t", "div", "dino"], "value": [0.305, 0.4, 0.668]})
    out = add_derived_columns(frame)
    assert out.loc[0, "value_clipscore"] == pytest.approx(0.7625)
    assert out.loc[2, "value_x100"] == pytest.approx(66.8) and np.isnan(out.loc[1, "value_x100"])
    assert list(frame.columns) == ["metric", "value"]


def _fake_hub_file(root, repo_id: str, filename: str, tensors: dict) -> None:
    """Place ``tensors`` where the hub cache keeps ``repo_id``/``filename`` (refs/main -> snapshot)."""
    from safetensors.torch import save_file

    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(snapshot / filename))


def test_pretrained_loading_path_reads_the_local_caches(monkeypatch, tmp_path):
    """The pretrained code path, offline, on cached files holding our random weights.

    It proves the plumbing (cache lookup, open_clip / timm / lpips file loading, QuickGELU,
    fingerprint) without the network; the real checkpoints' contents are not checked here.
    """
    from torchvision import models

    from metrics.backbones import _load_clip, _load_lpips

    previous = _empty_hub_cache(monkeypatch, tmp_path)
    try:
        cpu = torch.device("cpu")
        clip, dino = get_clip(RANDOM), get_dino(RANDOM)
        _fake_hub_file(tmp_path / "hub", "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors",
                       clip.model.state_dict())
        _fake_hub_file(tmp_path / "hub", "timm/vit_small_patch16_224.dino", "model.safetensors",
                       dino.model.state_dict())
        trunk = models.alexnet().state_dict()
        (tmp_path / "torch-hub" / "checkpoints").mkdir(parents=True)
        staged = tmp_path / "torch-hub" / "checkpoints" / "staged.pth"
        torch.save(trunk, staged)
        # The trunk is pinned by the sha256 prefix in its URL's file name: pin the fake one alike.
        prefix = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
        staged.rename(staged.with_name(f"alexnet-owt-{prefix}.pth"))
        monkeypatch.setattr("metrics.backbones._torchvision_trunk_url",
                            lambda net: f"https://download.pytorch.org/models/alexnet-owt-{prefix}.pth")

        loaded_clip = _load_clip("ViT-B-32", "pretrained", cpu, "fp32")
        loaded_dino = _load_dino("pretrained", cpu, "fp32")
        loaded_lpips = _load_lpips("alex", "pretrained", cpu, "fp32")
    finally:
        torch.hub.set_dir(previous)
    assert loaded_clip.weights_sha256() == clip.weights_sha256()
    assert loaded_dino.weights_sha256() == dino.weights_sha256()
    assert torch.equal(loaded_lpips.model.net.slice1[0].weight, trunk["features.0.weight"])
    fingerprint = loaded_clip.fingerprint()
    assert fingerprint["weights"] == "pretrained" and fingerprint["weights_tag"] == "openai"
    assert fingerprint["weights_source"].startswith("hf:timm/vit_base_patch32_clip_224.openai/open_clip_model")
    assert loaded_dino.fingerprint()["weights_tag"] == "dino" and loaded_lpips.weights == "pretrained"


def test_a_cached_lpips_trunk_with_other_content_is_refused_before_loading(monkeypatch, tmp_path):
    """Downloaders check only what they download; a cached file is checked before every load."""
    from data.common import ChecksumError
    from metrics.backbones import _torchvision_trunk_url

    previous = _empty_hub_cache(monkeypatch, tmp_path)
    try:
        url = _torchvision_trunk_url("alex")
        cached = tmp_path / "torch-hub" / "checkpoints" / url.rsplit("/", 1)[-1]
        cached.parent.mkdir(parents=True)
        cached.write_bytes(b"not the alexnet weights")
        with pytest.raises(ChecksumError) as caught:
            build_metric("div", MetricSettings(weights="pretrained", lpips_net="alex")).fingerprint()
    finally:
        torch.hub.set_dir(previous)
    message = str(caught.value)
    assert str(cached) in message and "expected 7be5be79..." in message
    assert hashlib.sha256(b"not the alexnet weights").hexdigest() in message and "delete it" in message
