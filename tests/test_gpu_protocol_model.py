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
        # TI: one pass of 2 subjects, 100 steps at 0.1 s; DONE seconds are the pass's share (7 s each)
        "textual_inversion": {"s_per_image_median": 0.5, "seconds": [0.5, 0.5, 3.5, 0.5],
                              "trainings": [_training(10.0, 0.1, 7.0), _training(10.0, 0.1, 7.0)]},
        # DreamBooth, 50 steps at 0.1 s: the first subject made 4 class images (at 0.25 s) and compiled
        "dreambooth": {"s_per_image_median": 0.25, "seconds": [0.25] * 4,
                       "trainings": [_training(10.0, 0.1, 32.0, class_images=4), _training(10.0, 0.1, 11.0)]},
    }}
    steps = {"textual_inversion": 100, "dreambooth": 50}
    rates = protocol.rates(measured, 2, steps)
    ti, db = rates["textual_inversion"], rates["dreambooth"]
    # TI per pass: 2 × 7 − 100 × 0.1 = 4
    assert ti["overhead_s"] == pytest.approx(4.0) and ti["overhead_per"] == "pass"
    assert ti["first_training_extra_s"] == pytest.approx(0.0)
    assert ti["compile_extra_s"] == pytest.approx(3.0)  # the one slow image, above the median
    # DreamBooth per subject: 32 − 5 − 4 × 0.25 = 26 and 11 − 5 = 6 → median 16, first extra 10
    assert db["overhead_s"] == pytest.approx(16.0) and db["first_training_extra_s"] == pytest.approx(10.0)
    parts = protocol.model(rates, {"subjects": 3, "ti_passes": 2, "images": 10, "class_images": 8,
                                   "steps": {"textual_inversion": 100, "dreambooth": 50}})
    assert parts["textual_inversion_training_s"] == pytest.approx(2 * 100 * 0.1)
    assert parts["textual_inversion_overhead_s"] == pytest.approx(2 * 4.0)  # per pass
    assert parts["dreambooth_training_s"] == pytest.approx(3 * 50 * 0.1)
    assert parts["dreambooth_overhead_s"] == pytest.approx(3 * 16.0 + 10.0)
    assert parts["textual_inversion_images_s"] == pytest.approx(3 * 10 * 0.5 + 3.0)
    assert parts["class_images_s"] == pytest.approx(8 * 0.25)


def test_rates_count_only_the_steps_a_resumed_training_ran_in_its_last_call(protocol):
    """A training resumed mid-way (a run continued over calls): its DONE seconds are the last
    call's, which ran only the steps after the resume point; its training seconds add every call's."""
    resumed = {"subject": "s", "training": {"seconds": 70.0, "seconds_per_step": 0.1, "resumed_from_step": 60},
               "prepare_seconds": 9.0, "class_images_generated": 0}
    measured = {"per_method": {"dreambooth": {"s_per_image_median": 0.25, "seconds": [0.25],
                                              "trainings": [resumed]}}}
    rate = protocol.rates(measured, 1, {"dreambooth": 100})["dreambooth"]
    assert rate["overhead_s"] == pytest.approx(9.0 - 40 * 0.1)  # not 9 − 100 × 0.1 < 0


def test_list_schedule_hands_each_group_to_the_first_free_worker(protocol):
    groups = [{"method": "ti", "seconds": 10.0, "train_s": 6.0, "first_compile_s": 1.0},
              {"method": "db", "seconds": 4.0, "first_compile_s": 2.0},
              {"method": "db", "seconds": 4.0, "first_compile_s": 2.0},
              {"method": "db", "seconds": 4.0, "first_compile_s": 2.0}]
    # two workers: w0 TI 10 + 1; w1 db 4 + 2 = 6, then db 4 (compiled already) = 10, then the
    # last db on w1 (free at 10 < 11): 14
    two = protocol.list_schedule(groups, 2)
    assert two["workers_busy_until_s"] == [11.0, 14.0] and two["execute_s"] == pytest.approx(14.0)
    # the TI training alone on the GPU: both workers start at 6; w0 runs TI's images 4 + 1 = 11,
    # w1 6 + 6 = 12, w1 again (12 < 11? no: w0 at 11) -> w0 11 + 4 + 2 = 17, then w1 12 + 4 = 16
    serial = protocol.list_schedule(groups, 2, ti_serial=True)
    assert serial["workers_busy_until_s"] == [17.0, 16.0] and serial["execute_s"] == pytest.approx(17.0)


