"""Multi-subject Textual Inversion: several subjects' vectors in one pass of the frozen models,
each equal to its alone-trained self (stated tolerance), stored exactly as alone; the harness's
passes, their fallback when a pass fails, and resumption after a kill mid-pass."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.units import expand, method_context, training_passes
from data.subjects import load_subjects
from methods.backbones import resolve_backbone
from methods.base import MethodContext, SamplerConfig
from methods.textual_inversion import TextualInversion, TextualInversionParams
from tests.helpers import REPO_ROOT, cli_command, cli_env, leftovers, run_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Stated tolerance (tiny backbone, fp32, CPU): the batched text encoder and UNet round a few
# operations differently from batch 2 (GEMM blocking), about 1e-7 per step; over 10 steps the
# learned vectors stay within VECTOR_ATOL of the alone-trained ones (measured: 2e-6) and images
# generated from them within one 8-bit level.
VECTOR_ATOL = 1e-5
LOSS_RTOL = 1e-5
PIXEL_LEVELS = 1
STEPS = 10
SEEDS = (11, 12, 13)


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> MethodContext:
    return MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path_factory.mktemp("multi-cache"))


@pytest.fixture(scope="module")
def subjects():
    return load_subjects("mini")


def _train_alone(method, subjects, seeds, root: Path) -> list[Path]:
    out = []
    for subject, seed in zip(subjects, seeds):
        workdir = root / f"alone-{subject.id}"
        workdir.mkdir()
        method.prepare(subject, workdir, seed)
        out.append(workdir)
    return out


def _train_together(method, subjects, seeds, root: Path, name: str) -> list[Path]:
    workdirs = [root / f"{name}-{s.id}" for s in subjects]
    for workdir in workdirs:
        workdir.mkdir()
    method.prepare_many(subjects, workdirs, seeds)
    return workdirs


@pytest.fixture(scope="module")
def trained(context, subjects, tmp_path_factory):
    """The 3 mini subjects alone, together, and together in reversed order (10 steps, a
    checkpoint at 10, per-subject gradient clipping active)."""
    params = TextualInversionParams(steps=STEPS, checkpoint_steps=(5,), max_grad_norm=0.05)
    method = TextualInversion(params, context)
    root = tmp_path_factory.mktemp("multi")
    alone = _train_alone(method, subjects, SEEDS, root)
    together = _train_together(method, subjects, SEEDS, root, "together")
    reversed_ = _train_together(method, subjects[::-1], SEEDS[::-1], root, "reversed")[::-1]
    return method, alone, together, reversed_


def _vectors(workdir: Path, name: str) -> torch.Tensor:
    tensors = load_file(str(workdir / name))
    assert len(tensors) == 1
    return next(iter(tensors.values()))


def test_each_subject_in_a_pass_equals_itself_trained_alone(trained, subjects):
    method, alone, together, reversed_ = trained
    for subject, solo, *batched in zip(subjects, alone, together, reversed_):
        solo_files = sorted(p.name for p in solo.iterdir())
        assert solo_files == ["learned_embeds-step-5.safetensors", "learned_embeds.safetensors", "state.json"]
        solo_state = json.loads((solo / "state.json").read_text())
        for workdir in batched:
            assert sorted(p.name for p in workdir.iterdir()) == solo_files
            state = json.loads((workdir / "state.json").read_text())
            # the same layout, key for key, down to the training summary
            assert state.keys() == solo_state.keys() and state["training"].keys() == solo_state["training"].keys()
            for key in ("subject", "seed", "placeholder_token", "tokens", "initializer", "checkpoints"):
                assert state[key] == solo_state[key], key
            np.testing.assert_allclose(state["losses"], solo_state["losses"], rtol=LOSS_RTOL)
            for name in ("learned_embeds.safetensors", "learned_embeds-step-5.safetensors"):
                a, b = _vectors(solo, name), _vectors(workdir, name)
                assert torch.allclose(a, b, rtol=0, atol=VECTOR_ATOL), (subject.id, name, (a - b).abs().max())
        # training moved the vectors far beyond the tolerance, so the check above can fail
        initial, _ = method.initial_vectors(method._backbone(), subject)
        assert (_vectors(solo, "learned_embeds.safetensors") - initial).abs().max() > 100 * VECTOR_ATOL


def test_subjects_are_independent_in_a_pass(trained):
    """Were the vectors coupled (a shared loss mean, global clipping, one noise stream), the same
    subject would learn something else next to other subjects or at another position."""
    _, alone, together, reversed_ = trained
    moved = [(_vectors(a, "learned_embeds.safetensors") - _vectors(t, "learned_embeds.safetensors")).abs().max() for a, t in zip(alone, together)]
    assert max(moved) <= VECTOR_ATOL
    # and the subjects did learn different things (no accidental sharing of one tensor)
    finals = [_vectors(t, "learned_embeds.safetensors") for t in together]
    assert not torch.allclose(finals[0] - finals[0].mean(), finals[1] - finals[1].mean(), atol=1e-3)
    assert all(reversed_)


def test_images_from_a_pass_match_images_from_alone(trained, subjects):
    method, alone, together, _ = trained
    sampler = SamplerConfig(steps=8)
    for subject, solo, batched in zip(subjects, alone, together):
        prompt = f"a photo of {method.placeholder(subject)}"
        images = [
            np.asarray(method.generate(method.load_state(w, subject), "final", [prompt], [5], sampler)[0], dtype=np.int16)
            for w in (solo, batched)
        ]
        assert np.abs(images[0] - images[1]).max() <= PIXEL_LEVELS, subject.id


def test_clipping_is_per_subject(context, subjects, tmp_path):
    """A tight max_grad_norm: a global norm over the pass would shrink each subject's step by
    the others' gradients; per-tensor clipping keeps each equal to alone."""
    params = TextualInversionParams(steps=3, max_grad_norm=1e-4, flip_p=0.0)
    method = TextualInversion(params, context)
    alone = _train_alone(method, subjects[:2], SEEDS[:2], tmp_path)
    together = _train_together(method, subjects[:2], SEEDS[:2], tmp_path, "together")
    for a, b in zip(alone, together):
        assert torch.allclose(_vectors(a, "learned_embeds.safetensors"), _vectors(b, "learned_embeds.safetensors"), rtol=0, atol=VECTOR_ATOL)


