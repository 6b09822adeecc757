"""Resume points: a training interrupted mid-way and rerun takes exactly the steps it would have
taken uninterrupted. Each method that trains is run three ways on the tiny backbone (CPU, fp32):
uninterrupted; interrupted right after a resume point (the interruption a killed or preempted
process is, raised from inside the loop); and rerun from that point by a fresh method object.
The rerun's files must equal the uninterrupted run's bit for bit (weights, embeddings, every
intermediate checkpoint, losses, the checkpoint bookkeeping), and its state must say where it
resumed. Then the harness: a CLI run killed with SIGKILL after a point is on disk resumes and
publishes the uninterrupted run's vectors."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.subjects import load_subjects
from methods.backbones import resolve_backbone
from methods.base import MethodContext
from methods.custom_diffusion import CustomDiffusion, CustomDiffusionParams
from methods.dreambooth import DreamBooth, DreamBoothLoRA, DreamBoothLoRAParams, DreamBoothParams
from methods.hifi_tuner import HifiTuner, HifiTunerParams
from methods.textual_inversion import TextualInversion, TextualInversionParams
from methods.training import resume_points
from tests.helpers import REPO_ROOT, cli_command, cli_env, leftovers, run_cli, without_volatile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRIOR = {"class_images": 2, "class_image_steps": 3}
# (method, params, context overrides, the save after which the run is interrupted)
CASES = {
    # batch 2 of 4 images: the image order reshuffles at steps 3, 5, 7 (the replay must draw in order)
    "textual_inversion": (
        TextualInversion, TextualInversionParams(steps=8, batch_size=2, checkpoint_steps=(3,), max_grad_norm=0.05), {}, 2,
    ),
    "dreambooth_captured": (
        DreamBooth, DreamBoothParams(steps=8, learning_rate=1e-3, checkpoint_steps=(3,), **PRIOR),
        {"graph_finetune": True}, 2,
    ),
    "dreambooth_lora": (
        DreamBoothLoRA, DreamBoothLoRAParams(steps=8, learning_rate=1e-2, checkpoint_steps=(3,), **PRIOR), {}, 2,
    ),
    "custom_diffusion": (
        CustomDiffusion, CustomDiffusionParams(steps=8, learning_rate=5e-3, checkpoint_steps=(3,), **PRIOR), {}, 2,
    ),
    # five loops (the main stage, then one per step-wise timestep, 2 steps each; a point after
    # every step): interrupted in the third, after the first two saved points too
    "hifi_tuner": (
        HifiTuner, HifiTunerParams(steps=4, stepwise_iters=2, stepwise_steps=4, reference_dino="random",
                                   segmenter="grabcut", reference_guidance=False), {}, 5,
    ),
}


class Interrupted(KeyboardInterrupt):
    """What Ctrl-C or a dying process is to the loop: raised after the chosen resume point."""


@pytest.fixture(scope="module")
def subjects():
    return load_subjects("mini")


def _context(tmp_path: Path, **overrides) -> MethodContext:
    return MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path / "cache", **overrides)


def _stop_after(save: int):
    saves = []

    def after_save(step: int) -> None:
        saves.append(step)
        if len(saves) == save:
            raise Interrupted(f"interrupted after the resume point of step {step}")

    return after_save


def _train(method, subjects, workdirs, many: bool) -> None:
    if many:
        method.prepare_many(subjects, workdirs, [5, 6])
    else:
        method.prepare(subjects[0], workdirs[0], 5)


def _files(workdir: Path) -> dict[str, Path]:
    return {str(p.relative_to(workdir)): p for p in sorted(workdir.rglob("*")) if p.is_file()}


def _assert_same_training(reference: Path, resumed: Path) -> dict:
    """Every file equal (JSON without its timing figures); the resumed state's training summary."""
    ours, theirs = _files(reference), _files(resumed)
    assert sorted(ours) == sorted(theirs)
    summary = {}
    for name, path in ours.items():
        other = theirs[name]
        if name.endswith(".safetensors"):
            a, b = load_file(path), load_file(other)
            assert sorted(a) == sorted(b), name
            for key in a:
                assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming"
        elif name.endswith(".json"):
            # without timing figures, how it was run, and whether the shared class-prior cache was
            # filled by this run; the training summaries' losses are compared
            a, b = (without_volatile(json.loads(p.read_text())) for p in (path, other))
            for data in (a, b):
                for key in [k for k in data if k in ("stage_seconds", "class_images_generated")]:
                    data.pop(key)
            raw = json.loads(other.read_text())
            summary = raw.get("training") or raw.get("tuning") or summary  # the tuning encoder's is "tuning"
            assert a == b, name
        else:
            assert path.read_bytes() == other.read_bytes(), name
    return summary


