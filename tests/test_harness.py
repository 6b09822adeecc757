"""Harness: expansion, seeds, store, resume after SIGKILL, failures, executors (dummy method)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.store import Store, StoreError
from benchmark.units import expand, method_context
from tests.helpers import (
    REPO_ROOT,
    cli_command,
    cli_env,
    descendant_processes,
    leftovers,
    run_cli,
    snapshot,
)

BASE = ["methods=dummy", "metrics.names=[]"]


def config(*overrides: str):
    return load_config("default", [*BASE, *overrides])


def test_expansion_counts_grid_and_seed_rule():
    cfg = config("methods.dummy.fidelity=[0.2,0.5,0.9]", "protocol.images_per_prompt=3", "protocol.prior_images=1")
    plan = expand(cfg, method_context(cfg, "cpu", "float32"))
    assert len(plan.cells) == 3
    assert [c.cell_id for c in plan.cells] == ["dummy[fidelity=0.2]", "dummy[fidelity=0.5]", "dummy[fidelity=0.9]"]
    # fidelity is generation-only: the three cells share one training per subject
    assert len(plan.groups) == 3
    assert all(len(g.cells) == 3 for g in plan.groups)
    assert len(plan.image_units) == 9 * (3 * 3 + 1)
    keys = [u.key for u in plan.image_units]
    assert len(set(keys)) == len(keys)
    # The seed of (subject, prompt, k) is the same in every cell: cells differ only by method.
    seeds = {}
    for unit in plan.image_units:
        seeds.setdefault((unit.subject_id, unit.prompt.template, unit.k), set()).add(unit.seed)
    assert all(len(s) == 1 for s in seeds.values())
    # Changing images_per_prompt keeps the keys of the images both configs share.
    smaller = load_config("default", [*BASE, "methods.dummy.fidelity=[0.2,0.5,0.9]", "protocol.images_per_prompt=2", "protocol.prior_images=1"])
    small_keys = {u.key for u in expand(smaller, method_context(smaller, "cpu", "float32")).image_units}
    assert small_keys < set(keys)


def test_generation_only_grids_train_once_per_subject(tmp_path):
    """A 2 × 2 grid over a generation-only param and the sampler trains each subject once;
    every cell's images equal those of a run of that cell alone."""
    grid = config("methods.dummy.fidelity=[0.2,0.9]", "protocol.sampler.guidance=[3,7.5]", "protocol.prompts=[0]")
    plan = expand(grid, method_context(grid, "cpu", "float32"))
    assert len(plan.groups) == len(plan.subjects) == 3
    cell_ids = sorted({u.cell_id for u in plan.image_units})
    assert cell_ids == sorted(
        f"dummy[fidelity={f},guidance={g}]" for f in (0.2, 0.9) for g in (3.0, 7.5)
    )
    summary = run_benchmark(grid, tmp_path / "grid", quiet=True)
    assert summary.exit_code == 0
    states = sorted((tmp_path / "grid" / "states").glob("*/*/*/DONE"))
    assert len(states) == 3  # trainings counted on disk: one per subject
    lines = run_cli("status", str(tmp_path / "grid")).stdout
    assert "trainings: 3 for 4 method cells × 3 subjects" in lines
    # one cell alone gives the same keys and bytes as in the grid
    alone = config("methods.dummy.fidelity=0.9", "protocol.sampler.guidance=3", "protocol.prompts=[0]")
    run_benchmark(alone, tmp_path / "alone", quiet=True)
    def pngs(run_dir):
        return {p.relative_to(run_dir): p.read_bytes() for p in (run_dir / "images").rglob("*.png")}

    grid_images, alone_images = pngs(tmp_path / "grid"), pngs(tmp_path / "alone")
    assert alone_images and set(alone_images) < set(grid_images)
    assert all(grid_images[k] == v for k, v in alone_images.items())
    # seeds are paired across grid points
    seeds = {}
    for unit in plan.image_units:
        seeds.setdefault((unit.subject_id, unit.prompt.template, unit.k), set()).add(unit.seed)
    assert all(len(s) == 1 for s in seeds.values())


