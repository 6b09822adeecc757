"""Compiled sampling (``generation.compile``): config, resolution, tolerance against eager, fallback.

The tolerance test compiles the tiny UNet with inductor on the CPU (needs the C++ toolchain the
README's install assumes; ~25 s on two cores); the fallback test uses a real dynamo trace with a
backend that fails, which is what a machine without a working compiler produces.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from benchmark.config import ConfigError, load_config
from benchmark.units import compile_enabled, method_context
from methods import sampling
from methods.backbones import load_backbone, resolve_backbone
from methods.base import SamplerConfig
from methods.sampling import build_pipeline, compiled_unet, generate_images

FAST = SamplerConfig(steps=6)
# four images per call, as the harness test's run samples them (one prompt x 4 images): every
# compiled-sampling test then compiles the same shapes, and after the first one inductor's
# on-disk graph cache serves the rest (~3.5 min of CPU compiles -> ~1.5 on two cores)
PROMPTS, SEEDS = ["a dog in the jungle", "a red teapot", "a cat on a sofa", "a dog on the beach"], [11, 22, 33, 44]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(resolve_backbone("tiny"))


@pytest.fixture
def fresh_compile_state(monkeypatch):
    """Each test starts with no compiled code and no recorded compile failure."""
    monkeypatch.setattr(sampling, "_compile_failed", [])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("true", "true"), ("FALSE", "false"),
                                                 (True, "true"), (False, "false")])
def test_generation_compile_values(value, expected):
    text = str(value).lower() if isinstance(value, bool) else value
    config = load_config("default", [f"generation.compile={text}"])
    assert config.generation.compile == expected


def test_generation_compile_rejects_other_values():
    with pytest.raises(ConfigError, match=r"generation.compile: expected auto, true or false, got 'sometimes'"):
        load_config("default", ["generation.compile=sometimes"])


def test_compile_and_deterministic_conflict_is_named():
    with pytest.raises(ConfigError, match="deterministic=true with generation.compile=true"):
        load_config("default", ["deterministic=true", "generation.compile=true"])


def test_auto_is_on_for_cuda_only_and_off_when_deterministic():
    config = load_config("default")
    assert config.generation.compile == "auto"
    assert compile_enabled(config, "cuda") and compile_enabled(config, "cuda:1")
    assert not compile_enabled(config, "cpu")
    assert not compile_enabled(load_config("default", ["deterministic=true"]), "cuda")
    assert compile_enabled(load_config("default", ["generation.compile=true"]), "cpu")
    assert not compile_enabled(load_config("default", ["generation.compile=false"]), "cuda")
    assert method_context(load_config("default", ["generation.compile=true"]), "cpu", "float32").compile_unet


# ----------------------------------------------------------------------------- behaviour


def test_compiled_view_wraps_the_module_and_keeps_the_weights(backbone, fresh_compile_state):
    view = compiled_unet(backbone.unet)
    assert view._orig_mod is backbone.unet
    pipeline = build_pipeline(backbone, FAST, compile_unet=True)
    assert pipeline.unet._orig_mod is backbone.unet
    assert build_pipeline(backbone, FAST).unet is backbone.unet  # off unless asked


def test_sampling_compiles_run_both_passes_and_training_compiles_neither():
    """Sampling (``inference=True``): the channels-last cats and the GroupNorm kernels, one shared
    instance each (equal options share compiled code); training: inductor's defaults (the op has
    no backward)."""
    from methods.compile_layout import channels_last_cat
    from methods.fused_norm import fused_group_norm
    from methods.sampling import _compile_options

    options = _compile_options(inference=True)["options"]
    assert options == {"post_grad_custom_pre_pass": channels_last_cat(), "pre_grad_custom_pass": fused_group_norm()}
    assert "options" not in _compile_options(inference=False)


def _conv_weights(module):
    """The convolution weights whose channels-last layout differs from the default one."""
    return {name: w for name, w in module.named_parameters() if w.dim() == 4 and w.shape[1] > 1 and w.shape[2] * w.shape[3] > 1}


def test_channels_last_is_only_for_a_module_that_will_be_compiled(backbone, fresh_compile_state):
    """``maybe_compiled(..., channels_last=True)`` converts the 4-D weights of a module that will
    be compiled (values unchanged), and leaves the layout alone when it will run eagerly: not
    wanted, or compiling already failed in this process (the eager fallback keeps the default)."""
    import copy

    from methods.diffusion import input_layout

    before = {k: v.detach().clone() for k, v in backbone.unet.state_dict().items()}
    for wanted, failed in ((False, []), (True, ["RuntimeError: no compiler"])):
        module = copy.deepcopy(backbone.unet)
        sampling._compile_failed[:] = failed
        assert sampling.maybe_compiled(module, wanted, channels_last=True) is module
        assert all(w.is_contiguous() for w in _conv_weights(module).values())
        assert input_layout(module) is torch.preserve_format
    sampling._compile_failed.clear()
    module = copy.deepcopy(backbone.unet)
    view = sampling.maybe_compiled(module, True, channels_last=True)
    assert view._orig_mod is module
    weights = _conv_weights(module)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in weights.values())
    assert input_layout(view) is torch.channels_last and input_layout(module) is torch.channels_last
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert all(w.is_contiguous() for w in backbone.unet.parameters())  # the shared module is untouched


def test_channels_last_loss_matches_the_default_layout(backbone):
    """The denoising loss and its gradients through channels-last weights and inputs (eager, so
    the layout is the only change) against the default layout on the same draw: equal within
    fp32 rounding (rtol 1e-5)."""
    import copy

    from methods.diffusion import diffusion_loss, make_noise_scheduler

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 77, backbone.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        module = copy.deepcopy(backbone.unet).float().train().requires_grad_(True)
        module.to(memory_format=layout)
        loss, _ = diffusion_loss(module, make_noise_scheduler(backbone), latents, hidden, torch.Generator().manual_seed(2))
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in module.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_pipeline_decodes_through_a_view_of_the_shared_vae(backbone, fresh_compile_state):
    """The compiled pipeline's VAE is a view: same config, encoder and decoder parameters as the
    backbone's, the decoder wrapped for torch.compile; the backbone's VAE (and its state dict)
    is unchanged, and an uncompiled pipeline gets the backbone's VAE itself."""
    keys = list(backbone.vae.state_dict())
    view = build_pipeline(backbone, FAST, compile_unet=True).vae
    assert view is not backbone.vae and isinstance(view.decoder, sampling._CompiledDecoder)
    assert view.decoder.eager is backbone.vae.decoder and view.encoder is backbone.vae.encoder
    assert view.config == backbone.vae.config and view.dtype == backbone.vae.dtype
    assert not isinstance(backbone.vae.decoder, sampling._CompiledDecoder)
    assert list(backbone.vae.state_dict()) == keys
    assert build_pipeline(backbone, FAST).vae is backbone.vae


