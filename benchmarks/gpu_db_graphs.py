"""Issue 17 item 2, a feasibility probe: a whole DreamBooth step as one CUDA graph, K trainings' graphs on K streams.

What the earlier probes left (``benchmarks/results/README.md``, eighth and ninth sessions): one
compiled DreamBooth step's kernels take 42 ms (channels-last) but the process runs 0.117 s per
step, so one training is host-bound; four processes reach their kernels' time together (49 ms
per step with 51 ms kernels) and stop there, because processes only time-share the GPU; and K
trainings on K streams from K threads of one process were slower still, because their host work
serializes. This probe removes the host work instead: each training's whole step (forward,
backward, gradient clipping at 1.0, fused AdamW) is captured once as a CUDA graph
(``torch.cuda.graph``; AdamW with ``capturable=True``, autocast without its weight-cast cache, as
PyTorch's whole-network capture requires) and replayed. Arms, for each ``--counts`` K, all from
the same start weights and the same fixed inputs per subject (``gpu_db_stacked.subject_inputs``):

- ``plain``: the K trainings' ordinary steps one after another (the reference: the trainer's
  step as ``gpu_db_stacked.plain_step`` runs it), s per subject-step and every loss;
- ``graphs_one_stream``: each training's step captured, the K graphs replayed one after another
  on one stream (what the host overhead cost);
- ``graphs_k_streams``: the same K graphs replayed round-robin from one thread, training k on
  its own stream k, so the GPU may run one training's kernels beside another's (the overlap that
  processes cannot get).

With ``--compile`` the UNet inside each graph is ``torch.compile``'d; with ``--channels-last``
its weights and inputs are in channels-last (what the harness's compiled fine-tunes use). Each
graph arm's losses (its warm-up steps, then its replays) are compared with ``plain``'s (relative
difference; capturable AdamW computes its bias corrections on the device, so bf16 fast-mode noise
is expected, not equality). Peak memory per arm: each graph keeps its own memory pool.

On the CPU nothing is captured (``captured: false``): a "replay" is an ordinary step, so the
tiny CPU check covers the plumbing (warm-up, round-robin order, the loss comparison, which must
then be exact), not the capture. Nothing in the harness uses this yet.

GPU: ``python benchmarks/gpu_db_graphs.py --counts 1,4 --steps 10 --compile --channels-last``.
CPU check: ``python benchmarks/gpu_db_graphs.py --tiny --device cpu --out /tmp/g.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_db_stacked import LEARNING_RATE, step_body, subject_inputs  # noqa: E402
from benchmarks.gpu_methods import environment, peak_gib, reset_peak, synchronize  # noqa: E402
from benchmarks.gpu_metrics import SDPA_ORDERS, save_partial, sdpa_preference  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.diffusion import fp32_trainable_copy  # noqa: E402

WARMUP_STEPS = 3  # ordinary steps on a side stream before capture (PyTorch's whole-network recipe)


class Training:
    """One subject's training: its fp32 UNet (compiled and/or channels-last as asked), fused
    AdamW, fixed inputs, and — once captured — its step as a CUDA graph."""

    def __init__(self, unet, inputs: dict, k: int, *, compiled: bool, channels_last: bool, capturable: bool, device):
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        self.module = torch.compile(unet) if compiled else unet
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.latents = inputs["latents"][k].contiguous(memory_format=layout)
        self.noise = inputs["noise"][k].contiguous(memory_format=layout)
        self.timesteps, self.hidden = inputs["timesteps"][k], inputs["hidden"][k]
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, weight_decay=1e-2,
                                           fused=device.type == "cuda", capturable=capturable)
        self.device = device
        self.graph = None
        self.static_loss = None

    def body(self) -> torch.Tensor:
        """``gpu_db_stacked.step_body``: forward, backward, clipping, AdamW, without zeroing the
        gradients (a captured backward writes them afresh on every replay)."""
        return step_body(self.module, self.optimizer, self.latents, self.noise, self.timesteps, self.hidden,
                         self._autocast)

    def _autocast(self):
        # autocast's weight-cast cache must be off under capture (PyTorch's CUDA graphs notes)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda",
                              cache_enabled=False)

    def plain_step(self) -> torch.Tensor:
        loss = self.body()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def capture(self, losses: list) -> None:
        """``WARMUP_STEPS`` ordinary steps on a side stream (their losses kept: they are steps of
        this training), then one step captured; the capture itself does not run the step. On the
        CPU (the plumbing check) nothing is captured and a replay is an ordinary step."""
        if self.device.type != "cuda":
            for _ in range(WARMUP_STEPS):
                losses.append(self.plain_step())
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                losses.append(self.plain_step())
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self.body()

    def replay(self, losses: list) -> None:
        if self.graph is None:  # CPU plumbing check
            losses.append(self.plain_step())
            return
        self.graph.replay()
        losses.append(self.static_loss.clone())


def make_trainings(backbone, args, device, start: list, inputs: dict, *, capturable: bool) -> list[Training]:
    """One ``Training`` per start state: a fresh fp32 UNet copy loaded with it, subject k's inputs."""
    trainings = []
    for k, state in enumerate(start):
        unet = fp32_trainable_copy(backbone, "unet")
        unet.load_state_dict(state)
        trainings.append(Training(unet, inputs, k, compiled=args.compile, channels_last=args.channels_last,
                                  capturable=capturable, device=device))
    return trainings


