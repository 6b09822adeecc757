"""A full disk while a trainer writes tensors (a checkpoint, an embedding, a resume point) is the
project's ``DiskWriteError`` naming the file and the fix, not safetensors' own ``SafetensorError``
(which names neither, and which the harness took for the training's own failure). A real full
file system: a tmpfs of a few KB (needs the right to mount one: root, as on the CI machine)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from data.common import DiskWriteError
from data.subjects import load_subjects
from methods.backbones import resolve_backbone
from methods.base import MethodContext
from methods.textual_inversion import TextualInversion, TextualInversionParams
from methods.training import resume_points, save_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs under ``tmp_path``, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_a_disk_write_error_naming_the_file(small_disk):
    path = small_disk / "weights.safetensors"
    with pytest.raises(DiskWriteError) as raised:
        save_tensors({"w": torch.zeros(64 * 1024)}, path)  # 256 KiB on a 64 KiB disk
    message = str(raised.value)
    assert str(path) in message and "No space left on device" in message and "free space" in message
    assert not path.exists()  # no partial file left behind
    save_tensors({"w": torch.ones(16)}, path)  # a file that fits is written as ever
    assert path.stat().st_size > 0


def test_a_resume_point_on_a_full_disk_stops_the_training_with_that_error(small_disk, tmp_path):
    """A full disk (filled up before the training) when the tiny TI saves its first resume point."""
    points = small_disk / "points"
    points.mkdir()
    try:
        with open(small_disk / "filler", "wb") as handle:
            handle.write(b"\0" * 256 * 1024)
    except OSError:
        pass  # the disk is full now
    context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path / "cache")
    workdir = tmp_path / "work"
    workdir.mkdir()
    method = TextualInversion(TextualInversionParams(steps=4), context)
    with pytest.raises(DiskWriteError, match=r"cannot write .*loop-0\.step-2\.safetensors.*free space"):
        with resume_points(points, every_steps=2):
            method.prepare(load_subjects("mini")[0], workdir, 5)
    assert not list(points.glob("*.safetensors*"))  # the partial point is gone
    assert not (points / "loop-0.json").exists()
