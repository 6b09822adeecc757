"""DreamBooth and DreamBooth-LoRA on the tiny backbone: learning, checkpoints, class-prior cache,
the diffusers LoRA format, bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from methods.backbones import load_backbone, resolve_backbone
from methods.base import MethodContext, ParamsError, SamplerConfig, expand_params
from methods.diffusion import (
    CachedTextEncoding,
    fixed_draw_loss,
    make_noise_scheduler,
    subject_latents,
    working_copy,
)
from methods.dreambooth import DreamBooth, DreamBoothLoRA, DreamBoothLoRAParams, DreamBoothParams
from methods.registry import get_method
from methods.sampling import build_pipeline, generate_images

FAST = SamplerConfig(steps=8)
STEPS = 30
# lr well above the paper's 5e-6 so that 30 steps on a random tiny UNet move the loss clearly.
PRIOR = {"class_images": 4, "class_image_steps": 5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> MethodContext:
    return MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path_factory.mktemp("db-cache"))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    state = module.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in snapshot)


@pytest.fixture(scope="module")
def full(context, dog, tmp_path_factory):
    backbone = load_backbone(context.backbone)
    unet_before = _snapshot(backbone.unet)
    method = DreamBooth(DreamBoothParams(steps=STEPS, learning_rate=1e-3, checkpoint_steps=(10,), **PRIOR), context)
    workdir = tmp_path_factory.mktemp("db-state")
    method.prepare(dog, workdir, seed=0)
    return method, method.load_state(workdir, dog), unet_before


@pytest.fixture(scope="module")
def lora(context, dog, tmp_path_factory):
    backbone = load_backbone(context.backbone)
    before = (_snapshot(backbone.unet), _snapshot(backbone.text_encoder))
    params = DreamBoothLoRAParams(steps=STEPS, learning_rate=1e-2, checkpoint_steps=(10,), **PRIOR)
    method = DreamBoothLoRA(params, context)
    workdir = tmp_path_factory.mktemp("lora-state")
    method.prepare(dog, workdir, seed=0)
    return method, method.load_state(workdir, dog), before


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _probe(method, subject, unet) -> float:
    backbone = method._backbone()
    latents = subject_latents(backbone, subject, 64)
    hidden = CachedTextEncoding(backbone.text_encoder, backbone.tokenizer, backbone.device)(
        [method.instance_prompt(subject)] * len(latents)
    )
    return fixed_draw_loss(unet, make_noise_scheduler(backbone), latents, hidden, seed=7, draws=8)


def test_registered_under_their_names():
    assert get_method("dreambooth") is DreamBooth
    assert get_method("dreambooth_lora") is DreamBoothLoRA


# ----------------------------------------------------------------------------- full fine-tune


def test_full_fine_tune_lowers_the_loss(full, dog):
    method, state, _ = full
    losses = state.data["losses"]
    assert len(losses) == STEPS
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)
    trained_unet, _ = method._generation_modules(state, "final")
    assert _probe(method, dog, trained_unet) < 0.7 * _probe(method, dog, method._backbone().unet)


def test_full_checkpoints_reload_generate_and_differ(full, dog):
    method, state, unet_before = full
    assert _same(method._backbone().unet, unet_before)  # the shared UNet was never trained
    assert list(method.checkpoints()) == ["step-10", "final"]
    names = sorted(p.name for p in state.path.iterdir())
    assert names == ["state.json", "unet-final.safetensors", "unet-step-10.safetensors"]
    saved = load_file(str(state.path / "unet-final.safetensors"))
    assert saved.keys() == unet_before.keys() and all(v.dtype == torch.float32 for v in saved.values())
    reloaded = method.load_state(state.path, dog)
    prompts, seeds = ["a sks dog in the jungle", "a sks dog"], [1, 2]
    images = {name: method.generate(reloaded, name, prompts, seeds, FAST) for name in method.checkpoints()}
    base = generate_images(build_pipeline(method._backbone(), FAST), prompts, seeds, FAST, 64)
    for a, b, c in zip(images["step-10"], images["final"], base):
        assert not np.array_equal(_pixels(a), _pixels(b))
        assert not np.array_equal(_pixels(b), _pixels(c))
    again = method.generate(reloaded, "step-10", prompts, seeds, FAST)  # switching back reloads
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(again, images["step-10"]))
    with pytest.raises(ValueError, match="'step-11'"):
        method.generate(reloaded, "step-11", prompts, seeds, FAST)


def test_class_images_are_shared_by_the_class_and_not_regenerated(full, context, dog, tmp_path):
    _, state, _ = full
    assert state.data["class_images_generated"] == 4 and state.data["class_prompt"] == "a dog"
    folder = state.data["class_prior_folder"]
    stamps = {p.name: p.stat().st_mtime_ns for p in sorted(__import__("pathlib").Path(folder).glob("*.png"))}
    assert len(stamps) == 4
    other_dog = replace(dog, id="dog_b", images=dog.images[:1], data_sha="dog-b")
    second = DreamBooth(DreamBoothParams(steps=2, **PRIOR), context)  # other params, same prior
    second.prepare(other_dog, tmp_path, seed=5)
    state_b = json.loads((tmp_path / "state.json").read_text())
    assert state_b["class_images_generated"] == 0 and state_b["class_prior_folder"] == folder
    assert {p.name: p.stat().st_mtime_ns for p in sorted(__import__("pathlib").Path(folder).glob("*.png"))} == stamps


def test_train_text_encoder_and_no_prior(context, dog, tmp_path):
    method = DreamBooth(DreamBoothParams(steps=2, train_text_encoder=True, class_images=0), context)
    method.prepare(dog, tmp_path, seed=0)
    state = method.load_state(tmp_path, dog)
    assert state.data["class_prompt"] is None and state.data["class_images_generated"] == 0
    assert state.data["checkpoints"]["final"]["text_encoder"] == "text_encoder-final.safetensors"
    saved = load_file(str(tmp_path / "text_encoder-final.safetensors"))
    assert saved.keys() == method._backbone().text_encoder.state_dict().keys()
    assert len(method.generate(state, "final", ["a sks dog"], [1], FAST)) == 1
    _, text_encoder = method._generation_modules(state, "final")
    assert text_encoder is not None and text_encoder is not method._backbone().text_encoder


# ----------------------------------------------------------------------------- LoRA


def test_lora_lowers_the_loss_and_leaves_shared_modules_alone(lora, dog):
    method, state, (unet_before, text_encoder_before) = lora
    backbone = method._backbone()
    assert _same(backbone.unet, unet_before) and _same(backbone.text_encoder, text_encoder_before)
    assert not any("lora" in name for name, _ in backbone.unet.named_parameters())
    trained_unet, _ = method._generation_modules(state, "final")
    before, after = _probe(method, dog, backbone.unet), _probe(method, dog, trained_unet)
    assert after < before - 0.01, (before, after)
    assert state.data["class_images_generated"] == 0  # the full fine-tune made the dog priors


def test_lora_format_loads_with_diffusers_and_changes_output(lora, dog):
    method, state, _ = lora
    backbone = method._backbone()
    folder = state.path / "lora-final"
    weights = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("unet.") for k in weights)
    # diffusers naming (convert_state_dict_to_diffusers): lora.down = A, lora.up = B
    assert any(".to_q.lora.down." in k for k in weights) and any(".to_out.0.lora.up." in k for k in weights)
    prompts, seeds = ["a sks dog in the jungle", "a sks dog"], [3, 4]
    pipeline = build_pipeline(backbone, FAST, unet=working_copy(backbone.unet))
    pipeline.load_lora_weights(str(folder))
    theirs = generate_images(pipeline, prompts, seeds, FAST, 64)
    ours = method.generate(state, "final", prompts, seeds, FAST)
    base = generate_images(build_pipeline(backbone, FAST), prompts, seeds, FAST, 64)
    # ours samples through the fused weights: the same images up to fp32 rounding
    difference = np.stack([np.abs(_pixels(a) - _pixels(b)) for a, b in zip(ours, theirs)])
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())
    assert all(np.abs(_pixels(a) - _pixels(b)).mean() > 1 for a, b in zip(ours, base))
    early = method.generate(state, "step-10", prompts, seeds, FAST)
    assert any(not np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(early, ours))


def test_lora_is_fused_for_sampling_as_w_plus_ba(lora):
    """The sampling UNet is a plain module whose weights are W + B·A (alpha = rank) from the saved
    file: an independent check of diffusers' fuse/unload against the formula."""
    method, state, _ = lora
    backbone = method._backbone()
    unet, _ = method._generation_modules(state, "final")
    assert not any("lora" in name for name, _ in unet.named_parameters())
    assert type(unet) is type(backbone.unet)
    weights = load_file(str(state.path / "lora-final" / "pytorch_lora_weights.safetensors"))
    fused, base = unet.state_dict(), backbone.unet.state_dict()
    downs = [k for k in weights if k.endswith(".lora.down.weight")]
    assert downs
    for down in downs:
        name = down.removeprefix("unet.").removesuffix(".lora.down.weight")
        up = weights[down.replace(".lora.down.", ".lora.up.")]
        expected = base[f"{name}.weight"] + up.float() @ weights[down].float()
        torch.testing.assert_close(fused[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    changed = [k for k in base if not torch.equal(base[k], fused[k])]
    assert changed and all(k.removesuffix(".weight") in {d.removeprefix("unet.").removesuffix(".lora.down.weight") for d in downs} for k in changed)


def test_lora_text_encoder_layers_are_saved(context, dog, tmp_path):
    method = DreamBoothLoRA(DreamBoothLoRAParams(steps=2, rank=2, train_text_encoder=True, **PRIOR), context)
    method.prepare(dog, tmp_path, seed=0)
    weights = load_file(str(tmp_path / "lora-final" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") and "q_proj" in k for k in weights)
    ranks = {v.shape[0] for k, v in weights.items() if k.endswith("down.weight")}
    assert ranks == {2}
    state = method.load_state(tmp_path, dog)
    assert len(method.generate(state, "final", ["a sks dog"], [1], FAST)) == 1


def test_defaults_come_from_the_papers():
    full, low_rank = DreamBoothParams(), DreamBoothLoRAParams()
    assert (full.learning_rate, full.steps, full.prior_loss_weight, full.class_images) == (5e-6, 1000, 1.0, 200)
    assert (low_rank.learning_rate, low_rank.steps, low_rank.rank) == (1e-4, 500, 4)
    assert full.max_grad_norm == 1.0 and full.batch_size == 1


# ----------------------------------------------------------------------------- bad inputs


def test_single_image_subject_trains(context, dog, tmp_path):
    single = replace(dog, id="dog_one", images=dog.images[:1], data_sha="one")
    method = DreamBoothLoRA(DreamBoothLoRAParams(steps=2, **PRIOR), context)
    method.prepare(single, tmp_path, seed=0)
    assert len(method.generate(method.load_state(tmp_path, single), "final", ["a sks dog"], [1], FAST)) == 1


def test_missing_class_noun_names_the_subject(context, dog, tmp_path):
    with pytest.raises(ValueError, match="'nameless' has no class noun"):
        DreamBooth(DreamBoothParams(steps=1), context).prepare(
            replace(dog, id="nameless", class_noun=" "), tmp_path, seed=0
        )


@pytest.mark.parametrize(
    ("cls", "raw", "message"),
    [
        (DreamBoothParams, {"checkpoint_steps": [50, 1200]}, r"\[1200\] are beyond.*steps=1000"),
        (DreamBoothParams, {"class_images": -1}, "class_images must be >= 0"),
        (DreamBoothParams, {"prior_loss_weight": -0.5}, "prior_loss_weight"),
        (DreamBoothParams, {"optimizer": "sgd"}, "'sgd' is not one of"),
        (DreamBoothLoRAParams, {"rank": 0}, "rank must be >= 1"),
        (DreamBoothLoRAParams, {"steps": 100, "checkpoint_steps": [100, 400]}, r"\[400\]"),
    ],
)
def test_bad_params_fail_at_config_validation(cls, raw, message):
    with pytest.raises(ParamsError, match=message):
        expand_params(cls, raw, "methods.dreambooth.params")


def test_prior_loss_weight_scales_the_class_term(context, dog, tmp_path):
    """λ enters the loss as L_inst + λ·L_class: with the same draws (same seed), first-step
    losses for λ = 0.5, 1, 2 lie on a line of positive slope (the class term); λ = 0 generates
    no class images and uses no class prompt."""
    first = {}
    for weight in (0.5, 1.0, 2.0):
        workdir = tmp_path / f"lambda-{weight}"
        workdir.mkdir()
        params = DreamBoothParams(steps=1, learning_rate=1e-3, prior_loss_weight=weight, **PRIOR)
        DreamBooth(params, context).prepare(dog, workdir, seed=0)
        state = json.loads((workdir / "state.json").read_text())
        assert state["class_prompt"] == "a dog"
        first[weight] = state["losses"][0]
    class_term = first[2.0] - first[1.0]
    assert class_term > 1e-4  # λ changes the loss at all
    assert first[1.0] - first[0.5] == pytest.approx(class_term / 2, rel=1e-4)
    instance_term = first[1.0] - class_term
    assert instance_term > 0
    # λ = 0: prior preservation off, so nothing is generated and no class prompt is used.
    empty_cache = tmp_path / "cache-lambda-0"
    off_context = replace(context, cache_dir=empty_cache)
    workdir = tmp_path / "lambda-0"
    workdir.mkdir()
    DreamBooth(DreamBoothParams(steps=1, learning_rate=1e-3, prior_loss_weight=0.0, **PRIOR), off_context).prepare(dog, workdir, seed=0)
    state = json.loads((workdir / "state.json").read_text())
    assert state["class_prompt"] is None and state["class_images_generated"] == 0
    assert not any(empty_cache.rglob("*.png"))


# ----------------------------------------------------------------------------- checkpoint writes


def _checkpoint_bytes(workdir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(workdir.glob("*.safetensors"))}


def test_background_checkpoint_writes_equal_inline_writes(context, dog, tmp_path, monkeypatch):
    """Checkpoint files written by the background thread (the default) are byte-identical to
    the same training's files written in line (``CHECKPOINT_WRITE_THREADS = 0``), for an
    intermediate checkpoint that training goes on past and for the final one, UNet and text
    encoder; and the state records the wait for them in its checkpoint time."""
    from methods import training

    params = DreamBoothParams(steps=3, learning_rate=1e-3, checkpoint_steps=(1,), train_text_encoder=True, **PRIOR)
    written = {}
    for threads in (0, 1):
        monkeypatch.setattr(training, "CHECKPOINT_WRITE_THREADS", threads)
        workdir = tmp_path / f"threads-{threads}"
        workdir.mkdir()
        DreamBooth(params, context).prepare(dog, workdir, seed=0)
        written[threads] = _checkpoint_bytes(workdir)
        state = json.loads((workdir / "state.json").read_text())
        assert state["training"]["checkpoint_seconds"] > 0
    assert sorted(written[1]) == ["text_encoder-final.safetensors", "text_encoder-step-1.safetensors",
                                  "unet-final.safetensors", "unet-step-1.safetensors"]
    assert written[1] == written[0]
    assert written[1]["unet-step-1.safetensors"] != written[1]["unet-final.safetensors"]


def test_a_checkpoint_is_the_weights_at_its_step_even_when_written_later(context, tmp_path, monkeypatch):
    """The snapshot is taken when the checkpoint is asked for: a write held back until after the
    weights changed (on the CPU in fp32, where ``.cpu()`` would alias the live tensors) still
    saves the values of that moment."""
    import threading

    from methods import dreambooth

    method = DreamBooth(DreamBoothParams(steps=2, class_images=0), context)
    module = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    release = threading.Event()
    real_save = dreambooth.save_tensors

    def held_save(tensors, path):
        release.wait(timeout=30)
        real_save(tensors, path)

    monkeypatch.setattr(dreambooth, "save_tensors", held_save)
    with method._background_writes() as writes:
        files = method._save_checkpoint(tmp_path, "step-1", module, None, torch.float32)
        with torch.no_grad():
            module.weight.add_(1.0)  # training goes on
        release.set()
        writes.close()
    saved = load_file(str(tmp_path / files["unet"]))
    assert all(torch.equal(saved[k], before[k]) for k in before) and not torch.equal(saved["weight"], module.weight)
    assert method._writes is None


def test_a_failed_background_write_fails_the_training_and_names_the_file(context, dog, tmp_path, monkeypatch):
    """A checkpoint write that fails in the background (here: a full disk at the intermediate
    checkpoint) fails ``prepare`` with the write's own error, noted with the file's path, and
    no state.json is written; the thread is gone afterwards."""
    import errno
    import threading

    from methods import dreambooth

    real_save = dreambooth.save_tensors

    def full_disk(tensors, path):
        if "step-1" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(tensors, path)

    monkeypatch.setattr(dreambooth, "save_tensors", full_disk)
    method = DreamBooth(DreamBoothParams(steps=3, learning_rate=1e-3, checkpoint_steps=(1,), **PRIOR), context)
    with pytest.raises(OSError, match="No space left") as raised:
        method.prepare(dog, tmp_path, seed=0)
    assert raised.value.errno == errno.ENOSPC
    assert any("unet-step-1.safetensors" in note for note in getattr(raised.value, "__notes__", []))
    assert not (tmp_path / "state.json").exists()
    assert method._writes is None
    assert not [t for t in threading.enumerate() if t.name.startswith("checkpoint")]