def test_only_plain_textual_inversion_in_fp32_or_bf16_prepares_many(context):
    from methods.hifi_tuner import HifiTuner, HifiTunerParams

    assert TextualInversion(TextualInversionParams(), context).prepares_many()
    half = MethodContext(backbone=context.backbone, dtype="float16")
    assert not TextualInversion(TextualInversionParams(), half).prepares_many()  # one scaler for all
    assert not HifiTuner(HifiTunerParams(), context).prepares_many()  # masks, extra losses


# ----------------------------------------------------------------------------- harness

TI_RUN = [
    "methods=textual_inversion", "methods.textual_inversion.steps=6", "metrics.names=[]",
    "protocol.prompts=[0]", "protocol.images_per_prompt=1", "protocol.prior_images=0",
    "protocol.sampler.steps=4",
]


def _config(*overrides: str):
    return load_config("default", [*TI_RUN, *overrides])


def test_passes_group_batchable_trainings_up_to_the_limit():
    config = load_config("default", [
        "methods=textual_inversion,dreambooth", "methods.textual_inversion.learning_rate=[0.05,0.1]",
        "metrics.names=[]",
    ])
    plan = expand(config, method_context(config, "cpu", "float32"))
    passes = training_passes(plan.groups, plan.context, 2)
    labels = [[(plan.groups[i].prepare.cell.cell_id, plan.groups[i].prepare.subject.id) for i in p] for p in passes]
    ti_low, ti_high = "textual_inversion[learning_rate=0.05]", "textual_inversion[learning_rate=0.1]"
    assert labels == [
        [(ti_low, "dog"), (ti_low, "duck_toy")], [(ti_low, "teapot")],
        [(ti_high, "dog"), (ti_high, "duck_toy")], [(ti_high, "teapot")],
        [("dreambooth", "dog")], [("dreambooth", "duck_toy")], [("dreambooth", "teapot")],
    ]
    assert sorted(i for p in passes for i in p) == list(range(len(plan.groups)))
    assert [len(p) for p in training_passes(plan.groups, plan.context, 1)] == [1] * len(plan.groups)


def _states(run_dir: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in (run_dir / "states" / "textual_inversion").glob("*/*") if (p / "DONE").is_file()}


def test_a_run_trains_subjects_in_one_pass_and_stores_them_as_alone(tmp_path):
    together = run_benchmark(_config("training.subjects_per_batch=8"), tmp_path / "together", quiet=True)
    alone = run_benchmark(_config("training.subjects_per_batch=1"), tmp_path / "alone", quiet=True)
    assert together.exit_code == alone.exit_code == 0 and together.done == alone.done == 3
    batched, solo = _states(tmp_path / "together"), _states(tmp_path / "alone")
    assert batched.keys() == solo.keys() == {"dog", "duck_toy", "teapot"}
    for subject, folder in batched.items():
        info = json.loads((folder / "DONE").read_text())
        assert info["subjects_in_pass"] == 3 and info["seconds"] == pytest.approx(info["pass_seconds"] / 3)
        assert folder.name == solo[subject].name  # the same prepare key: stored where alone would be
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in solo[subject].iterdir())
        a, b = _vectors(folder, "learned_embeds.safetensors"), _vectors(solo[subject], "learned_embeds.safetensors")
        assert torch.allclose(a, b, rtol=0, atol=VECTOR_ATOL)
    for png in (tmp_path / "alone" / "images").rglob("*.png"):
        other = tmp_path / "together" / png.relative_to(tmp_path / "alone")
        from PIL import Image

        difference = np.abs(np.asarray(Image.open(png), np.int16) - np.asarray(Image.open(other), np.int16))
        assert difference.max() <= PIXEL_LEVELS, png.name


