"""Issue-17 item 5: the `dreambooth` suite's cost, measured through the CLI and projected to the protocol.

One `subjectbench run dreambooth` (a subprocess, as a user runs it; ``--gpus 1``) on ``--subjects``
(default 4 subjects of 4 classes) with TI, DreamBooth and DreamBooth-LoRA at reduced length
(``--ti-steps`` / ``--db-steps`` / ``--lora-steps``, ``--class-images`` per class, ``--prompts`` × 4
images per subject and method), scored with CLIP-T, CLIP-I, DINO and DIV (random-init weights:
speed only). Timed end to end. From the run's own records (state.json training summaries, the
per-image ``seconds`` of the image records) it derives per-unit rates — seconds per training
step (TI: per pass of all subjects), per generated image (median over batches, so the first
call's compile and warm-up are counted once, apart), per state load and save — and

- checks the cost model: the model's prediction of this very run (start-up + training + images +
  class images + scoring, from the per-unit rates) beside its measured wall time;
- projects the full protocol (30 subjects; TI 5000 steps in passes of ``training.subjects_per_batch``
  = 8; DreamBooth 1000 steps and LoRA 500 with 200 class images per class; 100 images per
  (method, subject); CLIP-T/CLIP-I/DINO/DIV over 9000 images) on one GPU with one worker, and
  with ``--workers-per-gpu`` concurrency applied to the trainings at the speed-up measured by
  ``benchmarks/gpu_speed.py --concurrency`` (``--db-concurrency-gain``), stated as such.

Data: ``--dataset-dir`` (a local DreamBooth copy); weights: ``sd15-random``. Writes JSON to ``--out``.
CPU check: ``python benchmarks/gpu_protocol.py --tiny --dataset-dir DIR --out /tmp/p.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import environment  # noqa: E402
from benchmark.results import load_records  # noqa: E402
from benchmark.store import Store  # noqa: E402

PROTOCOL = {"subjects": 30, "classes": 15, "ti_steps": 5000, "db_steps": 1000, "lora_steps": 500,
            "class_images": 200, "images_per_method_subject": 100, "ti_subjects_per_pass": 8,
            "metric_images": 9000}
METHODS = ("textual_inversion", "dreambooth", "dreambooth_lora")


def overrides(args) -> list[str]:
    return [
        f"backbone={args.backbone}", f"protocol.resolution={args.resolution}", f"subjects={args.subjects}",
        f"protocol.prompts=[{','.join(str(i) for i in range(args.prompts))}]", "protocol.images_per_prompt=4",
        "protocol.prior_images=0", f"protocol.sampler.steps={args.sampling_steps}",
        f"methods.textual_inversion.steps={args.ti_steps}",
        f"methods.dreambooth.steps={args.db_steps}", f"methods.dreambooth.class_images={args.class_images}",
        f"methods.dreambooth.class_image_steps={args.sampling_steps}", "methods.dreambooth.checkpoint_steps=[]",
        f"methods.dreambooth_lora.steps={args.lora_steps}", f"methods.dreambooth_lora.class_images={args.class_images}",
        f"methods.dreambooth_lora.class_image_steps={args.sampling_steps}", "methods.dreambooth_lora.checkpoint_steps=[]",
        "metrics.weights=random", "metrics.names=[clip_t,clip_i,dino,div]",
        f"generation.batch_size={args.batch_size}", f"generation.compile={args.compile}",
    ]


def measure(args) -> dict:
    run_dir = Path(args.work or tempfile.mkdtemp(prefix="gpu-protocol-")) / "run"
    env = {**os.environ, "SUBJECTBENCH_CACHE": str(run_dir.parent / "cache")}
    command = [sys.executable, "-m", "benchmark", "run", "dreambooth", *overrides(args), "--out", str(run_dir),
               "--quiet", *(["--gpus", "1"] if args.device == "cuda" else [])]
    if args.device != "cuda":
        command.append(f"device={args.device}")
    if args.dataset_dir:
        command += ["--dataset-dir", args.dataset_dir]
    started = time.perf_counter()
    log_path = run_dir.parent / "run.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:  # keep what finished: the store has it
            process.kill()
            process.wait()
            returncode = "timeout"
    wall = time.perf_counter() - started
    out: dict = {"command": " ".join(["subjectbench run dreambooth", *overrides(args)]),
                 "returncode": returncode, "wall_seconds": wall, "log_tail": log_path.read_text()[-3000:]}
    if not (run_dir / "plan.parquet").exists():
        out["per_method"] = {}
        return out
    store = Store(run_dir)
    records = load_records(store)
    subjects = args.subjects.split(",")
    per_method = {}
    for method in METHODS:
        rows = records[records["label"] == method] if not records.empty else records
        if rows.empty:
            continue
        trainings = []
        for subject in subjects:
            sub = rows[rows["subject"] == subject]
            if sub.empty:
                continue
            state_dir = store.state_dir(method, subject, sub["prepare_key"].iloc[0])
            if not (state_dir / "DONE").exists():
                continue
            state = json.loads((state_dir / "state.json").read_text())
            done = json.loads((state_dir / "DONE").read_text())
            trainings.append({"subject": subject, "training": state.get("training", {}), "prepare_seconds": done.get("seconds")})
        seconds = rows["seconds"].astype(float).tolist()
        per_method[method] = {
            "images": len(rows),
            "s_per_image_median": statistics.median(seconds),
            "s_per_image_mean": statistics.fmean(seconds),
            "s_per_image_max": max(seconds),
            "trainings": trainings,
        }
    out["per_method"] = per_method
    return out


def rates(measured: dict) -> dict:
    """Per-unit rates from the run's records."""
    out = {}
    for method, row in measured["per_method"].items():
        steps = [t["training"].get("seconds_per_step") for t in row["trainings"] if t["training"].get("seconds_per_step")]
        prepare = [t["prepare_seconds"] for t in row["trainings"] if t["prepare_seconds"] is not None]
        out[method] = {
            "s_per_step": statistics.median(steps) if steps else None,
            "prepare_s_mean": statistics.fmean(prepare) if prepare else None,
            "s_per_image": row["s_per_image_median"],
            "first_call_extra_s": (row["s_per_image_max"] - row["s_per_image_median"]),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--subjects", default="backpack,cat,dog,teapot")
    parser.add_argument("--ti-steps", type=int, default=200)
    parser.add_argument("--db-steps", type=int, default=100)
    parser.add_argument("--lora-steps", type=int, default=100)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--db-concurrency-gain", type=float, default=None,
                        help="aggregate training speed-up of --workers-per-gpu, measured by gpu_speed.py --concurrency")
    parser.add_argument("--scoring-s-per-3000", type=float, default=None, help="measured by gpu_scoring.py")
    parser.add_argument("--dataset-dir", default=None)
    parser.add_argument("--work", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, few steps (CPU check)")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds; the partial store is still read")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.resolution, args.device = "tiny", 64, "cpu"
        args.ti_steps, args.db_steps, args.lora_steps, args.class_images = 4, 4, 4, 2
        args.prompts, args.sampling_steps, args.subjects = 1, 4, "backpack,dog"
    measured = measure(args)
    result = {
        "benchmark": "gpu_protocol",
        "device": environment.device_name(args.device),
        "packages": environment.package_versions(),
        "settings": vars(args),
        "measured": measured,
    }
    if measured["returncode"] == 0 and measured["per_method"]:
        rate = rates(measured)
        result["rates"] = rate
        subjects = len(args.subjects.split(","))
        images_each = args.prompts * 4
        # the model's prediction of this run, from its own rates (start-up and scoring not modelled)
        predicted = 0.0
        for method, r in rate.items():
            predicted += subjects * images_each * r["s_per_image"] + r["first_call_extra_s"]
            steps = {"textual_inversion": args.ti_steps, "dreambooth": args.db_steps, "dreambooth_lora": args.lora_steps}[method]
            per_training = r["s_per_step"] * steps if r["s_per_step"] else 0.0
            predicted += per_training * (1 if method == "textual_inversion" else subjects)
        result["model_check"] = {"predicted_training_and_generation_s": predicted, "measured_wall_s": measured["wall_seconds"],
                                 "unmodelled_s": measured["wall_seconds"] - predicted}
        # full protocol, one worker, from the same rates
        p = PROTOCOL
        ti = rate.get("textual_inversion", {})
        ti_pass_step = ti.get("s_per_step") or 0.0  # a pass of `subjects` subjects
        ti_per_subject_step = ti_pass_step / subjects
        projection = {
            "textual_inversion_training_s": p["subjects"] * p["ti_steps"] * ti_per_subject_step,
            "dreambooth_training_s": p["subjects"] * p["db_steps"] * (rate.get("dreambooth", {}).get("s_per_step") or 0.0),
            "lora_training_s": p["subjects"] * p["lora_steps"] * (rate.get("dreambooth_lora", {}).get("s_per_step") or 0.0),
            "class_images_s": p["classes"] * p["class_images"] * (rate.get("dreambooth", {}).get("s_per_image") or 0.0),
            "generation_s": sum(p["subjects"] * p["images_per_method_subject"] * r["s_per_image"] for r in rate.values()),
            "scoring_s": (args.scoring_s_per_3000 or 0.0) * p["metric_images"] / 3000,
            "unmodelled_s_scaled": result["model_check"]["unmodelled_s"],
        }
        projection["total_one_worker_gpu_hours"] = sum(projection.values()) / 3600
        if args.db_concurrency_gain:
            trainings = projection["dreambooth_training_s"] + projection["lora_training_s"]
            projection["total_with_concurrent_trainings_gpu_hours"] = (
                sum(projection.values()) - projection["total_one_worker_gpu_hours"]
                - trainings + trainings / args.db_concurrency_gain
            ) / 3600
        result["projection_full_protocol"] = projection
        result["notes"] = (
            "TI per-subject-step rate here is for a pass of the run's subjects (4); the protocol trains passes of 8 "
            "(benchmarks/results: 8/pass is faster per subject), so the TI projection is conservative. The class-image "
            "rate is the DreamBooth generation rate. Unmodelled: process start-up, backbone builds, state save/load, "
            "scoring builds and the report, carried over unscaled."
        )
    text = json.dumps(result, indent=1, default=str)
    print(text)
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_protocol.json")
    out.write_text(text)
    return 0 if measured["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
