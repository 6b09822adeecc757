"""Issue-18 scaling figures: one multi-subject slice of the ``dreambooth`` suite run through the
CLI (`python -m benchmark run dreambooth ...`, one process per run, as a user runs it) with each
executor arm, timed end to end, and each arm's images compared with the single-worker run's.

The slice: 4 subjects of 4 different classes (``--subjects``), Textual Inversion + DreamBooth,
``--steps`` training steps each (reduced from 5000 / 1000; DreamBooth with 2 class images made
in 10 DDIM steps), 1 prompt x 2 images per subject at ``--sampling-steps`` DDIM steps, no prior
images, no scoring (only the executor is being measured): 8 trainings and 16 images per arm.

Arms (GPU): ``--gpus 1`` (the baseline), ``--gpus 1 --workers-per-gpu 2`` (two workers share the
GPU), ``--gpus 2`` when 2 or more GPUs are visible, and ``--executor ray`` over a local Ray cluster
started by the run (``--workers 2``: 2 CPUs; 2 tasks per GPU on one GPU, 1 per GPU on several),
skipped with the reason "ray not installed" when Ray does not import. On the CPU (``--device
cpu``): ``--executor local --workers 1``, ``--workers 2``, and Ray with 2 CPUs.
Then the kill check: the 2-worker arm again, with one worker process SIGKILLed once the first
image is on disk: the run must finish (the group is run again on a new worker), its images must
equal the baseline's, and a plain rerun must have nothing left to do.

Every arm gets a fresh cache folder (class images included), so every arm does the same work.
With ``--deterministic`` (the default) every arm's images must be bit-identical to the
baseline's; with ``--fast`` the largest pixel difference is reported instead. images/s is
end-to-end (training included): images generated / wall time of the whole `run` command.

Data: the DreamBooth dataset is read from ``--dataset-dir DIR`` (or ``$SUBJECTBENCH_DATASET_DIR``,
or the `subjectbench data download` cache); nothing is downloaded. Weights: ``sd15-random``
(built from its config, no hub).

CPU check: ``python benchmarks/gpu_scaling.py --tiny --device cpu --dataset-dir DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import environment  # noqa: E402
from tests.helpers import descendant_processes  # noqa: E402

# Rough per-unit costs on an H100/H200 (benchmarks/results/README.md) for the printed estimate.
# start: process, imports, sd15-random build (11.6 s); state_io: publish + reload (DreamBooth a UNet).
EST = {"start_s": 25.0, "db_step_s": 0.16, "ti_step_s": 0.13, "db_state_io_s": 6.0, "ti_state_io_s": 1.0,
       "image_s": 0.25, "ray_start_s": 15.0}


def overrides(args) -> list[str]:
    return [
        f"backbone={args.backbone}", f"protocol.resolution={args.resolution}", f"device={args.device}",
        f"subjects={args.subjects}", "protocol.prompts=[0]", "protocol.images_per_prompt=2",
        "protocol.prior_images=0", f"protocol.sampler.steps={args.sampling_steps}",
        "methods=textual_inversion,dreambooth",
        f"methods.textual_inversion.steps={args.steps}", "methods.textual_inversion.learning_rate=5.0e-3",
        f"methods.dreambooth.steps={args.steps}", "methods.dreambooth.learning_rate=5.0e-6",
        "methods.dreambooth.class_images=2", f"methods.dreambooth.class_image_steps={args.class_image_steps}",
        "methods.dreambooth.checkpoint_steps=[]", "metrics.names=[]",
    ]


def arms(args, gpus: int) -> dict[str, list[str]]:
    if args.device == "cpu":
        return {
            "local_1_worker": ["--executor", "local", "--workers", "1"],
            "local_2_workers": ["--workers", "2"],
            "ray_2_workers": ["--executor", "ray", "--workers", "2"],
        }
    out = {"gpus_1": ["--gpus", "1"], "gpus_1_x2_workers": ["--gpus", "1", "--workers-per-gpu", "2"]}
    if gpus >= 2:
        out["gpus_2"] = ["--gpus", "2"]
    out["ray_2_workers"] = ["--executor", "ray", "--workers", "2", *(["--workers-per-gpu", "2"] if gpus < 2 else [])]
    return out


def estimate(args, n_arms: int) -> float:
    subjects = len(args.subjects.split(","))
    work = subjects * (args.steps * (EST["db_step_s"] + EST["ti_step_s"]) + EST["db_state_io_s"] + EST["ti_state_io_s"]
                       + 2 * 2 * EST["image_s"] * args.sampling_steps / 50)
    serial = EST["start_s"] + work
    parallel = EST["start_s"] + work / 1.5
    return serial + (n_arms - 1) * parallel + EST["ray_start_s"] + parallel + 20  # + kill check and its rerun


def run_arm(name: str, executor_args: list[str], args, work: Path, kill: bool = False) -> dict:
    run_dir, cache = work / name, work / f"{name}-cache"
    command = [sys.executable, "-m", "benchmark", "run", "dreambooth", *overrides(args), *executor_args,
               "--out", str(run_dir), "--quiet", "--no-report", "--no-score"]
    if args.dataset_dir:
        command += ["--dataset-dir", args.dataset_dir]
    if not args.fast:
        command.append("--deterministic")
    env = {**os.environ, "SUBJECTBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    started = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        killed = {}
        if kill:
            def killer():
                while process.poll() is None:
                    if any((run_dir / "images").glob("*/*/*.json")):
                        workers = sorted(p for p, c in descendant_processes(process.pid).items() if "spawn_main" in c)
                        if workers:
                            os.kill(workers[0], signal.SIGKILL)
                            killed.update(pid=workers[0], images_on_disk=len(list((run_dir / "images").glob("*/*/*.json"))),
                                          at_seconds=round(time.perf_counter() - started, 1))
                            return
                    time.sleep(0.05)

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
        code = process.wait()
    wall = time.perf_counter() - started
    images = len(list((run_dir / "images").glob("*/*/*.json")))
    failures = [json.loads(p.read_text()).get("message") for p in (run_dir / "failures").glob("*.json")]
    line = {
        "command": " ".join(["subjectbench run dreambooth", "<overrides>", *executor_args]),
        "exit_code": code, "wall_seconds": round(wall, 1), "images": images,
        "images_per_second": round(images / wall, 4), "failures": failures[:5],
    }
    if code != 0:
        line["log_tail"] = (work / f"{name}.log").read_text()[-2000:]
    if kill:
        run_log = (run_dir / "run.log").read_text() if (run_dir / "run.log").exists() else ""
        line["killed"] = killed or None
        line["group_run_again"] = "running it again on a new worker" in run_log
        rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        line["rerun_exit_code"] = rerun.returncode
        line["rerun_summary"] = next((s for s in rerun.stdout.splitlines() if s.startswith("images:")), rerun.stdout[-300:])
        line["images_after_rerun"] = len(list((run_dir / "images").glob("*/*/*.json")))
    return line


def image_pixels(run_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for record in (run_dir / "images").glob("*/*/*.json"):
        out[record.stem] = np.asarray(Image.open(record.with_suffix(".png")).convert("RGB"), dtype=np.int16)
    return out


def compare(baseline: dict[str, np.ndarray], run_dir: Path) -> dict:
    other = image_pixels(run_dir)
    shared = sorted(baseline.keys() & other.keys())
    diffs = [int(np.abs(baseline[k] - other[k]).max()) for k in shared]
    return {
        "same_image_keys": sorted(baseline) == sorted(other),
        "images_compared": len(shared),
        "images_identical": sum(d == 0 for d in diffs),
        "max_pixel_difference": max(diffs) if diffs else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--subjects", default="backpack,cat,dog,teapot")
    parser.add_argument("--steps", type=int, default=30, help="training steps of TI and of DreamBooth")
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--class-image-steps", type=int, default=10)
    parser.add_argument("--dataset-dir", default=None, help="local copy of the DreamBooth dataset")
    parser.add_argument("--fast", action="store_true", help="fast kernels (default: --deterministic)")
    parser.add_argument("--skip-kill", action="store_true", help="leave out the kill-a-worker check")
    parser.add_argument("--keep-states", action="store_true", help="keep each arm's states (DreamBooth: a UNet each)")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, 2 steps (a CPU check)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.resolution, args.steps, args.sampling_steps, args.class_image_steps = "tiny", 64, 2, 4, 2
    if len(args.subjects.split(",")) < 4:
        parser.error("--subjects: the issue asks for at least 4 subjects")
    from data.subjects import load_subjects

    try:  # the dataset is found before any arm starts (no network here)
        load_subjects("dreambooth", args.dataset_dir, args.subjects.split(","))
    except Exception as error:  # noqa: BLE001
        raise SystemExit(f"error: {error}") from None

    import torch

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    if args.device != "cpu" and gpus == 0:
        raise SystemExit("error: no CUDA GPU visible; use --device cpu (with --tiny) for the CPU check")
    chosen = arms(args, gpus)
    ray_ok = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode == 0
    if not ray_ok:
        chosen.pop("ray_2_workers")
    if not args.tiny:
        print(f"estimated device time: {estimate(args, len(chosen)) / 60:.1f} min "
              f"({len(chosen)} arms + kill check; rough, from the H100/H200 per-step figures)", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    figures = {
        "device": environment.device_name(environment.resolve_device(args.device)),
        "gpus_visible": gpus,
        "packages": environment.package_versions(),
        "mode": "fast" if args.fast else "deterministic",
        "overrides": overrides(args),
        "note": ("8 trainings (TI + DreamBooth x 4 subjects) and 16 images per arm; wall time is the whole "
                 "`run` command (process start, backbone builds, class images, training, generation); "
                 "images/s = images / wall"),
        "arms": {},
    }
    if not ray_ok:
        figures["arms"]["ray_2_workers"] = {"skipped": "ray not installed"}
    if gpus < 2 and args.device != "cpu":
        figures["gpus_2"] = f"not run: {gpus} GPU visible on this machine"
    if args.device == "cpu":
        figures["cpu_threads_note"] = (
            "on the CPU a single worker uses every core's torch thread and each of 2 workers one: CPU "
            "kernels sum in another order with another thread count, so images of the 1-worker arm may "
            "differ from the 2-worker arms by a little (max_pixel_difference); arms with equal thread "
            "counts (2 local workers, Ray, the kill check) must be identical")
    baseline_name = next(iter(chosen))
    parallel = [n for n in chosen if n != baseline_name and not n.startswith("ray")][0]
    baseline = twin = None
    for name, executor_args in chosen.items():
        line = run_arm(name, executor_args, args, work)
        if name == parallel:
            twin = image_pixels(work / name)
        if baseline is None:
            baseline = image_pixels(work / name)
        else:
            line["speedup"] = round(figures["arms"][baseline_name]["wall_seconds"] / line["wall_seconds"], 3)
            line["vs_baseline"] = compare(baseline, work / name)
        figures["arms"][name] = line
        print(name, json.dumps({k: v for k, v in line.items() if k != "log_tail"}), flush=True)
        if not args.keep_states:
            shutil.rmtree(work / name / "states", ignore_errors=True)
    if not args.skip_kill:
        line = run_arm("kill_check", chosen[parallel], args, work, kill=True)
        line["arm"] = parallel
        line["vs_baseline"] = compare(baseline, work / "kill_check")
        line["vs_uninterrupted_arm"] = compare(twin, work / "kill_check")  # same executor, not killed
        figures["kill_check"] = line
        print("kill_check", json.dumps({k: v for k, v in line.items() if k != "log_tail"}), flush=True)
        if not args.keep_states:
            shutil.rmtree(work / "kill_check" / "states", ignore_errors=True)
    text = json.dumps(figures, indent=1, default=str)
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_scaling.json")
    out.write_text(text)
    print(f"wrote {out}")
    ok = all(a.get("exit_code", 0) == 0 for a in figures["arms"].values())
    def identical(c: dict) -> bool:
        return c["same_image_keys"] and c["images_identical"] == c["images_compared"] > 0

    if not args.fast:
        # deterministic mode: every arm equals the baseline on a GPU; on the CPU, see cpu_threads_note
        compared = [a["vs_baseline"] for a in figures["arms"].values() if "vs_baseline" in a]
        if args.device != "cpu":
            ok &= all(identical(c) for c in compared)
        if "kill_check" in figures:
            ok &= identical(figures["kill_check"]["vs_uninterrupted_arm"])
    if "kill_check" in figures:
        k = figures["kill_check"]
        ok &= k["exit_code"] == 0 and k["killed"] is not None and k["rerun_exit_code"] == 0
        ok &= k["images_after_rerun"] == figures["arms"][parallel]["images"]
    print("all checks passed" if ok else "some check failed (see the JSON)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
