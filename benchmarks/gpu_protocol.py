"""Issue-17 item 5: the `dreambooth` suite's cost, measured through the CLI and projected to the protocol.

One `subjectbench run dreambooth` (a subprocess, as a user runs it; ``--gpus 1``) on ``--subjects``
(default 4 subjects of 4 classes) with TI, DreamBooth and DreamBooth-LoRA at reduced length
(``--ti-steps`` / ``--db-steps`` / ``--lora-steps``, ``--class-images`` per class, ``--prompts`` × 4
images per subject and method), scored with CLIP-T, CLIP-I, DINO and DIV (random-init weights:
speed only). Timed end to end, with the driver's stage clock (plan / execute / score from
``invocations.jsonl``). From the run's own records (state.json training summaries, DONE seconds, the
per-image ``seconds`` of the image records) it derives per-unit rates (``rates``: seconds per
training step — TI: per step of the pass — the overhead around a training's steps, seconds per
image, and compiles counted once) and

- checks the cost model: the model's parts for this very run beside the measured execute stage
  (what they miss is fixed cost: worker start-up, backbone builds);
- projects the full protocol (30 subjects; TI 5000 steps in passes of up to the suite's
  ``training.subjects_per_batch`` (30: one pass); DreamBooth 1000 and LoRA 500 steps with 200 class images per
  class; 100 images per (method, subject); 9000 scored images) for the run's worker count.

``--workers-per-gpu K`` runs the CLI with K workers on the GPU. ``--combine ONE.json K.json``
(no run) divides the one-worker projection's execute stage by the gain the same workload
measured with K workers; ``--ti-json`` / ``--scoring-json`` replace the TI and scoring parts by
the ``gpu_ti_multi.py`` (the protocol's pass size) and ``gpu_scoring.py`` measurements, and
``--finetune-json`` / ``--concurrency-json`` scale the DreamBooth and LoRA training parts by
measured compiled/eager ratios (``training.compile``), each named in the output;
``--check-compiled K_COMPILED.json`` (the K-worker run made again with ``--training-compile true``)
checks those ratios against the CLI (``cli_check``).

``--protocol-lengths`` runs the suite's own lengths (TI 5000, DreamBooth 1000 and LoRA 500 steps,
200 class images, 25 prompts x 4 images), which on ``--subjects`` of 4 takes longer than one call
of a lent GPU (10 minutes): ``--work DIR --run-timeout S`` stops a call's run in time and keeps
its store, and the next call on the same machine with ``--continue`` resumes it (the store skips
what finished). Each call is one leg in ``DIR/legs.json``; ``wall_seconds`` and the stage clock are
the legs' sums, so they overstate one uninterrupted run by each restart's start-up, by the
training steps after each training's last resume point and by any scoring pass a call's end cut
(it starts again in the next call). A training cut by a call's end resumes from its last resume
point (``--resume-every S``, ``training.resume_every``; 240 keeps a 1000-step DreamBooth, ~2 min
beside three others, from writing its ~10 GB points while the TI pass of 4, which did not finish
in one 540-s call with one worker, saves a few KB every 4 minutes). A continued call may change
the executor flags (``--workers-per-gpu``, ``--mps``; each leg records its own), not the workload.

``--schedule TIMED.json --ti-json TI30.json [--scoring-json S.json] [--ti-step-factor F]
[--overlap TI_A DB_A DB_B TI_B] [--lora-compiled-json L.json]`` (no run): item 5 from a finished
``--protocol-lengths`` run with K workers, by list scheduling the plan's groups at that run's
per-process rates (``schedule``): the run's own workload beside what it measured, and the
30-subject suite with TI as one pass measured alone, bounded by that pass beside the other
workers at its lone speed and by the others waiting for it; with ``--overlap``, the pass and the
other workers slowed as measured beside each other (``overlap_factors``).

Data: ``--dataset-dir`` (a local DreamBooth copy); weights: ``sd15-random``. Writes JSON to ``--out``.
CPU check: ``python benchmarks/gpu_protocol.py --tiny --dataset-dir DIR --out /tmp/p.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import environment  # noqa: E402
from benchmark.config import load_config  # noqa: E402
from benchmark.results import load_records  # noqa: E402
from benchmark.store import Store  # noqa: E402
from benchmark.units import balanced_chunks  # noqa: E402

PROTOCOL = {"subjects": 30, "classes": 15, "ti_steps": 5000, "db_steps": 1000, "lora_steps": 500,
            "class_images": 200, "images_per_method_subject": 100, "metric_images": 9000,
            # the suite's own pass size, read from it (one place to change it)
            "ti_subjects_per_pass": load_config("dreambooth").training.subjects_per_batch}
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
        f"training.compile={args.training_compile}",
        *([f"training.cuda_graphs={args.training_graphs}"] if args.training_graphs else []),
        *([f"training.resume_every={args.resume_every:g}"] if args.resume_every is not None else []),
    ]


def _workload(command: list[str]) -> list[str]:
    """``command`` without its executor flags (``--workers-per-gpu K``, ``--mps``): what the run's
    store is keyed by, which a continued call must not change."""
    kept, skip = [], False
    for part in command:
        if skip:
            skip = False
        elif part == "--workers-per-gpu":
            skip = True
        elif part != "--mps":
            kept.append(part)
    return kept


def earlier_legs(work: Path, command: list[str], resume: bool) -> list[dict]:
    """The legs earlier calls ran in ``work`` (``legs.json``), checked against this call's wish:
    ``--continue`` needs them and the same workload (the executor flags may change: a first call
    with one worker can train a long TI pass alone, the next ones run four); without it, ``work``
    must not hold a run."""
    path = work / "legs.json"
    legs = json.loads(path.read_text()) if path.exists() else []
    if resume and not legs:
        raise SystemExit(f"--continue: no earlier call's run in {work} (no legs.json): on a lent GPU the "
                         "machine may have been replaced since; start again without --continue")
    if not resume and (legs or (work / "run").exists()):
        raise SystemExit(f"--work {work} holds a run from an earlier call: pass --continue to resume it, "
                         "or choose an empty --work")
    if legs and _workload(legs[0]["command"]) != _workload(command):
        changed = sorted(set(_workload(command)) ^ set(_workload(legs[0]["command"])))
        raise SystemExit(f"--continue: this call's run differs from the one in {work} ({changed}); "
                         "continue with the same settings, or start in an empty --work")
    return legs


def measure(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-protocol-"))
    run_dir = work / "run"
    env = {**os.environ, "SUBJECTBENCH_CACHE": str(run_dir.parent / "cache")}
    command = [sys.executable, "-m", "benchmark", "run", "dreambooth", *overrides(args), "--out", str(run_dir),
               "--quiet", *(["--gpus", "1", "--workers-per-gpu", str(args.workers_per_gpu)] if args.device == "cuda" else []),
               *(["--mps"] if args.mps else [])]
    if args.device != "cuda":
        command.append(f"device={args.device}")
    if args.dataset_dir:
        command += ["--dataset-dir", args.dataset_dir]
    legs = earlier_legs(work, command, args.resume)
    started = time.perf_counter()
    log_path = run_dir.parent / "run.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"=== gpu_protocol leg {len(legs) + 1} ===\n")
        log.flush()
        # its own process group: at the timeout the whole run (workers included) gets Ctrl-C, so it
        # stops as a user's interrupted run does (an --mps daemon stopped, the store closed), then
        # whatever is left is killed
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:  # keep what finished: the store has it
            _stop_group(process)
            returncode = "timeout"
    wall = time.perf_counter() - started
    legs.append({"command": command, "returncode": returncode, "wall_seconds": wall,
                 "workers_per_gpu": args.workers_per_gpu, "mps": args.mps})
    (work / "legs.json").write_text(json.dumps(legs, indent=1))
    out: dict = {"command": " ".join(["subjectbench run dreambooth", *overrides(args)]),
                 "returncode": returncode, "wall_seconds": sum(leg["wall_seconds"] for leg in legs),
                 "legs": [{k: leg.get(k) for k in ("returncode", "wall_seconds", "workers_per_gpu", "mps")}
                          for leg in legs],
                 "log_tail": log_path.read_text()[-3000:]}
    store_log = run_dir / "run.log"  # the harness's own log: what trained, resumed, generated
    if store_log.is_file():
        out["store_log_tail"] = store_log.read_text(errors="replace").splitlines()[-60:]
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
            trainings.append({"subject": subject, "training": state.get("training", {}),
                              "prepare_seconds": done.get("seconds"),
                              "compile_finetune": done.get("compile_finetune", False),
                              "class_images_generated": state.get("class_images_generated", 0)})
        seconds = rows["seconds"].astype(float).tolist()
        per_method[method] = {
            "images": len(rows),
            "s_per_image_median": statistics.median(seconds),
            "s_per_image_mean": statistics.fmean(seconds),
            "s_per_image_max": max(seconds),
            "seconds": seconds,
            "trainings": trainings,
        }
    out["per_method"] = per_method
    out["stage_seconds"] = stage_seconds(store)
    # the run's private cache (SUBJECTBENCH_CACHE above) started empty: every class image in it was
    # made by this run, also by a training a call's end cut before it published its records
    out["class_images_made"] = len(list((work / "cache" / "class_prior").glob("*/*.png")))
    return out


def _stop_group(process: subprocess.Popen, grace: float = 60.0) -> None:
    """Ctrl-C to ``process``'s group, ``grace`` seconds to stop, then SIGKILL to what is left."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def stage_seconds(store: Store) -> dict:
    """The driver's stage clock (plan / execute / score) of every invocation (``invocations.jsonl``),
    summed: one per call of a run continued over calls (``--continue``; a call stopped by its
    timeout records how far it got, ``stopped_in``)."""
    total: dict = {}
    for record in store.invocations():
        for stage, seconds in (record.get("stage_seconds") or {}).items():
            total[stage] = round(total.get(stage, 0.0) + seconds, 2)
    return total


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rates(measured: dict, subjects: int, steps: dict) -> dict:
    """Per-unit rates from the run's records.

    Per training (TI: per pass of all the run's subjects; the others: per subject):
    ``s_per_step`` and the ``overhead_s`` around the steps = prepare seconds − steps ×
    ``s_per_step`` − its class images at the generation rate (latents, copies, the first step's
    warm-up or compile, state saves), median over trainings, with the first training's surplus
    (its compiles) as ``first_training_extra_s``. Per image: the median ``s_per_image``; the
    batches well above it (compiles) summed as ``compile_extra_s``.
    """
    out = {}
    gen_rate = {m: row["s_per_image_median"] for m, row in measured["per_method"].items()}
    for method, row in measured["per_method"].items():
        per_pass = method == "textual_inversion"
        overheads = []
        trainings = row["trainings"][:1] if per_pass else row["trainings"]  # TI: one pass; DONE holds its share
        for t in trainings:
            per_step = t["training"].get("seconds_per_step")
            if t["prepare_seconds"] is None or not per_step:
                continue
            prepare = t["prepare_seconds"] * (len(row["trainings"]) if per_pass else 1)
            class_s = t.get("class_images_generated", 0) * gen_rate.get("dreambooth", gen_rate[method])
            # a training resumed mid-way (a run continued over calls) ran only the steps after its
            # point in the call whose DONE holds prepare_seconds
            run_steps = steps[method] - t["training"].get("resumed_from_step", 0)
            overheads.append(prepare - run_steps * per_step - class_s)
        median_image = row["s_per_image_median"]
        out[method] = {
            "s_per_step": _median([t["training"].get("seconds_per_step") for t in trainings]),
            "overhead_s": _median(overheads),
            "overhead_per": "pass" if per_pass else "subject",
            "first_training_extra_s": (max(overheads) - statistics.median(overheads)) if overheads else 0.0,
            "s_per_image": median_image,
            "compile_extra_s": sum(s - median_image for s in row["seconds"] if s > 1.5 * median_image),
        }
    return out