def _three_ways(build, chosen, many: bool, tmp_path: Path, every: int, stop: int):
    """Train ``chosen`` uninterrupted (``reference``), then interrupted after the ``stop``-th
    resume point (one every ``every`` steps) and rerun by a fresh method (``resumed``); the loops'
    point files as the interruption left them, and the steps the rerun saved points at."""
    reference = [tmp_path / f"reference-{s.id}" for s in chosen]
    resumed = [tmp_path / f"resumed-{s.id}" for s in chosen]
    for folder in reference + resumed:
        folder.mkdir()
    _train(build(), chosen, reference, many)
    points = tmp_path / "points"
    with pytest.raises(Interrupted), resume_points(points, every_steps=every, after_save=_stop_after(stop)):
        _train(build(), chosen, resumed, many)
    loops = sorted(points.glob("loop-*.json"))
    assert loops, "no resume point was saved"
    loops = [(p, p.read_text()) for p in loops]
    saved_steps = []
    with resume_points(points, every_steps=every, after_save=saved_steps.append):
        _train(build(), chosen, resumed, many)  # a fresh object, as a new process has
    return reference, resumed, [_Frozen(p, text) for p, text in loops], saved_steps


class _Frozen:
    """A point file's name and its text as the interruption left it (the rerun rewrites it)."""

    def __init__(self, path: Path, text: str) -> None:
        self.name, self._text = path.name, text

    def read_text(self) -> str:
        return self._text


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tuning encoder pre-trained for a few steps on the mini subjects' photos."""
    from methods.tuning_encoder_pretrain import PretrainOptions, pretrain

    out = tmp_path_factory.mktemp("encoder") / "enc.safetensors"
    pretrain(PretrainOptions(images=str(load_subjects("mini")[0].images[0].parent), out=str(out), backbone="tiny",
                             steps=4, batch_size=2, learning_rate=1e-2, save_every=100, device="cpu"))
    return out


@pytest.mark.parametrize("case", sorted(CASES) + ["textual_inversion_pass", "two_stage", "tuning_encoder"])
def test_an_interrupted_training_resumes_to_the_uninterrupted_result(case, subjects, tmp_path, request):
    many = case.endswith("_pass")
    chosen = subjects[:2] if many else subjects[:1]
    if case == "two_stage":  # two loops on one photo, one generator: interrupted in the second
        from data.single_image import training_view
        from methods.single_image import TwoStage, TwoStageParams

        cls, overrides, stop = TwoStage, {}, 4
        params = TwoStageParams(stage1_steps=6, steps=8, stage1_learning_rate=1e-3, learning_rate=1e-3,
                                checkpoint_steps=(3,), **PRIOR)
        chosen = [training_view(subjects[0], 0).subject]
    elif case == "tuning_encoder":  # an extra loss term (the regularizer), a predicted conditioning
        from methods.tuning_encoder import TuningEncoder, TuningEncoderParams

        encoder = request.getfixturevalue("encoder")
        cls, params, overrides, stop = TuningEncoder, TuningEncoderParams(encoder=str(encoder), tuning_steps=8), {}, 2
    else:
        cls, params, overrides, stop = CASES[case.removesuffix("_pass")]
    every = 1 if case == "hifi_tuner" else 2
    reference, resumed, loops, saved_steps = _three_ways(
        lambda: cls(params, _context(tmp_path, **overrides)), chosen, many, tmp_path, every, stop)
    interrupted_at = json.loads(loops[-1].read_text())["step"]
    for ref, res in zip(reference, resumed):
        summary = _assert_same_training(ref, res)
    if case == "two_stage":  # stage I resumed after its step 4 (of 6), stage II after its 4 (of 8)
        assert interrupted_at == 4 and saved_steps == [6]
    elif case != "hifi_tuner":  # one loop: it resumed after the point's step and saved only later ones
        assert interrupted_at == 4
        assert summary.get("resumed_from_step") == interrupted_at
        assert saved_steps == [6]
    else:  # interrupted in the third loop; the two before it resumed from their own points
        assert [p.name for p in loops] == ["loop-0.json", "loop-1.json", "loop-2.json"]
        assert saved_steps == [1, 1]  # the last two loops' first steps; the first three had saved theirs


def test_a_point_for_another_training_is_ignored(subjects, tmp_path, caplog):
    """A point whose loop differs (here: more steps) is not restored; the training starts over
    and equals an uninterrupted one."""
    context = _context(tmp_path)
    points = tmp_path / "points"
    short = TextualInversionParams(steps=6)
    folder = tmp_path / "a"
    folder.mkdir()
    with pytest.raises(Interrupted), resume_points(points, every_steps=2, after_save=_stop_after(1)):
        TextualInversion(short, context).prepare(subjects[0], folder, 5)
    longer = TextualInversionParams(steps=8)
    resumed, reference = tmp_path / "b", tmp_path / "c"
    resumed.mkdir()
    reference.mkdir()
    with resume_points(points, every_steps=0):
        TextualInversion(longer, context).prepare(subjects[0], resumed, 5)
    TextualInversion(longer, context).prepare(subjects[0], reference, 5)
    assert "is for another training" in caplog.text
    summary = _assert_same_training(reference, resumed)
    assert "resumed_from_step" not in summary


