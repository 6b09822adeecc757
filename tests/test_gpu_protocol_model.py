"""The cost model of ``benchmarks/gpu_protocol.py`` (the README's GPU-hours come from it):
rates from a run's records, the parts of a workload, and ``--combine``'s arithmetic, checked
against hand computations on small synthetic inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def protocol():
    spec = importlib.util.spec_from_file_location("gpu_protocol", ROOT / "benchmarks" / "gpu_protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _training(seconds, per_step, prepare, class_images=0):
    return {"subject": "s", "training": {"seconds": seconds, "seconds_per_step": per_step},
            "prepare_seconds": prepare, "class_images_generated": class_images}


def test_rates_separate_overhead_class_images_and_compiles(protocol):
    measured = {"per_method": {
        # TI: one pass of 2 subjects, 10 s of steps; DONE seconds are the pass's share (7 s each)
        "textual_inversion": {"s_per_image_median": 0.5, "seconds": [0.5, 0.5, 3.5, 0.5],
                              "trainings": [_training(10.0, 0.1, 7.0), _training(10.0, 0.1, 7.0)]},
        # DreamBooth: the first subject made 4 class images (at 0.25 s) and compiled (+20 s)
        "dreambooth": {"s_per_image_median": 0.25, "seconds": [0.25] * 4,
                       "trainings": [_training(10.0, 0.1, 32.0, class_images=4), _training(10.0, 0.1, 11.0)]},
    }}
    rates = protocol.rates(measured, subjects=2)
    ti, db = rates["textual_inversion"], rates["dreambooth"]
    assert ti["overhead_s"] == pytest.approx(2.0) and ti["first_training_extra_s"] == pytest.approx(0.0)
    assert ti["compile_extra_s"] == pytest.approx(3.0)  # the one slow image, above the median
    # overheads: 32 - 10 - 4 × 0.25 = 21 and 11 - 10 = 1 → median 11, first extra 10
    assert db["overhead_s"] == pytest.approx(11.0) and db["first_training_extra_s"] == pytest.approx(10.0)
    parts = protocol.model(rates, {"subjects": 3, "ti_passes": 2, "images": 10, "class_images": 8,
                                   "steps": {"textual_inversion": 100, "dreambooth": 50}})
    assert parts["textual_inversion_training_s"] == pytest.approx(2 * 100 * 0.1)
    assert parts["dreambooth_training_s"] == pytest.approx(3 * 50 * 0.1)
    assert parts["dreambooth_overhead_s"] == pytest.approx(3 * 11.0 + 10.0)
    assert parts["textual_inversion_images_s"] == pytest.approx(3 * 10 * 0.5 + 3.0)
    assert parts["class_images_s"] == pytest.approx(8 * 0.25)


def _run_json(path, workers, execute, parts):
    settings = {"workers_per_gpu": workers, "subjects": "a,b", "ti_steps": 1, "db_steps": 1, "lora_steps": 1,
                "class_images": 1, "prompts": 1, "sampling_steps": 1, "batch_size": 1}
    projection = {**parts, "total_gpu_hours": sum(parts.values()) / 3600}
    path.write_text(json.dumps({"settings": settings, "measured": {"stage_seconds": {"execute": execute}},
                                "projection_full_protocol": projection}))
    return str(path)


def test_combine_divides_the_execute_stage_by_the_measured_gain(protocol, tmp_path):
    parts = {"textual_inversion_training_s": 3000.0, "dreambooth_training_s": 3600.0,
             "plan_and_process_s": 100.0, "score_s": 500.0}
    one = _run_json(tmp_path / "one.json", 1, 200.0, parts)
    many = _run_json(tmp_path / "many.json", 4, 100.0, parts)
    ti = tmp_path / "ti.json"
    ti.write_text(json.dumps({"settings": {"measured_steps": 10, "compile_training": True},
                              "passes": [{"subjects": 8, "s_per_subject_step": 0.01, "s_per_step": 0.08,
                                          "wall_seconds": 50.8}]}))
    scoring = tmp_path / "scoring.json"
    scoring.write_text(json.dumps({"n_images": 3000, "score_run": {"seconds": 30.0}}))
    out = tmp_path / "combined.json"
    assert protocol.combine(one, many, str(out)) == 0
    plain = json.loads(out.read_text())
    assert plain["execute_gain"] == pytest.approx(2.0)
    assert plain["one_worker_gpu_hours"] == pytest.approx(7200 / 3600)
    assert plain["k_workers_gpu_hours"] == pytest.approx((6600 / 2 + 600) / 3600)
    protocol.combine(one, many, str(out), ti_path=str(ti), scoring_path=str(scoring))
    refined = json.loads(out.read_text())
    # TI: 32 slots (4 passes of 8) × 5000 steps × 0.01 s + the first step's surplus 50.8 − 10 × 0.08
    ti_s = 32 * 5000 * 0.01 + 50.0
    score_s = 30.0 / 3000 * 9000
    assert refined["parts_one_worker_s"]["textual_inversion_training_s"] == pytest.approx(ti_s)
    assert refined["k_workers_gpu_hours"] == pytest.approx(((ti_s + 3600) / 2 + 100 + score_s) / 3600)
    assert set(refined["refinements"]) == {"textual_inversion_training_s", "score_s"}


def test_combine_refuses_runs_of_different_workloads(protocol, tmp_path):
    parts = {"plan_and_process_s": 1.0, "score_s": 1.0}
    one = _run_json(tmp_path / "one.json", 1, 10.0, parts)
    many_path = tmp_path / "many.json"
    _run_json(many_path, 4, 5.0, parts)
    data = json.loads(many_path.read_text())
    data["settings"]["db_steps"] = 2
    many_path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="differ in \\['db_steps'\\]"):
        protocol.combine(one, str(many_path), None)
    with pytest.raises(SystemExit, match="one-worker JSON then a K-worker JSON"):
        protocol.combine(str(many_path), one, None)