def model(rate: dict, counts: dict) -> dict:
    """Seconds per component for a workload: ``counts`` = subjects, steps per method, TI passes,
    images per (method, subject), class images made."""
    parts = {}
    for method, r in rate.items():
        steps = counts["steps"][method]
        trainings = counts["ti_passes"] if method == "textual_inversion" else counts["subjects"]
        parts[f"{method}_training_s"] = trainings * steps * (r["s_per_step"] or 0.0)
        parts[f"{method}_overhead_s"] = trainings * (r["overhead_s"] or 0.0) + r["first_training_extra_s"]
        parts[f"{method}_images_s"] = counts["subjects"] * counts["images"] * r["s_per_image"] + r["compile_extra_s"]
    parts["class_images_s"] = counts["class_images"] * (rate.get("dreambooth", {}).get("s_per_image") or 0.0)
    return parts


def analyse(measured: dict, settings: dict) -> dict:
    """Rates, the model check on the run itself, and the full-protocol projection (one process's
    sum of parts), from a run's ``measured`` block and the script's settings."""
    subjects = len(settings["subjects"].split(","))
    steps = {"textual_inversion": settings["ti_steps"], "dreambooth": settings["db_steps"],
             "dreambooth_lora": settings["lora_steps"]}
    rate = rates(measured, subjects, steps)
    made = sum(t.get("class_images_generated", 0) for row in measured["per_method"].values() for t in row["trainings"])
    # over calls (--continue) the trainings that made them may have published in none: the run's own cache counts
    made = max(made, measured.get("class_images_made", 0))
    run_counts = {"subjects": subjects, "steps": steps, "ti_passes": 1, "images": settings["prompts"] * 4,
                  "class_images": made}
    stages = measured.get("stage_seconds", {})
    predicted = model(rate, run_counts)
    execute = stages.get("execute")
    # the model's parts against the run's own stage clock: what the parts miss is fixed cost
    # (worker start-up, backbone builds), carried over unscaled to the projection
    check = {
        "parts_s": predicted,
        "predicted_execute_s": sum(predicted.values()),
        "measured_execute_s": execute,
        "unmodelled_execute_s": (execute - sum(predicted.values())) if execute is not None else None,
        "measured_stage_seconds": stages,
        "measured_wall_s": measured["wall_seconds"],
    }
    p = PROTOCOL
    protocol_rate = rate
    ti = rate.get("textual_inversion")
    if ti and ti["s_per_step"]:
        # the protocol's passes (the suite's size), at this run's per-subject cost (4 per pass here): conservative
        protocol_rate = {**rate, "textual_inversion": {**ti, "s_per_step": ti["s_per_step"] / subjects * p["ti_subjects_per_pass"]}}
    protocol_counts = {
        "subjects": p["subjects"], "ti_passes": -(-p["subjects"] // p["ti_subjects_per_pass"]),
        "steps": {"textual_inversion": p["ti_steps"], "dreambooth": p["db_steps"], "dreambooth_lora": p["lora_steps"]},
        "images": p["images_per_method_subject"], "class_images": p["classes"] * p["class_images"],
    }
    projection = model(protocol_rate, protocol_counts)
    projection["unmodelled_execute_s"] = max(0.0, check["unmodelled_execute_s"] or 0.0)
    scored_images = sum(row["images"] for row in measured["per_method"].values())
    projection["plan_and_process_s"] = (
        (stages.get("plan", 0.0) + measured["wall_seconds"] - sum(stages.values())) if stages else 0.0
    )
    projection["score_s"] = stages.get("score", 0.0) * p["metric_images"] / max(1, scored_images)
    execute_total = sum(v for k, v in projection.items() if k not in ("plan_and_process_s", "score_s"))
    projection["total_gpu_hours"] = sum(projection.values()) / 3600
    notes = (
        f"Execute-stage parts {execute_total:.0f} s. Rates are per process; with --workers-per-gpu > 1 they run "
        "concurrently, so the projection's total (a sum) overstates the wall time: divide by the measured gain of "
        "the same workload against one worker (--combine). TI passes of the suite's size are projected at this run's per-subject "
        "cost (a pass of 4), and its per-pass overhead (with any compile) counted in every pass: conservative. "
        "Scoring is scaled by images from this run's score stage (its fixed cost included, conservative). Class "
        "images at the DreamBooth generation rate."
    )
    return {"rates": rate, "model_check": check,
            "projection_full_protocol": projection, "notes": notes}


def ti_pass_measured(ti_path: str, size: int, wanted: str, option: str = "--ti-json") -> tuple[dict, dict, float]:
    """A ``gpu_ti_multi.py`` result, its pass of ``size`` subjects and that pass's first-step surplus
    over its measured steps (the compile, when compile_training; paid once per batch shape).
    ``wanted`` says, in the error, why that size; ``option`` which flag gave the file."""
    ti = json.loads(Path(ti_path).read_text())
    passes = {p["subjects"]: p for p in ti["passes"] if "error" not in p}
    if size not in passes:
        raise SystemExit(f"{option} {ti_path}: no pass of {size} subjects in it ({wanted}); it has {sorted(passes)}")
    measured = passes[size]
    return ti, measured, max(0.0, measured["wall_seconds"] - ti["settings"]["measured_steps"] * measured["s_per_step"])


def scoring_seconds(scoring_path: str) -> float:
    """The suite's scoring seconds from a ``gpu_scoring.py`` result (``score_run`` per image)."""
    scoring = json.loads(Path(scoring_path).read_text())
    return scoring["score_run"]["seconds"] / scoring["n_images"] * PROTOCOL["metric_images"]


def _stretched(start: float, seconds: float, until: float, factor: float) -> float:
    """Wall seconds of ``seconds`` of work started at ``start`` that runs ``factor`` times slower
    until ``until`` (the TI pass's training beside it) and at its own rate after."""
    if factor == 1.0 or start >= until:
        return seconds
    if start + seconds * factor <= until:
        return seconds * factor
    return (until - start) + seconds - (until - start) / factor


def _ti_steps_window(path: str, size: int) -> tuple[list[float], dict]:
    """Epoch seconds of a ``gpu_ti_multi.py`` pass's measured steps (its ``clock_window`` less the
    first step, which compiles) and the pass's row."""
    _, row, first = ti_pass_measured(path, size, "the suite's pass, run beside the trainings", option="--overlap")
    if not row.get("clock_window"):
        raise SystemExit(f"--overlap {path}: its pass of {size} subjects has no clock_window "
                         f"(run gpu_ti_multi.py --counts {size} from this repository's version)")
    return [row["clock_window"][0] + first, row["clock_window"][1]], row


def _db_windows(path: str) -> tuple[list[list[float]], list[float]]:
    """Epoch windows and s/step of each training of a ``gpu_speed.py --concurrency N`` arm."""
    speed = json.loads(Path(path).read_text())
    arms = [a for a in speed.get("training_concurrency", {}).values() if a.get("clock_windows_each")]
    if len(arms) != 1:
        raise SystemExit(f"--overlap {path}: wants one gpu_speed.py concurrency arm with clock_windows_each, "
                         f"found {len(arms)} (run it with one --concurrency N and one --concurrency-arms)")
    return arms[0]["clock_windows_each"], arms[0]["s_per_step_each"]


def overlap_factors(paths: list[str], size: int, ti_lone_s_per_step: float, finetune_s_per_step: float) -> dict:
    """How the suite's TI pass and the fine-tune workers slow each other on one GPU (MPS), from two
    calls that each ran both at once: (1) ``gpu_ti_multi.py`` pass + ``gpu_speed.py`` trainings
    whose timed windows hold the pass's measured steps: the pass's step time beside them over its
    lone one (F); (2) the same pair the other way round, the trainings' timed windows inside the
    pass's steps: their step time beside it over the rate the schedule gives the fine-tunes (G).
    Refuses a pair whose windows do not nest (a factor that mixes time beside and alone)."""
    ti_window_a, row_a = _ti_steps_window(paths[0], size)
    windows_a, _ = _db_windows(paths[1])
    windows_b, steps_b = _db_windows(paths[2])
    ti_window_b, _ = _ti_steps_window(paths[3], size)
    if not all(w[0] <= ti_window_a[0] + 1 and ti_window_a[1] <= w[1] + 1 for w in windows_a):
        raise SystemExit(f"--overlap {paths[0]} {paths[1]}: the pass's measured steps {ti_window_a} do not lie inside "
                         f"every training's timed window {windows_a}; its step time is not one beside them")
    if not all(ti_window_b[0] <= w[0] + 1 and w[1] <= ti_window_b[1] + 1 for w in windows_b):
        raise SystemExit(f"--overlap {paths[2]} {paths[3]}: the trainings' timed windows {windows_b} do not lie inside "
                         f"the pass's measured steps {ti_window_b}; their step time is not one beside it")
    beside = _median(steps_b)
    return {"ti_s_per_step_beside": row_a["s_per_step"], "ti_s_per_step_alone": ti_lone_s_per_step,
            "ti_step_factor": row_a["s_per_step"] / ti_lone_s_per_step,
            "finetune_s_per_step_beside_ti": beside, "finetune_s_per_step_schedule": finetune_s_per_step,
            "finetune_step_factor": beside / finetune_s_per_step,
            "trainings_beside": len(windows_a), "files": list(paths)}


def list_schedule(groups: list[dict], workers: int, ti_serial: bool = False, beside_factor: float = 1.0) -> dict:
    """Wall seconds of an execute stage by list scheduling, the way the executors hand out work:
    groups in plan order, each to the worker that is free first. A group is ``{"method",
    "seconds", "first_compile_s"}``: ``first_compile_s`` is paid by a worker's first group of that
    method (a process compiles a method's sampling UNet once; later working copies reuse the code,
    ``methods.sampling``). ``ti_serial``: the first group's ``train_s`` (the TI pass's training) has
    the GPU to itself, every other worker idle until it ends (the upper bound when a GPU-filling
    pass gains nothing from the workers beside it). ``beside_factor`` G: the other workers' groups
    run G times slower while the first group's ``train_s`` lasts (the fine-tunes' step time
    measured beside the TI pass over the rate ``seconds`` was built from)."""
    free = [0.0] * workers
    compiled: list[set] = [set() for _ in range(workers)]
    until = groups[0].get("train_s") or 0.0 if groups else 0.0
    if ti_serial and until:
        free = [until] * workers
        groups = [{**groups[0], "seconds": groups[0]["seconds"] - until}, *groups[1:]]
    for n, group in enumerate(groups):
        i = min(range(workers), key=free.__getitem__)
        seconds = group["seconds"]
        if group["method"] not in compiled[i]:
            compiled[i].add(group["method"])
            seconds += group.get("first_compile_s", 0.0)
        free[i] += seconds if n == 0 or ti_serial else _stretched(free[i], seconds, until, beside_factor)
    return {"execute_s": max(free), "workers_busy_until_s": [round(f, 1) for f in free]}


def schedule_groups(rate: dict, *, subjects: int, classes: int, workers: int, steps: dict, images: int,
                    class_images: int, ti_train_s: float, compile_groups: dict) -> list[dict]:
    """The plan's groups for a workload (``benchmark.units`` order: the TI pass with its subjects'
    images, then DreamBooth per subject, then LoRA per subject), each with its duration at the
    rates of ``rate``: overhead + steps x s_per_step + images x s_per_image; the first
    DreamBooth group of each of ``classes`` classes also makes its class images (LoRA finds them
    cached: same key). A method's sampling compile (the rate's ``compile_extra_s``, spread over
    the ``compile_groups[method]`` groups that paid it in the measured run) goes to each worker's
    first group of the method."""
    def first_compile(method):
        return rate[method]["compile_extra_s"] / max(1, compile_groups.get(method, 1))
    ti = rate["textual_inversion"]
    groups = [{"method": "textual_inversion", "train_s": ti_train_s,
               "seconds": ti_train_s + subjects * images * ti["s_per_image"],
               "first_compile_s": first_compile("textual_inversion")}]
    for method in ("dreambooth", "dreambooth_lora"):
        r = rate[method]
        for k in range(subjects):
            seconds = r["overhead_s"] + steps[method] * r["s_per_step"] + images * r["s_per_image"]
            if method == "dreambooth" and k < classes:
                seconds += class_images * r["s_per_image"]
            groups.append({"method": method, "seconds": seconds, "first_compile_s": first_compile(method)})
    return groups


def lora_compiled_scaling(path: str, measured: dict) -> dict:
    """The compiled/eager step-time ratio of DreamBooth-LoRA with captured steps, and its cold
    compile, from a ``gpu_finetune_compile.py --methods dreambooth_lora --graphs`` result; refused
    when the timed run's LoRA trainings were compiled already."""
    if any(t.get("compile_finetune") for t in measured["per_method"].get("dreambooth_lora", {}).get("trainings", [])):
        raise SystemExit(f"--lora-compiled-json {path}: the timed run trained LoRA compiled already; nothing to scale")
    arms = json.loads(Path(path).read_text()).get("results", {}).get("dreambooth_lora", {})
    missing = [a for a in ("eager_captured", "compiled_captured", "compiled") if not (arms.get(a) or {}).get("s_per_step")]
    if missing:
        raise SystemExit(f"--lora-compiled-json {path}: no {', '.join(missing)} arm of dreambooth_lora in it "
                         "(run gpu_finetune_compile.py --methods dreambooth_lora --graphs)")
    return {"ratio": arms["compiled_captured"]["s_per_step"] / arms["eager_captured"]["s_per_step"],
            "compile_s": arms["compiled"]["first_step_s"], "from": path,
            "note": "captured steps both, one process alone; the cold compile is the compiled arm's first step"}


def schedule(timed_path: str, ti_path: str, scoring_path: str | None, out: str | None,
             ti_step_factor: float | None = None, overlap: list[str] | None = None,
             lora_compiled_path: str | None = None) -> int:
    """Item 5 from a timed multi-subject run at the suite's lengths with K workers (``--protocol-lengths
    --workers-per-gpu K``, one or more legs): its per-process rates, measured with K at once, drive
    a list schedule (``list_schedule``) of (a) the run's own workload, beside what it measured, and
    (b) the 30-subject suite with TI as one pass of ``ti_path``'s largest size (``gpu_ti_multi.py``,
    measured alone), twice: the pass beside the other workers at its alone step time (lower
    bound) and the pass's training alone on the GPU, the others waiting (upper bound); with
    ``ti_step_factor`` F also (c) the pass beside the others at F times its lone step time (F: the
    pass's step time measured beside three fine-tune workers over its lone one); with ``overlap``
    (four files, ``overlap_factors``) also (d) the pass and the other workers both slowed as
    measured when they share the GPU. ``lora_compiled_path`` (``gpu_finetune_compile.py --graphs``),
    when the timed run trained LoRA eager (``training.compile=auto`` below its threshold, as a
    resumed leg with few steps left can be) but the suite compiles it (45 000 fine-tune steps on
    the GPU): the suite's LoRA step time scaled by that file's compiled/eager ratio (captured
    steps both), and each worker's first LoRA group pays its cold compile. Plan, process start-up and scoring (``scoring_path``, else
    the run's score stage scaled) are added once."""
    timed = json.loads(Path(timed_path).read_text())
    settings, measured = timed["settings"], timed["measured"]
    if measured.get("returncode") != 0:
        raise SystemExit(f"--schedule {timed_path}: the run did not finish (returncode {measured.get('returncode')}); "
                         "continue it first (--continue)")
    lengths = {"ti_steps": PROTOCOL["ti_steps"], "db_steps": PROTOCOL["db_steps"], "lora_steps": PROTOCOL["lora_steps"],
               "class_images": PROTOCOL["class_images"]}
    differ = [k for k, v in lengths.items() if settings[k] != v]
    if differ or settings["prompts"] * 4 != PROTOCOL["images_per_method_subject"]:
        raise SystemExit(f"--schedule {timed_path}: not run at the suite's lengths ({differ or 'prompts'} differ): "
                         "run it with --protocol-lengths")
    subjects = settings["subjects"].split(",")
    steps = {"textual_inversion": settings["ti_steps"], "dreambooth": settings["db_steps"],
             "dreambooth_lora": settings["lora_steps"]}
    rate = rates(measured, len(subjects), steps)
    workers = settings["workers_per_gpu"]
    images = settings["prompts"] * 4
    # each fine-tune's subjects were sampled by as many workers as there were subjects (at most K)
    compile_groups = {"textual_inversion": 1, "dreambooth": min(workers, len(subjects)),
                      "dreambooth_lora": min(workers, len(subjects))}
    ti_row = measured["per_method"]["textual_inversion"]["trainings"][0]["training"]
    # the pass's training as it ran: its seconds add every leg's time up to its resume point
    run_ti_train = ti_row["seconds"] + rate["textual_inversion"]["overhead_s"]
    made = measured.get("class_images_made") or 0
    classes_run = made // PROTOCOL["class_images"] if made else len(subjects)
    own = list_schedule(schedule_groups(rate, subjects=len(subjects), classes=classes_run, workers=workers,
                                        steps=steps, images=images, class_images=PROTOCOL["class_images"],
                                        ti_train_s=run_ti_train, compile_groups=compile_groups), workers)
    stages = measured["stage_seconds"]
    legs = measured["legs"]
    outside = measured["wall_seconds"] - sum(stages.values())  # process start and exit, every leg
    fixed_s = stages.get("plan", 0.0) / len(legs) + outside / len(legs)
    check = {"simulated_execute_s": own["execute_s"], "workers_busy_until_s": own["workers_busy_until_s"],
             "simulated_wall_s": own["execute_s"] + fixed_s + stages.get("score", 0.0),
             "measured_execute_s": stages["execute"], "measured_wall_s": measured["wall_seconds"],
             "legs": len(legs),
             "note": "measured over every leg: each restart's start-up and the work a call's end cut after a "
                     "training's last resume point (or before its first) are in it, not in the simulation"}
    size = PROTOCOL["ti_subjects_per_pass"]
    if PROTOCOL["subjects"] > size:
        raise SystemExit(f"--schedule projects one TI pass of all {PROTOCOL['subjects']} subjects; the suite's "
                         f"training.subjects_per_batch is {size}")
    _, measured_pass, first_step = ti_pass_measured(ti_path, size, "--schedule projects one TI pass of the suite")
    suite_ti_train = (PROTOCOL["ti_steps"] * measured_pass["s_per_step"] + first_step
                      + rate["textual_inversion"]["overhead_s"])
    suite_steps = {"textual_inversion": PROTOCOL["ti_steps"], "dreambooth": PROTOCOL["db_steps"],
                   "dreambooth_lora": PROTOCOL["lora_steps"]}

    suite_rate, lora_compile = dict(rate), None
    if lora_compiled_path:
        lora_compile = lora_compiled_scaling(lora_compiled_path, measured)
        r = rate["dreambooth_lora"]
        suite_rate["dreambooth_lora"] = {
            **r, "s_per_step": r["s_per_step"] * lora_compile["ratio"],
            # spread by schedule_groups over the workers' first LoRA groups: each pays it once
            "compile_extra_s": r["compile_extra_s"] + lora_compile["compile_s"] * compile_groups["dreambooth_lora"]}

    def suite_groups(ti_train_s):
        return schedule_groups(suite_rate, subjects=PROTOCOL["subjects"], classes=PROTOCOL["classes"], workers=workers,
                               steps=suite_steps, images=PROTOCOL["images_per_method_subject"],
                               class_images=PROTOCOL["class_images"], ti_train_s=ti_train_s,
                               compile_groups=compile_groups)
    groups = suite_groups(suite_ti_train)
    if scoring_path:
        score_s = scoring_seconds(scoring_path)
    else:
        scored = sum(row["images"] for row in measured["per_method"].values())
        score_s = stages.get("score", 0.0) * PROTOCOL["metric_images"] / max(1, scored)
    def ti_pass_slowed(factor):  # the suite's groups with the pass's steps ``factor`` times its lone step time
        return suite_groups(suite_ti_train + PROTOCOL["ti_steps"] * measured_pass["s_per_step"] * (factor - 1.0))

    projection = {}
    # (name, groups, the pass alone on the GPU, the other workers' slow-down while it trains)
    arms = [("ti_pass_overlapped", groups, False, 1.0), ("ti_pass_alone_on_the_gpu", groups, True, 1.0)]
    if ti_step_factor:
        arms.append((f"ti_pass_overlapped_at_{ti_step_factor:g}x_its_step", ti_pass_slowed(ti_step_factor), False, 1.0))
    factors = None
    if overlap:
        factors = overlap_factors(overlap, size, measured_pass["s_per_step"], rate["dreambooth"]["s_per_step"])
        arms.append(("ti_pass_and_finetunes_as_measured_beside_each_other",
                     ti_pass_slowed(factors["ti_step_factor"]), False, factors["finetune_step_factor"]))
    for name, arm_groups, serial, beside in arms:
        sim = list_schedule(arm_groups, workers, ti_serial=serial, beside_factor=beside)
        wall = sim["execute_s"] + fixed_s + score_s
        projection[name] = {**sim, "wall_s": wall, "gpu_hours": wall / 3600}
    result = {
        "benchmark": "gpu_protocol_schedule", "timed_run": timed_path, "ti_json": ti_path, "scoring_json": scoring_path,
        "device": timed.get("device"), "workers_per_gpu": workers, "rates": rate,
        "suite_ti_pass": {"subjects": size, "s_per_step_alone": measured_pass["s_per_step"],
                          "first_step_surplus_s": first_step, "training_s": suite_ti_train},
        "fixed_s": {"plan_and_process_per_run": fixed_s, "score": score_s},
        "check_on_the_timed_run": check, "overlap": factors, "lora_compiled": lora_compile, "projection_full_protocol": projection,
        "notes": ("Per-process rates measured with K workers at once, also for a schedule's tail where fewer "
                  "run (conservative there). Each worker pays a method's sampling compile once; the first "
                  "DreamBooth group of each class makes its class images. The first two projections bound how "
                  "far the TI pass of 30 (measured alone) overlaps the fine-tune workers; 'overlap' (when given) "
                  "measures it: the pass's step time beside three fine-tune trainings and theirs beside it, "
                  "applied to every group a worker runs while the pass trains (images and LoRA included: "
                  "assumed to slow as the DreamBooth steps measured)."),
    }
    text = json.dumps(result, indent=1, default=str)
    print(text)
    Path(out or Path(os.environ.get("OUT", ".")) / "gpu_protocol_schedule.json").write_text(text)
    return 0


def compiled_finetunes(run: dict) -> bool:
    """Whether a CLI run trained its fine-tunes compiled (``--training-compile true``, or ``auto``
    that chose it: its DONE records say so)."""
    return run["settings"].get("training_compile", "auto") == "true" or any(
        t.get("compile_finetune") for row in run["measured"]["per_method"].values() for t in row["trainings"])


def combine(one_path: str, many_path: str, out: str | None, ti_path: str | None = None,
            scoring_path: str | None = None, finetune_path: str | None = None,
            concurrency_path: str | None = None, ti_pass: int | None = None,
            compiled_path: str | None = None) -> int:
    """Project K workers per GPU: the one-worker projection, its execute stage divided by the
    execute-stage speed-up the same 4-subject workload measured with K workers (more groups in
    the full protocol balance better, so this is conservative).

    Optional refinements from the component benchmarks, each named in the output: ``ti_path``
    (``gpu_ti_multi.py``: the step time of its pass of the protocol's largest pass size at
    ``training.subjects_per_batch`` = ``ti_pass`` (default the suite's, 30: one pass), in
    place of the run's pass of 4, plus one compile per distinct pass size) and ``scoring_path``
    (``gpu_scoring.py``: ``score_run`` seconds per image over 3000 stored PNGs, in place of the
    run's score stage scaled with its fixed costs) and
    ``finetune_path`` (``gpu_finetune_compile.py``: DreamBooth's and LoRA's training parts scaled
    by the compiled/eager step-time ratio it measured in one process, ``training.compile=true``,
    plus one compile each) and ``concurrency_path`` (``gpu_speed.py --concurrency 1,K
    --concurrency-arms eager,compiled``: DreamBooth's compiled/eager ratio with one training and
    with K at once, the K-worker figure then uses the latter; LoRA's K-worker saving is estimated
    from its one-process saving shrunk as DreamBooth's was, and says so).
    ``compiled_path`` (``--check-compiled``): the K-worker run repeated through the CLI with
    compiled fine-tunes, against which the compiled/eager ratios used are checked (``check_compiled``).
    The K-worker figure divides the execute stage by the gain the runs measured (eager trainings)
    after scaling each compiled part by its K-worker ratio; compiles are added once, undivided.
    """
    one, many = json.loads(Path(one_path).read_text()), json.loads(Path(many_path).read_text())
    if one["settings"]["workers_per_gpu"] != 1 or many["settings"]["workers_per_gpu"] <= 1:
        raise SystemExit(f"--combine wants a one-worker JSON then a K-worker JSON; got workers_per_gpu "
                         f"{one['settings']['workers_per_gpu']} and {many['settings']['workers_per_gpu']}")
    same = ("subjects", "ti_steps", "db_steps", "lora_steps", "class_images", "prompts", "sampling_steps", "batch_size")
    differ = [k for k in same if one["settings"][k] != many["settings"][k]]
    # compile settings (older results predate training_compile: it was auto then)
    differ += [k for k in ("compile", "training_compile")
               if one["settings"].get(k, "auto") != many["settings"].get(k, "auto")]
    if differ:
        raise SystemExit(f"--combine: the two runs' workloads differ in {differ}")
    gain = one["measured"]["stage_seconds"]["execute"] / many["measured"]["stage_seconds"]["execute"]
    # recomputed from the run's measurements with this script's model (not the stored projection)
    projection = analyse(one["measured"], one["settings"])["projection_full_protocol"]
    refinements = {}
    if ti_path:
        limit = ti_pass or PROTOCOL["ti_subjects_per_pass"]
        # the suite's passes (benchmark.units.balanced_chunks): 30 at 30 are one, at 16 two of 15, at 8 8, 8, 7, 7
        sizes = [len(chunk) for chunk in balanced_chunks(list(range(PROTOCOL["subjects"])), limit)]
        # the first step's surplus counted once per distinct pass size: a compiled pass compiles once per shape
        ti, measured, first_step = ti_pass_measured(
            ti_path, max(sizes), f"the protocol's passes at training.subjects_per_batch={limit} are {sizes}")
        before = projection["textual_inversion_training_s"]
        # every pass at the largest pass's step time: smaller passes are a little faster (conservative)
        projection["textual_inversion_training_s"] = (
            len(sizes) * PROTOCOL["ti_steps"] * measured["s_per_step"] + first_step * len(set(sizes)))
        refinements["textual_inversion_training_s"] = {
            "from": ti_path, "compile_training": ti["settings"].get("compile_training"),
            "subjects_per_batch": limit, "passes": sizes, "s_per_step_of_pass": measured["s_per_step"],
            "s_per_subject_step": measured["s_per_subject_step"], "first_step_surplus_s": first_step,
            "before_s": before, "after_s": projection["textual_inversion_training_s"]}
    if scoring_path:
        before = projection["score_s"]
        projection["score_s"] = scoring_seconds(scoring_path)
        refinements["score_s"] = {"from": scoring_path, "before_s": before, "after_s": projection["score_s"]}
    if (finetune_path or concurrency_path) and compiled_finetunes(one):
        raise SystemExit(f"--finetune-json/--concurrency-json scale eager fine-tunes, but {one_path} already trained "
                         "them compiled (its DONE records or training_compile say so): combine without them")
    ratios = {}  # fine-tune part -> compiled/eager step-time ratios (one worker, K workers) and compile seconds
    if finetune_path:
        finetune = json.loads(Path(finetune_path).read_text())
        mismatch = [k for k in ("backbone", "resolution") if finetune["settings"][k] != one["settings"][k]]
        if mismatch:
            raise SystemExit(f"--finetune-json {finetune_path}: its {mismatch} differ from {one_path}'s; "
                             "measure both on the same backbone and resolution")
        for method, row in finetune["results"].items():
            if method not in ("dreambooth", "dreambooth_lora") or row["compiled"].get("compile_failed"):
                continue
            # the CLI run's own rate times the compiled/eager ratio measured in one process: machines
            # of one kind differ by ±30 %, a ratio measured side by side transfers, an absolute does not
            ratio = row["compiled"]["s_per_step"] / row["eager"]["s_per_step"]
            ratios[f"{method}_training_s"] = {
                "one": ratio, "k": ratio, "compile_s": max(0.0, row["compile_seconds"]), "from": finetune_path,
                "s_per_step_same_process": {"eager": row["eager"]["s_per_step"], "compiled": row["compiled"]["s_per_step"]},
                "agreement": row["agreement"],
                "k_worker_ratio": "the one-process ratio (not measured with K trainings at once: optimistic)"}
    if concurrency_path:
        rows = json.loads(Path(concurrency_path).read_text())["training_concurrency"]
        k = many["settings"]["workers_per_gpu"]
        wanted = ["1", "1+compile", str(k), f"{k}+compile"]
        missing = [name for name in wanted if "aggregate_steps_per_s" not in rows.get(name, {})]
        if missing:
            raise SystemExit(f"--concurrency-json {concurrency_path}: no measured rows {missing} (gpu_speed.py "
                             f"--concurrency 1,{k} --concurrency-arms eager,compiled makes them)")
        one_ratio = rows["1"]["aggregate_steps_per_s"] / rows["1+compile"]["aggregate_steps_per_s"]
        k_ratio = rows[str(k)]["aggregate_steps_per_s"] / rows[f"{k}+compile"]["aggregate_steps_per_s"]
        compile_s = max(0.0, rows["1+compile"]["warmup_seconds_each"][0] - rows["1"]["warmup_seconds_each"][0])
        ratios["dreambooth_training_s"] = {
            "one": one_ratio, "k": k_ratio, "compile_s": compile_s, "from": concurrency_path,
            "aggregate_steps_per_s": {name: rows[name]["aggregate_steps_per_s"] for name in wanted},
            "k_worker_ratio": f"measured: {k} compiled trainings at once against {k} eager ones"}
        lora = ratios.get("dreambooth_lora_training_s")
        if lora and one_ratio < 1:
            # LoRA was not measured with K at once: its one-process saving shrunk as DreamBooth's did
            lora["k"] = 1 - (1 - lora["one"]) * (1 - k_ratio) / (1 - one_ratio)
            lora["k_worker_ratio"] = (f"estimated: its one-process saving times DreamBooth's shrink under {k} "
                                      f"trainings at once ({(1 - k_ratio) / (1 - one_ratio):.2f})")
    k_scaled = {}  # fine-tune parts as the K-worker run has them (before the gain)
    compiles = 0.0  # paid once per worker, in parallel: added to the K-worker wall time undivided
    for key, r in ratios.items():
        if key not in projection:  # a method the CLI runs did not train
            continue
        before = projection[key]
        projection[key] = before * r["one"] + r["compile_s"]
        k_scaled[key] = before * r["k"]
        compiles += r["compile_s"]
        refinements[key] = {**{n: v for n, v in r.items() if n not in ("one", "k")}, "training_compile": "true or auto",
                            "compiled_over_eager": {"one_worker": r["one"], "k_workers": r["k"]},
                            "compile_once_s": r["compile_s"], "before_s": before, "after_s": projection[key]}
    projection.pop("total_gpu_hours")
    fixed = projection["plan_and_process_s"] + projection["score_s"]
    execute = sum(projection.values()) - fixed
    execute_k = execute - sum(projection[key] for key in k_scaled) + sum(k_scaled.values())
    ti_part = projection.get("textual_inversion_training_s", 0.0)
    k_run = KWorkerRun(execute_k=execute_k, gain=gain, compiles=compiles, fixed=fixed)
    result = {
        "benchmark": "gpu_protocol_combined", "one_worker": one_path, "k_workers": many_path,
        "workers_per_gpu": many["settings"]["workers_per_gpu"], "execute_gain": gain,
        "refinements": refinements,
        "one_worker_gpu_hours": (execute + fixed) / 3600,
        "k_workers_gpu_hours": k_run.gpu_hours(execute_k),
        # the gain was measured on a mix whose TI pass was small; a GPU-filling TI pass may gain
        # nothing from workers beside it: the bound with TI training's part left undivided
        "k_workers_gpu_hours_if_ti_gains_nothing": (
            execute_k / gain + ti_part * (1 - 1 / gain) + compiles + fixed) / 3600,
        "parts_one_worker_s": projection,
    }
    if compiled_path:
        result["cli_check"] = check_compiled(many, compiled_path, ratios, k_scaled, k_run)
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text)
    return 0


