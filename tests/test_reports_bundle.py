"""Result bundles: `subjectbench export`, verification, loading with `datasets`, bundle as compare baseline."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from reports.bundle import BundleError, export_bundle, read_bundle, read_source, verify_bundle
from reports.compare import compare_runs
from reports.rundata import read_run
from tests.report_fakes import use_fakes


def run(path, *overrides):
    config = load_config("default", ["methods=dummy", "metrics.weights=random", *overrides])
    run_benchmark(config, path, quiet=True)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundle")
    with pytest.MonkeyPatch.context() as patch:
        use_fakes(patch)
        baseline = run(base / "baseline")
        bundle, digest = export_bundle(baseline, base / "bundle", thumbnails=True)
        yield {
            "baseline": baseline, "bundle": bundle, "digest": digest,
            "rerun": run(base / "rerun"), "less": run(base / "less", "methods.dummy.fidelity=0.4"),
        }


def test_export_writes_a_self_describing_hashed_bundle(runs, tmp_path, capsys):
    bundle = runs["bundle"]
    manifest = verify_bundle(bundle)
    assert manifest["content_hash"] == runs["digest"] and len(runs["digest"]) == 64
    expected = {"README.md", "results.parquet", "images.parquet", "plan.parquet", "states.parquet", "config.yaml",
                "subjects.json", "fingerprints.json", "protocol.json", "cost.csv", "invocations.json", "failures.json"}
    assert expected <= set(manifest["files"])
    # the run time travels: the bundle reads back the run's invocation (one, on the CPU)
    invocations = read_bundle(bundle).invocations
    assert invocations == read_run(runs["baseline"]).invocations and len(invocations) == 1
    assert not (bundle / "images").exists()  # results travel without the PNGs
    images = pd.read_parquet(bundle / "images.parquet")
    assert len(images) == 24 and images["image_sha256"].str.len().eq(64).all()
    assert {"key", "seed", "device", "packages", "method_fingerprint_json", "thumbnail"} <= set(images.columns)
    assert json.loads(images["packages"].iloc[0])["torch"]
    assert all((bundle / t).is_file() for t in images["thumbnail"])
    fingerprints = json.loads((bundle / "fingerprints.json").read_text())
    assert fingerprints["metrics"]["dino"]["fingerprint"]["weights"] == "random"
    assert fingerprints["methods"]["dummy"][0]["params"]["fidelity"] == 0.7
    card = (bundle / "README.md").read_text()
    assert card.startswith("---\n") and "configs:" in card and "path: results.parquet" in card
    assert "Smoke numbers" in card
    # The same through the CLI; an existing folder is not overwritten.
    assert main(["export", str(runs["baseline"]), "--out", str(tmp_path / "b2")]) == 0
    assert main(["export", str(runs["baseline"]), "--out", str(tmp_path / "b3")]) == 0
    # Exports are reproducible: the same run gives the same content hash wherever the bundle goes.
    assert verify_bundle(tmp_path / "b2")["content_hash"] == verify_bundle(tmp_path / "b3")["content_hash"]
    assert f"content hash: {verify_bundle(tmp_path / 'b3')['content_hash']}" in capsys.readouterr().out
    assert main(["export", str(runs["baseline"]), "--out", str(tmp_path / "b2")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_bundle_reads_back_as_the_run(runs):
    from_bundle, from_run = read_bundle(runs["bundle"]), read_run(runs["baseline"])
    pd.testing.assert_frame_equal(from_bundle.long, from_run.long, check_dtype=False)
    assert from_bundle.fingerprints == from_run.fingerprints and from_bundle.config == from_run.config
    assert read_source(runs["baseline"]).root == from_run.root


def test_bundle_loads_with_datasets(runs):
    datasets = pytest.importorskip("datasets")
    long = pd.read_parquet(runs["bundle"] / "results.parquet")
    table = datasets.load_dataset("parquet", data_files=str(runs["bundle"] / "results.parquet"), split="train")
    assert table.num_rows == len(long) and {"metric", "value", "subject", "entry"} <= set(table.column_names)
    # Through the dataset card's configs, as after a push to a hub dataset repository.
    images = datasets.load_dataset(str(runs["bundle"]), "images", split="train")
    assert images.num_rows == 24 and "image_sha256" in images.column_names
    verify_bundle(runs["bundle"])  # loading wrote nothing into the bundle


def test_hub_hosting_files_are_not_tampering(runs, tmp_path, capsys, monkeypatch):
    # A dataset repository made by huggingface_hub.upload_folder holds a .gitattributes beside the files.
    bundle = tmp_path / "pushed"
    shutil.copytree(runs["bundle"], bundle)
    (bundle / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    assert verify_bundle(bundle)["content_hash"] == runs["digest"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["leaderboard", "hf://datasets/nobody/no-such-results", "--out", str(tmp_path / "site")]) == 2
    assert "hf://datasets/nobody/no-such-results: cannot download the bundle" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["modify", "remove", "add", "manifest"])
def test_modified_bundle_is_refused_naming_the_file(runs, tmp_path, capsys, change):
    bundle = tmp_path / "b"
    shutil.copytree(runs["bundle"], bundle)
    if change == "modify":
        frame = pd.read_parquet(bundle / "results.parquet")
        frame.loc[0, "value"] += 0.5
        frame.to_parquet(bundle / "results.parquet", index=False)
        expected = "results.parquet was modified since export"
    elif change == "remove":
        (bundle / "cost.csv").unlink()
        expected = "cost.csv is missing"
    elif change == "add":
        (bundle / "notes.txt").write_text("x")
        expected = "notes.txt is not part of the exported bundle"
    else:
        manifest = json.loads((bundle / "bundle.json").read_text())
        manifest["files"]["results.parquet"] = "0" * 64
        (bundle / "bundle.json").write_text(json.dumps(manifest))
        expected = "content_hash"
    with pytest.raises(BundleError, match=expected):
        read_bundle(bundle)
    assert main(["leaderboard", str(bundle), "--out", str(tmp_path / "site")]) == 2
    assert expected.split()[0] in capsys.readouterr().err


@pytest.mark.parametrize("current", ["rerun", "less"])
def test_compare_against_a_bundle_equals_compare_against_its_run(runs, current):
    with pytest.MonkeyPatch.context() as patch:
        use_fakes(patch)
        from_run = compare_runs(runs["baseline"], runs[current], resamples=300)
        from_bundle = compare_runs(runs["bundle"], runs[current], resamples=300)
    pd.testing.assert_frame_equal(from_run.rows, from_bundle.rows)
    pd.testing.assert_frame_equal(from_run.images, from_bundle.images)
    assert from_run.exit_code == from_bundle.exit_code == (0 if current == "rerun" else 1)
    assert from_run.warnings == from_bundle.warnings
    if current == "rerun":  # bit-identity comes from the recorded sha256 of each image
        assert set(from_bundle.rows["verdict"]) == {"identical"}


def test_compare_cli_takes_a_bundle_baseline(runs, tmp_path, capsys):
    code = main(["compare", str(runs["bundle"]), str(runs["less"]), "--out", str(tmp_path), "--resamples", "300"])
    assert code == 1
    markdown = (tmp_path / "compare.md").read_text()
    assert "FAIL: significant regression" in markdown and f"baseline: `{runs['bundle']}`" in markdown
    verify_bundle(runs["bundle"])  # compare wrote nothing into the bundle
    # A bundle is a baseline only: the current side is a run directory (reports are written there).
    assert main(["compare", str(runs["less"]), str(runs["bundle"]), "--out", str(tmp_path)]) == 2
    assert "is a result bundle, not a run directory" in capsys.readouterr().err
    assert main(["report", str(runs["bundle"])]) == 2
    verify_bundle(runs["bundle"])