def test_decoder_compile_failure_decodes_eagerly_with_one_warning(backbone, fresh_compile_state, monkeypatch, caplog):
    """A compiler failure inside the decoder (a real dynamo trace with a failing backend): one
    warning naming the decoder, the same pixels as the eager decoder, and no retry after."""

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setitem(sampling.COMPILE_OPTIONS, "backend", failing_backend)
    decoder = sampling._CompiledDecoder(backbone.vae.decoder)
    latents = torch.randn(2, backbone.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="methods.sampling"):
        decoded = decoder(latents)
        expected = backbone.vae.decoder(latents)
    assert torch.equal(decoded, expected)
    assert "sampling VAE decoder failed" in caplog.text and sampling._compile_failed
    assert build_pipeline(backbone, FAST, compile_unet=True).vae is backbone.vae


def test_working_copies_share_compiled_code_and_are_freed(backbone, fresh_compile_state):
    """One compiled graph for every working copy of the architecture, and a copy that is let go
    is freed: a per-module cache of views once held every DreamBooth subject's UNet (+1.7 GB of
    GPU memory per subject on the H200)."""
    import gc
    import weakref

    from torch._dynamo.utils import counters

    from methods.diffusion import working_copy

    copies = []
    for seed in (1, 2, 3):
        unet = working_copy(backbone.unet)
        generate_images(build_pipeline(backbone, FAST, unet=unet, compile_unet=True), PROMPTS,
                        [seed * 100 + i for i in range(len(PROMPTS))], FAST, 64)
        copies.append(weakref.ref(unet))
        del unet
        gc.collect()
    assert not sampling._compile_failed, sampling._compile_failed
    assert counters["stats"]["unique_graphs"] == 2  # the UNet's and the VAE decoder's, each compiled once
    assert all(copy() is None for copy in copies)