def _median_step(row: dict) -> float | None:
    return _median([t["training"].get("seconds_per_step") for t in row.get("trainings", [])])


class KWorkerRun(NamedTuple):
    """The K-worker projection's totals: its execute seconds (fine-tunes as K workers run them),
    the measured K-worker gain on execute, the compiles paid once, and the fixed parts (plan,
    process start, scoring)."""

    execute_k: float
    gain: float
    compiles: float
    fixed: float

    def gpu_hours(self, execute_k: float) -> float:
        """GPU-hours of a K-worker run whose execute part is ``execute_k``."""
        return (execute_k / self.gain + self.compiles + self.fixed) / 3600


def check_compiled(many: dict, compiled_path: str, ratios: dict, k_scaled: dict, k_run: KWorkerRun) -> dict:
    """The projection's compiled fine-tune ratios against a CLI run: the K-worker workload run again
    with ``--training-compile true``. Per fine-tune: the median seconds per step of the compiled run
    over the eager K-worker run's (both through the CLI, K trainings at once), beside the ratio the
    projection used; the K-worker GPU-hours with the CLI-measured ratios in their place; and each
    compiled training's surplus over its steps (its compile, K workers compiling at once) beside the
    compile seconds the projection adds once."""
    compiled = json.loads(Path(compiled_path).read_text())
    same = ("subjects", "ti_steps", "db_steps", "lora_steps", "class_images", "prompts", "sampling_steps",
            "batch_size", "workers_per_gpu")
    differ = [k for k in same if compiled["settings"][k] != many["settings"][k]]
    if differ:
        raise SystemExit(f"--check-compiled {compiled_path}: its workload differs from the K-worker run's in {differ}")
    if compiled["settings"].get("training_compile") != "true":
        raise SystemExit(f"--check-compiled {compiled_path}: not a compiled run (made with --training-compile true)")
    if compiled_finetunes(many):
        raise SystemExit("--check-compiled compares against eager fine-tunes, but the K-worker run trained them compiled")
    steps = {"dreambooth": compiled["settings"]["db_steps"], "dreambooth_lora": compiled["settings"]["lora_steps"]}
    methods, k_cli = {}, dict(k_scaled)
    for method, n_steps in steps.items():
        key = f"{method}_training_s"
        eager_row, compiled_row = many["measured"]["per_method"].get(method), compiled["measured"]["per_method"].get(method)
        if not (eager_row and compiled_row and _median_step(eager_row) and _median_step(compiled_row)):
            continue
        measured = _median_step(compiled_row) / _median_step(eager_row)
        surplus = [t["training"]["seconds"] - n_steps * t["training"]["seconds_per_step"]
                   for t in compiled_row["trainings"] if t["training"].get("seconds") and t["training"].get("seconds_per_step")]
        used = ratios.get(key)
        methods[method] = {
            "s_per_step_k_workers": {"eager": _median_step(eager_row), "compiled": _median_step(compiled_row)},
            "compiled_over_eager_cli": measured,
            "compiled_over_eager_projection": used and used["k"],
            "compile_surplus_s_per_training": surplus,
            "compile_once_s_projection": used and used["compile_s"]}
        if key in k_cli and used:
            k_cli[key] = k_scaled[key] / used["k"] * measured
    execute_cli = k_run.execute_k - sum(k_scaled.values()) + sum(k_cli.values())
    return {"from": compiled_path, "measured_wall_s": compiled["measured"]["wall_seconds"],
            "measured_stage_seconds": compiled["measured"].get("stage_seconds"), "per_method": methods,
            "k_workers_gpu_hours_with_cli_ratios": k_run.gpu_hours(execute_cli),
            "note": "both K-worker runs through the CLI, on different machines of one kind (±30 %); at the "
                    "run's short lengths its wall time is mostly the K workers' concurrent compiles"}


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
    parser.add_argument("--compile", default="auto", help="generation.compile")
    parser.add_argument("--training-compile", default="auto",
                        help="training.compile (true also compiles the DreamBooth fine-tune)")
    parser.add_argument("--training-graphs", default=None, choices=("true", "false"),
                        help="training.cuda_graphs (true: each fine-tune step one replayed CUDA graph)")
    parser.add_argument("--resume-every", type=float, default=None,
                        help="training.resume_every (seconds between a training's resume points; default: the config's)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="passed to the CLI run")
    parser.add_argument("--mps", action="store_true", help="passed to the CLI run (needs --workers-per-gpu 2 or more)")
    parser.add_argument("--combine", nargs=2, metavar=("ONE_WORKER_JSON", "K_WORKERS_JSON"), default=None,
                        help="no run: the one-worker projection with the execute stage divided by the gain that the "
                        "same workload measured with --workers-per-gpu K")
    parser.add_argument("--schedule", default=None, metavar="TIMED_JSON",
                        help="no run: item 5 by list scheduling from a finished --protocol-lengths run with K workers "
                             "(its rates), with --ti-json (the suite's TI pass) and optionally --scoring-json")
    parser.add_argument("--ti-step-factor", type=float, default=None,
                        help="with --schedule: the TI pass's step time beside three fine-tune workers over its lone one")
    parser.add_argument("--overlap", nargs=4, default=None,
                        metavar=("TI_BESIDE_JSON", "DB_AROUND_JSON", "DB_INSIDE_JSON", "TI_AROUND_JSON"),
                        help="with --schedule: two calls that ran the TI pass (gpu_ti_multi.py) and three fine-tune "
                             "trainings (gpu_speed.py --concurrency 3) at once: one whose trainings' windows hold the "
                             "pass's steps, one whose pass holds the trainings' windows")
    parser.add_argument("--lora-compiled-json", default=None,
                        help="with --schedule: a gpu_finetune_compile.py --methods dreambooth_lora --graphs result; the "
                             "suite's LoRA compiled when the timed run's was eager")
    parser.add_argument("--ti-json", default=None,
                        help="with --combine: a gpu_ti_multi.py result holding the protocol's largest pass (30 at the suite's pass size; 15 at --ti-pass 16)")
    parser.add_argument("--ti-pass", type=int, default=None,
                        help="with --ti-json: training.subjects_per_batch of the projected run (default: the suite's, 30)")
    parser.add_argument("--concurrency-json", default=None,
                        help="with --combine: a gpu_speed.py --concurrency 1,K --concurrency-arms eager,compiled result")
    parser.add_argument("--scoring-json", default=None, help="with --combine: a gpu_scoring.py result")
    parser.add_argument("--finetune-json", default=None,
                        help="with --combine: a gpu_finetune_compile.py result (compiled/eager ratios for DreamBooth and LoRA)")
    parser.add_argument("--check-compiled", default=None, metavar="K_COMPILED_JSON",
                        help="with --combine: the K-worker run again with --training-compile true; checks the "
                             "compiled fine-tune ratios the projection used against it (cli_check)")
    parser.add_argument("--dataset-dir", default=None)
    parser.add_argument("--work", default=None, help="the run's folder (default: a new temporary one)")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume the run an earlier call left in --work (same workload; --workers-per-gpu and --mps may "
                             "change); its legs' walls add up")
    parser.add_argument("--protocol-lengths", action="store_true",
                        help="the suite's lengths: TI 5000, DreamBooth 1000, LoRA 500 steps, 200 class images, 25 prompts")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, few steps (CPU check; flags given beside it win)")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds; the partial store is still read")
    parser.add_argument("--out", default=None)
    if "--tiny" in (sys.argv[1:] if argv is None else argv):
        # CPU-check settings, as defaults: a flag given beside --tiny still counts
        parser.set_defaults(backbone="tiny", resolution=64, device="cpu", ti_steps=4, db_steps=4, lora_steps=4,
                            class_images=2, prompts=1, sampling_steps=4, subjects="backpack,dog")
    args = parser.parse_args(argv)
    if args.schedule:
        if not args.ti_json:
            parser.error("--schedule needs --ti-json (a gpu_ti_multi.py result with the suite's TI pass)")
        return schedule(args.schedule, args.ti_json, args.scoring_json, args.out, args.ti_step_factor, args.overlap,
                        args.lora_compiled_json)
    if args.combine:
        return combine(*args.combine, out=args.out, ti_path=args.ti_json, scoring_path=args.scoring_json,
                       finetune_path=args.finetune_json, concurrency_path=args.concurrency_json, ti_pass=args.ti_pass,
                       compiled_path=args.check_compiled)
    if args.resume and not args.work:
        parser.error("--continue needs the --work folder of the run to resume")
    if args.protocol_lengths:
        args.ti_steps, args.db_steps, args.lora_steps = PROTOCOL["ti_steps"], PROTOCOL["db_steps"], PROTOCOL["lora_steps"]
        args.class_images, args.prompts = PROTOCOL["class_images"], PROTOCOL["images_per_method_subject"] // 4
    measured = measure(args)
    result = {
        "benchmark": "gpu_protocol",
        "device": environment.device_name(args.device),
        "packages": environment.package_versions(),
        "settings": vars(args),
        "measured": measured,
    }
    if measured["returncode"] == 0 and measured["per_method"]:
        result.update(analyse(measured, vars(args)))
    text = json.dumps(result, indent=1, default=str)
    print(text)
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_protocol.json")
    out.write_text(text)
    return 0 if measured["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
