"""``metrics.cuda_graphs``: metric backbones' forwards captured once per input signature and
replayed (metrics/replay.py). On a CPU nothing is captured, but a "replay" moves the data as a
graph's does (static input, static outputs, clones out), so these tests cover the plumbing; the
``gpu`` test checks on CUDA that replayed values equal plain ones bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.config import ConfigError, load_config
from metrics.backbones import get_clip, get_lpips, get_vit
from metrics.base import MetricInputError, MetricSettings, ScoringInputs
from metrics.embeddings import clear_embedding_caches, encode_batch
from metrics.lpips_metrics import lpips_features
from metrics.registry import build_metric
from metrics.replay import WARMUP_CALLS, ReplayedForward
from tests.helpers import assert_same_scores


@pytest.fixture(autouse=True)
def _fresh_embeddings():
    clear_embedding_caches()
    yield
    clear_embedding_caches()


def _counted(forward):
    calls = []

    def wrapped(value):
        calls.append(tuple(value.shape))
        return forward(value)
    return wrapped, calls


def test_a_signature_is_captured_after_its_warm_up_and_replayed():
    layer = torch.nn.Linear(4, 3)
    forward, calls = _counted(lambda x: layer(x).detach())
    replayed = ReplayedForward(forward, "linear")
    inputs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    outputs = [replayed(x) for x in inputs]
    for x, out in zip(inputs, outputs):  # each output is its own input's, not a later replay's
        assert torch.equal(out, layer(x).detach())
    assert len(replayed.graphs) == 1 and replayed.replays == len(inputs) - WARMUP_CALLS
    assert outputs[-1].data_ptr() != replayed.graphs[next(iter(replayed.graphs))].outputs[0].data_ptr()
    # a new shape warms up on its own, then is captured too
    other = [replayed(torch.randn(2, 4)) for _ in range(WARMUP_CALLS + 1)]
    assert len(replayed.graphs) == 2 and all(o.shape == (2, 3) for o in other)


def test_list_outputs_and_the_cap_on_graphs():
    replayed = ReplayedForward(lambda x: [x * 2, x.sum(dim=1)], "pair", warmup=0, max_graphs=1)
    first = replayed(torch.ones(2, 3))
    assert isinstance(first, list) and torch.equal(first[0], torch.full((2, 3), 2.0))
    assert torch.equal(first[1], torch.full((2,), 3.0))
    second = replayed(torch.ones(4, 3))  # over the cap: plain
    assert len(replayed.graphs) == 1 and torch.equal(second[1], torch.full((4,), 3.0))
    # strides are part of the signature: a transposed input is another one
    assert replayed(torch.ones(3, 2).t())[0].shape == (2, 3) and len(replayed.graphs) == 1


def test_a_graph_is_never_replayed_under_other_kernel_settings():
    # deterministic kernels turned on later in the process: a fresh warm-up and capture, as a
    # plain call would pick fresh kernels (replaying the earlier capture would not)
    replayed = ReplayedForward(lambda x: x * 2, "double", warmup=0)
    before = torch.are_deterministic_algorithms_enabled()
    replayed(torch.ones(2))
    try:
        torch.use_deterministic_algorithms(True)
        replayed(torch.ones(2))
    finally:
        torch.use_deterministic_algorithms(before)
    replayed(torch.ones(2))
    assert len(replayed.graphs) == 2 and replayed.replays == 3


def test_a_failed_capture_falls_back_to_plain_calls_and_says_so(caplog):
    calls = []

    def forward(value):
        calls.append(1)
        if len(calls) == 2:  # the capture (the first call is the warm-up)
            raise RuntimeError("operation not permitted when stream is capturing")
        return value + 1

    replayed = ReplayedForward(forward, "fragile", warmup=1)
    results = [replayed(torch.zeros(2)) for _ in range(4)]
    assert all(torch.equal(r, torch.ones(2)) for r in results)
    assert replayed.capture_error.startswith("RuntimeError: operation not permitted")
    assert not replayed.graphs and replayed.replays == 0
    assert "metrics.cuda_graphs: capturing fragile failed" in caplog.text


@pytest.mark.parametrize("name", ["clip_t", "clip_i", "dino", "div", "dino_s16_squash"])
def test_replayed_metrics_score_as_plain_ones(name):
    """The same values, with the forwards going through the replay plumbing (several subject
    batches of full and partial chunks, as the score stage sends them)."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for batch in range(3):
        batches.append(ScoringInputs(
            images=torch.rand(7, 3, 48, 48, generator=generator),
            image_keys=[f"replay/{batch}/{i}" for i in range(7)],
            texts=["a dog", "a red teapot"] * 3 + ["a dog"],
            references=[torch.rand(3, 40, 30, generator=generator) for _ in range(2)],
            reference_key=f"replay-ref-{batch}",
            groups=["a", "a", "b", "b", "b", "c", "c"],
        ))
    values = {}
    for mode in ("false", "true"):
        clear_embedding_caches()
        settings = MetricSettings(weights="random", batch_size=3, cuda_graphs=mode)
        metric = build_metric(name, settings)
        replays = metric.backbone.replays
        before = {} if replays is None else {purpose: row["replays"] for purpose, row in replays.summary().items()}
        values[mode] = [metric.score(inputs) for inputs in batches]
        if mode == "true":  # every forward of this metric went through graphs, and some were replayed
            summary = replays.summary()
            assert summary and all(row["replays"] > before.get(purpose, 0) and row["capture_error"] is None
                                   for purpose, row in summary.items())
        else:
            assert replays is None
    for plain, replayed in zip(values["false"], values["true"]):
        np.testing.assert_array_equal(plain, replayed)