def test_compile_failure_falls_back_to_identical_eager_images(backbone, fresh_compile_state, monkeypatch, caplog):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setitem(sampling.COMPILE_OPTIONS, "backend", failing_backend)
    eager = generate_images(build_pipeline(backbone, FAST), PROMPTS, SEEDS, FAST, 64)
    with caplog.at_level(logging.WARNING, logger="methods.sampling"):
        fallen_back = generate_images(build_pipeline(backbone, FAST, compile_unet=True), PROMPTS, SEEDS, FAST, 64)
    assert np.array_equal(_pixels(eager), _pixels(fallen_back))
    assert "sampling UNet failed" in caplog.text and "running eagerly from now on" in caplog.text and "no C++ compiler" in caplog.text
    assert sampling._compile_failed
    # Later pipelines do not try again.
    assert build_pipeline(backbone, FAST, compile_unet=True).unet is backbone.unet


def test_errors_that_are_not_compiler_errors_still_raise(backbone, fresh_compile_state, monkeypatch):
    def broken_backend(graph, example_inputs):
        return graph

    monkeypatch.setitem(sampling.COMPILE_OPTIONS, "backend", broken_backend)
    pipeline = build_pipeline(backbone, FAST, compile_unet=True)
    with pytest.raises(ValueError, match="prompts but"):
        generate_images(pipeline, PROMPTS, SEEDS[:2], FAST, 64)
    assert not sampling._compile_failed


def test_compiled_images_match_eager_within_tolerance(backbone, fresh_compile_state):
    """Inductor on the CPU vs eager on the tiny backbone: the same images up to kernel rounding.

    Stated tolerance (tiny, fp32, 6 DDIM steps): max 2 uint8 levels, mean < 0.05 — the size of
    the batch-size effect ``methods.sampling`` documents. On a GPU in bf16 over 50 steps the
    spread is that of two fast-mode runs (H200: max 13, mean 0.99; benchmarks/results).
    """
    eager = _pixels(generate_images(build_pipeline(backbone, FAST), PROMPTS, SEEDS, FAST, 64))
    compiled = _pixels(generate_images(build_pipeline(backbone, FAST, compile_unet=True), PROMPTS, SEEDS, FAST, 64))
    assert not sampling._compile_failed, sampling._compile_failed
    difference = np.abs(eager - compiled)
    assert difference.max() <= 2, difference.max()
    assert difference.mean() < 0.05, difference.mean()
    other = _pixels(generate_images(build_pipeline(backbone, FAST), PROMPTS[:1], [12], FAST, 64))
    assert np.abs(other[0] - compiled[0]).mean() > 5  # the tolerance is far below a different image


def test_the_harness_samples_through_the_compiled_unet(tmp_path, fresh_compile_state):
    """``generation.compile=true`` through `run`: the method's pipeline uses the compiled views
    (UNet and VAE decoder), records say so, and the images equal the eager run's (same state) within the tolerance."""
    import json
    import shutil

    from PIL import Image

    from benchmark.driver import run_benchmark

    base = ["methods=textual_inversion", "subjects=dog", "protocol.prompts=[0]"]
    run_dir = tmp_path / "run"
    run_benchmark(load_config("default", [*base, "generation.compile=false"]), run_dir, quiet=True)
    shutil.move(run_dir / "images", tmp_path / "eager")
    from torch._dynamo.utils import counters

    assert not counters["stats"]["unique_graphs"]
    summary = run_benchmark(load_config("default", [*base, "generation.compile=true"]), run_dir, quiet=True)
    assert summary.exit_code == 0 and summary.done == 4
    assert counters["stats"]["unique_graphs"] == 2 and not sampling._compile_failed  # UNet, VAE decoder
    records = [json.loads(p.read_text()) for p in (run_dir / "images").rglob("*.json")]
    assert records and all(r["compile"] is True for r in records)
    eager = sorted((tmp_path / "eager").rglob("*.png"))
    compiled = sorted((run_dir / "images").rglob("*.png"))
    difference = np.stack([np.abs(_pixels([Image.open(a)]) - _pixels([Image.open(b)])) for a, b in zip(eager, compiled)])
    assert len(eager) == len(compiled) == 4 and difference.max() <= 2 and difference.mean() < 0.05