def test_a_failing_pass_falls_back_to_each_subject_alone(tmp_path, monkeypatch):
    """One subject that cannot train fails the pass; the others still train (alone) and only
    that subject's failure is recorded."""
    original = TextualInversion._training_setup

    def broken_for_teapot(self, backbone, subject, seed):
        if subject.id == "teapot":
            raise ValueError("teapot cannot be learned")
        return original(self, backbone, subject, seed)

    monkeypatch.setattr(TextualInversion, "_training_setup", broken_for_teapot)
    summary = run_benchmark(_config(), tmp_path / "run", quiet=True)
    assert [(f["stage"], f["subject"]) for f in summary.failed] == [("prepare", "teapot")]
    assert "teapot cannot be learned" in summary.failed[0]["message"]
    states = _states(tmp_path / "run")
    assert states.keys() == {"dog", "duck_toy"}
    assert all("subjects_in_pass" not in json.loads((p / "DONE").read_text()) for p in states.values())
    assert summary.done == 2
    # the pass left nothing behind; teapot's own failed attempt leaves its working folder in its
    # resume space (kept for --retry-failed, emptied there as it holds no resume point)
    assert leftovers(tmp_path / "run") == []
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "run" / "resume").glob("*/work/*")] == ["teapot"]


def test_a_pass_out_of_gpu_memory_is_split_not_dropped_to_alone(tmp_path, monkeypatch):
    """A GPU that holds 2 subjects per pass: the pass of 3 runs out of memory, is retried as a pass
    of 2 and one alone, and every state equals its alone-trained one (the CPU raises CUDA's OOM
    error where a real GPU would)."""
    original = TextualInversion.prepare_many
    sizes: list[int] = []

    def holds_two(self, subjects, workdirs, seeds):
        sizes.append(len(subjects))
        if len(subjects) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, subjects, workdirs, seeds)

    monkeypatch.setattr(TextualInversion, "prepare_many", holds_two)
    summary = run_benchmark(_config("training.subjects_per_batch=8"), tmp_path / "split", quiet=True)
    assert summary.exit_code == 0 and summary.done == 3 and not summary.failed
    assert sizes == [3, 2]
    log = (tmp_path / "split" / "run.log").read_text()
    assert "ran out of GPU memory" in log and "passes of 2 and 1" in log
    states = _states(tmp_path / "split")
    in_pass = {s: json.loads((p / "DONE").read_text()).get("subjects_in_pass") for s, p in states.items()}
    assert sorted(in_pass.values(), key=str) == [2, 2, None]  # a pass of two, the third alone
    assert leftovers(tmp_path / "split") == []  # the failed pass's workdirs are gone
    alone = run_benchmark(_config("training.subjects_per_batch=1"), tmp_path / "alone", quiet=True)
    assert alone.done == 3
    for subject, folder in _states(tmp_path / "alone").items():
        a, b = _vectors(states[subject], "learned_embeds.safetensors"), _vectors(folder, "learned_embeds.safetensors")
        assert torch.allclose(a, b, rtol=0, atol=VECTOR_ATOL), subject


@pytest.mark.slow
def test_sigkill_mid_pass_then_rerun_gives_identical_results(tmp_path):
    args = [*TI_RUN, "methods.textual_inversion.steps=60", "--quiet"]
    reference = tmp_path / "reference"
    run_cli("run", "default", *args, "--out", str(reference), check=True)
    victim = tmp_path / "victim"
    process = subprocess.Popen(
        cli_command("run", "default", *args, "--out", str(victim)),
        cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((victim / "resume").glob("*/work/*"))) == 3:  # the pass's three workdirs
            break
        time.sleep(0.01)
    time.sleep(1.0)  # well inside the 60-step pass (a few CPU seconds at least)
    assert process.poll() is None, "the run finished before it could be killed mid-pass"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not _states(victim)
    run_cli("run", "default", *args, "--out", str(victim), check=True)
    assert leftovers(victim) == []
    assert snapshot(victim) == snapshot(reference)


def test_passes_are_balanced_so_a_compiled_pass_sees_few_shapes():
    from benchmark.units import balanced_chunks

    sizes = lambda n, limit: [len(c) for c in balanced_chunks(list(range(n)), limit)]  # noqa: E731
    assert sizes(30, 8) == [8, 8, 7, 7]
    assert sizes(30, 16) == [15, 15]
    assert sizes(3, 2) == [2, 1]
    assert sizes(8, 8) == [8]
    assert sizes(0, 8) == []
    assert sizes(5, 1) == [1] * 5
    assert sum(balanced_chunks(list(range(17)), 4), []) == list(range(17))  # order kept, nothing lost