def test_a_checkpoint_hook_without_bookkeeping_saves_points_only_before_its_first_checkpoint(tmp_path):
    """train_loop's own rule, on a real tiny UNet: with on_checkpoint but no checkpoint_state, no
    point is saved at or after the first intermediate checkpoint (its bookkeeping would be lost)."""
    from methods.backbones import load_backbone
    from methods.diffusion import make_noise_scheduler
    from methods.training import TrainBatch, TrainingParams, train_loop

    backbone = load_backbone(resolve_backbone("tiny"), "cpu", torch.float32)
    unet = copy.deepcopy(backbone.unet)  # the cached backbone stays untouched
    parameters = list(unet.parameters())[-2:]
    for tensor in parameters:
        tensor.requires_grad_(True)
    latents = torch.zeros(1, unet.config.in_channels, 8, 8)
    hidden = torch.zeros(1, 4, unet.config.cross_attention_dim)
    saved = []
    with resume_points(tmp_path / "points", every_steps=1, after_save=saved.append):
        train_loop(
            unet=unet, noise_scheduler=make_noise_scheduler(backbone), parameters=parameters,
            params=TrainingParams(steps=6, checkpoint_steps=(4,)), learning_rate=1e-4,
            next_batch=lambda step: TrainBatch(latents, ["x"]), encode_prompts=lambda prompts: hidden,
            generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), dtype=torch.float32,
            on_checkpoint=lambda step: None,
        )
    assert saved == [1, 2, 3]