# ----------------------------------------------------------------------------- training.compile


def test_training_compile_config():
    assert load_config("default").training.compile == "auto"
    assert load_config("default", ["training.compile=true"]).training.compile == "true"
    assert load_config("default", ["training.compile=FALSE"]).training.compile == "false"
    assert method_context(load_config("default", ["training.compile=true"]), "cpu", "float32").compile_training
    assert method_context(load_config("default"), "cuda", "bfloat16").compile_training
    assert not method_context(load_config("default"), "cpu", "float32").compile_training
    assert not method_context(load_config("default", ["deterministic=true"]), "cuda", "bfloat16").compile_training
    assert not method_context(load_config("default", ["training.compile=false"]), "cuda", "bfloat16").compile_training
    with pytest.raises(ConfigError, match="training.compile: expected auto, true or false"):
        load_config("default", ["training.compile=often"])
    with pytest.raises(ConfigError, match="deterministic=true with training.compile=true"):
        load_config("default", ["deterministic=true", "training.compile=true"])


@pytest.mark.slow  # ~90 s on two cores: inductor compiles the tiny UNet's forward and backward
def test_compiled_textual_inversion_matches_eager(tmp_path, dog, fresh_compile_state):
    """training.compile (auto on CUDA): TI through the compiled frozen UNet vs eager on the tiny
    backbone, same seeds: the mean losses of the first and last steps and the learned vectors
    agree within fp32 kernel rounding (stated: relative 1e-4 on losses, 1e-4 absolute on the
    vectors, against vectors of size ~1e-2)."""
    from safetensors.torch import load_file

    from methods.base import MethodContext
    from methods.textual_inversion import TextualInversion, TextualInversionParams

    params = TextualInversionParams(steps=4)
    results = {}
    for compiled in (False, True):
        context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path / "cache",
                                compile_training=compiled)
        method = TextualInversion(params, context)
        workdir = tmp_path / f"state-{compiled}"
        workdir.mkdir()
        method.prepare(dog, workdir, seed=3)
        state = json.loads((workdir / "state.json").read_text())
        vectors = load_file(str(workdir / state["checkpoints"]["final"]))
        training = state["training"]
        results[compiled] = ([training["loss_first"], training["loss_last"]], next(iter(vectors.values())))
    assert not sampling._compile_failed and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eager_losses, eager_vectors = results[False]
    compiled_losses, compiled_vectors = results[True]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    torch.testing.assert_close(compiled_vectors, eager_vectors, rtol=0, atol=1e-4)
    assert (eager_vectors - compiled_vectors).abs().max() < (eager_vectors.abs().max() * 1e-3)


def test_records_say_compile_only_where_the_method_sampled_compiled(tmp_path, fresh_compile_state):
    """``generation.compile=true`` with a method that never samples through the compiled UNet
    (the dummy; likewise DreamBlend, HiFi Tuner, two_stage): its records say false."""
    import json

    from benchmark.driver import run_benchmark
    from methods.dreambooth import DreamBooth, DreamBoothLoRA
    from methods.hifi_tuner import HifiTuner
    from methods.single_image import TwoStage
    from methods.textual_inversion import TextualInversion

    config = load_config("default", ["methods=dummy", "subjects=dog", "protocol.prompts=[0]", "generation.compile=true"])
    summary = run_benchmark(config, tmp_path / "run", quiet=True)
    assert summary.exit_code == 0 and summary.done
    records = [json.loads(p.read_text()) for p in (tmp_path / "run" / "images").rglob("*.json")]
    assert records and all(r["compile"] is False for r in records)
    assert TextualInversion.samples_compiled and DreamBooth.samples_compiled and DreamBoothLoRA.samples_compiled
    assert not HifiTuner.samples_compiled and not TwoStage.samples_compiled


