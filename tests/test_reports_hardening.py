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