def test_training_params_still_split_trainings():
    cfg = config("methods.dummy.fidelity=[0.2,0.9]")
    shared = expand(cfg, method_context(cfg, "cpu", "float32"))
    # a training-relevant change (protocol seed changes the training seed) gives new prepare keys
    other = config("methods.dummy.fidelity=[0.2,0.9]", "protocol.seed=3")
    split = expand(other, method_context(other, "cpu", "float32"))
    assert {g.prepare.key for g in shared.groups}.isdisjoint({g.prepare.key for g in split.groups})


def test_sampler_grid_errors_name_the_value():
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match=r"protocol.sampler: guidance must be >= 0"):
        config("protocol.sampler.guidance=[3,-1]")
    with pytest.raises(ConfigError, match=r"protocol.sampler.steps: an empty list"):
        config("protocol.sampler.steps=[]")


def test_keys_change_with_everything_that_changes_output():
    def keys(*overrides):
        cfg = config(*overrides)
        return {u.key for u in expand(cfg, method_context(cfg, "cpu", "float32")).image_units}

    base = keys()
    for change in ("methods.dummy.noise=0.5", "protocol.seed=1", "protocol.sampler.steps=10",
                   "protocol.sampler.guidance=5.0", "protocol.resolution=32", "protocol.identifier=zwx"):
        assert keys(change).isdisjoint(base), change
    cfg = config()
    assert {u.key for u in expand(cfg, method_context(cfg, "cpu", "bfloat16")).image_units}.isdisjoint(base)


def test_shards_and_batch_sizes_give_identical_images(tmp_path):
    whole = tmp_path / "whole"
    run_benchmark(config("generation.batch_size=8"), whole, quiet=True)
    sharded = tmp_path / "sharded"
    for index in range(3):
        run_benchmark(config("generation.batch_size=1"), sharded, quiet=True, shard_spec=(index, 3))
    assert snapshot(whole) == snapshot(sharded)
    assert len(list((whole / "images").rglob("*.png"))) == 24


def test_rerun_skips_finished_work_and_force_redoes(tmp_path):
    first = run_benchmark(config(), tmp_path, quiet=True)
    assert (first.done, first.skipped, first.failed) == (24, 0, [])
    assert set(first.stage_seconds) <= {"plan", "execute", "score"} and {"plan", "execute"} <= set(first.stage_seconds)
    assert sum(first.stage_seconds.values()) <= first.seconds
    assert "stage seconds: {" in (tmp_path / "run.log").read_text()
    assert "fine-tunes" in (tmp_path / "run.log").read_text()  # what training.compile decided, and why
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*.png")}
    again = run_benchmark(config(), tmp_path, quiet=True)
    assert (again.done, again.skipped) == (0, 24)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*.png")}
    forced = run_benchmark(config(), tmp_path, quiet=True, force=True)
    assert forced.done == 24
    # each invocation's line in invocations.jsonl: its stage clock, how and where it ran
    lines = [json.loads(line) for line in (tmp_path / "invocations.jsonl").read_text().splitlines()]
    assert [line["images_generated"] for line in lines] == [24, 0, 24]
    assert all(list((tmp_path / "configs").glob(f"*-{line['config']}.yaml")) for line in lines)
    assert lines[0]["stage_seconds"] == {k: round(v, 2) for k, v in first.stage_seconds.items()}
    assert all(line["executor"] == "inprocess" and line["gpus"] == 0 and line["device"] == "cpu"
               and line["stopped_in"] is None and line["seconds"] >= sum(line["stage_seconds"].values()) - 0.05
               for line in lines)