def test_training_compile_failure_trains_eagerly_with_identical_results(tmp_path, dog, fresh_compile_state,
                                                                      monkeypatch, caplog):
    """``training.compile`` on a machine where compiling fails: one warning, then the training
    redone eagerly from a fresh setup — the same vectors and losses as an eager run."""
    from safetensors.torch import load_file

    from methods.base import MethodContext
    from methods.textual_inversion import TextualInversion, TextualInversionParams

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setitem(sampling.COMPILE_OPTIONS, "backend", failing_backend)
    params = TextualInversionParams(steps=2)
    results = {}
    for compiled in (False, True):
        context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path / "cache",
                                compile_training=compiled)
        workdir = tmp_path / f"state-{compiled}"
        workdir.mkdir()
        with caplog.at_level(logging.WARNING, logger="methods.sampling"):
            TextualInversion(params, context).prepare(dog, workdir, seed=0)
        state = json.loads((workdir / "state.json").read_text())
        results[compiled] = (state["losses"], load_file(str(workdir / "learned_embeds.safetensors")))
    assert sampling._compile_failed and "training UNet failed" in caplog.text and "training.compile=false" in caplog.text
    assert results[True][0] == results[False][0]
    assert all(torch.equal(results[True][1][k], results[False][1][k]) for k in results[False][1])


def test_training_compile_true_alone_compiles_the_full_fine_tune():
    """The context alone: ``true`` compiles the fine-tunes (DreamBooth, DreamBooth-LoRA); ``auto``
    leaves them to ``resolve_finetune_compile``, which needs the plan (next test)."""
    from methods.dreambooth import DreamBooth, DreamBoothLoRA

    assert method_context(load_config("default", ["training.compile=true"]), "cpu", "float32").compile_finetune
    assert not method_context(load_config("default"), "cuda", "bfloat16").compile_finetune
    assert not method_context(load_config("default", ["training.compile=false"]), "cuda", "bfloat16").compile_finetune
    assert DreamBooth.compiles_finetune and DreamBoothLoRA.compiles_finetune


def test_auto_compiles_fine_tunes_when_a_gpu_trains_enough_steps():
    """``training.compile=auto`` compiles DreamBooth/LoRA when the untrained fine-tune steps per
    GPU reach FINETUNE_COMPILE_STEPS (where a cold compile pays back), however many workers share
    each GPU, on CUDA only, never under ``deterministic``; TI steps do not count (it compiles
    under ``auto`` anyway)."""
    from benchmark.units import FINETUNE_COMPILE_STEPS, expand, resolve_finetune_compile

    def decide(overrides, device="cuda", devices=1, trained=lambda group: False):
        config = load_config("default", [
            "methods=textual_inversion,dreambooth,dreambooth_lora", "methods.textual_inversion.steps=5000",
            "methods.dreambooth.steps=1000", "methods.dreambooth_lora.steps=500", *overrides,
        ])
        context = method_context(config, device, "bfloat16")
        plan = expand(config, context)
        decided, note = resolve_finetune_compile(config, context, plan.groups, devices, trained)
        return decided.compile_finetune, note

    assert FINETUNE_COMPILE_STEPS == 6000  # the H200 break-evens in benchmark/units.py
    # the mini set's 3 subjects at the paper's steps: DreamBooth 3 x 1000 + LoRA 3 x 500 = 4500
    # (TI's 15 000 do not count): below the threshold on one GPU
    compiled, note = decide([])
    assert not compiled and "4500 steps per GPU" in note and "training.compile=true" in note
    compiled, note = decide(["methods.dreambooth.steps=2000"])  # 6000 + 1500
    assert compiled and "7500 steps per GPU" in note
    compiled, note = decide(["methods.dreambooth.steps=2000"], devices=2)  # 3750 per GPU
    assert not compiled and "3750 steps per GPU" in note
    compiled, note = decide(["methods.dreambooth.steps=3000"], devices=2)  # (9000 + 1500) / 2
    assert not compiled and "5250 steps per GPU" in note
    compiled, note = decide(["methods.dreambooth.steps=4000"], devices=2)  # (12 000 + 1500) / 2
    assert compiled and "6750 steps per GPU" in note
    assert decide(["methods.dreambooth.steps=3000"])[0]  # 10 500 on one GPU: each "not" below is its own reason
    assert not decide(["methods.dreambooth.steps=3000"], device="cpu")[0]
    assert not decide(["methods.dreambooth.steps=3000", "deterministic=true"])[0]
    assert not decide(["methods.dreambooth.steps=3000"], devices=None)[0]  # an executor that cannot say
    assert decide(["training.compile=true"], device="cpu", devices=8)[0]
    assert not decide(["methods.dreambooth.steps=3000", "training.compile=false"])[0]
    # already trained DreamBooth states do not count: LoRA's 1500 steps alone stay eager
    compiled, note = decide(["methods.dreambooth.steps=3000"], trained=lambda group: group.prepare.cell.method == "dreambooth")
    assert not compiled and "1500 steps per GPU" in note
    # DreamBlend trains DreamBooth states (trains_as): its steps count as DreamBooth's
    config = load_config("default", ["methods=dreamblend", "methods.dreamblend.steps=2000"])
    context = method_context(config, "cuda", "bfloat16")
    decided, note = resolve_finetune_compile(config, context, expand(config, context).groups, 1)
    assert decided.compile_finetune and "6000 steps per GPU" in note