def test_list_schedule_slows_the_other_workers_while_the_ti_pass_trains(protocol):
    """``beside_factor`` G: a group that runs while the first group trains progresses G times slower
    until that training ends, at its own rate after (hand-computed)."""
    groups = [{"method": "ti", "seconds": 12.0, "train_s": 10.0},
              {"method": "db", "seconds": 4.0}, {"method": "db", "seconds": 4.0}, {"method": "db", "seconds": 4.0}]
    # w1: db1 from 0 at 1/2 speed: 4 × 2 = 8 (ends before 10); db2 from 8: 2 s of wall beside the pass
    # do 1 s of work, the other 3 s after it: ends 13; w0: TI 12; db3 -> w0 (12 < 13): 16
    slowed = protocol.list_schedule(groups, 2, beside_factor=2.0)
    assert slowed["workers_busy_until_s"] == [16.0, 13.0]
    assert protocol.list_schedule(groups, 2)["workers_busy_until_s"] == [12.0, 12.0]  # G = 1: unchanged
    assert protocol._stretched(3.0, 5.0, 10.0, 4.0) == pytest.approx(7.0 + 5.0 - 7.0 / 4.0)
    assert protocol._stretched(11.0, 5.0, 10.0, 4.0) == 5.0


def _overlap_files(tmp_path, ti_steps_from=110.0, db_windows=((100.0, 300.0),) * 3):
    """Two hand-made calls: a TI pass of 30 (10 measured steps, first step 10 s) with three
    trainings around it, and three trainings (0.3 s per step) inside a pass (500 steps at 0.4 s
    from 110 s)."""
    def ti(window, s_per_step, steps=10):
        wall = window[1] - window[0]
        return {"settings": {"measured_steps": steps},
                "passes": [{"subjects": 30, "s_per_step": s_per_step, "wall_seconds": wall, "clock_window": list(window)}]}

    def db(windows, s_per_step):
        return {"training_concurrency": {"3+compile+graphs": {
            "clock_windows_each": [list(w) for w in windows], "s_per_step_each": [s_per_step] * len(windows)}}}
    files = {"ti_a": ti((ti_steps_from - 10.0, ti_steps_from + 4.0), 0.4), "db_a": db(db_windows, 0.2),
             "db_b": db(((150.0, 250.0),) * 3, 0.3), "ti_b": ti((100.0, 310.0), 0.4, steps=500)}
    paths = []
    for name, data in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        paths.append(str(tmp_path / f"{name}.json"))
    return paths


def test_overlap_factors_come_from_nested_windows_only(protocol, tmp_path):
    paths = _overlap_files(tmp_path)
    factors = protocol.overlap_factors(paths, 30, ti_lone_s_per_step=0.32, finetune_s_per_step=0.12)
    assert factors["ti_step_factor"] == pytest.approx(0.4 / 0.32)
    assert factors["finetune_step_factor"] == pytest.approx(0.3 / 0.12)
    # the pass's measured steps (110-114) reach past a training's window (100-112): refused
    paths = _overlap_files(tmp_path, db_windows=((100.0, 300.0), (100.0, 112.0), (100.0, 300.0)))
    with pytest.raises(SystemExit, match="do not lie inside"):
        protocol.overlap_factors(paths, 30, ti_lone_s_per_step=0.32, finetune_s_per_step=0.12)
    # the other way round: a training's window (150-250) starts before the pass's steps (200-310)
    paths = _overlap_files(tmp_path)
    ti_b = json.loads(Path(paths[3]).read_text())
    ti_b["passes"][0]["clock_window"] = [190.0, 310.0]
    ti_b["settings"]["measured_steps"] = 275  # 110 s of steps: the first step ends at 200
    Path(paths[3]).write_text(json.dumps(ti_b))
    with pytest.raises(SystemExit, match="trainings' timed windows .* do not lie inside"):
        protocol.overlap_factors(paths, 30, ti_lone_s_per_step=0.32, finetune_s_per_step=0.12)


def _timed_json(path, ti_seconds=700.0):
    """A finished --protocol-lengths run with 2 workers on 2 subjects of 2 classes (hand-made)."""
    settings = {"workers_per_gpu": 2, "subjects": "a,b", "ti_steps": 5000, "db_steps": 1000, "lora_steps": 500,
                "class_images": 200, "prompts": 25}
    ti_training = {"seconds": ti_seconds, "seconds_per_step": 0.1, "resumed_from_step": 2000}

    def fine(per_step, prepare):
        return {"subject": "s", "training": {"seconds": 1.0, "seconds_per_step": per_step},
                "prepare_seconds": prepare, "class_images_generated": 0}
    measured = {
        "returncode": 0, "wall_seconds": 1000.0, "legs": [{}, {}],
        "stage_seconds": {"plan": 4.0, "execute": 900.0, "score": 6.0},
        "class_images_made": 400,
        "per_method": {
            # the pass of 2: DONE holds each subject's share of the last call (2 × 160 − 3000 × 0.1 = 20 s)
            "textual_inversion": {"images": 200, "s_per_image_median": 0.3, "seconds": [0.3] * 199 + [10.3],
                                  "trainings": [{"subject": "a", "training": ti_training, "prepare_seconds": 160.0},
                                                {"subject": "b", "training": ti_training, "prepare_seconds": 160.0}]},
            "dreambooth": {"images": 200, "s_per_image_median": 0.5, "seconds": [0.5] * 198 + [20.5, 20.5],
                           "trainings": [fine(0.1, 130.0), fine(0.1, 130.0)]},
            "dreambooth_lora": {"images": 200, "s_per_image_median": 0.4, "seconds": [0.4] * 200,
                                "trainings": [fine(0.2, 110.0), fine(0.2, 110.0)]},
        },
    }
    path.write_text(json.dumps({"settings": settings, "measured": measured, "device": "test"}))
    return str(path)


