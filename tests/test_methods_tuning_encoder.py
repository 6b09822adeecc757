"""tuning_encoder (reconstructed): pre-training (loss falls, kill + resume), 0-step tuning, dual path
at α = 0 against a plain diffusers pipeline, the contrastive loss, the missing-encoder error, and
the encoders_tiny suite end to end. Tiny backbone, CPU, real diffusers/transformers modules."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from methods.backbones import load_backbone, resolve_backbone
from methods.base import MethodContext, SamplerConfig
from methods.tuning_encoder import TuningEncoder, TuningEncoderParams, slot_token
from methods.tuning_encoder_net import (
    EncoderCheckpointError,
    build_net,
    build_parts,
    contrastive_loss,
    default_config,
    read_metadata,
    save_checkpoint,
    word_vocabulary,
)
from methods.tuning_encoder_pretrain import (
    PretrainError,
    PretrainOptions,
    pretrain,
    probe_loss,
    resume_dir,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLER = SamplerConfig(steps=4, guidance=7.5)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four synthetic 64 px images: coloured squares on noise (seeded)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(4):
        pixels = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        pixels[16:48, 16:48] = [(220, 40, 40), (40, 200, 60), (50, 60, 230), (230, 220, 40)][index]
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def options(images, out, **changes) -> PretrainOptions:
    base = PretrainOptions(images=str(images), out=str(out), backbone="tiny", steps=6, batch_size=2,
                           learning_rate=1e-2, save_every=2, device="cpu")
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def encoder(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder") / "enc.safetensors"
    pretrain(options(images, out, steps=12, save_every=100))
    return out


@pytest.fixture(scope="module")
def subject():
    from data.subjects import load_subjects

    return load_subjects("mini", subjects=["dog"])[0]


def method(encoder, **params) -> TuningEncoder:
    return TuningEncoder(TuningEncoderParams(encoder=str(encoder), **params), MethodContext(backbone=resolve_backbone("tiny")))


def test_pretraining_loss_falls_on_fixed_draws(images, encoder):
    opts = options(images, encoder, steps=12)
    before, after = probe_loss(opts, None), probe_loss(opts, encoder)
    assert after < before, (before, after)
    record = read_metadata(encoder)
    assert record["pretraining"]["steps"] == 12 and record["pretraining"]["images"] == 24
    assert record["config"]["backbone"] == "tiny" and record["pretraining"]["seconds"] > 0


def test_kill_and_resume_continues_from_the_saved_step_with_the_same_data(images, tmp_path):
    straight = pretrain(options(images, tmp_path / "a.safetensors"))
    killed = options(images, tmp_path / "b.safetensors")
    pretrain(killed, stop_after=3)  # dies after step 3; the last save is step 2
    progress = json.loads((resume_dir(tmp_path / "b.safetensors") / "progress.json").read_text())
    assert progress["step"] == 2 and progress["position"] == 4
    resumed = pretrain(killed)
    assert resumed.start_step == 2
    assert np.allclose(resumed.losses, straight.losses, rtol=0, atol=1e-6), (resumed.losses, straight.losses)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(PretrainError, match="other options"):  # a resume must keep the options
        pretrain(dataclasses.replace(killed, learning_rate=5e-3))


def _untrained_encoder(path):
    backbone = load_backbone(resolve_backbone("tiny"))
    config = default_config(backbone)
    save_checkpoint(path, build_net(build_parts(backbone, config), config), {"steps": 0, "seconds": 0.0, "images": 0, "device": "cpu"})
    return path


def test_zero_tuning_steps_generate_from_the_prediction_alone(encoder, subject, tmp_path):
    # An untrained encoder predicts exactly its init word and zero offsets: the images are the
    # frozen model's for the prompt with that word (diffusers pipeline as the reference).
    untrained = method(_untrained_encoder(tmp_path / "untrained.safetensors"), tuning_steps=0, dual_path=False)
    (tmp_path / "s0").mkdir()
    untrained.prepare(subject, tmp_path / "s0", seed=0)
    state = untrained.load_state(tmp_path / "s0", subject)
    backbone = load_backbone(resolve_backbone("tiny"))
    init = backbone.text_encoder.get_input_embeddings().weight[backbone.tokenizer("object", add_special_tokens=False).input_ids[0]]
    assert torch.allclose(state.data["word"], init.float(), rtol=0, atol=1e-7) and state.data["losses"] == []
    assert all(not up.any() for targets in state.data["offsets"].values() for _, up in targets.values())
    prompt = f"a {slot_token(0)} on the beach"
    from methods.sampling import build_pipeline, generate_images

    ours = untrained.sample(state, [prompt], [3], SAMPLER, output_type="latent")[0]
    reference = generate_images(build_pipeline(backbone, SAMPLER), ["a object on the beach"], [3], SAMPLER, 64, output_type="latent")[0]
    # The reference runs diffusers' SDPA attention, ours the explicit softmax, and the stored word is a
    # mean of 40 equal fp32 rows: equal up to float rounding (latents of magnitude ~5).
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-4), float((ours - reference).abs().max())
    # The pre-trained encoder, 0 steps: its own prediction (not the init word), no tuning; tuning moves it.
    zero = method(encoder, tuning_steps=0)
    tuned = method(encoder, tuning_steps=2, tuning_lr=1e-2)
    for name, m in (("z", zero), ("t", tuned)):
        (tmp_path / name).mkdir()
        m.prepare(subject, tmp_path / name, seed=0)
    z, t = zero.load_state(tmp_path / "z", subject), tuned.load_state(tmp_path / "t", subject)
    assert not torch.allclose(z.data["word"], init.float(), atol=1e-4) and z.data["losses"] == [] and len(t.data["losses"]) == 2
    assert not torch.equal(z.data["word"], t.data["word"])
    images = zero.generate(z, "final", [prompt, prompt], [1, 2], SAMPLER)
    assert len(images) == 2 and images[0].size == (64, 64)


def test_dual_path_at_alpha_zero_is_the_frozen_model_with_the_hard_token(encoder, subject, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor

    from methods.sampling import build_pipeline, generate_images

    blended = method(encoder, tuning_steps=0, dual_path=True, alpha=0.0)
    blended.prepare(subject, tmp_path, seed=0)
    state = blended.load_state(tmp_path, subject)
    prompts = [f"a {slot_token(0)} in the jungle", f"a {slot_token(0)} on a cobblestone street"]
    ours = torch.stack(blended.sample(state, prompts, [5, 6], SAMPLER, output_type="latent"))
    backbone = load_backbone(resolve_backbone("tiny"))
    hard = state.data["hard_token"]
    assert backbone.tokenizer(hard, add_special_tokens=False).input_ids == [state.data["hard_token_id"]]
    unet, original = backbone.unet, dict(backbone.unet.attn_processors)
    unet.set_attn_processor(AttnProcessor())  # diffusers' own explicit-softmax attention
    try:
        plain = build_pipeline(backbone, SAMPLER)
        reference = torch.stack(generate_images(plain, [p.replace(slot_token(0), hard) for p in prompts], [5, 6], SAMPLER, 64, output_type="latent"))
    finally:
        unet.set_attn_processor(original)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6), float((ours - reference).abs().max())
    soft = torch.stack(method(encoder, tuning_steps=0, dual_path=True, alpha=1.0).sample(state, prompts, [5, 6], SAMPLER, output_type="latent"))
    assert (soft - reference).abs().max() > 1e-4  # the soft path is something else


def test_contrastive_loss_moves_embeddings_toward_their_nearest_tokens():
    backbone = load_backbone(resolve_backbone("tiny"))
    vocabulary = word_vocabulary(backbone)
    words = torch.randn(3, vocabulary.unit_rows.shape[1], generator=torch.Generator().manual_seed(0)) * 0.3
    words.requires_grad_(True)

    def cosine(vectors):
        return torch.nn.functional.normalize(vectors.detach(), dim=-1) @ vocabulary.unit_rows.T

    start = cosine(words)
    neighbours = start.topk(5, dim=1).indices
    optimizer = torch.optim.Adam([words], lr=5e-3)
    for _ in range(60):
        loss = contrastive_loss(vocabulary, words, neighbours=5, temperature=0.07)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = cosine(words)
    assert end.gather(1, neighbours).mean() > start.gather(1, neighbours).mean() + 0.01  # toward their first neighbours
    assert end.topk(5, dim=1).values.mean() > start.topk(5, dim=1).values.mean() + 0.02  # and closer to their nearest now
    assert end[:, vocabulary.negatives].mean() < start[:, vocabulary.negatives].mean()  # away from the others


def test_missing_encoder_names_the_command_that_makes_one(tmp_path, monkeypatch, capsys):
    from benchmark.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "encoders_tiny", "--out", str(tmp_path / "run"), "subjects=dog"]) == 2
    err = capsys.readouterr().err
    assert "subjectbench pretrain tuning-encoder --images mini --backbone tiny --out tuning_encoder_tiny.safetensors" in err
    assert err.startswith("error:") and "Traceback" not in err and not (tmp_path / "run" / "states").exists()
    with pytest.raises(EncoderCheckpointError, match="subjectbench pretrain tuning-encoder --images mini --backbone tiny"):
        method("").fingerprint()


def test_wrong_backbone_encoder_is_refused(encoder):
    other = TuningEncoder(TuningEncoderParams(encoder=str(encoder)), MethodContext(backbone=resolve_backbone("sd15-random")))
    with pytest.raises(EncoderCheckpointError, match="pre-trained for backbone 'tiny'.*--backbone sd15-random"):
        other.fingerprint()


@pytest.mark.slow
def test_encoders_tiny_suite_end_to_end(tmp_path, monkeypatch, capsys):
    """pretrain command (progress, PNG) → the encoders_tiny suite → report with the one-time cost."""
    from benchmark.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "tuning-encoder", "--images", "mini", "--backbone", "tiny", "--steps", "4",
                 "--out", "tuning_encoder_tiny.safetensors", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "tuning_encoder_tiny.loss.png").is_file() and "4 steps, 8 images seen" in out
    code = main(["run", "encoders_tiny", "--out", str(tmp_path / "run"), "subjects=dog", "--quiet",
                 "methods.tuning_encoder.tuning_steps=[0,4]"])
    assert code == 0, capsys.readouterr()
    from reports.rundata import read_run
    from reports.tables import cost_table

    cost = cost_table(read_run(tmp_path / "run")).set_index("cell_id")
    encoder_rows = cost[cost["method"] == "tuning_encoder (reconstructed)"]
    assert len(encoder_rows) == 8 and (encoder_rows["pretrain_steps"] == 4).all() and (encoder_rows["pretrain_images"] == 8).all()
    assert cost.loc["textual_inversion", "pretrain_seconds"] != cost.loc["textual_inversion", "pretrain_seconds"]  # NaN: none
    tables = (tmp_path / "run" / "report" / "tables.md").read_text()
    assert "one-time pre-training" in tables and "(4 steps, 8 images)" in tables


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """--gpus 2 (torch.distributed, Gloo on CPU) = one process with twice the batch (L2 reg: its
    loss does not mix samples): same losses, weights equal up to float rounding of the reduction."""
    import subprocess
    import sys

    from tests.helpers import cli_env

    script = tmp_path / "two.py"
    script.write_text(
        "from methods.tuning_encoder_pretrain import PretrainOptions, run_pretraining\n"
        "if __name__ == '__main__':\n"
        "    common = dict(images='mini', backbone='tiny', steps=4, learning_rate=1e-2, reg='l2', save_every=2, device='cpu')\n"
        "    run_pretraining(PretrainOptions(out='one.safetensors', batch_size=2, gpus=1, **common))\n"
        "    run_pretraining(PretrainOptions(out='two.safetensors', batch_size=1, gpus=2, **common))\n"
    )
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=cli_env(), check=True, timeout=900)
    one = json.loads((tmp_path / "one.safetensors.json").read_text())
    two = json.loads((tmp_path / "two.safetensors.json").read_text())
    assert np.allclose(one["losses"], two["losses"], atol=1e-5) and two["device"] == "cpu x2"
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)


def test_image_sources_folder_saved_dataset_and_clear_errors(images, tmp_path):
    from methods.tuning_encoder_pretrain import ImageSource

    folder = ImageSource(str(images))
    assert len(folder) == 4 and folder.image(0, 32).size == (32, 32)
    datasets = pytest.importorskip("datasets")
    frame = datasets.Dataset.from_dict({"picture": [str(p) for p in sorted(images.glob("*.png"))]})
    frame.cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    saved = ImageSource(str(tmp_path / "saved"))
    assert len(saved) == 4 and np.array_equal(np.asarray(saved.image(2, 64)), np.asarray(folder.image(2, 64)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainError, match="the folder has no images"):
        ImageSource(str(tmp_path / "empty"))
    with pytest.raises(PretrainError, match="not a folder, and `datasets` could not load it"):
        ImageSource("no-such-image-set-anywhere")


def test_encoders_tiny_suite_runs_with_the_one_time_cost_apart(encoder, tmp_path, capsys):
    """The suite, trimmed (one subject, one image, fewer steps): tunings shared across the
    dual-path switch, every cell generated, the encoder's pre-training in the cost table."""
    from benchmark.cli import main
    from reports.rundata import read_run
    from reports.tables import cost_table

    code = main([
        "run", "encoders_tiny", "--out", str(tmp_path / "run"), "subjects=dog", "--quiet",
        f"methods.tuning_encoder.encoder={encoder}", "methods.tuning_encoder.tuning_steps=[0,4]",
        "methods.tuning_encoder.reg=contrastive", "methods.textual_inversion.steps=2", "methods.dreambooth.steps=2",
        "protocol.images_per_prompt=1", "protocol.sampler.steps=3", "metrics.names=[clip_t]",
    ])
    assert code == 0, capsys.readouterr()
    states = list((tmp_path / "run" / "states" / "tuning_encoder").glob("dog/*/DONE"))
    assert len(states) == 2  # 0 and 4 steps; dual path on/off share them
    cost = cost_table(read_run(tmp_path / "run")).set_index("cell_id")
    rows = cost[cost["method"] == "tuning_encoder (reconstructed)"]
    assert len(rows) == 4 and (rows["pretrain_steps"] == 12).all() and (rows["pretrain_images"] == 24).all()
    assert (rows["images_done"] == 1).all() and np.isnan(cost.loc["dreambooth", "pretrain_seconds"])
    assert cost.loc["ip_adapter", "images_done"] == 1  # the zero-shot baseline sits in the same report