def test_executors_say_how_many_gpus_their_workers_share():
    """What ``resolve_finetune_compile`` divides by: GPUs, not worker processes."""
    from benchmark.executors import InProcessExecutor, LocalProcessExecutor, RayExecutor

    assert InProcessExecutor().devices == 1
    four_on_one = LocalProcessExecutor(workers=1, gpu_ids=[0], workers_per_gpu=4)
    assert (four_on_one.workers, four_on_one.devices) == (4, 1)
    two_on_two = LocalProcessExecutor(workers=2, gpu_ids=[0, 1], workers_per_gpu=2)
    assert (two_on_two.workers, two_on_two.devices) == (4, 2)
    assert LocalProcessExecutor(workers=3).devices == 3  # CPU workers (auto never compiles there)
    assert RayExecutor().devices is None


def _l2(pairs) -> float:
    """The L2 norm of the differences over (a, b) tensor pairs, as one flat vector."""
    return float(sum(((a.float() - b.float()) ** 2).sum() for a, b in pairs) ** 0.5)


def _dreambooth_states(tmp_path, dog, compiled_arms, steps, lora=False):
    """{compiled: (losses, final weights)}: the UNet's for DreamBooth, the adapters' for LoRA."""
    from safetensors.torch import load_file

    from methods.base import MethodContext
    from methods.dreambooth import (
        DreamBooth,
        DreamBoothLoRA,
        DreamBoothLoRAParams,
        DreamBoothParams,
    )

    method, params = (DreamBoothLoRA, DreamBoothLoRAParams) if lora else (DreamBooth, DreamBoothParams)
    params = params(steps=steps, class_images=2, class_image_steps=2, collapse_prompts=0)
    results = {}
    for compiled in compiled_arms:
        context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path / "cache",
                                compile_finetune=compiled)
        workdir = tmp_path / f"db-{compiled}"
        workdir.mkdir()
        method(params, context).prepare(dog, workdir, seed=5)
        state = json.loads((workdir / "state.json").read_text())
        final = state["checkpoints"]["final"]
        path = workdir / final["lora"] / "pytorch_lora_weights.safetensors" if lora else workdir / final["unet"]
        results[compiled] = (state["losses"], load_file(str(path)))
    return results


def test_compiled_dreambooth_trains_its_copy_in_channels_last(tmp_path, dog, fresh_compile_state, monkeypatch):
    """The wiring, in the default tier: with ``compile_finetune`` DreamBooth's train loop gets a
    compiled view of a copy whose weights are channels-last (dynamo with its ``eager`` backend, so
    no inductor compile here), the shared backbone UNet keeps its layout, and the losses equal the
    eager default-layout run's within fp32 rounding (rtol 1e-5): the layout alone changes nothing."""
    from methods import dreambooth
    from methods.diffusion import input_layout

    monkeypatch.setitem(sampling.COMPILE_OPTIONS, "backend", "eager")
    layouts = []
    real_train_loop = dreambooth.train_loop

    def recording_train_loop(**kwargs):
        layouts.append(input_layout(kwargs["unet"]))
        return real_train_loop(**kwargs)

    monkeypatch.setattr(dreambooth, "train_loop", recording_train_loop)
    results = _dreambooth_states(tmp_path, dog, (False, True), steps=2)
    assert layouts == [torch.preserve_format, torch.channels_last]
    assert not sampling._compile_failed
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    shared = load_backbone(resolve_backbone("tiny")).unet
    assert all(w.is_contiguous() for w in shared.parameters())