def test_schedule_projects_the_suite_from_a_timed_run(protocol, tmp_path):
    timed = _timed_json(tmp_path / "timed.json")
    ti = tmp_path / "ti.json"
    ti.write_text(json.dumps({"settings": {"measured_steps": 10},
                              "passes": [{"subjects": 30, "s_per_step": 0.3, "wall_seconds": 93.0}]}))
    out = tmp_path / "schedule.json"
    assert protocol.schedule(timed, str(ti), None, str(out)) == 0
    result = json.loads(out.read_text())
    rate = result["rates"]
    assert rate["textual_inversion"]["overhead_s"] == pytest.approx(20.0)
    assert rate["dreambooth"]["overhead_s"] == pytest.approx(30.0)
    assert rate["dreambooth_lora"]["overhead_s"] == pytest.approx(10.0)
    # the run itself, uninterrupted: w0 = TI (700 + 20 training, 200 images × 0.3, compile 10) = 790;
    # w1 = db a (30 + 100 + 50 + 200 class images × 0.5 = 280, compile 40 / 2 = 20) = 300,
    # db b -> w1 (300 < 790): 300 + 280 = 580, lora a -> w1: 580 + 10 + 100 + 40 = 730 (its compile 0),
    # lora b -> w1 (730 < 790): 730 + 150 = 880
    check = result["check_on_the_timed_run"]
    assert check["workers_busy_until_s"] == [790.0, 880.0]
    fixed = 4.0 / 2 + (1000.0 - 910.0) / 2  # plan and process start-up, per leg
    assert check["simulated_wall_s"] == pytest.approx(880.0 + fixed + 6.0)
    assert check["measured_execute_s"] == 900.0 and check["legs"] == 2
    # the suite: TI pass of 30 = 5000 × 0.3 + (93 − 10 × 0.3) + 20 = 1610 training + 3000 × 0.3 images
    assert result["suite_ti_pass"]["training_s"] == pytest.approx(1610.0)
    score = 6.0 * 9000 / 600
    for name, serial in (("ti_pass_overlapped", False), ("ti_pass_alone_on_the_gpu", True)):
        groups = protocol.schedule_groups(
            rate, subjects=30, classes=15, workers=2, images=100, class_images=200, ti_train_s=1610.0,
            steps={"textual_inversion": 5000, "dreambooth": 1000, "dreambooth_lora": 500},
            compile_groups={"textual_inversion": 1, "dreambooth": 2, "dreambooth_lora": 2})
        assert len(groups) == 61 and sum(g["seconds"] for g in groups) == pytest.approx(
            1610 + 900 + 30 * 180 + 15 * 100 + 30 * 150)
        expected = protocol.list_schedule(groups, 2, ti_serial=serial)["execute_s"]
        assert result["projection_full_protocol"][name]["wall_s"] == pytest.approx(expected + fixed + score)
    assert (result["projection_full_protocol"]["ti_pass_alone_on_the_gpu"]["wall_s"]
            > result["projection_full_protocol"]["ti_pass_overlapped"]["wall_s"])
    # a measured slow-down of the pass beside the fine-tunes: its 5000 steps at 1.5 × 0.3 s
    assert protocol.schedule(timed, str(ti), None, str(out), ti_step_factor=1.5) == 0
    slowed = json.loads(out.read_text())["projection_full_protocol"]["ti_pass_overlapped_at_1.5x_its_step"]
    groups = protocol.schedule_groups(
        rate, subjects=30, classes=15, workers=2, images=100, class_images=200, ti_train_s=1610.0 + 5000 * 0.15,
        steps={"textual_inversion": 5000, "dreambooth": 1000, "dreambooth_lora": 500},
        compile_groups={"textual_inversion": 1, "dreambooth": 2, "dreambooth_lora": 2})
    assert slowed["wall_s"] == pytest.approx(protocol.list_schedule(groups, 2)["execute_s"] + fixed + score)
    # measured both ways (--overlap): the pass at 0.4 / 0.3 of its lone step, the other workers at
    # 0.3 / 0.1 (the run's DreamBooth rate) of theirs while it trains
    overlap = _overlap_files(tmp_path)
    assert protocol.schedule(timed, str(ti), None, str(out), overlap=overlap) == 0
    result = json.loads(out.read_text())
    both = result["projection_full_protocol"]["ti_pass_and_finetunes_as_measured_beside_each_other"]
    groups = protocol.schedule_groups(
        rate, subjects=30, classes=15, workers=2, images=100, class_images=200,
        ti_train_s=1610.0 + 5000 * 0.3 * (0.4 / 0.3 - 1.0),
        steps={"textual_inversion": 5000, "dreambooth": 1000, "dreambooth_lora": 500},
        compile_groups={"textual_inversion": 1, "dreambooth": 2, "dreambooth_lora": 2})
    expected = protocol.list_schedule(groups, 2, beside_factor=3.0)["execute_s"]
    assert both["wall_s"] == pytest.approx(expected + fixed + score)
    assert result["overlap"]["finetune_step_factor"] == pytest.approx(3.0)
    # the suite's LoRA compiled where the run's was eager: its step × compiled/eager (captured), and
    # each of the 2 workers' first LoRA group pays the cold compile (50 s)
    lora = tmp_path / "lora.json"
    lora.write_text(json.dumps({"results": {"dreambooth_lora": {
        "eager_captured": {"s_per_step": 0.05}, "compiled_captured": {"s_per_step": 0.03},
        "compiled": {"s_per_step": 0.1, "first_step_s": 50.0}}}}))
    assert protocol.schedule(timed, str(ti), None, str(out), lora_compiled_path=str(lora)) == 0
    result = json.loads(out.read_text())
    assert result["lora_compiled"]["ratio"] == pytest.approx(0.6)
    suite_rate = dict(rate)
    suite_rate["dreambooth_lora"] = {**rate["dreambooth_lora"], "s_per_step": 0.2 * 0.6,
                                     "compile_extra_s": rate["dreambooth_lora"]["compile_extra_s"] + 2 * 50.0}
    groups = protocol.schedule_groups(
        suite_rate, subjects=30, classes=15, workers=2, images=100, class_images=200, ti_train_s=1610.0,
        steps={"textual_inversion": 5000, "dreambooth": 1000, "dreambooth_lora": 500},
        compile_groups={"textual_inversion": 1, "dreambooth": 2, "dreambooth_lora": 2})
    assert result["projection_full_protocol"]["ti_pass_overlapped"]["wall_s"] == pytest.approx(
        protocol.list_schedule(groups, 2)["execute_s"] + fixed + score)
    assert result["check_on_the_timed_run"]["workers_busy_until_s"] == [790.0, 880.0]  # the run itself: as run


