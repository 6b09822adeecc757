"""What resume points cost: one full fine-tune's point beside the reference a user would run
instead, and a resumed training's replay.

1. A DreamBooth point holds SD 1.5's UNet as fp32 master weights and AdamW's two moments (built on
   the meta device from the ``sd15-random`` config, filled with random values, one real AdamW step
   on zero gradients so the optimizer's state is its own; nothing downloaded). Timed in one
   process: ``methods.training``'s point save (``_LoopResume.save``: safetensors + JSON) against
   ``accelerate.Accelerator.save_state`` of the same model and optimizer, which is what the
   diffusers DreamBooth example's ``--checkpointing_steps`` writes to resume from (safetensors
   for the model, pickle for the optimizer). Disk speed decides both, so the figures are this
   machine's; the sizes are the point.
2. Textual Inversion on the tiny backbone: 40 steps uninterrupted, and the same training resumed
   from its point at step 39 (the replay of 39 steps' draws, then one step), in one process.

Run explicitly: ``python -m pytest benchmarks/cpu/test_resume_bench.py --benchmark-enable -s``.
"""

from __future__ import annotations

import gc
import shutil
import time

import torch

from methods.training import ResumePoints, _LoopResume, _optimizer_tensors


def _folder_gb(folder) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def test_a_full_fine_tunes_point_beside_accelerates_save_state(benchmark, tmp_path):
    from accelerate import Accelerator

    from methods.backbones import _build_sd15_random

    with torch.device("meta"):
        unet = _build_sd15_random()[0]
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    parameters = list(unet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=5e-6)
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for parameter in parameters:
        parameter.grad = None
    gc.collect()

    ours = []

    def save_point():
        points = ResumePoints(tmp_path / f"points-{len(ours)}")
        loop = _LoopResume(points, {"steps": 1000}, last_step=1000)
        started = time.perf_counter()
        tensors = {f"parameter.{i}": t.detach().cpu().contiguous() for i, t in enumerate(parameters)}
        more, other = _optimizer_tensors(optimizer)
        tensors.update(more)
        tensors["losses"] = torch.zeros(500)
        tensors["generator"] = torch.Generator().get_state()
        loop.save(500, tensors, {"optimizer": other, "scaler": None, "checkpoint_state": {}, "seconds": 0.0,
                                 "checkpoint_seconds": 0.0})
        ours.append(time.perf_counter() - started)
        del tensors, more
        sizes["point"] = _folder_gb(points.directory)
        shutil.rmtree(points.directory)  # 10 GB each: one on disk at a time

    sizes: dict[str, float] = {}
    benchmark.pedantic(save_point, rounds=3, iterations=1)
    ours_gb = sizes["point"]

    accelerator = Accelerator(cpu=True)
    model, prepared = accelerator.prepare(unet, optimizer)
    reference = []
    for round_ in range(3):
        folder = tmp_path / f"accelerate-{round_}"
        started = time.perf_counter()
        accelerator.save_state(str(folder))
        reference.append(time.perf_counter() - started)
        sizes["accelerate"] = _folder_gb(folder)
        shutil.rmtree(folder)
    reference_gb = sizes["accelerate"]
    figures = {
        "point_gb": round(ours_gb, 2), "point_save_s": [round(t, 2) for t in ours],
        "accelerate_save_state_gb": round(reference_gb, 2), "accelerate_save_state_s": [round(t, 2) for t in reference],
    }
    benchmark.extra_info.update(figures)
    print(figures)
    assert abs(ours_gb - reference_gb) / reference_gb < 0.05  # the same state: weights and both moments


def test_resuming_a_textual_inversion_near_its_end(benchmark, tmp_path):
    from data.subjects import load_subjects
    from methods.backbones import resolve_backbone
    from methods.base import MethodContext
    from methods.textual_inversion import TextualInversion, TextualInversionParams
    from methods.training import resume_points

    torch.set_num_threads(1)
    context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path / "cache")
    subject = load_subjects("mini")[0]
    params = TextualInversionParams(steps=40)
    (tmp_path / "warm").mkdir()
    TextualInversion(params, context).prepare(subject, tmp_path / "warm", 5)  # builds and caches the backbone

    def whole():
        folder = tmp_path / f"whole-{time.perf_counter_ns()}"
        folder.mkdir()
        started = time.perf_counter()
        TextualInversion(params, context).prepare(subject, folder, 5)
        return time.perf_counter() - started

    uninterrupted = min(whole() for _ in range(2))

    class Stop(KeyboardInterrupt):
        pass

    def stop_at(step):
        if step == 39:
            raise Stop

    (tmp_path / "resumed").mkdir()
    try:
        with resume_points(tmp_path / "points", every_steps=39, after_save=stop_at):
            TextualInversion(params, context).prepare(subject, tmp_path / "resumed", 5)
    except Stop:
        pass
    resumed = []

    def resume():
        started = time.perf_counter()
        with resume_points(tmp_path / "points", every_steps=0):
            TextualInversion(params, context).prepare(subject, tmp_path / "resumed", 5)
        resumed.append(time.perf_counter() - started)

    benchmark.pedantic(resume, rounds=2, iterations=1)
    figures = {"uninterrupted_40_steps_s": round(uninterrupted, 3), "resumed_at_39_s": [round(t, 3) for t in resumed]}
    benchmark.extra_info.update(figures)
    print(figures)
    assert min(resumed) < uninterrupted  # the replay of 39 steps' draws is cheaper than their training
