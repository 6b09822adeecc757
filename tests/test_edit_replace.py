"""``subjectbench edit replace`` on the tiny backbone: a trained HiFi Tuner state edits a photo."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmark.cli import main
from data.subjects import load_subjects
from methods.backbones import resolve_backbone
from methods.base import MethodContext
from methods.hifi_tuner import HifiTuner, HifiTunerParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding one published hifi_tuner state of the teapot (store layout, DONE last)."""
    root = tmp_path_factory.mktemp("run")
    teapot = load_subjects("mini", subjects=["teapot"])[0]
    method = HifiTuner(
        HifiTunerParams(steps=2, stepwise_iters=1, stepwise_steps=4, segmenter="grabcut", reference_guidance=False),
        MethodContext(backbone=resolve_backbone("tiny"), resolution=64),
    )
    state = root / "states" / "hifi_tuner" / "teapot" / "k1"
    state.mkdir(parents=True)
    method.prepare(teapot, state, seed=0)
    (state / "DONE").write_text(json.dumps({"fingerprint": method.training_fingerprint(), "subject": "teapot"}))
    return root


def test_replace_writes_the_edit_its_mask_and_record(run_dir, dog, tmp_path, capsys):
    out = tmp_path / "edit.png"
    code = main(["edit", "replace", "--image", str(dog.images[0]), "--subject", "teapot", "--run", str(run_dir),
                 "--word", "dog", "--out", str(out), "--steps", "4", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)
    assert Image.open(tmp_path / "edit-mask.png").size == (64, 64)
    record = json.loads((tmp_path / "edit.json").read_text())
    assert record["source_prompt"] == "a photo of a dog" and record["edited_prompt"] == "a photo of a teapot"
    assert record["embedding"] == "output (c_s)" and record["mode"] == "replace"
    # The new word (position 5) and c_s's 5 positions keep their own maps.
    assert record["own_token_positions"] == [5, 72, 73, 74, 75, 76]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--image": "missing.png"}, "image missing.png does not exist"),
        ({"--word": "cat"}, "the word 'cat' is not in the prompt 'a photo of a dog'"),
        ({"--subject": "duck_toy"}, "subject 'duck_toy' has no trained .* state.*teapot"),
    ],
)
def test_bad_input_is_a_clear_error(run_dir, dog, tmp_path, capsys, change, message):
    import re

    args = {"--image": str(dog.images[0]), "--subject": "teapot", "--run": str(run_dir), "--word": "dog",
            "--prompt": "a photo of a dog", "--out": str(tmp_path / "x.png"), "--steps": "4", "--device": "cpu"}
    args.update(change)
    code = main(["edit", "replace", *[item for pair in args.items() for item in pair]])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()
