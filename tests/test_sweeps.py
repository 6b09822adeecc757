"""Sweeps that never retrain, through the harness: DreamBooth and a 2 × 2 DreamBlend grid over
generation-only knobs share one DreamBooth training per subject; the shipped sweep suites load
and expand as documented."""

from __future__ import annotations

import hashlib
import json

import pytest

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.units import expand, method_context
from tests.helpers import run_cli

TRAINING = {
    "steps": 6, "learning_rate": 1e-3, "checkpoint_steps": "[2,4]", "class_images": 2, "class_image_steps": 3,
    "collapse_prompts": 1,
}


def _overrides(*extra: str) -> list[str]:
    out = ["methods=dreambooth,dreamblend", "metrics.names=[]", "subjects=dog", "protocol.prompts=[0]",
           "protocol.images_per_prompt=1", "protocol.prior_images=1", "protocol.sampler.steps=4"]
    for method in ("dreambooth", "dreamblend"):
        out += [f"methods.{method}.{key}={value}" for key, value in TRAINING.items()]
    out += ["methods.dreamblend.underfit_step=2", "methods.dreamblend.overfit_step=4", "methods.dreamblend.guidance_weight=[0,50]",
            "methods.dreamblend.guided_tokens=[all,subject]"]
    return [*out, *extra]


def test_a_2x2_dreamblend_grid_plans_one_training_per_subject():
    cfg = load_config("default", _overrides("subjects=dog,teapot"))
    plan = expand(cfg, method_context(cfg, "cpu", "float32"))
    assert len(plan.groups) == 2  # one training per subject, shared by dreambooth and the 4 dreamblend cells
    assert {group.prepare.trainer for group in plan.groups} == {"dreambooth"}
    assert all(len(group.cells) == 5 for group in plan.groups)
    # a training-relevant change to the DreamBlend entry alone splits the training again
    split = load_config("default", _overrides("methods.dreamblend.learning_rate=2e-3"))
    assert len(expand(split, method_context(split, "cpu", "float32")).groups) == 2


@pytest.mark.slow  # ~90 s on a shared 2-core CPU: a real run, status and report
def test_a_2x2_dreamblend_grid_trains_once_per_subject(tmp_path):
    cfg = load_config("default", _overrides())
    summary = run_benchmark(cfg, tmp_path, quiet=True)
    assert summary.exit_code == 0
    done = sorted((tmp_path / "states").glob("*/*/*/DONE"))
    assert len(done) == 1 and done[0].parts[-4] == "dreambooth"  # trainings counted on disk
    assert "trainings: 1 for 5 method cells × 1 subjects" in run_cli("status", str(tmp_path)).stdout
    # weight 0 through the harness: the images of DreamBooth's overfit checkpoint (step 4), bit for bit
    records = [json.loads(p.read_text()) for p in (tmp_path / "images").rglob("*.json")]

    def png(record):
        path = next((tmp_path / "images").rglob(f"{record['key']}.png"))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    booth = {(r["prompt_text"], r["seed"]): png(r) for r in records if r["label"] == "dreambooth" and r["checkpoint"] == "step-4"}
    blend_zero = [r for r in records if r["label"] == "dreamblend" and r["grid"].get("guidance_weight") == 0]
    assert len(blend_zero) == 4  # (all, subject) tokens × (eval, prior) images
    assert all(png(r) == booth[(r["prompt_text"], r["seed"])] for r in blend_zero)
    guided = [r for r in records if r["label"] == "dreamblend" and r["grid"].get("guidance_weight") == 50
              and r["role"] == "eval"]
    assert any(png(r) != booth[(r["prompt_text"], r["seed"])] for r in guided)
    # the collapse diagnostic of the shared state reaches the report
    run_cli("report", str(tmp_path), check=True)
    assert (tmp_path / "report" / "plots" / "attention_collapse.png").is_file()


@pytest.mark.parametrize(
    ("suite", "labels"),
    [
        ("dreambooth_sweep", {"dreambooth"}),
        ("custom_diffusion_sweep", {"custom_diffusion"}),
        ("dreamblend_pareto", {"dreambooth", "DreamBlend (reconstructed)", "custom_diffusion"}),
    ],
)
def test_sweep_suites_load_and_share_trainings(suite, labels):
    cfg = load_config(suite, ["dataset.source=mini"])
    plan = expand(cfg, method_context(cfg, "cpu", "float32"))
    assert {cell.label for cell in plan.cells} == labels
    trainers = {group.prepare.trainer for group in plan.groups}
    # one training per (trainer, subject): DreamBlend's cells ride on DreamBooth's
    assert len(plan.groups) == len(trainers) * len(plan.subjects)
    assert len({u.cell_id for u in plan.image_units}) > len(plan.groups)
