"""``training.cuda_graphs``: a fine-tune's step captured once as a CUDA graph and replayed
(``methods.training.CapturedStep``).

On this CPU machine nothing is captured: a "replay" runs the step on the static copies of its
inputs, with the conditioning and the noise/timestep draws made before it, exactly as on a GPU.
So these tests pin the plumbing — the same draws from the same generator in the same order, the
warm-up steps, fresh gradients every step, steps of another shape run uncaptured, the refusals —
against the plain loop, exactly. Capture itself is checked by the GPU tier's test at the end
(``pytest -m gpu``; its DreamBooth case passed on an H200, 2026-12-03)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmark.config import load_config
from benchmark.errors import ConfigError
from benchmark.units import method_context
from methods.backbones import resolve_backbone
from methods.base import MethodContext
from methods.dreambooth import DreamBooth, DreamBoothLoRA, DreamBoothLoRAParams, DreamBoothParams
from methods.training import GRAPH_WARMUP_STEPS, CapturedStep, TrainingParams, graph_refusal


def _train(tmp_path, dog, method, params, graphs: bool, device: str = "cpu", dtype: str = "float32"):
    """(state.json, final weights) of one training on the tiny backbone."""
    from safetensors.torch import load_file

    context = MethodContext(backbone=resolve_backbone("tiny"), device=device, dtype=dtype, resolution=64,
                            cache_dir=tmp_path / "cache", graph_finetune=graphs)
    workdir = tmp_path / f"{method.__name__}-{graphs}"
    workdir.mkdir()
    method(params, context).prepare(dog, workdir, seed=5)
    state = json.loads((workdir / "state.json").read_text())
    final = state["checkpoints"]["final"]
    path = workdir / final["lora"] / "pytorch_lora_weights.safetensors" if "lora" in final else workdir / final["unet"]
    return state, load_file(str(path))


STEPS = GRAPH_WARMUP_STEPS + 3  # warm-up steps, the captured step, two replays


@pytest.mark.parametrize("lora", [False, True], ids=["dreambooth", "dreambooth_lora"])
def test_the_captured_path_trains_exactly_as_the_plain_loop(tmp_path, dog, lora):
    method, params = (DreamBoothLoRA, DreamBoothLoRAParams(steps=STEPS, rank=2, class_images=2, class_image_steps=2,
                                                           collapse_prompts=0)) if lora else (
        DreamBooth, DreamBoothParams(steps=STEPS, class_images=2, class_image_steps=2, collapse_prompts=0,
                                     checkpoint_steps=(GRAPH_WARMUP_STEPS + 1,)))
    plain_state, plain_weights = _train(tmp_path, dog, method, params, graphs=False)
    graph_state, graph_weights = _train(tmp_path, dog, method, params, graphs=True)
    assert graph_state["losses"] == plain_state["losses"] and len(set(plain_state["losses"])) == STEPS
    assert plain_weights.keys() == graph_weights.keys()
    assert all(torch.equal(plain_weights[k], graph_weights[k]) for k in plain_weights)
    assert graph_state["training"]["cuda_graphs"] == "not captured on a CPU (same plumbing)"
    assert graph_state["training"]["uncaptured_steps"] == 0
    assert "cuda_graphs" not in plain_state["training"]  # not asked for: not recorded


def test_a_trained_text_encoder_keeps_the_plain_loop_and_says_why(tmp_path, dog):
    params = DreamBoothParams(steps=STEPS, train_text_encoder=True, class_images=0, collapse_prompts=0)
    plain_state, plain_weights = _train(tmp_path, dog, DreamBooth, params, graphs=False)
    graph_state, graph_weights = _train(tmp_path, dog, DreamBooth, params, graphs=True)
    assert graph_state["training"]["cuda_graphs"] == "not captured: the conditioning (a text encoder or token) trains"
    assert graph_state["losses"] == plain_state["losses"]
    assert all(torch.equal(plain_weights[k], graph_weights[k]) for k in plain_weights)


def test_steps_of_another_shape_run_uncaptured_and_gradients_are_fresh_each_step():
    """A toy step through ``CapturedStep``: the same parameters as plain steps (fresh gradients
    after every step, also around an uncaptured one), and a step whose inputs change shape is
    counted and run plainly."""
    torch.manual_seed(0)
    inputs = [{"x": torch.randn(4, 3)} for _ in range(7)]
    inputs[5] = {"x": torch.randn(2, 3)}  # another shape after the capture
    results = []
    for captured in (False, True):
        layer = torch.nn.Linear(3, 1)
        layer.load_state_dict({"weight": torch.ones(1, 3), "bias": torch.zeros(1)})
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)

        def body(batch, layer=layer, optimizer=optimizer):
            loss = layer(batch["x"]).square().mean()
            loss.backward()
            optimizer.step()
            return loss.detach(), loss.detach().reshape(1)

        step = CapturedStep(body, optimizer, torch.device("cpu"))
        losses = []
        for batch in inputs:
            if captured:
                losses.append(float(step(batch)[0]))
            else:
                losses.append(float(body(batch)[0]))
                optimizer.zero_grad(set_to_none=True)
        results.append((losses, layer.weight.detach().clone()))
        if captured:
            assert step.uncaptured_steps == 1 and step.static is not None
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_what_cannot_be_captured_is_named():
    plain = TrainingParams()
    assert graph_refusal(plain, torch.bfloat16, None) is None
    assert graph_refusal(plain, torch.float32, None) is None
    assert "GradScaler" in graph_refusal(plain, torch.float16, None)
    assert "adamw8bit is not capturable" in graph_refusal(TrainingParams(optimizer="adamw8bit"), torch.bfloat16, None)
    assert "loss term" in graph_refusal(plain, torch.bfloat16, lambda: torch.zeros(()))


def test_the_config_key():
    """auto (the default): captured on CUDA devices unless the run is deterministic; true also on
    a CPU (the uncaptured plumbing); deterministic runs refuse an explicit true."""
    default = load_config("default")
    assert default.training.cuda_graphs == "auto"
    assert method_context(default, "cuda", "bfloat16").graph_finetune
    assert method_context(default, "cuda:1", "bfloat16").graph_finetune
    assert not method_context(default, "cpu", "float32").graph_finetune
    assert not method_context(load_config("default", ["deterministic=true"]), "cuda", "bfloat16").graph_finetune
    assert not method_context(load_config("default", ["training.cuda_graphs=false"]), "cuda", "bfloat16").graph_finetune
    config = load_config("default", ["training.cuda_graphs=true"])
    assert config.training.cuda_graphs == "true" and method_context(config, "cpu", "float32").graph_finetune
    with pytest.raises(ConfigError, match="training.cuda_graphs"):
        load_config("default", ["training.cuda_graphs=sometimes"])
    with pytest.raises(ConfigError, match="deterministic=true with training.cuda_graphs=true"):
        load_config("default", ["deterministic=true", "training.cuda_graphs=true"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("lora", [False, True], ids=["dreambooth", "dreambooth_lora"])
def test_captured_dreambooth_on_cuda_matches_the_plain_loop(tmp_path, dog, lora):
    """On a GPU the step is really captured: bf16 losses of the captured run within 1e-3 relative
    of the plain run's (capturable AdamW computes its bias corrections on the device). Both cases
    passed on an H200 (DreamBooth 2026-12-03, both 2026-12-04: ``h200-gpu_tests_graphs.log``)."""
    method, params = (DreamBoothLoRA, DreamBoothLoRAParams(steps=STEPS + 4, rank=2, class_images=2, class_image_steps=2,
                                                           collapse_prompts=0)) if lora else (
        DreamBooth, DreamBoothParams(steps=STEPS + 4, class_images=2, class_image_steps=2, collapse_prompts=0))
    plain_state, _ = _train(tmp_path, dog, method, params, graphs=False, device="cuda", dtype="bfloat16")
    graph_state, _ = _train(tmp_path, dog, method, params, graphs=True, device="cuda", dtype="bfloat16")
    assert graph_state["training"]["cuda_graphs"] == "captured"
    torch.testing.assert_close(torch.tensor(graph_state["losses"]), torch.tensor(plain_state["losses"]), rtol=1e-3, atol=0)


def test_a_failed_capture_trains_on_uncaptured_and_says_so(tmp_path, dog, monkeypatch, caplog):
    """Should capturing fail on some GPU (an op a graph cannot hold), the training goes on with
    plain steps — the same results — and its state records why; nothing is lost."""
    from methods import training

    def failing_capture(self, inputs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    params = DreamBoothParams(steps=STEPS, class_images=2, class_image_steps=2, collapse_prompts=0)
    plain_state, plain_weights = _train(tmp_path, dog, DreamBooth, params, graphs=False)
    monkeypatch.setattr(training.CapturedStep, "_capture", failing_capture)
    graph_state, graph_weights = _train(tmp_path, dog, DreamBooth, params, graphs=True)
    assert graph_state["training"]["cuda_graphs"] == (
        "not captured: the capture failed (RuntimeError: operation not permitted when stream is capturing)")
    assert graph_state["losses"] == plain_state["losses"]
    assert all(torch.equal(plain_weights[k], graph_weights[k]) for k in plain_weights)
    assert "capturing the step failed" in caplog.text