def test_schedule_refuses_an_unfinished_or_short_run(protocol, tmp_path):
    timed = Path(_timed_json(tmp_path / "timed.json"))
    data = json.loads(timed.read_text())
    data["measured"]["returncode"] = "timeout"
    timed.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="did not finish"):
        protocol.schedule(str(timed), "unused", None, None)
    data["measured"]["returncode"] = 0
    data["settings"]["db_steps"] = 100
    timed.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="suite's lengths"):
        protocol.schedule(str(timed), "unused", None, None)


def _run_json(path, workers, execute):
    settings = {"workers_per_gpu": workers, "backbone": "sd15-random", "resolution": 512, "subjects": "a,b", "ti_steps": 100, "db_steps": 50, "lora_steps": 50,
                "class_images": 4, "prompts": 1, "sampling_steps": 1, "batch_size": 4}
    measured = {
        "wall_seconds": execute + 30.0,
        "stage_seconds": {"plan": 5.0, "execute": execute, "score": 10.0},
        "per_method": {
            "textual_inversion": {"images": 8, "s_per_image_median": 0.5, "seconds": [0.5] * 8,
                                  "trainings": [_training(10.0, 0.1, 7.0), _training(10.0, 0.1, 7.0)]},
            "dreambooth": {"images": 8, "s_per_image_median": 0.25, "seconds": [0.25] * 8,
                           "trainings": [_training(5.0, 0.1, 7.0, 4), _training(5.0, 0.1, 6.0)]},
        },
    }
    path.write_text(json.dumps({"settings": settings, "measured": measured}))
    return str(path)


def _concurrency_json(tmp_path) -> Path:
    """A ``gpu_speed.py --concurrency 1,4`` result: compiled/eager 0.5 alone, 0.8 with 4 at once."""
    rows = {"1": {"aggregate_steps_per_s": 5.0, "warmup_seconds_each": [20.0]},
            "1+compile": {"aggregate_steps_per_s": 10.0, "warmup_seconds_each": [120.0]},
            "4": {"aggregate_steps_per_s": 16.0, "warmup_seconds_each": [5.0] * 4},
            "4+compile": {"aggregate_steps_per_s": 20.0, "warmup_seconds_each": [9.0] * 4}}
    path = tmp_path / "conc.json"
    path.write_text(json.dumps({"training_concurrency": rows}))
    return path