def _vectors(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted((run_dir / "states").rglob("learned_embeds.safetensors")):
        for key, value in load_file(path).items():
            out[f"{path.parent.parent.name}/{path.parent.name}/{key}"] = value  # subject/prepare key/tensor
    return out


@pytest.mark.slow
def test_a_killed_run_resumes_its_training_through_the_cli(tmp_path):
    """SIGKILL (a preempted machine) after a resume point is on disk; the rerun resumes the pass
    from it (the log says so), publishes the same vectors as an uninterrupted run, and leaves no
    resume folder behind."""
    args = ["run", "default", "methods=textual_inversion", "metrics.names=[]", "subjects=dog,teapot",
            "protocol.prompts=[0]", "protocol.images_per_prompt=1", "protocol.prior_images=0",
            "protocol.sampler.steps=4", "methods.textual_inversion.steps=150", "training.resume_every=0.05", "--quiet"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(cli_command(*args, "--out", str(killed)), cwd=REPO_ROOT, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not list((killed / "resume").glob("*/points/loop-0.json")):
            assert process.poll() is None, "the run ended before its first resume point"
            assert time.monotonic() < deadline, "no resume point within 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    point = json.loads(next((killed / "resume").glob("*/points/loop-0.json")).read_text())
    assert point["step"] < 150
    status = run_cli("status", str(killed))
    assert "interrupted trainings that the next run resumes (1" in status.stdout, status.stdout
    assert f"(dog, teapot): loop-0 at step {point['step']}/150" in status.stdout, status.stdout
    assert not list((killed / "states").rglob("DONE"))
    rerun = run_cli(*args, "--out", str(killed))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (killed / "run.log").read_text()
    assert "training resumed at step" in log
    dones = [json.loads(p.read_text()) for p in (killed / "states").rglob("DONE")]
    assert len(dones) == 2 and all(d["resumed"][0]["step"] >= point["step"] for d in dones), dones
    assert not (killed / "resume").exists()  # every space gone, and the empty folder with them
    assert leftovers(killed) == []
    reference = tmp_path / "reference"
    whole = run_cli(*args, "--out", str(reference))
    assert whole.returncode == 0, whole.stderr[-3000:]
    ours, theirs = _vectors(reference), _vectors(killed)
    assert sorted(ours) == sorted(theirs) and len(ours) == 2
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["dreambooth_lora_captured", "textual_inversion_pass_compiled"])
def test_a_resumed_gpu_training_continues_where_it_stopped(case, subjects, tmp_path):
    """On a GPU (bf16; LoRA's steps captured as CUDA graphs, AdamW's step counters on the device;
    TI's pass through the compiled UNet): the resumed run restores into those optimizers and
    continues; its losses match the uninterrupted run's within bf16 run-to-run spread (a GPU run
    is not bit-reproducible without --deterministic), and its state says it resumed."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    many = case.startswith("textual")
    context = _context(tmp_path, device="cuda", dtype="bfloat16", graph_finetune=not many, compile_training=many)
    if many:
        cls, params = TextualInversion, TextualInversionParams(steps=12, batch_size=2)
    else:
        cls, params = DreamBoothLoRA, DreamBoothLoRAParams(steps=12, learning_rate=1e-2, checkpoint_steps=(5,), **PRIOR)
    chosen = subjects[:2] if many else subjects[:1]
    reference, resumed, _, _ = _three_ways(lambda: cls(params, context), chosen, many, tmp_path, 3, 2)
    for ref, res in zip(reference, resumed):
        a, b = json.loads((ref / "state.json").read_text()), json.loads((res / "state.json").read_text())
        assert b["training"]["resumed_from_step"] == 6
        assert sorted(a["checkpoints"]) == sorted(b["checkpoints"])
        if not many:
            assert b["training"]["cuda_graphs"] == "captured"
        assert len(a["losses"]) == len(b["losses"]) == 12
        assert torch.allclose(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=2e-2, atol=1e-3), (
            a["losses"], b["losses"])


def test_resume_spaces_keep_a_point_unless_forced_and_go_once_published(tmp_path):
    from benchmark.store import Store

    store = Store(tmp_path / "run")
    space = store.resume_space("k1", ["k1"])
    work = store.resume_workdir(space, "dog", "k1")
    (work / "learned_embeds-step-3.safetensors").write_bytes(b"x")
    assert store.resume_space("k1", ["k1"]) == space and not work.exists()  # no point: emptied
    work = store.resume_workdir(space, "dog", "k1")
    (work / "file").write_bytes(b"x")
    (space / "points").mkdir()
    (space / "points" / "loop-0.json").write_text(json.dumps({"step": 40, "identity": {"steps": 100}}))
    (space / "points" / "loop-1.json").write_text("{")
    store.resume_space("k1", ["k1"])
    assert (work / "file").exists()  # a point: kept for the rerun
    from benchmark.status import _resume_points

    assert _resume_points(store) == ["k1 (dog): loop-0 at step 40/100; loop-1 unreadable (the training starts over)"]
    store.resume_space("k1", ["k1"], fresh=True)
    assert not (work / "file").exists()  # --force: from step 0
    other = store.resume_space("pass-ab", ["k1", "k2"])
    unrelated = store.resume_space("k3", ["k3"])
    store.discard_resume(["k2"])
    assert space.exists() and not other.exists() and unrelated.exists()
    store.discard_resume(["k1"])
    assert not space.exists() and unrelated.exists()



def test_a_pass_of_two_single_image_views_of_one_subject_resumes(tmp_path):
    """Two single-image views of one subject share its id but not their keys: trained in one
    pass, each keeps its own working folder, and a pass interrupted after a resume point and
    rerun publishes both states equal to an uninterrupted run's."""
    from benchmark.config import load_config
    from benchmark.driver import run_benchmark
    from methods import training

    overrides = ["methods=textual_inversion", "methods.textual_inversion.steps=6", "metrics.names=[]",
                 "subjects=dog", "protocol.single_image=[0,1]", "protocol.prompts=[0]",
                 "protocol.images_per_prompt=1", "protocol.prior_images=0", "protocol.sampler.steps=4",
                 "training.subjects_per_batch=2"]
    reference = run_benchmark(load_config("default", overrides), tmp_path / "reference", quiet=True)
    assert reference.done == 2

    saves = []
    original = training._LoopResume.due

    def due_every_two(self, step):  # points at steps 2 and 4, interrupted after the first
        return step < self.last_step and step % 2 == 0

    def interrupt(self, step, tensors, meta, save=training._LoopResume.save):
        save(self, step, tensors, meta)
        saves.append(step)
        if len(saves) == 1:
            raise Interrupted("after the point of step 2")

    run = tmp_path / "run"
    try:
        training._LoopResume.due = due_every_two
        training._LoopResume.save, saved = interrupt, training._LoopResume.save
        with pytest.raises(KeyboardInterrupt):
            run_benchmark(load_config("default", overrides), run, quiet=True)
        training._LoopResume.save = saved
        works = sorted(p.name for p in (run / "resume").glob("*/work/*"))
        assert len(works) == 2 and {w.rsplit("-", 1)[0] for w in works} == {"dog"}
        resumed = run_benchmark(load_config("default", overrides), run, quiet=True)
    finally:
        training._LoopResume.due, training._LoopResume.save = original, saved
    assert resumed.done == 2 and "training resumed at step 3" in (run / "run.log").read_text()
    ours, theirs = _vectors(tmp_path / "reference"), _vectors(run)
    assert len(ours) == 2 and sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
