"""A full fine-tune's checkpoint write: how long the training waits for it, in line vs in the background.

DreamBooth saves the whole UNet per checkpoint (SD 1.5: 1.72 GB in bf16). The snapshot (weights
copied to host memory) is taken in line either way; what ``methods.training.BackgroundWrites``
moves off the training's path is the safetensors file write. This measures, on a state dict of
SD 1.5's UNet shapes (built on the meta device from the ``sd15-random`` config, then filled with
bf16 values; no weights are downloaded), the seconds the caller is blocked by ``save_file`` in
line (the reference path) against the seconds ``submit`` blocks it, and the background write's
own time (``close``), in one process; the two files must be byte-identical. Disk speed decides the
figures, so they are this machine's.

Run explicitly: ``python -m pytest benchmarks/cpu/test_checkpoint_write_bench.py --benchmark-enable -s``.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import save_file

from methods.training import BackgroundWrites


def _sd15_unet_state() -> dict[str, torch.Tensor]:
    """SD 1.5's UNet state dict shapes (``sd15-random``'s builder on the meta device), bf16 values."""
    from methods.backbones import _build_sd15_random

    with torch.device("meta"):
        unet = _build_sd15_random()[0]
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float32).to(torch.bfloat16)
            for k, v in unet.state_dict().items()}


def test_checkpoint_write(benchmark, tmp_path):
    state = _sd15_unet_state()
    size_gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    inline = []
    for i in range(2):
        started = time.perf_counter()
        save_file(state, str(tmp_path / f"inline-{i}.safetensors"))
        inline.append(time.perf_counter() - started)
    blocked, waits = [], []

    def background():
        """One checkpoint through BackgroundWrites: submit (what the training waits for), then close."""
        writes = BackgroundWrites(threads=1)
        path = tmp_path / f"background-{len(blocked)}.safetensors"
        started = time.perf_counter()
        writes.submit(path, lambda: save_file(state, str(path)))
        blocked.append(time.perf_counter() - started)
        waits.append(writes.close())

    benchmark.pedantic(background, rounds=2, iterations=1)
    figures = {"state_gb": round(size_gb, 3), "inline_write_blocks_s": round(min(inline), 3),
               "background_submit_blocks_s": round(min(blocked), 5),
               "background_write_s_in_its_thread": round(min(waits), 3)}
    benchmark.extra_info.update(figures)
    print(figures)
    assert max(blocked) < 0.1 * min(inline)
    assert (tmp_path / "inline-0.safetensors").read_bytes() == (tmp_path / "background-0.safetensors").read_bytes()


def test_a_host_bound_loop_beside_a_background_write(tmp_path):
    """What the writer thread takes from a host-bound training thread: a pure-Python loop (the
    kind of host work a GPU training step's launches are) timed alone and while a 1.72 GB
    checkpoint is written in the background, in one process. safetensors writes from pointers in
    Rust; if it held the GIL for the write, the loop would stall for its duration."""
    state = _sd15_unet_state()

    def python_loop(n=25_000_000):  # ~1 s here: inside the write, which takes several
        started = time.perf_counter()
        total = 0
        for i in range(n):
            total += i & 7
        return time.perf_counter() - started

    alone = min(python_loop() for _ in range(2))
    beside, after = [], []
    for i in range(2):
        writes = BackgroundWrites(threads=1)
        path = tmp_path / f"beside-{i}.safetensors"
        writes.submit(path, lambda path=path: save_file(state, str(path)))
        beside.append(python_loop())
        after.append(writes.close())  # > 0: the write was still going when the loop ended
    figures = {"loop_alone_s": round(alone, 3), "loop_beside_write_s": [round(t, 3) for t in beside],
               "write_went_on_after_the_loop_s": [round(t, 3) for t in after],
               "slowdown": round(min(beside) / alone, 3)}
    print(figures)
    assert min(beside) < 3 * alone  # a write holding the GIL throughout would stall the loop ~5 s
