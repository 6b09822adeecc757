"""Reports never show a silent or wrong result: nothing scored, odd subject ids, compare's inputs,
a run directory reused with another config (dummy method, fake metrics)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from reports.anchors import PUBLISHED
from reports.build import build_report
from tests.report_fakes import use_fakes
from tests.test_reports_build import parse

DUMMY = ["methods=dummy", "protocol.prompts=[0]", "protocol.images_per_prompt=1", "protocol.prior_images=0"]


def test_a_run_without_metrics_says_nothing_was_scored_instead_of_an_empty_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "default", *DUMMY, "metrics.names=[]", "--quiet", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "nothing was scored: metrics.names is empty" in stdout and "subjectbench score" in stdout
    assert main(["report", str(out), "--resamples", "20"]) == 0
    board = (out / "report" / "leaderboard.md").read_text()
    assert "Nothing was scored" in board and "dummy" not in board
    assert "Nothing was scored" in (out / "report" / "index.html").read_text()
    assert main(["score", str(out)]) == 2
    assert "metrics.names is empty, nothing to score" in capsys.readouterr().err


def _odd_subjects(root: Path) -> Path:
    from data.subjects import mini_dataset_dir

    ids = {"a#b": "dog", "a_b": "teapot", "c?d 1": "duck_toy"}
    for subject_id, source in ids.items():
        shutil.copytree(mini_dataset_dir() / source, root / subject_id)
    rows = [{"id": s, "class": "dog" if src == "dog" else "toy", "kind": "live" if src == "dog" else "object"}
            for s, src in ids.items()]
    (root / "subjects.yaml").write_text(yaml.safe_dump({"subjects": rows}))
    return root


def test_gallery_quotes_links_and_keeps_colliding_subject_ids_apart(tmp_path, monkeypatch):
    use_fakes(monkeypatch)
    dataset = _odd_subjects(tmp_path / "data")
    run = tmp_path / "run"
    run_benchmark(load_config("default", [*DUMMY, "metrics.names=[dino]", "dataset.source=custom",
                                          f"dataset.path={dataset}"]), run, quiet=True)
    build_report(run, resamples=20)
    gallery = run / "report" / "gallery"
    pages = sorted(gallery.glob("s-*.html"))
    assert len(pages) == 3  # 'a#b' and 'a_b' no longer overwrite each other's page
    titles = {page.read_text().split("<h1>", 1)[1].split(" <span", 1)[0] for page in pages}
    assert titles == {"a#b", "a_b", "c?d 1"}
    images = 0
    for page in [gallery / "index.html", *pages]:
        for link in parse(page).links:
            target = urlparse(link)
            assert not target.query, f"{page.name}: unquoted '?' in {link}"
            if target.path:
                assert (page.parent / unquote(target.path)).exists(), f"{page.name}: broken link {link}"
                images += "/images/" in link
    assert images == 3 * 2 + 3  # each subject page: <a> and <img> per image; the index: one sample each


def test_compare_without_out_does_not_write_into_its_inputs(tmp_path, monkeypatch):
    use_fakes(monkeypatch)
    run = tmp_path / "run"
    run_benchmark(load_config("default", [*DUMMY, "metrics.names=[dino]"]), run, quiet=True)

    def contents():
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}

    before = contents()
    assert main(["compare", str(run), str(run), "--resamples", "20"]) == 0
    assert contents() == before
    assert main(["compare", str(run), str(run), "--resamples", "20", "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.md").is_file() and contents() == before


def test_reusing_out_with_another_config_says_so_at_start_and_in_the_report(tmp_path, capsys, monkeypatch):
    use_fakes(monkeypatch)
    out = tmp_path / "run"
    args = ["run", "default", *DUMMY, "metrics.names=[dino]", "--out", str(out), "--no-report"]
    assert main(args) == 0
    assert main(args) == 0  # the same config again: no warning
    assert "different config" not in capsys.readouterr().err
    assert main([*args, "methods.dummy.noise=0.5"]) == 0
    err = capsys.readouterr().err
    assert f"{out} last ran with a different config (changed: methods[0].params.noise)" in err
    index = build_report(out, resamples=20).read_text()
    assert "This run directory holds 2 different configs" in index


@pytest.mark.parametrize("subject_id", ["dog", "duck_toy"])
def test_plain_subject_ids_keep_their_page_names(subject_id):
    from reports.gallery import _subject_file

    assert _subject_file(subject_id) == f"s-{subject_id}.html"
    assert _subject_file("a#b") != _subject_file("a_b") != _subject_file("A_b")


# ----------------------------------------------------------------------------- statistics that do not overclaim


def _summary(**columns):
    import pandas as pd

    n = len(next(iter(columns.values())))
    base = {"entry": [f"ours-{i}" for i in range(n)], "method": ["m"] * n, "cell_id": [f"c{i}" for i in range(n)],
            "checkpoint": ["final"] * n}
    return pd.DataFrame({**base, **columns})


def test_equal_displayed_values_share_a_rank():
    from reports.leaderboard import leaderboard_frame

    board = leaderboard_frame(_summary(dino_mean=[0.70001, 0.70004, 0.6]), "dino", smoke=True)
    ours = board[board["source"] == "this run"].set_index("entry")["rank"]
    assert ours.to_dict() == {"ours-0": 1, "ours-1": 1, "ours-2": 3}


def test_intervals_from_few_subjects_are_marked():
    from reports.leaderboard import leaderboard_frame, leaderboard_markdown
    from reports.render import FEW_MARK, estimate

    assert FEW_MARK in estimate(0.5, 0.4, 0.6, n_subjects=3).text and "few subjects" in estimate(0.5, 0.4, 0.6, n_subjects=3).as_html()
    assert FEW_MARK not in estimate(0.5, 0.4, 0.6, n_subjects=5).text
    summary = _summary(dino_mean=[0.7, 0.6], dino_ci_low=[0.6, 0.5], dino_ci_high=[0.8, 0.7], dino_n_subjects=[3, 30])
    markdown = leaderboard_markdown(leaderboard_frame(summary, "dino"), "dino", [], "", 100, 0.95)
    rows = {line.split("|")[2].strip(): line for line in markdown.splitlines() if "ours-" in line}
    assert f"[0.600, 0.800] {FEW_MARK}" in rows["ours-0"] and FEW_MARK not in rows["ours-1"]
    assert "fewer than 5 subjects" in markdown


def test_a_run_short_of_the_full_protocol_is_not_ranked_among_published_rows():
    import pandas as pd

    from reports.leaderboard import (
        PARTIAL_SEPARATOR,
        leaderboard_frame,
        leaderboard_markdown,
        partial_protocol,
    )

    images = pd.DataFrame({"role": ["eval"] * 4, "subject": ["dog", "dog", "cat", "cat"], "entry": ["e"] * 4,
                           "template": ["a", "b", "a", "b"]})
    reason = partial_protocol(images, {"dataset": {"source": "custom"}})
    assert "not the DreamBooth dataset (dataset.source=custom)" in reason
    assert "2 subject(s) × 2 prompt(s) × 1 image(s) per prompt, not the full 30 × 25 × 4" in reason
    summary = _summary(dino_mean=[0.70, 0.60])
    board = leaderboard_frame(summary, "dino", smoke=False, apart=True)
    assert list(board["source"]) == ["this run"] * 2 + ["published"] * len(PUBLISHED)
    assert PARTIAL_SEPARATOR in leaderboard_markdown(board, "dino", [], reason, 100, 0.95)
    full = pd.DataFrame([{"role": "eval", "subject": f"s{s}", "entry": "e", "template": f"t{p}"}
                         for s in range(30) for p in range(25) for _ in range(4)])
    assert partial_protocol(full, {"dataset": {"source": "dreambooth"}}) == ""


def test_images_column_counts_what_each_metric_averaged():
    from reports.leaderboard import leaderboard_frame, leaderboard_markdown

    summary = _summary(dino_mean=[0.7], dino_n_images=[6], clip_t_mean=[0.3], clip_t_n_images=[6],
                       pres_mean=[0.5], pres_n_images=[2])
    markdown = leaderboard_markdown(leaderboard_frame(summary, "dino", smoke=True), "dino", [], "", 100, 0.95)
    row = next(line for line in markdown.splitlines() if "ours-0" in line)
    assert row.rstrip(" |").endswith("6 (PRES: 2)")