def test_failures_are_isolated_recorded_and_retried(tmp_path):
    cfg = config("methods.dummy.fail_subjects=[teapot]", "methods.dummy.fail_prompts=[snow]", "protocol.prompts=[0,1]")
    summary = run_benchmark(cfg, tmp_path, quiet=True)
    assert summary.exit_code == 1
    stages = sorted((f["stage"], f["subject"]) for f in summary.failed)
    # teapot's prepare failed once; prompt 1 ("in the snow") failed for each image of dog and duck_toy.
    assert stages.count(("prepare", "teapot")) == 1
    assert stages.count(("generate", "dog")) == 2 and stages.count(("generate", "duck_toy")) == 2
    assert summary.done == 2 * (2 + 2)  # jungle × 2 + prior × 2 for the two healthy subjects
    failure = next(f for f in summary.failed if f["stage"] == "prepare")
    assert "simulated failure preparing teapot" in failure["message"]
    assert "Traceback" in failure["traceback"]
    assert any("FAILED [prepare/error] dummy on teapot" in line for line in summary.lines())
    # A plain rerun does not retry recorded failures; --retry-failed does.
    rerun = run_benchmark(cfg, tmp_path, quiet=True)
    assert rerun.done == 0 and rerun.exit_code == 1
    fixed = config("protocol.prompts=[0,1]")
    healed = run_benchmark(fixed, tmp_path, quiet=True, retry_failed=True)
    assert healed.exit_code == 0 and healed.failed == []
    assert healed.done == 4 + 6  # dog/duck snow images + all of teapot


def test_out_of_memory_is_recorded_as_oom_and_next_unit_runs(tmp_path):
    summary = run_benchmark(config("methods.dummy.oom_subjects=[dog]"), tmp_path, quiet=True)
    assert [(f["subject"], f["kind"]) for f in summary.failed] == [("dog", "oom")]
    assert summary.done == 16


def test_state_must_be_safetensors(tmp_path):
    store = Store(tmp_path)
    work = store.new_state_workdir("m", "s", "k")
    (work / "weights.pt").write_bytes(b"not allowed")
    with pytest.raises(StoreError, match="weights.pt is not safetensors"):
        store.publish_state(work, "m", "s", "k", {})


def test_status_and_log(tmp_path):
    run_benchmark(config("methods.dummy.fail_subjects=[dog]"), tmp_path, quiet=True)
    result = run_cli("status", str(tmp_path))
    assert result.returncode == 1
    assert "2/3" in result.stdout and "16/24" in result.stdout
    assert "simulated failure preparing dog" in result.stdout
    assert "run time: 1 invocation, " in result.stdout and "GPU-hours" not in result.stdout  # a CPU run
    log = (tmp_path / "run.log").read_text()
    assert "prepare dummy on teapot" in log and "prepare failed for dummy/dog" in log


def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    result = run_cli("status", str(tmp_path))
    assert result.returncode == 2
    assert "is not a run directory" in result.stderr and "Traceback" not in result.stderr