def test_combine_divides_the_execute_stage_by_the_measured_gain(protocol, tmp_path):
    one = _run_json(tmp_path / "one.json", 1, 200.0)
    many = _run_json(tmp_path / "many.json", 4, 100.0)
    ti = tmp_path / "ti.json"
    ti.write_text(json.dumps({"settings": {"measured_steps": 10, "compile_training": True},
                              "passes": [{"subjects": 8, "s_per_subject_step": 0.01, "s_per_step": 0.08,
                                          "wall_seconds": 50.8},
                                         {"subjects": 15, "s_per_subject_step": 0.01, "s_per_step": 0.15,
                                          "wall_seconds": 61.5}]}))
    scoring = tmp_path / "scoring.json"
    scoring.write_text(json.dumps({"n_images": 3000, "score_run": {"seconds": 30.0}}))
    out = tmp_path / "combined.json"
    # the projection is recomputed from the one-worker run's measurements
    parts = protocol.analyse(json.loads(Path(one).read_text())["measured"],
                             json.loads(Path(one).read_text())["settings"])["projection_full_protocol"]
    total = parts.pop("total_gpu_hours") * 3600
    fixed = parts["plan_and_process_s"] + parts["score_s"]
    assert parts["plan_and_process_s"] == pytest.approx(5.0 + 30.0 - 15.0)  # plan + outside the stages
    assert parts["score_s"] == pytest.approx(10.0 * 9000 / 16)
    assert protocol.combine(one, many, str(out)) == 0
    plain = json.loads(out.read_text())
    assert plain["execute_gain"] == pytest.approx(2.0)
    assert plain["one_worker_gpu_hours"] == pytest.approx(total / 3600)
    assert plain["k_workers_gpu_hours"] == pytest.approx(((total - fixed) / 2 + fixed) / 3600)
    ti_train = parts["textual_inversion_training_s"]
    assert plain["k_workers_gpu_hours_if_ti_gains_nothing"] == pytest.approx(
        ((total - fixed - ti_train) / 2 + ti_train + fixed) / 3600)
    # the suite's own pass size (30 subjects in one pass): this TI JSON has no pass of 30
    assert protocol.PROTOCOL["ti_subjects_per_pass"] == 30
    with pytest.raises(SystemExit, match="no pass of 30 subjects"):
        protocol.combine(one, many, None, ti_path=str(ti))
    protocol.combine(one, many, str(out), ti_path=str(ti), scoring_path=str(scoring), ti_pass=16)
    refined = json.loads(out.read_text())
    # TI at 16 per pass: two passes of 15 × 5000 steps × 0.15 s + one compile (the first
    # step's surplus 61.5 − 10 × 0.15: one pass size, one shape)
    ti_s = 2 * 5000 * 0.15 + 60.0
    score_s = 30.0 / 3000 * 9000
    assert refined["parts_one_worker_s"]["textual_inversion_training_s"] == pytest.approx(ti_s)
    execute = total - fixed - parts["textual_inversion_training_s"] + ti_s
    assert refined["k_workers_gpu_hours"] == pytest.approx((execute / 2 + parts["plan_and_process_s"] + score_s) / 3600)
    assert set(refined["refinements"]) == {"textual_inversion_training_s", "score_s"}
    # at 8 per pass: 8, 8, 7, 7 (balanced), each at the pass of 8's step time, and two shapes compile
    protocol.combine(one, many, str(out), ti_path=str(ti), ti_pass=8)
    at8 = json.loads(out.read_text())
    assert at8["refinements"]["textual_inversion_training_s"]["passes"] == [8, 8, 7, 7]
    assert at8["parts_one_worker_s"]["textual_inversion_training_s"] == pytest.approx(4 * 5000 * 0.08 + 2 * 50.0)
    with pytest.raises(SystemExit, match="no pass of 10 subjects"):
        protocol.combine(one, many, None, ti_path=str(ti), ti_pass=10)  # 30 at 10: three of 10


def test_combine_refuses_runs_of_different_workloads(protocol, tmp_path):
    one = _run_json(tmp_path / "one.json", 1, 10.0)
    many_path = tmp_path / "many.json"
    _run_json(many_path, 4, 5.0)
    data = json.loads(many_path.read_text())
    data["settings"]["db_steps"] = 2
    many_path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="differ in \\['db_steps'\\]"):
        protocol.combine(one, str(many_path), None)
    with pytest.raises(SystemExit, match="one-worker JSON then a K-worker JSON"):
        protocol.combine(str(many_path), one, None)