@pytest.mark.slow
def test_sigkill_during_pretraining_then_the_same_command_resumes(images, tmp_path):
    """A real kill (SIGKILL of the CLI process) at an arbitrary moment, then the same command: it
    resumes from the last complete save and ends with the uninterrupted run's losses."""
    import signal
    import subprocess
    import time

    from tests.helpers import cli_command, cli_env

    def command(out):
        return cli_command("pretrain", "tuning-encoder", "--images", str(images), "--backbone", "tiny", "--out", str(out),
                           "--steps", "30", "--batch-size", "1", "--save-every", "3", "--device", "cpu", "--quiet")

    out = tmp_path / "killed.safetensors"
    progress = resume_dir(out) / "progress.json"
    process = subprocess.Popen(command(out), cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (progress.is_file() and json.loads(progress.read_text())["step"] >= 6):
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = json.loads(progress.read_text())["step"]
    assert 6 <= saved < 30 and saved % 3 == 0 and not out.exists()
    subprocess.run(command(out), cwd=tmp_path, env=cli_env(), check=True, capture_output=True, timeout=600)
    subprocess.run(command(tmp_path / "straight.safetensors"), cwd=tmp_path, env=cli_env(), check=True, capture_output=True, timeout=600)
    killed = json.loads((tmp_path / "killed.safetensors.json").read_text())
    straight = json.loads((tmp_path / "straight.safetensors.json").read_text())
    assert len(killed["losses"]) == 30 and np.allclose(killed["losses"], straight["losses"], atol=1e-6)
    assert (tmp_path / "killed.loss.png").is_file()