def _wait_for(predicate, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.parametrize(
    "kill_when",
    ["in_prepare", "after_1_image", "after_9_images", "after_17_images"],
)
def test_sigkill_at_any_moment_then_rerun_gives_identical_results(tmp_path, kill_when):
    # Batches of 4: background writers finish a batch's files within milliseconds, so a kill
    # after image 17 lands while the last batch (21-24) is still being generated.
    args = [*BASE, "methods.dummy.sleep_s=0.03", "methods.dummy.prepare_sleep_s=0.3", "generation.batch_size=4", "--quiet"]
    reference = tmp_path / "reference"
    run_cli("run", "default", *args, "--out", str(reference), check=True)

    victim = tmp_path / "victim"
    process = subprocess.Popen(
        cli_command("run", "default", *args, "--out", str(victim)),
        cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if kill_when == "in_prepare":
        # a training's working folder (in the run's resume space: training.resume_every is on)
        condition = lambda: any((victim / "resume").glob("*/work/*"))  # noqa: E731
    else:
        count = int(kill_when.split("_")[1])
        condition = lambda: len(list((victim / "images").glob("*/*/*.json"))) >= count  # noqa: E731
    reached = _wait_for(condition, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert reached, f"run finished before reaching {kill_when}"
    assert len(list((victim / "images").glob("*/*/*.json"))) < 24

    # the killed invocation's time is counted from its heartbeat (status and report read it)
    (killed,) = Store(victim).invocations()
    assert killed["killed"] is True and killed["stopped_in"].endswith("(killed)") and killed["seconds"] > 0

    run_cli("run", "default", *args, "--out", str(victim), check=True)
    assert leftovers(victim) == []
    assert snapshot(victim) == snapshot(reference)
    # the rerun moved it into invocations.jsonl, before its own line
    lines = [json.loads(line) for line in (victim / "invocations.jsonl").read_text().splitlines()]
    assert [line.get("killed", False) for line in lines] == [True, False]
    assert not (victim / "invocations.live").exists()
    records = list((victim / "images").glob("*/*/*.json"))
    assert len(records) == 24 and len({json.loads(p.read_text())["key"] for p in records}) == 24


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_heartbeats_count_a_killed_invocation_and_not_a_running_one(tmp_path):
    """``invocations.live``: a heartbeat whose process is gone on this host, or that has not
    beaten for ``LIVE_STALE_S`` on any host, is a killed invocation's line; a fresh one from
    another host, or this process's own, is a running invocation's and counts nowhere yet."""
    import socket

    from benchmark import store as store_module

    store = Store(tmp_path / "run")
    here = store_module._safe(socket.gethostname())
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = time.time()
    beats = {
        "mine": {"host": here, "pid": os.getpid(), "heartbeat": now, "started": "2026-01-01T00:00:03+00:00"},
        "gone": {"host": here, "pid": gone.pid, "heartbeat": now, "started": "2026-01-01T00:00:01+00:00"},
        "away": {"host": "elsewhere", "pid": 1, "heartbeat": now, "started": "2026-01-01T00:00:04+00:00"},
        "stale": {"host": "elsewhere", "pid": 1, "heartbeat": now - store_module.LIVE_STALE_S - 1,
                  "started": "2026-01-01T00:00:02+00:00"},
    }
    store.live_path.mkdir(parents=True)
    for name, beat in beats.items():
        (store.live_path / f"{name}.json").write_text(json.dumps(
            {**beat, "seconds": 7.5, "stage_seconds": {"plan": 1.0, "execute": 6.5}, "stopped_in": "execute"}))
    store.record_invocation({"started": "2026-01-01T00:00:00+00:00", "seconds": 3.0, "stopped_in": None})
    records = store.invocations()
    assert [r["started"][-10:-6] for r in records] == ["0:00", "0:01", "0:02"]  # oldest first
    assert [r.get("stopped_in") for r in records] == [None, "execute (killed)", "execute (killed)"]
    assert all("pid" not in r and "host" not in r for r in records)
    # the run's lock holder (the driver, at start) knows no other run of the folder is running:
    # every heartbeat of this host is a dead one's (a reused pid cannot keep one alive)
    assert store.settle_killed_invocations() == 3
    assert sorted(p.stem for p in store.live_path.glob("*.json")) == ["away"]
    assert len(store._recorded_invocations()) == 4 and len(store.invocations()) == 4


def test_the_heartbeat_rewrites_the_stage_clock_until_the_invocation_ends(tmp_path):
    store = Store(tmp_path)
    ticks = iter(range(1, 1000))
    with store.live_invocation({"started": "x"}, lambda: {"seconds": float(next(ticks))}, every=0.02) as live:
        first = json.loads(live.path.read_text())["seconds"]
        deadline = time.monotonic() + 10
        while json.loads(live.path.read_text())["seconds"] < first + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads(live.path.read_text())["seconds"] >= first + 3
        assert store.invocations() == []  # this process is alive: a running invocation, no line yet
    assert not live.path.exists() and not store.live_path.exists()


def test_a_finished_invocation_leaves_no_heartbeat(tmp_path):
    run_benchmark(config(), tmp_path, quiet=True)
    assert not (tmp_path / "invocations.live").exists()
    (record,) = Store(tmp_path).invocations()
    assert record["stopped_in"] is None and "killed" not in record


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from Linux /proc")
@pytest.mark.parametrize("executor", [
    "local",
    # ray.init puts its own SIGTERM handler in the driver (it aborted the process, exit -6);
    # starts a local Ray cluster, ~30-60 s on 2 cores
    pytest.param("ray", marks=pytest.mark.slow),
])
def test_sigterm_stops_the_run_like_ctrl_c(tmp_path, executor):
    """``kill``, ``timeout`` and batch schedulers send SIGTERM: the run stops its worker
    processes (and the local Ray cluster it started), logs and records where it stopped, says
    how to resume (exit 143, no traceback), and the rerun finishes it."""
    if executor == "ray":
        pytest.importorskip("ray")
    args = [*BASE, "methods.dummy.sleep_s=0.3", "methods.dummy.prepare_sleep_s=1", "generation.batch_size=4", "--quiet"]
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli_command("run", "default", *args, "--executor", executor, "--workers", "2", "--out", str(out)),
        cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    reached = _wait_for(lambda: any((out / "images").glob("*/*/*.json")), process, timeout=240)
    workers = list(descendant_processes(process.pid))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert reached, "the run finished (or failed) before its first image"
    assert process.returncode == 143, stderr
    assert "terminated (SIGTERM); rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert workers, "no worker processes were found to check"
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the run"
    (record,) = Store(out).invocations()
    assert record["stopped_in"] == "execute" and record["executor"] == executor
    assert "(stopped in execute)" in (out / "run.log").read_text()
    made = len(list((out / "images").glob("*/*/*.json")))
    assert 0 < made < 24
    assert record["images_generated"] == made  # counted on disk: the workers' tally never came back

    run_cli("run", "default", *args, "--out", str(out), check=True)
    assert leftovers(out) == []
    assert len(list((out / "images").glob("*/*/*.json"))) == 24
    assert [r["stopped_in"] for r in Store(out).invocations()] == ["execute", None]


def test_local_process_executor_matches_inprocess(tmp_path):
    run_benchmark(config(), tmp_path / "a", quiet=True)
    run_benchmark(config(), tmp_path / "b", quiet=True, executor="local", workers=2)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    # the workers' own records (what each prepared) reach the run's log, under their names
    workers = [line for line in (tmp_path / "b" / "run.log").read_text().splitlines() if " Worker-" in line]
    assert any(" INFO Worker-" in line and " prepare " in line for line in workers), workers[:5]
    assert not (tmp_path / "b" / "resume").exists()  # every training published: no resume space left


def test_ray_executor_matches_inprocess(tmp_path):
    pytest.importorskip("ray")
    run_benchmark(config(), tmp_path / "a", quiet=True)
    summary = run_benchmark(config("methods.dummy.fail_subjects=[dog]"), tmp_path / "b", quiet=True, executor="ray", workers=2)
    assert [f["subject"] for f in summary.failed] == ["dog"]
    run_benchmark(config(), tmp_path / "b", quiet=True, executor="ray", workers=2, retry_failed=True)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_concurrent_runs_on_one_directory_are_refused(tmp_path):
    args = [*BASE, "methods.dummy.sleep_s=0.4", "--quiet", "--out", str(tmp_path)]
    process = subprocess.Popen(cli_command("run", "default", *args), cwd=REPO_ROOT, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: (tmp_path / "plan.parquet").exists(), process)
        second = run_cli("run", "default", *args)
        assert second.returncode == 2
        assert "another subjectbench process is using" in second.stderr
    finally:
        process.wait(timeout=120)
    assert process.returncode == 0
    assert os.path.exists(tmp_path / "config.yaml")


def test_resolved_config_is_saved_with_defaults(tmp_path):
    import yaml

    run_benchmark(config("methods.dummy.noise=0.1"), tmp_path, quiet=True)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    params = saved["methods"][0]["params"]
    assert params["noise"] == 0.1 and params["fidelity"] == 0.7 and "sleep_s" in params
    assert len(list((tmp_path / "configs").glob("*.yaml"))) == 1


def test_clip_t_receives_the_identifier_free_prompts(tmp_path, monkeypatch):
    """Through the harness, CLIP-T sees exactly the protocol's evaluation texts: the rendered
    prompt without the identifier, class noun kept (never 'a sks dog ...')."""
    from metrics.clip import ClipT

    seen: list[str] = []
    original = ClipT.score

    def spy(self, inputs):
        seen.extend(inputs.texts)
        return original(self, inputs)

    monkeypatch.setattr(ClipT, "score", spy)
    cfg = load_config("default", ["methods=dummy", "metrics.names=[clip_t]", "metrics.weights=random", "protocol.prompts=[0,20]"])
    summary = run_benchmark(cfg, tmp_path, quiet=True)
    assert summary.exit_code == 0 and summary.scored > 0
    plan = expand(cfg, method_context(cfg, "cpu", "float32"))
    nouns = {s.id: s.class_noun for s in plan.subjects}
    # the templates' "{0} {1}" with the identifier left out: "a {0} {1} in the jungle" -> "a dog in the jungle"
    expected = [
        " ".join(u.prompt.template.format("", nouns[u.subject_id]).split())
        for u in plan.image_units if u.role == "eval"
    ]
    assert sorted(seen) == sorted(expected)
    assert not any("sks" in text for text in seen)
    assert "a dog in the jungle" in seen


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """Atomic writes: a failure after the bytes are on disk but before the rename (disk full at
    fsync) keeps the old content whole and leaves no temporary file behind."""
    from benchmark.store import atomic_write_bytes, atomic_write_json

    target = tmp_path / "scores" / "current.json"
    atomic_write_json(target, {"old": True})
    old = target.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b'{"new": true, "padding": "' + b"x" * 100_000 + b'"}')
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert sorted(p.name for p in target.parent.iterdir()) == ["current.json"]
    # and a store image: the old PNG and record survive a failed rewrite
    store = Store(tmp_path / "run")
    from PIL import Image

    store.write_image("m", "s", "k", Image.new("RGB", (8, 8), "red"), {"key": "k"})
    png = store.image_path("m", "s", "k").read_bytes()
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.write_image("m", "s", "k", Image.new("RGB", (8, 8), "blue"), {"key": "k", "v": 2})
    monkeypatch.undo()
    assert store.image_path("m", "s", "k").read_bytes() == png
    assert json.loads(store.record_path("m", "s", "k").read_text()) == {"key": "k"}
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.startswith(".tmp-")]


def test_div_siblings_stay_within_a_cell_when_cells_share_a_training(tmp_path):
    """DIV compares an image with its siblings of the same cell, checkpoint and prompt: a second
    cell generating from the same training must not join the group."""
    from reports.rundata import read_run

    common = ["metrics.names=[div]", "metrics.weights=random", "subjects=dog", "protocol.prompts=[0]",
              "protocol.images_per_prompt=3", "protocol.prior_images=0"]
    run_benchmark(config(*common, "methods.dummy.noise=0.3"), tmp_path / "alone", quiet=True)
    run_benchmark(config(*common, "methods.dummy.noise=[0.3,0.9]"), tmp_path / "grid", quiet=True)

    def div(run_dir, cell):
        long = read_run(run_dir).long
        rows = long[(long["metric"] == "div") & (long["cell_id"] == cell)]
        return dict(zip(rows["key"], rows["value"]))

    alone, shared = div(tmp_path / "alone", "dummy"), div(tmp_path / "grid", "dummy[noise=0.3]")
    assert len(alone) == 3 and alone.keys() == shared.keys()
    assert all(alone[k] == pytest.approx(shared[k], abs=1e-6) for k in alone)


def test_a_metric_whose_role_has_no_images_scores_nothing_and_the_rest_score(tmp_path):
    """PRES scores class-prior images; a run without them (prior_images=0) scores the other metrics
    and records nothing for PRES (its empty row set once selected no columns: a KeyError)."""
    from reports.rundata import read_run

    summary = run_benchmark(config("metrics.names=[clip_t,pres]", "metrics.weights=random", "subjects=dog",
                                   "protocol.prompts=[0]", "protocol.images_per_prompt=2",
                                   "protocol.prior_images=0"), tmp_path / "run", quiet=True)
    long = read_run(tmp_path / "run").long
    assert summary.scored == 2 and set(long["metric"]) == {"clip_t"}
    assert long["value"].notna().all()


def test_done_mask_equals_image_done_per_row(tmp_path):
    """``done_mask`` (one folder listing per label and subject) says what ``image_done`` (two
    stats per image) says: done only with both the PNG and its record; a half-written image, a
    folder where a file should be, a subject or label never written are not done."""
    import pandas as pd
    from PIL import Image

    store = Store(tmp_path / "run")
    for key in ("both", "png-only", "json-only"):
        store.write_image("m", "dog", key, Image.new("RGB", (4, 4)), {"key": key})
    store.record_path("m", "dog", "png-only").unlink()
    store.image_path("m", "dog", "json-only").unlink()
    store.image_path("m", "dog", "folder").mkdir()  # a directory named like the PNG
    store.record_path("m", "dog", "folder").write_text("{}")
    store.write_image("m", "cat/x", "other", Image.new("RGB", (4, 4)), {"key": "other"})  # a name made safe
    rows = [("m", "dog", k) for k in ("both", "png-only", "json-only", "folder", "never")]
    rows += [("m", "cat/x", "other"), ("m", "teapot", "both"), ("n", "dog", "both")]
    frame = pd.DataFrame(rows, columns=["label", "subject", "key"])
    expected = [store.image_done(*row) for row in rows]
    assert expected == [True, False, False, False, False, True, False, False]
    assert store.done_mask(frame) == expected
    assert store.done_mask(frame.iloc[:0]) == []


def test_sibling_groups_and_context_keys_equal_their_reference_computations(tmp_path, monkeypatch):
    """On a real plan with grid cells, checkpoints and prior images: the column-wise sibling-group
    ids are the row-wise "|".join of the group columns' strings, and the context keys (stored with
    every score: a change would recompute them all) are the per-group hash of a groupby over the
    group columns, as they were computed before. An empty frame gives an empty Series."""
    import pandas as pd

    from benchmark.hashing import stable_hash
    from benchmark.results import SIBLING_GROUP, context_keys, sibling_groups
    from tests.report_fakes import use_fakes

    use_fakes(monkeypatch)  # sweep_dummy: the dummy with three checkpoints
    cfg = load_config("default", ["methods=dummy,sweep_dummy", "methods.dummy.noise=[0.3,0.9]",
                                  "protocol.prior_images=2", "metrics.names=[]"])
    run_benchmark(cfg, tmp_path / "run", quiet=True)
    plan = pd.read_parquet(tmp_path / "run" / "plan.parquet")
    assert plan["checkpoint"].nunique() > 1 and plan["cell_id"].nunique() > 1 and plan["role"].nunique() > 1
    expected = [("|".join(str(row[c]) for c in SIBLING_GROUP)) for _, row in plan.iterrows()]
    got = sibling_groups(plan)
    assert list(got) == expected and got.index.equals(plan.index)
    assert len(sibling_groups(plan.iloc[:0])) == 0

    siblings = plan.groupby(SIBLING_GROUP)["key"].transform(lambda keys: stable_hash(sorted(keys)))
    reference = [stable_hash([d, t, s]) for d, t, s in zip(plan["reference_sha"], plan["eval_text"], siblings)]
    assert list(context_keys(plan, True)) == reference
    assert len(set(context_keys(plan, True))) > len(set(context_keys(plan, False)))  # siblings matter


def test_two_identical_entries_are_refused_by_name():
    from benchmark.config import ConfigError

    cfg = load_config("default", ["metrics.names=[]"])
    document = cfg.to_dict()
    document["methods"] = [{"name": "dummy", "label": "a"}, {"name": "dummy", "label": "b"}]
    from benchmark.config import config_from_dict

    twin = config_from_dict(document)
    with pytest.raises(ConfigError, match=r"'a' and 'b' are the same method with the same parameters"):
        expand(twin, method_context(twin, "cpu", "float32"))


@pytest.mark.parametrize(("count", "batch"), [(100, 32), (104, 32), (10, 8), (8, 8), (1, 8), (33, 32), (7, 1)])
def test_balanced_batches_are_few_even_and_in_order(count, batch):
    from benchmark.runner import balanced_batches

    units = list(range(count))
    batches = balanced_batches(units, batch)
    sizes = [len(b) for b in batches]
    assert [u for b in batches for u in b] == units
    assert len(batches) == -(-count // batch) and max(sizes) <= batch and max(sizes) - min(sizes) <= 1