def test_combine_takes_compiled_finetune_rates(protocol, tmp_path):
    """``--finetune-json``: DreamBooth's training part is scaled by the compiled/eager ratio
    measured in one process, plus one compile; a failed compile or another backbone is not used."""
    one = _run_json(tmp_path / "one.json", 1, 200.0)
    many = _run_json(tmp_path / "many.json", 4, 100.0)
    finetune = {"settings": {"backbone": "sd15-random", "resolution": 512}, "results": {"dreambooth": {
        "eager": {"s_per_step": 0.1}, "compiled": {"s_per_step": 0.05}, "compile_seconds": 90.0,
        "agreement": {"max_relative_loss_difference": 1e-5}}}}
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(finetune))
    out = tmp_path / "combined.json"
    protocol.combine(one, many, str(out))
    before = json.loads(out.read_text())
    protocol.combine(one, many, str(out), finetune_path=str(path))
    after = json.loads(out.read_text())
    # the run's 0.1 s/step (30 × 1000 steps) halved by the ratio 0.05 / 0.1, plus the compile
    assert before["parts_one_worker_s"]["dreambooth_training_s"] == pytest.approx(30 * 1000 * 0.1)
    assert after["parts_one_worker_s"]["dreambooth_training_s"] == pytest.approx(30 * 1000 * 0.1 * 0.5 + 90.0)
    change = after["parts_one_worker_s"]["dreambooth_training_s"] - before["parts_one_worker_s"]["dreambooth_training_s"]
    assert after["one_worker_gpu_hours"] - before["one_worker_gpu_hours"] == pytest.approx(change / 3600)
    assert "not measured with K trainings at once" in after["refinements"]["dreambooth_training_s"]["k_worker_ratio"]
    # K workers: the same ratio applied before the gain, the compile added once
    assert after["k_workers_gpu_hours"] * 3600 == pytest.approx(
        before["k_workers_gpu_hours"] * 3600 - 3000 / 2 + 1500 / 2 + 90.0)
    finetune["results"]["dreambooth"]["compiled"]["compile_failed"] = True
    path.write_text(json.dumps(finetune))
    protocol.combine(one, many, str(out), finetune_path=str(path))
    assert json.loads(out.read_text())["refinements"] == {}
    finetune["settings"]["backbone"] = "tiny"
    path.write_text(json.dumps(finetune))
    with pytest.raises(SystemExit, match="backbone"):
        protocol.combine(one, many, None, finetune_path=str(path))


def test_combine_takes_compiled_rates_measured_with_k_trainings_at_once(protocol, tmp_path):
    """``--concurrency-json``: DreamBooth's one-worker part scales by the one-process compiled/eager
    ratio, its K-worker part by the ratio of K compiled to K eager trainings at once; compiles are
    added once to the K-worker wall time; LoRA's K-worker saving shrinks as DreamBooth's did."""
    one = _run_json(tmp_path / "one.json", 1, 200.0)
    many = _run_json(tmp_path / "many.json", 4, 100.0)  # execute gain 2
    for path in (one, many):  # a LoRA row like DreamBooth's
        data = json.loads(Path(path).read_text())
        data["measured"]["per_method"]["dreambooth_lora"] = data["measured"]["per_method"]["dreambooth"]
        Path(path).write_text(json.dumps(data))
    concurrency = _concurrency_json(tmp_path)
    out = tmp_path / "combined.json"
    protocol.combine(one, many, str(out))
    before = json.loads(out.read_text())
    protocol.combine(one, many, str(out), concurrency_path=str(concurrency))
    after = json.loads(out.read_text())
    db = 30 * 1000 * 0.1  # the run's DreamBooth part, eager
    assert after["parts_one_worker_s"]["dreambooth_training_s"] == pytest.approx(db * 0.5 + 100.0)
    # K workers: DreamBooth at 16/20 of its eager part, divided by the gain; the compile once, undivided
    assert after["k_workers_gpu_hours"] * 3600 == pytest.approx(
        before["k_workers_gpu_hours"] * 3600 - db / 2 + db * 0.8 / 2 + 100.0)
    assert "measured" in after["refinements"]["dreambooth_training_s"]["k_worker_ratio"]
    # with LoRA's one-process ratio (0.75) its K-worker ratio is 1 - 0.25 × (0.2 / 0.5) = 0.9
    finetune = {"settings": {"backbone": "sd15-random", "resolution": 512}, "results": {"dreambooth_lora": {
        "eager": {"s_per_step": 0.1}, "compiled": {"s_per_step": 0.075}, "compile_seconds": 50.0, "agreement": {}}}}
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(finetune))
    protocol.combine(one, many, str(out), finetune_path=str(path), concurrency_path=str(concurrency))
    lora = json.loads(out.read_text())["refinements"]["dreambooth_lora_training_s"]
    assert lora["compiled_over_eager"] == pytest.approx({"one_worker": 0.75, "k_workers": 0.9})
    assert "estimated" in lora["k_worker_ratio"]
    for path in (one, many):  # runs that trained compiled already: scaling them again would count twice
        data = json.loads(Path(path).read_text())
        data["settings"]["training_compile"] = "true"
        Path(path).write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="already trained"):
        protocol.combine(one, many, None, concurrency_path=str(concurrency))
    for path in (one, many):  # auto, but its DONE records say the fine-tunes compiled (enough steps per GPU)
        data = json.loads(Path(path).read_text())
        data["settings"]["training_compile"] = "auto"
        data["measured"]["per_method"]["dreambooth"]["trainings"][0]["compile_finetune"] = True
        Path(path).write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="already trained"):
        protocol.combine(one, many, None, concurrency_path=str(concurrency))
    for path in (one, many):
        data = json.loads(Path(path).read_text())
        data["measured"]["per_method"]["dreambooth"]["trainings"][0]["compile_finetune"] = False
        Path(path).write_text(json.dumps(data))
    rows = json.loads(concurrency.read_text())["training_concurrency"]
    del rows["4+compile"]
    concurrency.write_text(json.dumps({"training_concurrency": rows}))
    with pytest.raises(SystemExit, match=r"4\+compile"):
        protocol.combine(one, many, None, concurrency_path=str(concurrency))