def graphs_arm(backbone, count: int, args, device, start: list, inputs: dict, reference: dict, streams: bool) -> dict:
    """K trainings' graphs replayed ``--steps`` times each: on one stream one after another, or
    round-robin on K streams from this thread."""
    trainings = make_trainings(backbone, args, device, start, inputs, capturable=device.type == "cuda")
    losses: list = [[] for _ in range(count)]
    first = time.perf_counter()
    for k, training in enumerate(trainings):  # warm-up steps (and the compile), then the capture
        training.capture(losses[k])
    synchronize(device)
    capture_seconds = time.perf_counter() - first
    if device.type == "cuda":
        lanes = [torch.cuda.Stream(device) for _ in range(count)] if streams else [torch.cuda.current_stream(device)] * count
        for lane in lanes:
            lane.wait_stream(torch.cuda.current_stream(device))
    started = time.perf_counter()
    for _ in range(args.steps):
        for k, training in enumerate(trainings):
            with torch.cuda.stream(lanes[k]) if device.type == "cuda" else contextlib.nullcontext():
                training.replay(losses[k])
    synchronize(device)
    seconds = time.perf_counter() - started
    rows = [[float(x) for x in row] for row in losses]
    difference = max(abs(a - b) / max(abs(b), 1e-12) for row, ref in zip(rows, reference["losses"]) for a, b in zip(row, ref))
    per = seconds / (count * args.steps)
    return {"subjects": count, "streams": count if streams else 1, "compiled": args.compile,
            "captured": device.type == "cuda",
            "channels_last": args.channels_last, "replays_each": args.steps,
            "s_per_subject_step": per, "amortized_s_per_1000_steps": 1000 * per,
            "speedup_vs_plain": reference["s_per_subject_step"] / per,
            "warmup_and_capture_s": capture_seconds, "peak_gib": peak_gib(device),
            "max_relative_loss_difference_vs_plain": difference, "losses": rows}


def plain_arm(backbone, count: int, args, device, start: list, inputs: dict) -> dict:
    """The K trainings' ordinary steps, one training after another: ``WARMUP_STEPS`` untimed
    steps each (the graph arms' warm-up), then ``--steps`` timed ones each."""
    trainings = make_trainings(backbone, args, device, start, inputs, capturable=False)
    losses: list = [[] for _ in range(count)]
    for k, training in enumerate(trainings):
        for _ in range(WARMUP_STEPS):
            losses[k].append(training.plain_step())
    synchronize(device)
    started = time.perf_counter()
    for k, training in enumerate(trainings):
        for _ in range(args.steps):
            losses[k].append(training.plain_step())
    synchronize(device)
    per = (time.perf_counter() - started) / (count * args.steps)
    return {"subjects": count, "compiled": args.compile, "channels_last": args.channels_last,
            "steps_each": args.steps, "s_per_subject_step": per, "amortized_s_per_1000_steps": 1000 * per,
            "peak_gib": peak_gib(device), "losses": [[float(x) for x in row] for row in losses]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--counts", default="1,4", help="trainings per arm (K)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (replays) per training, after the warm-up")
    parser.add_argument("--compile", action="store_true", help="the UNet inside each step through torch.compile")
    parser.add_argument("--channels-last", action="store_true", help="weights and inputs in channels-last")
    parser.add_argument("--sdpa", default="default", choices=sorted(SDPA_ORDERS),
                        help="attention backends for every arm (flash: without cuDNN's attention, should its "
                             "kernels refuse graph capture)")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, 2 steps, counts 1,2")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_db_graphs.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.resolution, args.steps, args.counts = "tiny", 64, 2, "1,2"
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = load_backbone(resolve_backbone(args.backbone), args.device, dtype)
    document: dict = {"benchmark": "gpu_db_graphs", "environment": environment(device),
                      "settings": {k: v for k, v in vars(args).items() if k != "out"}, "arms": {}}
    with sdpa_preference(args.sdpa):
        run_arms(args, backbone, device, document)
    save_partial(document, args.out, "gpu_db_graphs.json")
    print(json.dumps({k: v for k, v in document.items() if k != "arms"}, indent=1))
    return 0


def run_arms(args, backbone, device, document: dict) -> None:
    """For each K: the plain reference, then the two graph arms; the JSON saved after each."""
    for count in [int(c) for c in args.counts.split(",") if c]:
        start = [copy.deepcopy(fp32_trainable_copy(backbone, "unet").state_dict()) for _ in range(count)]
        inputs = subject_inputs(count, backbone.unet, args.resolution, device)
        arms = [("plain", functools.partial(plain_arm, backbone, count, args, device, start, inputs))]
        for streams in (False, True):
            arms.append(("graphs_k_streams" if streams else "graphs_one_stream",
                         functools.partial(graphs_arm, backbone, count, args, device, start, inputs, streams=streams)))
        for name, measure in arms:
            key = f"{name}_{count}"
            if name != "plain" and "error" in document["arms"][f"plain_{count}"]:
                document["arms"][key] = {"subjects": count, "skipped": "no plain reference to compare with"}
                continue
            reset_peak(device)
            try:
                row = measure() if name == "plain" else measure(reference=document["arms"][f"plain_{count}"])
            except Exception as error:  # noqa: BLE001 - keep the other arms
                row = {"subjects": count, "error": f"{type(error).__name__}: {str(error)[:1500]}"}
            gc.collect()  # the arm's trainings (weights, optimizer state, graph pools) go before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
            document["arms"][key] = row
            print(key, {k: v for k, v in row.items() if k != "losses"}, flush=True)
            save_partial(document, args.out, "gpu_db_graphs.json")
        del start, inputs


if __name__ == "__main__":
    sys.exit(main())
