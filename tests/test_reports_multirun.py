"""`subjectbench leaderboard`: one site from several bundles and runs, grouped by comparable protocol."""

from __future__ import annotations

import json
import shutil
from importlib import resources

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from reports.bundle import export_bundle
from reports.multirun import build_site
from tests.report_fakes import use_fakes

FAST = ["--resamples", "300"]


def run(path, suite="default", *overrides):
    config = load_config(suite, ["metrics.weights=random", *overrides])
    run_benchmark(config, path, quiet=True)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("multirun")
    # Lab B: another method on the default protocol (a suite file of its own).
    suite = yaml.safe_load(resources.files("benchmark").joinpath("suites", "default.yaml").read_text())
    suite["methods"] = [{"name": "dummy", "label": "dummy_low", "params": {"fidelity": 0.4}}]
    (base / "lab_b.yaml").write_text(yaml.safe_dump(suite))
    with pytest.MonkeyPatch.context() as patch:
        use_fakes(patch)
        lab_a = run(base / "lab_a", "default", "methods=dummy")
        out = {
            "bundle_a": export_bundle(lab_a, base / "bundle_a")[0],
            "lab_a": lab_a,
            "lab_b": run(base / "lab_b", str(base / "lab_b.yaml")),
            "rerun_a": run(base / "rerun_a", "default", "methods=dummy"),
            "other_prompts": run(base / "other_prompts", "default", "methods=dummy", "protocol.prompts=[0,1,2]"),
        }
        # Same images, metrics with other weights: the metric fingerprints differ.
        shutil.copytree(lab_a, base / "other_weights")
        # the fakes stand in for the five classic metrics; the copy check would load real DINO weights
        assert main(["score", str(base / "other_weights"), "metrics.weights=pretrained",
                     "metrics.names=[clip_t,clip_i,dino,div,pres]", "--quiet"]) == 0
        out["other_weights"] = base / "other_weights"
        # Same method fingerprint and protocol, other pixels (as from nondeterministic hardware).
        shutil.copytree(lab_a, base / "drifted")
        for png in (base / "drifted" / "images").rglob("*.png"):
            pixels = np.asarray(Image.open(png).convert("RGB"))
            Image.fromarray(255 - pixels).save(png)
        shutil.rmtree(base / "drifted" / "scores")
        assert main(["score", str(base / "drifted"), "--quiet"]) == 0
        out["drifted"] = base / "drifted"
        yield out


def test_two_compatible_sources_are_ranked_together(sources, tmp_path):
    site = build_site([sources["bundle_a"], sources["lab_b"]], tmp_path / "site", resamples=300)
    assert len(site.groups) == 1 and site.notes == []
    board = pd.read_csv(tmp_path / "site" / "leaderboard.csv")
    assert list(board["entry"]) == ["dummy", "dummy_low"] and list(board["rank"]) == [1, 2]
    assert list(board["sources"]) == ["bundle_a", "lab_b"] and set(board["group"]) == {"A"}
    index = (tmp_path / "site" / "index.html").read_text()
    assert "1 comparability group" in index and "dummy_low" in index
    assert "/bundle_a/README.md'>dataset card</a>" in index and "href='../" in index  # relative links to sources
    page = (tmp_path / "site" / "group-a.html").read_text()
    assert "By prompt category" in page and "Per subject" in page and "recontextualization" in page
    assert "dummy (bundle_a)" in page and "dummy_low (lab_b)" in page  # cost table, read from the bundle too
    for y in ("dino", "clip_i"):
        assert (tmp_path / "site" / "plots" / f"group-a_pareto_{y}_vs_clip_t.png").stat().st_size > 1000
    listed = json.loads((tmp_path / "site" / "sources.json").read_text())
    assert [s["kind"] for s in listed] == ["bundle", "run"] and listed[0]["content_hash"]


def test_incompatible_sources_are_segregated_with_the_reason(sources, tmp_path, capsys):
    paths = [sources[n] for n in ("bundle_a", "other_prompts", "lab_b", "other_weights")]
    assert main(["leaderboard", *map(str, paths), "--out", str(tmp_path / "site"), *FAST]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2
    prompts = next(n for n in notes if "other_prompts" in n)
    assert "prompts differ" in prompts and "in the snow" in prompts and "seeds" not in prompts
    weights = next(n for n in notes if "other_weights" in n)
    assert "metric dino fingerprint differs (weights: \"pretrained\" vs \"random\")" in weights
    board = pd.read_csv(tmp_path / "site" / "leaderboard.csv")
    groups = {g: list(frame["sources"]) for g, frame in board.groupby("group")}
    assert groups == {"A": ["bundle_a", "lab_b"], "B": ["other_prompts"], "C": ["other_weights"]}
    assert (board.groupby("group")["rank"].min() == 1).all()  # each group ranked on its own
    index = (tmp_path / "site" / "index.html").read_text()
    assert index.count("Not ranked with group A") == 2 and "group-c.html" in index


def test_the_same_entry_twice_is_shown_once_or_flagged(sources, tmp_path):
    site = build_site([sources["bundle_a"], sources["rerun_a"], sources["lab_b"]], tmp_path / "same", resamples=300)
    board = pd.read_csv(tmp_path / "same" / "leaderboard.csv")
    assert list(board["entry"]) == ["dummy", "dummy_low"]
    assert board["sources"].iloc[0] == "bundle_a, rerun_a" and pd.isna(board["disagree"].iloc[0])
    assert site.notes == [] and "agree within their CIs" in site.index.read_text()

    site = build_site([sources["bundle_a"], sources["drifted"]], tmp_path / "drift", resamples=300)
    assert len(site.groups) == 1
    board = pd.read_csv(tmp_path / "drift" / "leaderboard.csv")
    assert len(board) == 1 and board["sources"].iloc[0] == "bundle_a, drifted"
    assert "DINO: bundle_a" in board["disagree"].iloc[0] and "CIs do not overlap" in board["disagree"].iloc[0]
    assert any("disagrees between bundle_a, drifted" in n for n in site.notes)
    assert "DISAGREE" in site.index.read_text()


def test_same_label_other_config_stays_two_rows(sources, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        use_fakes(patch)
        other = run(tmp_path / "other_fidelity", "default", "methods=dummy", "methods.dummy.fidelity=0.9")
    build_site([sources["bundle_a"], other], tmp_path / "site", resamples=300)
    board = pd.read_csv(tmp_path / "site" / "leaderboard.csv")
    assert sorted(board["entry"]) == ["dummy [bundle_a]", "dummy [other_fidelity]"]


def test_unusable_input_names_it(sources, tmp_path, capsys):
    site = str(tmp_path / "site")
    assert main(["leaderboard", str(tmp_path / "nowhere"), "--out", site]) == 2
    assert "nowhere: no such bundle or run directory" in capsys.readouterr().err
    assert main(["leaderboard", str(sources["lab_b"]), str(sources["lab_b"]), "--out", site]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["leaderboard", str(sources["lab_b"]), "--out", site, "--rank-by", "fid"]) == 2
    assert "--rank-by 'fid' is not scored by any source; scored: clip_i, clip_t, clip_t_clipscore, clip_t_identifier, copy, copy_nn, copy_real, dino, dino_s16_squash, div, pres" in capsys.readouterr().err