def test_check_compiled_sets_the_cli_ratio_beside_the_projections(protocol, tmp_path):
    """``--check-compiled``: the K-worker run made again with compiled fine-tunes. DreamBooth's
    compiled/eager step ratio through the CLI (0.06 / 0.1) is reported beside the ratio the
    projection used (20 ÷ 16 aggregate steps/s → 0.8), the K-worker hours recomputed with it, and
    each compiled training's surplus over its steps (its compile) listed."""
    one = _run_json(tmp_path / "one.json", 1, 200.0)
    many = _run_json(tmp_path / "many.json", 4, 100.0)  # execute gain 2
    compiled = json.loads(Path(_run_json(tmp_path / "compiled.json", 4, 300.0)).read_text())
    compiled["settings"]["training_compile"] = "true"
    compiled["measured"]["per_method"]["dreambooth"]["trainings"] = [_training(53.0, 0.06, 60.0),
                                                                      _training(13.0, 0.06, 20.0)]
    (tmp_path / "compiled.json").write_text(json.dumps(compiled))
    concurrency = _concurrency_json(tmp_path)
    out = tmp_path / "combined.json"
    protocol.combine(one, many, str(out), concurrency_path=str(concurrency),
                     compiled_path=str(tmp_path / "compiled.json"))
    result = json.loads(out.read_text())
    check = result["cli_check"]["per_method"]["dreambooth"]
    assert check["compiled_over_eager_cli"] == pytest.approx(0.6)
    assert check["compiled_over_eager_projection"] == pytest.approx(0.8)
    assert check["compile_surplus_s_per_training"] == pytest.approx([53.0 - 50 * 0.06, 13.0 - 50 * 0.06])
    db = 30 * 1000 * 0.1  # the run's DreamBooth part, eager: at 0.6 instead of 0.8, divided by the gain
    assert result["cli_check"]["k_workers_gpu_hours_with_cli_ratios"] * 3600 == pytest.approx(
        result["k_workers_gpu_hours"] * 3600 - db * 0.8 / 2 + db * 0.6 / 2)
    compiled["settings"]["training_compile"] = "auto"
    (tmp_path / "compiled.json").write_text(json.dumps(compiled))
    with pytest.raises(SystemExit, match="not a compiled run"):
        protocol.combine(one, many, None, concurrency_path=str(concurrency), compiled_path=str(tmp_path / "compiled.json"))
    compiled["settings"]["training_compile"] = "true"
    (tmp_path / "compiled.json").write_text(json.dumps(compiled))
    eager_k = json.loads(Path(many).read_text())
    eager_k["measured"]["per_method"]["dreambooth"]["trainings"][0]["compile_finetune"] = True
    Path(many).write_text(json.dumps(eager_k))
    with pytest.raises(SystemExit, match="K-worker run trained them compiled"):
        protocol.combine(one, many, None, concurrency_path=str(concurrency), compiled_path=str(tmp_path / "compiled.json"))
    eager_k["measured"]["per_method"]["dreambooth"]["trainings"][0]["compile_finetune"] = False
    Path(many).write_text(json.dumps(eager_k))
    compiled["settings"]["db_steps"] = 7
    (tmp_path / "compiled.json").write_text(json.dumps(compiled))
    with pytest.raises(SystemExit, match="differs from the K-worker run's in \\['db_steps'\\]"):
        protocol.combine(one, many, None, concurrency_path=str(concurrency), compiled_path=str(tmp_path / "compiled.json"))


