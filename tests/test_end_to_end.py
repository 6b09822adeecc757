"""End to end: the embedded default through the CLI; scoring is cached, incremental and
survives SIGKILL; `score` recomputes only what is missing."""

from __future__ import annotations

import signal
import subprocess
import time

import pandas as pd
import pytest

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.results import load_scores
from benchmark.store import Store
from tests.helpers import REPO_ROOT, cli_command, cli_env, leftovers, run_cli, snapshot

DUMMY = ["methods=dummy", "protocol.prompts=[0,20]", "subjects=dog,teapot"]


def test_embedded_default_runs_and_reports_all_three_methods(tmp_path):
    result = run_cli("run", "--out", str(tmp_path / "run"), "--quiet", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "report:" in result.stdout and "0 unit failures" in result.stdout
    frame = pd.read_parquet(tmp_path / "run" / "report" / "results.parquet")
    assert set(frame["method"]) == {"textual_inversion", "dreambooth", "dreambooth_lora"}
    assert set(frame["metric"]) == {"clip_t", "clip_i", "dino", "div", "pres", "copy", "copy_nn", "copy_real",
                                    "dino_s16_squash", "clip_t_identifier", "clip_t_clipscore"}
    assert set(frame.loc[frame["method"] == "dreambooth", "checkpoint"]) == {"step-15", "final"}
    # 3 subjects × (3 prompts × 2 images + 2 prior) × (1 + 2 + 1 checkpoints)
    assert frame["key"].nunique() == 3 * 8 * 4
    leaderboard = (tmp_path / "run" / "report" / "leaderboard.md").read_text()
    for method in ("textual_inversion", "dreambooth", "dreambooth_lora"):
        assert method in leaderboard
    assert "smoke numbers, not measurements" in leaderboard.lower()


def test_scores_are_cached_and_only_missing_or_changed_values_are_computed(tmp_path):
    config = load_config("default", DUMMY)
    first = run_benchmark(config, tmp_path, quiet=True)
    # eval images: 2 subjects × 2 prompts × 2 = 8, scored by 10 metrics (4 + the copy check's 3 +
    # 3 convention variants); prior: 2 × 2 by pres.
    assert first.scored == 8 * 10 + 4
    before = load_scores(Store(tmp_path))
    again = run_benchmark(config, tmp_path, quiet=True)
    assert again.scored == 0

    result = run_cli("score", str(tmp_path), "--quiet")
    assert result.returncode == 0 and result.stdout.startswith("0 scores computed")

    # One more image per prompt: new images are scored, and DIV is recomputed for whole groups
    # because every image's siblings changed; nothing else is recomputed.
    bigger = load_config("default", [*DUMMY, "protocol.images_per_prompt=3"])
    grown = run_benchmark(bigger, tmp_path, quiet=True)
    new_eval = 4  # 2 subjects × 2 prompts × 1 new image
    assert grown.scored == new_eval * 9 + (8 + new_eval)
    after = load_scores(Store(tmp_path))
    merged = before.merge(after, on=["key", "metric"], suffixes=("_before", "_after"))
    unchanged = merged[merged["metric"] != "div"]
    assert (unchanged["value_before"] == unchanged["value_after"]).all()

    # A different metric setting is a new fingerprint: everything for that metric is recomputed,
    # the old scores stay in the store.
    result = run_cli("score", str(tmp_path), "metrics.lpips_net=vgg", "--quiet")
    assert result.returncode == 0 and result.stdout.startswith("12 scores computed")
    assert len(list((tmp_path / "scores" / "div").iterdir())) == 2


def test_score_rejects_non_metric_overrides(tmp_path):
    run_benchmark(load_config("default", [*DUMMY, "metrics.names=[]"]), tmp_path, quiet=True)
    result = run_cli("score", str(tmp_path), "protocol.seed=3")
    assert result.returncode == 2 and "only metrics.* settings can change" in result.stderr


def test_sigkill_during_scoring_then_rerun_gives_identical_scores(tmp_path):
    args = ["run", "default", *DUMMY, "--quiet", "--no-report"]
    reference = tmp_path / "reference"
    run_cli(*args, "--out", str(reference), check=True)
    victim = tmp_path / "victim"
    process = subprocess.Popen(
        cli_command(*args, "--out", str(victim)), cwd=REPO_ROOT, env=cli_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if list((victim / "scores").glob("*/*/part-*.parquet")):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (victim / "scores" / "current.json").exists(), "scoring finished before the kill"
    run_cli(*args, "--out", str(victim), check=True)
    assert leftovers(victim) == []
    assert snapshot(victim) == snapshot(reference)


@pytest.mark.parametrize("bad", ["--gpus 1", "--shard 3/3"])
def test_bad_executor_options_are_named(tmp_path, bad):
    result = run_cli("run", "default", *DUMMY, "--out", str(tmp_path), *bad.split())
    assert result.returncode == 2
    assert ("--gpus 1: only 0 CUDA GPU(s) visible" in result.stderr) or ("--shard '3/3'" in result.stderr)


def test_scores_from_another_context_key_version_ask_for_rescoring(tmp_path):
    import json

    run_benchmark(load_config("default", DUMMY), tmp_path, quiet=True)
    current = tmp_path / "scores" / "current.json"
    stale = json.loads(current.read_text())
    for info in stale.values():
        info.pop("context_version")
    current.write_text(json.dumps(stale))
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2
    assert "written by another version of subjectbench" in result.stderr
    assert f"subjectbench score {tmp_path}" in result.stderr and "Traceback" not in result.stderr
    assert run_cli("score", str(tmp_path), "--quiet").returncode == 0
    assert run_cli("report", str(tmp_path)).returncode == 0


def test_deterministic_mode_runs_every_method_and_keys_apart(tmp_path):
    """``--deterministic`` turns on deterministic kernels for the run (no op of TI, DreamBooth or
    DreamBooth-LoRA training or sampling refuses them), is recorded in the saved config, and
    keys its states and images apart from the fast mode's."""
    import torch

    from benchmark.config import load_config
    from benchmark.driver import run_benchmark
    from benchmark.units import expand, method_context

    overrides = [
        "subjects=dog", "protocol.prompts=[0]", "protocol.images_per_prompt=1", "protocol.prior_images=0",
        "protocol.sampler.steps=2", "metrics.names=[]",
        "methods.textual_inversion.steps=2", "methods.dreambooth.steps=2", "methods.dreambooth.checkpoint_steps=[1]",
        "methods.dreambooth.class_images=1", "methods.dreambooth_lora.steps=2", "methods.dreambooth_lora.class_images=1",
    ]
    fast = load_config("default", overrides)
    exact = load_config("default", [*overrides, "deterministic=true"])
    try:
        summary = run_benchmark(exact, tmp_path, quiet=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert summary.exit_code == 0 and summary.done == 4
    assert "deterministic: true" in (tmp_path / "config.yaml").read_text()
    fast_keys = {u.key for u in expand(fast, method_context(fast, "cpu", "float32")).image_units}
    exact_keys = {u.key for u in expand(exact, method_context(exact, "cpu", "float32")).image_units}
    assert fast_keys.isdisjoint(exact_keys)


def test_an_unreadable_png_fails_its_subject_batch_on_record_and_the_rest_is_scored(tmp_path):
    """Images are decoded ahead in threads; a PNG that cannot be decoded still fails only its
    own (metric, subject) batches, by name, and the other subject is scored."""
    config = load_config("default", [*DUMMY, "metrics.names=[clip_t,dino]"])
    run_benchmark(config, tmp_path, quiet=True)
    for victim in (tmp_path / "images" / "dummy" / "teapot").glob("*.png"):  # prompts' and prior's
        victim.write_bytes(b"not a png")
    result = run_cli("score", str(tmp_path), "--force", "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr
    failures = Store(tmp_path).failures()
    assert sorted(failures) == ["score-clip_t-teapot", "score-dino-teapot"]
    assert all("UnidentifiedImageError" in f["message"] and ".png" in f["message"] for f in failures.values())
    assert result.stdout.startswith("8 scores computed")  # dog's 4 images × 2 metrics
