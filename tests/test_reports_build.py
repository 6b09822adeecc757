"""`subjectbench report`: the report of a real (dummy-method) run, rebuilt from its store alone."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from reports import load_results
from reports.build import build_report
from tests.report_fakes import use_fakes

RESAMPLES = "400"
OVERRIDES = [
    "methods=dummy,sweep_dummy",
    "methods.dummy.fidelity=[0.3,0.9]",
    "metrics.weights=random",
]


def make_run(run_dir: Path, *overrides: str) -> Path:
    run_benchmark(load_config("default", [*OVERRIDES, *overrides]), run_dir, quiet=True)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        use_fakes(patch)
        path = make_run(tmp_path_factory.mktemp("run"))
        assert main(["report", str(path), "--resamples", RESAMPLES]) == 0
        yield path


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        for name in ("href", "src"):
            if attrs.get(name):
                self.links.append(attrs[name])


def parse(path: Path) -> Links:
    parser = Links()
    parser.feed(read(path))
    return parser


def test_report_writes_every_artefact(run_dir):
    report = run_dir / "report"
    for name in ("index.html", "results.parquet", "fingerprints.json", "leaderboard.html", "leaderboard.md",
                 "leaderboard.csv", "tables.html", "tables.md", "plots.html", "gallery/index.html"):
        assert (report / name).is_file(), name
    for table in ("summary", "by_kind", "by_category", "per_subject", "clip_t_scales", "cost"):
        assert (report / "tables" / f"{table}.csv").is_file(), table
    for plot in ("pareto_dino_vs_clip_t", "pareto_clip_i_vs_clip_t"):
        for suffix in (".png", ".svg"):
            assert (report / "plots" / f"{plot}{suffix}").stat().st_size > 1000
    subjects = {p.name for p in (report / "gallery").glob("s-*.html")}
    assert subjects == {"s-dog.html", "s-duck_toy.html", "s-teapot.html"}


def test_long_format_one_row_per_image_and_metric(run_dir):
    results = pd.read_parquet(run_dir / "report" / "results.parquet")
    rebuilt = load_results(run_dir)
    pd.testing.assert_frame_equal(results, rebuilt)
    # 2 cells×1 checkpoint + 1 cell×3 checkpoints = 5 entries; per subject 3 prompts × 2 images + 2 prior.
    eval_images, prior_images = 5 * 3 * 6, 5 * 3 * 2
    counts = results.groupby("metric").size().to_dict()
    copy_check = {"copy": eval_images, "copy_nn": eval_images, "copy_real": eval_images}  # in every report
    copy_check |= dict.fromkeys(("dino_s16_squash", "clip_t_identifier", "clip_t_clipscore"), eval_images)  # conventions
    assert counts == {"dino": eval_images, "clip_i": eval_images, "clip_t": eval_images, "div": eval_images, "pres": prior_images,
                      **copy_check}
    assert not results.duplicated(["key", "metric"]).any()
    for column in ("method", "cell_id", "grid", "grid_fidelity", "subject", "kind", "prompt", "category", "checkpoint",
                   "k", "seed", "backbone", "metric_fingerprint", "metric_weights", "value", "clip_t_x100", "clipscore", "image"):
        assert column in results, column
    assert set(results["method"]) == {"dummy", "sweep_dummy"}
    assert set(results.loc[results["method"] == "dummy", "grid_fidelity"]) == {0.3, 0.9}
    assert results.loc[results["method"] == "sweep_dummy", "grid_fidelity"].isna().all()
    assert set(results["checkpoint"]) == {"final", "step-10", "step-20"}
    assert set(results["category"]) == {"recontextualization", "property", "prior"}
    assert results["smoke"].all() and set(results["metric_weights"]) == {"random"}
    assert results["higher_is_better"].tolist() == [m not in ("pres", "copy", "copy_nn", "copy_real") for m in results["metric"]]
    clip_t = results[results["metric"] == "clip_t"]
    np.testing.assert_allclose(clip_t["clip_t_x100"], 100 * clip_t["value"])
    np.testing.assert_allclose(clip_t["clipscore"], 2.5 * np.maximum(clip_t["value"], 0))
    assert results.loc[results["metric"] != "clip_t", ["clip_t_x100", "clipscore"]].isna().all().all()
    assert all((run_dir / p).is_file() for p in results["image"])


def test_summary_matches_the_long_format(run_dir):
    summary = pd.read_csv(run_dir / "report" / "tables" / "summary.csv")
    results = load_results(run_dir)
    assert len(summary) == 5
    for _, row in summary.iterrows():
        mine = results[(results["entry"] == row["entry"]) & (results["metric"] == "dino")]
        assert row["dino_mean"] == pytest.approx(mine["value"].mean())
        assert row["dino_ci_low"] <= row["dino_mean"] <= row["dino_ci_high"]
        assert row["dino_n_subjects"] == 3
    by_category = pd.read_csv(run_dir / "report" / "tables" / "by_category.csv")
    prior = by_category[by_category["category"] == "prior"]
    assert prior["dino_mean"].isna().all() and prior["pres_mean"].notna().all()
    by_kind = pd.read_csv(run_dir / "report" / "tables" / "by_kind.csv")
    live = by_kind[by_kind["kind"] == "live"]  # one live subject: a mean, but no interval
    assert live["dino_mean"].notna().all() and live["dino_ci_low"].isna().all()
    sweep = summary[summary["cell_id"] == "sweep_dummy"].sort_values("checkpoint_index")
    assert list(sweep["checkpoint"]) == ["step-10", "step-20", "final"]
    assert sweep["dino_mean"].is_monotonic_increasing  # fidelity grows along the sweep


def test_cost_table_reads_states_and_records(run_dir):
    cost = pd.read_csv(run_dir / "report" / "tables" / "cost.csv")
    assert set(cost["cell_id"]) == {"dummy[fidelity=0.3]", "dummy[fidelity=0.9]", "sweep_dummy"}
    assert (cost["subjects_prepared"] == 3).all() and (cost["prepare_device"] == "CPU").all()
    assert (cost["prepare_seconds_per_subject"] > 0).all() and (cost["seconds_per_image"] > 0).all()
    # device hours: every prepare and every image's seconds, once
    expected = (cost["prepare_seconds_total"] + cost["seconds_per_image"] * cost["images_done"]) / 3600
    assert np.allclose(cost["device_hours"], expected) and (cost["device_hours"] > 0).all()
    # The dummy's state is one float32 image mean (64×64×3) plus a small JSON.
    assert cost["state_mb_per_subject"].between(64 * 64 * 3 * 4 / 2**20, 0.1).all()
    assert (cost["prepare_peak_kind"] == "RSS").all()


def test_run_time_lists_each_invocation_and_its_gpu_hours(run_dir):
    table = pd.read_csv(run_dir / "report" / "tables" / "run_time.csv")
    assert list(table["invocation"].astype(str)) == ["1", "total"]  # the fixture's one run, then the total
    assert table.loc[0, "executor"] == "inprocess" and table.loc[0, "gpus"] == 0
    assert table.loc[0, "wall_seconds"] >= table.loc[0, "execute_seconds"] > 0
    assert table["gpu_hours"].isna().all()  # a CPU run has no GPU-hours
    assert "Run time" in read(run_dir / "report" / "tables.md")


def test_run_time_gpu_hours_are_wall_times_gpus_and_unknown_under_ray():
    from types import SimpleNamespace

    from reports.tables import run_time_table

    def invocation(seconds, gpus, workers=4, stopped=None):
        return {"seconds": seconds, "gpus": gpus, "workers_per_gpu": workers, "mps": True, "executor": "local",
                "stage_seconds": {"plan": 5.0, "execute": seconds - 15.0, "score": 10.0}, "stopped_in": stopped,
                "images_generated": 10}
    # a run cut by a call's end, then resumed: four workers on one GPU, then two GPUs
    table = run_time_table(SimpleNamespace(invocations=[invocation(600.0, 1, stopped="execute"), invocation(360.0, 2)]))
    assert list(table["gpu_hours"]) == pytest.approx([600 / 3600, 720 / 3600, 1320 / 3600])
    assert table.loc[2, "wall_seconds"] == 960.0 and table.loc[2, "images_generated"] == 20
    ray = run_time_table(SimpleNamespace(invocations=[invocation(600.0, 1), invocation(100.0, None)]))
    assert np.isnan(ray.loc[2, "gpu_hours"])  # one invocation's GPUs unknown: no total
    assert run_time_table(SimpleNamespace(invocations=[])).empty


def test_status_line_adds_every_invocation(tmp_path):
    from benchmark.results import run_time_line
    from benchmark.store import Store

    store = Store(tmp_path)
    assert run_time_line(store) is None  # a run made before invocations were kept
    store.record_invocation({"seconds": 600.0, "gpus": 1, "stopped_in": "execute"})
    store.record_invocation({"seconds": 360.0, "gpus": 2, "stopped_in": None})
    assert run_time_line(store) == "run time: 2 invocations, 960 s wall, 0.367 GPU-hours (1 stopped early)"
    (tmp_path / "invocations.jsonl").write_text((tmp_path / "invocations.jsonl").read_text() + "{half a line\n")
    with pytest.raises(Exception, match=r"invocations.jsonl line 3 is not JSON.*delete that line"):
        store.invocations()


def test_leaderboard_ranks_warns_and_cites(run_dir):
    page = read(run_dir / "report" / "leaderboard.html")
    markdown = read(run_dir / "report" / "leaderboard.md")
    assert "Smoke numbers — not measurements" in page and "WARNING — smoke numbers" in markdown
    assert "random-init (tiny)" in page
    for figure in ("0.774", "0.885", "0.393", "0.706", "0.337", "0.569", "0.780", "0.255", "0.668", "0.803", "0.305",
                   "0.665", "0.807", "0.291", "0.680", "0.809", "0.317", "0.696", "0.812", "0.306", "0.643", "0.790"):
        assert figure in markdown, figure
    assert "arXiv:2208.12242" in markdown and "arXiv:2312.00079" in markdown
    board = pd.read_csv(run_dir / "report" / "leaderboard.csv")
    ours = board[board["source"] == "this run"]
    assert list(ours["rank"]) == sorted(ours["rank"]) and list(ours["dino_mean"]) == sorted(ours["dino_mean"], reverse=True)
    assert board[board["source"] == "published"]["rank"].isna().all()
    # Smoke rows are not interleaved with published figures.
    from reports.anchors import PUBLISHED

    assert list(board["source"]) == ["this run"] * 5 + ["published"] * len(PUBLISHED)
    # Rank confidence of our entries: a section on the page and two tables.
    assert "id='rank-confidence'" in page and "## Rank confidence" in markdown
    ranks = pd.read_csv(run_dir / "report" / "tables" / "rank_probabilities.csv")
    assert sorted(ranks["entry"]) == sorted(ours["entry"])
    assert ranks[[f"p_rank_{k}" for k in range(1, len(ranks) + 1)]].sum(axis=1).round(6).eq(1).all()
    beats = pd.read_csv(run_dir / "report" / "tables" / "rank_beats.csv").set_index("entry")
    assert beats.shape == (len(ranks), len(ranks))
    # Real images have no CLIP-T: shown as a dash, never 0.
    real = [line for line in markdown.splitlines() if line.startswith("|  | Real images")][0]
    assert real.split("|")[5].strip() == "—"


def test_links_resolve_and_leaderboard_reaches_gallery(run_dir):
    report = run_dir / "report"
    pages = [report / "index.html", report / "leaderboard.html", report / "tables.html", report / "plots.html",
             *sorted((report / "gallery").glob("*.html"))]
    for page in pages:
        for link in parse(page).links:
            target = urlparse(link)
            assert not target.scheme and not link.startswith("/"), f"{page.name}: non-relative link {link}"
            path = (page.parent / unquote(target.path)).resolve() if target.path else page
            assert path.exists(), f"{page.name}: broken link {link}"
            if target.fragment:
                assert target.fragment in parse(path).ids, f"{page.name}: missing anchor {link}"
    gallery_links = [link for link in parse(report / "leaderboard.html").links if link.startswith("gallery/index.html#")]
    assert len(gallery_links) == 5
    generated = [link for link in parse(report / "gallery" / "s-dog.html").links if "/images/" in link]
    assert len(generated) == 2 * 5 * (3 * 2 + 2)  # <a href> and <img src> per image


def test_missing_metric_shows_a_dash_and_unscored_run_still_reports(tmp_path, monkeypatch):
    use_fakes(monkeypatch)
    run = make_run(tmp_path / "r", "metrics.names=[dino]", "methods=dummy")
    build_report(run, resamples=50)
    board = read(run / "report" / "leaderboard.md")
    row = [line for line in board.splitlines() if "dummy[fidelity=0.3]" in line][0]
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] != "—" and cells[4:8] == ["—", "—", "—", "—"]  # DINO present; CLIP-I, CLIP-T, DIV, PRES absent
    bare = make_run(tmp_path / "bare", "metrics.names=[]", "methods=dummy")
    index = build_report(bare, resamples=50)
    assert index.is_file() and len(pd.read_parquet(bare / "report" / "results.parquet")) == 0
    assert "— no scored images" in read(bare / "report" / "tables.md")


def test_report_rebuilds_identically_from_a_copied_store(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report"))
    build_report(copy, resamples=int(RESAMPLES))
    for name in ("leaderboard.csv", "tables/summary.csv", "tables/by_category.csv", "plots/pareto_dino_vs_clip_t.svg"):
        assert read(copy / "report" / name) == read(run_dir / "report" / name), name


def test_cli_errors_are_user_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_rank_by_is_validated_and_used(run_dir, capsys):
    assert main(["report", str(run_dir), "--rank-by", "dinoo", "--resamples", "50"]) == 2
    assert "valid: dino" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--rank-by", "pres", "--resamples", "50"]) == 0
    board = pd.read_csv(run_dir / "report" / "leaderboard.csv")
    ours = board[board["source"] == "this run"]
    assert list(ours["pres_mean"]) == sorted(ours["pres_mean"])  # lower is better: ascending
    assert re.search(r"Ranked by PRES \(lower first\)", read(run_dir / "report" / "leaderboard.md"))
    main(["report", str(run_dir), "--resamples", RESAMPLES])  # restore for other tests
    assert json.loads(read(run_dir / "report" / "fingerprints.json"))["metrics"]["dino"]["fingerprint"]["weights"] == "random"


def test_failed_units_are_reported_not_hidden(tmp_path, monkeypatch):
    use_fakes(monkeypatch)
    run = tmp_path / "failing"
    run_benchmark(load_config("default", ["methods=dummy", "metrics.weights=random", "methods.dummy.fail_subjects=[dog]"]),
                  run, quiet=True)
    build_report(run, resamples=50)
    cost = pd.read_csv(run / "report" / "tables" / "cost.csv")
    assert cost.loc[0, ["subjects_prepared", "images_done", "images_planned"]].tolist() == [2, 16, 24]
    summary = pd.read_csv(run / "report" / "tables" / "summary.csv")
    assert summary.loc[0, "dino_n_subjects"] == 2
    assert "1 recorded failure(s)" in read(run / "report" / "index.html")
    dog = read(run / "report" / "gallery" / "s-dog.html")
    assert dog.count("— failed") == 3 * 2 + 2


def test_published_rows_interleave_only_with_measurements():
    from reports.leaderboard import leaderboard_frame

    summary = pd.DataFrame({"entry": ["ours-a", "ours-b"], "method": ["a", "b"], "cell_id": ["a", "b"],
                            "checkpoint": ["final", "final"], "dino_mean": [0.70, 0.60], "clip_t_mean": [0.30, 0.31]})
    measured = list(leaderboard_frame(summary, "dino", smoke=False)["entry"])
    assert measured == ["Real images (reference set)", "ours-a", "DreamBooth (Imagen)", "HiFi Tuner on DreamBooth",
                        "DreamBooth (Stable Diffusion)", "IP-Adapter SD 1.5 (DreamCache's table)",
                        "HiFi Tuner on Textual Inversion", "Custom Diffusion", "IP-Adapter SD 1.5 (re-run quoted in issue 13)",
                        "ours-b", "BLIP-Diffusion, zero-shot", "Textual Inversion (Stable Diffusion)",
                        "Stable Diffusion 1.4, unpersonalized"]
    smoke = leaderboard_frame(summary, "dino", smoke=True)
    assert list(smoke["entry"][:2]) == ["ours-a", "ours-b"] and list(smoke["rank"][:2]) == [1, 2]
    by_clip_t = list(leaderboard_frame(summary, "clip_t", smoke=False)["entry"])
    assert by_clip_t.index("DreamBooth (Imagen)") < by_clip_t.index("DreamBooth (Stable Diffusion)")
    assert by_clip_t.index("Stable Diffusion 1.4, unpersonalized") == 0 and by_clip_t[-1] == "Real images (reference set)"


def test_published_rows_cite_a_table_and_a_convention():
    """Every published row names a paper table (or says it is unchecked) and its metric convention;
    the unpersonalized SD 1.4 row is HiFi Tuner's Table 1, Custom Diffusion is flagged as unchecked."""
    from reports.anchors import CITATIONS, CONVENTIONS, PUBLISHED, reference
    from reports.leaderboard import leaderboard_csv, leaderboard_frame, leaderboard_markdown

    rows = {a.name: a for a in PUBLISHED}
    for anchor in PUBLISHED:
        assert "Table" in CITATIONS[anchor.source] or "checked against the paper" in CITATIONS[anchor.source], anchor.name
        assert "DINO ViT-S/16" in anchor.convention and "without the identifier" in anchor.convention
    sd14 = rows["Stable Diffusion 1.4, unpersonalized"]
    assert (sd14.dino, sd14.clip_i, sd14.clip_t) == (0.393, 0.706, 0.337)
    assert "arXiv:2312.00079), Table 1" in CITATIONS[sd14.source]
    assert not any("no primary" in text or "DESIGN.md" in text for text in CITATIONS.values())
    imagen = rows["DreamBooth (Imagen)"]
    assert (imagen.dino, imagen.clip_i, imagen.clip_t, imagen.source) == (0.696, 0.812, 0.306, "dreambooth")
    custom = rows["Custom Diffusion"]
    assert (custom.dino, custom.clip_i, custom.clip_t) == (0.643, 0.790, 0.305)
    assert "as quoted in issue 15" in CITATIONS[custom.source] and "not verified" in CONVENTIONS[custom.source]
    summary = pd.DataFrame({"entry": ["ours"], "method": ["a"], "cell_id": ["a"], "checkpoint": ["final"], "dino_mean": [0.7]})
    board = leaderboard_frame(summary, "dino")
    markdown = leaderboard_markdown(board, "dino", [], "coverage", 100, 0.95)
    assert all(reference(key) in markdown for key in {a.source for a in PUBLISHED})
    csv = leaderboard_csv(board).set_index("entry")
    assert csv.loc["Custom Diffusion", "convention"] == custom.convention and csv.loc["ours", "convention"] == ""