def test_a_timed_out_run_gets_ctrl_c_before_it_is_killed(protocol, tmp_path):
    """At --run-timeout the run's whole process group gets Ctrl-C first, so the CLI stops as an
    interrupted run does (its --mps daemon stopped, its workers gone), and is killed only after."""
    import subprocess
    import sys
    import time

    child = ("import sys, time, pathlib\n"
             "pathlib.Path(sys.argv[1], 'ready').touch()\n"
             "try:\n    time.sleep(120)\n"
             "except KeyboardInterrupt:\n    pathlib.Path(sys.argv[1], 'interrupted').touch()\n")
    process = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    protocol._stop_group(process, grace=30)
    assert (tmp_path / "interrupted").exists() and process.returncode == 0


def test_a_run_continued_over_calls_checks_its_folder_and_settings(protocol, tmp_path):
    """``--continue`` resumes the run an earlier call left in ``--work`` (lent GPUs allow 10
    minutes a call): it needs that call's legs and the same workload (its executor flags may
    change); a call without it refuses a folder that holds a run instead of mixing two runs' stores."""
    command = ["python", "-m", "benchmark", "run", "dreambooth", "subjects=dog"]
    assert protocol.earlier_legs(tmp_path, command, resume=False) == []
    with pytest.raises(SystemExit, match="no earlier call's run.*start again without --continue"):
        protocol.earlier_legs(tmp_path, command, resume=True)
    legs = [{"command": command, "returncode": "timeout", "wall_seconds": 560.0}]
    (tmp_path / "legs.json").write_text(json.dumps(legs))
    assert protocol.earlier_legs(tmp_path, command, resume=True) == legs
    with pytest.raises(SystemExit, match="holds a run from an earlier call: pass --continue"):
        protocol.earlier_legs(tmp_path, command, resume=False)
    with pytest.raises(SystemExit, match=r"differs from the one in .*subjects=cat"):
        protocol.earlier_legs(tmp_path, [*command[:-1], "subjects=cat"], resume=True)
    # the executor flags may change between calls (the store does not depend on them)
    four = [*command, "--gpus", "1", "--workers-per-gpu", "4", "--mps"]
    (tmp_path / "legs.json").write_text(json.dumps([{**legs[0], "command": [*command, "--gpus", "1", "--workers-per-gpu", "1"]}]))
    assert len(protocol.earlier_legs(tmp_path, four, resume=True)) == 1
    with pytest.raises(SystemExit, match="differs"):
        protocol.earlier_legs(tmp_path, [*four[:-4], "--gpus", "2", "--workers-per-gpu", "4"], resume=True)
    with pytest.raises(SystemExit):
        protocol.main(["--continue", "--tiny"])  # --continue without --work: argparse names it


@pytest.mark.slow  # two tiny CLI runs on the CPU (~2-3 min on two cores)
def test_a_run_cut_by_its_timeout_is_finished_by_the_next_call(protocol, tmp_path, dreambooth_dir):
    """The first call's run is stopped by ``--run-timeout`` and keeps its store; the second call
    with ``--continue`` finishes it without redoing what finished: two legs, their walls summed.
    The TI pass is long enough (800 steps: ~35 s on an idle 2-core machine, 0.043 s per step, more
    under load; 400 steps once finished 2 s before the cut there) that the cut lands inside it,
    and the second call resumes it from its last point."""
    work, out = tmp_path / "work", tmp_path / "p.json"
    base = ["--tiny", "--ti-steps", "800", "--resume-every", "5", "--dataset-dir", str(dreambooth_dir),
            "--work", str(work), "--out", str(out)]
    assert protocol.main([*base, "--run-timeout", "25"]) == 1
    first = json.loads(out.read_text())["measured"]
    assert first["legs"][0]["returncode"] == "timeout"
    assert protocol.main([*base, "--continue"]) == 0
    second = json.loads(out.read_text())
    legs = second["measured"]["legs"]
    assert [leg["returncode"] for leg in legs] == ["timeout", 0]
    assert second["measured"]["wall_seconds"] == pytest.approx(sum(leg["wall_seconds"] for leg in legs))
    assert "rates" in second and "projection_full_protocol" in second
    assert second["settings"]["ti_steps"] == 800 and second["settings"]["backbone"] == "tiny"
    (ti_row, *_) = second["measured"]["per_method"]["textual_inversion"]["trainings"]
    assert 0 < ti_row["training"]["resumed_from_step"] < 800
    assert (work / "run.log").read_text().count("=== gpu_protocol leg") == 2
    # the stopped call logged how far its stages got; the stage clock adds both calls' lines
    assert "(stopped in " in (work / "run" / "run.log").read_text()
    # every class image the run made, whichever call made it: 2 classes × 2 (LoRA shares DreamBooth's)
    assert second["measured"]["class_images_made"] == 4
    assert sum(second["measured"]["stage_seconds"].values()) >= 15  # the first call ran ~25 s, most in stages