@pytest.mark.slow  # ~60 s on two cores: inductor compiles the tiny UNet's forward and backward
def test_compiled_dreambooth_matches_eager(tmp_path, dog, fresh_compile_state):
    """``training.compile=true``: DreamBooth through the compiled fp32 UNet copy vs eager on the
    tiny backbone, same seeds: every loss of the first steps within relative 1e-4, and the
    compiled run's weights differ from eager's by under 1 % of how far training moved them (L2
    over the UNet; measured 0.24 %: AdamW turns near-zero gradients into ±lr steps, so fp32
    kernels of another order flip a few percent of those elements; an element-wise bound would
    be as large as the move itself)."""
    results = _dreambooth_states(tmp_path, dog, (False, True), steps=3)
    assert not sampling._compile_failed and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    (eager_losses, eager_unet), (compiled_losses, compiled_unet) = results[False], results[True]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    initial = load_backbone(resolve_backbone("tiny")).unet.state_dict()
    move = _l2((eager_unet[k], initial[k]) for k in eager_unet)
    gap = _l2((compiled_unet[k], eager_unet[k]) for k in eager_unet)
    assert move > 0 and gap < 0.01 * move, (gap, move)


@pytest.mark.slow  # ~35 s on two cores: inductor compiles the tiny UNet with its adapters
def test_compiled_dreambooth_lora_matches_eager(tmp_path, dog, fresh_compile_state):
    """``training.compile=true`` for DreamBooth-LoRA: the frozen base plus fp32 peft adapters
    through torch.compile vs eager on tiny, same seeds: losses within relative 1e-4 and the
    adapters within 1 % of how far training moved them (the up weights start at zero, so their
    norm is the move; measured 0.0015 %)."""
    results = _dreambooth_states(tmp_path, dog, (False, True), steps=3, lora=True)
    assert not sampling._compile_failed and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    (eager_losses, eager), (compiled_losses, compiled) = results[False], results[True]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    assert eager.keys() == compiled.keys()
    move = _l2((v, torch.zeros_like(v)) for k, v in eager.items() if ".lora.up." in k)
    gap = _l2((compiled[k], eager[k]) for k in eager)
    assert move > 0 and gap < 0.01 * move, (gap, move)


def test_dreambooth_compile_failure_trains_eagerly_with_identical_results(tmp_path, dog, fresh_compile_state,
                                                                          monkeypatch, caplog):
    """``training.compile=true`` where compiling fails: one warning, then DreamBooth trained again
    eagerly from fresh copies — bit-identical losses and weights to an eager run."""

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setitem(sampling.COMPILE_OPTIONS, "backend", failing_backend)
    with caplog.at_level(logging.WARNING, logger="methods.sampling"):
        results = _dreambooth_states(tmp_path, dog, (False, True), steps=2)
    assert sampling._compile_failed and "training UNet failed" in caplog.text
    assert results[True][0] == results[False][0]
    assert all(torch.equal(results[True][1][k], results[False][1][k]) for k in results[False][1])


def test_done_records_whether_the_fine_tune_was_compiled():
    """DONE's provenance says whether a training went through the compiled fine-tune, which
    ``auto`` now decides per run: true only for methods that compile their fine-tune."""
    import dataclasses

    from benchmark.runner import JobSpec, _state_info
    from benchmark.units import expand

    config = load_config("default", ["methods=textual_inversion,dreambooth,dreamblend"])
    context = method_context(config, "cpu", "float32")
    plan = expand(config, context)
    for compiled in (False, True):
        job = JobSpec(run_dir="unused", context=dataclasses.replace(context, compile_finetune=compiled), batch_size=1)
        recorded = {g.prepare.cell.method: _state_info(g, job, 1.0)["compile_finetune"] for g in plan.groups}
        assert recorded == {"textual_inversion": False, "dreambooth": compiled, "dreamblend": compiled}
