"""Harness under faults: a batch failing part-way, a full or read-only disk, a bad --out (dummy method)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

import data.common as store_module
from benchmark.cli import main
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.status import status_frame
from benchmark.store import Store
from tests.helpers import leftovers

BASE = ["methods=dummy", "metrics.names=[]"]


def config(*overrides: str):
    return load_config("default", [*BASE, *overrides])


class FailingImageWrites:
    """Fault injection (in the one atomic writer): PNG writes under images/ fail with ``code`` once ``allowed`` have succeeded."""

    def __init__(self, monkeypatch, allowed: int, code: int):
        self.allowed, self.code, self.active = allowed, code, True
        real = store_module._fsync_write

        def write(path: Path, data: bytes) -> None:
            if self.active and "images" in path.parts and ".png." in path.name:
                if self.allowed <= 0:
                    raise OSError(self.code, os.strerror(self.code), str(path))
                self.allowed -= 1
            real(path, data)

        monkeypatch.setattr(store_module, "_fsync_write", write)


def counts_add_up(run_dir: Path) -> dict:
    frame, failures = status_frame(Store(run_dir))
    row = frame.iloc[0]
    done, total = (int(x) for x in row["images done"].split("/"))
    assert row["images pending"] >= 0, row.to_dict()
    assert done + row["images failed"] + row["images pending"] == total, row.to_dict()
    return {"done": done, "failed": int(row["images failed"]), "pending": int(row["images pending"]), "failures": len(failures)}


def test_batch_failing_part_way_blames_only_unfinished_images_and_retry_clears(tmp_path, monkeypatch):
    cfg = config("generation.batch_size=8")  # one batch of 8 images per subject
    faults = FailingImageWrites(monkeypatch, allowed=2, code=errno.EIO)
    broken = run_benchmark(cfg, tmp_path, quiet=True)
    # The first batch wrote 2 images, then every write failed: 22 images failed, none finished twice.
    assert broken.done == 2 and len(broken.failed) == 22
    done_keys = {p.stem for p in (tmp_path / "images").rglob("*.json")}
    assert len(done_keys) == 2 and not done_keys & {f["key"] for f in broken.failed}
    assert counts_add_up(tmp_path) == {"done": 2, "failed": 22, "pending": 0, "failures": 22}

    faults.active = False
    assert run_benchmark(cfg, tmp_path, quiet=True).exit_code == 1  # a plain rerun keeps failures
    healed = run_benchmark(cfg, tmp_path, quiet=True, retry_failed=True)
    assert (healed.done, healed.exit_code, healed.failed) == (22, 0, [])
    assert counts_add_up(tmp_path) == {"done": 24, "failed": 0, "pending": 0, "failures": 0}
    assert not (tmp_path / "failures").exists() or not list((tmp_path / "failures").glob("*.json"))


def test_a_failure_left_on_a_finished_image_is_cleared_by_the_next_run(tmp_path):
    run_benchmark(config(), tmp_path, quiet=True)
    store = Store(tmp_path)
    key = next((tmp_path / "images").rglob("*.json")).stem
    store.record_failure(key, {"stage": "generate", "kind": "error", "message": "stale"})  # as older versions left
    assert counts_add_up(tmp_path)["pending"] == 0  # status already ignores it
    assert run_benchmark(config(), tmp_path, quiet=True).exit_code == 0
    assert store.failure(key) is None


def test_full_disk_stops_the_run_with_one_error_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    faults = FailingImageWrites(monkeypatch, allowed=3, code=errno.ENOSPC)
    code = main(["run", "default", *BASE, "--quiet", "--no-report", "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot write ") and str(out) in lines[-1], err
    assert "No space left on device" in lines[-1] and "free space" in lines[-1]
    assert "Traceback" not in err
    assert leftovers(out) == [] and not list((out / "failures").glob("*.json"))  # no unit is blamed
    assert len(list((out / "images").rglob("*.json"))) == 3
    faults.active = False
    assert main(["run", "default", *BASE, "--quiet", "--no-report", "--out", str(out)]) == 0
    assert len(list((out / "images").rglob("*.json"))) == 24


def test_out_pointing_at_a_file_is_one_error_line(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    assert main(["run", "default", *BASE, "--quiet", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(target) in err and "is a file" in err and "Traceback" not in err
    assert target.read_text() == "not a folder"


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits; the immutable flag still binds it
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not available here")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


@pytest.mark.parametrize("inside", [False, True], ids=["out-is-read-only", "out-inside-read-only"])
def test_out_in_a_read_only_directory_is_one_error_line(read_only_dir, capsys, inside):
    out = read_only_dir / "run" if inside else read_only_dir
    assert main(["run", "default", *BASE, "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to run directory ") and str(out) in err, err
    assert "writable --out" in err and "Traceback" not in err
    assert list(read_only_dir.iterdir()) == []


def _one_error_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


TINY_TI = ["methods=textual_inversion", "metrics.names=[]", "protocol.prompts=[0]", "protocol.images_per_prompt=1",
           "protocol.prior_images=0", "--quiet", "--no-report"]


def test_backbone_folder_without_weights_fails_once_before_any_unit(tmp_path, capsys):
    folder = tmp_path / "my-sd"
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / component).mkdir(parents=True)
        (folder / component / "config.json").write_text("{}")
    (folder / "model_index.json").write_text("{}")
    out = tmp_path / "run"
    line = _one_error_line(capsys, main(["run", "default", *TINY_TI, f"backbone={folder}", "--out", str(out)]))
    assert f"backbone folder {folder} is incomplete" in line and "holds no weights" in line
    assert not (out / "failures").exists() and not (out / "states").exists()


def test_hub_backbone_missing_offline_fails_once_before_any_unit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    line = _one_error_line(capsys, main(["run", "default", *TINY_TI, "backbone=sd14", "--out", str(out)]))
    assert "backbone 'sd14'" in line and "not in the local Hugging Face cache" in line and "huggingface-cli download" in line
    assert not (out / "failures").exists()


def test_unreadable_dataset_image_is_found_before_training(tmp_path, capsys):
    import shutil

    from data.subjects import mini_dataset_dir

    dataset = tmp_path / "subjects"
    shutil.copytree(mini_dataset_dir(), dataset)
    broken = dataset / "teapot" / "01.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    out = tmp_path / "run"
    args = ["run", "default", *BASE, "dataset.source=custom", f"dataset.path={dataset}", "--quiet", "--no-report"]
    line = _one_error_line(capsys, main([*args, "--out", str(out)]))
    assert str(broken) in line and "corrupt or truncated" in line and "data verify" in line
    assert not (out / "states").exists() and not (out / "failures").exists()


def test_a_state_that_fails_to_load_is_recorded_and_the_rerun_completes(tmp_path, monkeypatch):
    """A published state that cannot be loaded fails its images on record (exit 1), never silently."""
    from methods.dummy import DummyMethod

    cfg = config("subjects=dog")
    real = DummyMethod.load_state

    def broken(self, workdir, subject):
        raise OSError(f"{workdir}: truncated checkpoint")

    monkeypatch.setattr(DummyMethod, "load_state", broken)
    result = run_benchmark(cfg, tmp_path, quiet=True)
    assert result.exit_code == 1 and result.done == 0
    failures = Store(tmp_path).failures()
    assert [f["stage"] for f in failures.values()] == ["load"]
    assert counts_add_up(tmp_path)["pending"] == 0
    monkeypatch.setattr(DummyMethod, "load_state", real)
    healed = run_benchmark(cfg, tmp_path, quiet=True)
    assert healed.exit_code == 0 and not Store(tmp_path).failures()