def test_replays_share_the_model_and_stay_out_of_the_fingerprint():
    plain = MetricSettings(weights="random", cuda_graphs="false")
    on = MetricSettings(weights="random", cuda_graphs="true")
    auto_cpu = MetricSettings(weights="random", cuda_graphs="auto")
    assert get_clip(on).model is get_clip(plain).model and get_clip(on).replays is not None
    assert get_clip(auto_cpu).replays is None  # auto: CUDA devices only
    for name in ("clip_t", "dino", "div"):
        assert build_metric(name, on).fingerprint() == build_metric(name, plain).fingerprint()
    with pytest.raises(MetricInputError, match="cuda_graphs='sometimes'"):
        MetricSettings(cuda_graphs="sometimes")


def test_config_key():
    assert load_config("default", []).metrics.cuda_graphs == "auto"  # on for CUDA devices
    assert load_config("default", ["metrics.cuda_graphs=false"]).metrics.cuda_graphs == "false"
    with pytest.raises(ConfigError, match="metrics.cuda_graphs"):
        load_config("default", ["metrics.cuda_graphs=sometimes"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_on_cuda_replayed_forwards_equal_plain_ones_bit_for_bit(precision):
    settings = {"weights": "random", "device": "cuda", "precision": precision}
    plain, on = MetricSettings(**settings, cuda_graphs="false"), MetricSettings(**settings, cuda_graphs="auto")
    assert get_clip(plain).replays is None and get_lpips(plain).replays is None  # really plain
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, 3, 512, 512, generator=generator).cuda() for n in (32, 32, 32, 4, 4, 4, 32, 4)]
    for get in (get_clip, lambda s: get_vit(s, "s16")):
        for images in batches:
            assert torch.equal(encode_batch(get(on), images), encode_batch(get(plain), images))
        summary = get(on).replays.summary()["encode"]
        assert summary["graphs"] == 2 and summary["capture_error"] is None, summary
    for images in batches:
        replayed, expected = lpips_features(get_lpips(on), images), lpips_features(get_lpips(plain), images)
        assert all(torch.equal(a, b) for a, b in zip(replayed, expected))
    assert get_lpips(on).replays.summary()["lpips trunk"]["graphs"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_replays_under_deterministic_kernels_equal_plain_ones():
    from benchmark import environment

    settings = {"weights": "random", "device": "cuda", "precision": "bf16"}
    plain, on = MetricSettings(**settings, cuda_graphs="false"), MetricSettings(**settings, cuda_graphs="auto")
    assert get_clip(plain).replays is None and get_lpips(plain).replays is None  # really plain
    generator = torch.Generator().manual_seed(1)
    batches = [torch.rand(n, 3, 256, 256, generator=generator).cuda() for n in (8, 8, 8, 8)]
    environment.apply_determinism(True)
    try:
        for images in batches:
            assert torch.equal(encode_batch(get_clip(on), images), encode_batch(get_clip(plain), images))
            replayed, expected = lpips_features(get_lpips(on), images), lpips_features(get_lpips(plain), images)
            assert all(torch.equal(a, b) for a, b in zip(replayed, expected))
        assert get_clip(on).replays.summary()["encode"]["replays"] >= 1
    finally:
        environment.apply_determinism(False)


def test_a_run_scored_with_replays_logs_them_and_scores_as_a_plain_run(tmp_path):
    from benchmark.driver import run_benchmark

    overrides = ["methods=dummy", "metrics.names=[clip_t,dino,div]", "metrics.weights=random",
                 "protocol.prompts=[0,1]", "protocol.images_per_prompt=2"]
    run_benchmark(load_config("default", [*overrides, "metrics.cuda_graphs=false"]), tmp_path / "plain", quiet=True)
    run_benchmark(load_config("default", [*overrides, "metrics.cuda_graphs=true"]), tmp_path / "replayed", quiet=True)
    log_text = (tmp_path / "replayed" / "run.log").read_text()
    assert "metrics.cuda_graphs: " in log_text and "clip ViT-B-32 encode: " in log_text and " replays" in log_text
    assert "metrics.cuda_graphs" not in (tmp_path / "plain" / "run.log").read_text()
    assert_same_scores(tmp_path / "plain", tmp_path / "replayed", ("clip_t", "dino", "div"))
