"""Metric backbones' forwards replayed as CUDA graphs (``metrics.cuda_graphs``).

Scoring on a GPU is bound by the host, not the device: an H200 was busy ~15 % of a score run
(``benchmarks/results``, sixteenth session), the rest being Python and the launch of each of the
hundreds of small kernels a ViT or AlexNet forward is made of, per batch of 32 images. A forward
captured once as a CUDA graph is replayed by one call, whatever its kernel count.

``ReplayedForward`` wraps one forward (a function of one tensor returning a tensor or a list of
tensors; it must do all its work on the device, with no host sync and no tensor made from host
data, since those cannot be captured). Per input signature (shape, strides, dtype, device, and the settings that pick kernels:
deterministic algorithms, cuDNN flags, TF32, autocast) the
first ``WARMUP_CALLS`` calls run plainly on a side stream (PyTorch's recipe: lazy initialisation
stays out of the graph), the next one captures the forward on a static copy of its input, and
every later call copies its input into that copy, replays, and returns clones of the outputs (a
later replay overwrites the graph's own). The kernels are those of the plain call, so the values
are too; ``tests/test_metrics_replay.py`` checks that on CUDA (``gpu``), and the plumbing on a CPU,
where nothing is captured: a "replay" runs the forward on the static copy and copies its results
into static outputs, the same data movement as on a GPU. A signature seen once (a subject's
reference photos of an odd size) never pays for a capture; at most ``MAX_GRAPHS`` are kept per
forward, and later signatures run plainly. A capture that fails (an op a graph cannot hold) is
logged once, and that forward runs plainly from then on.

On by default for CUDA devices (``metrics.cuda_graphs=auto``; ``false`` turns it off, ``true``
also runs the plumbing on a CPU). Measured on an H200 (``benchmarks/gpu_scoring.py --cuda-graphs``,
eighteenth session): every value of 3000 images × CLIP-T, CLIP-I, DINO, DIV identical to the plain
run's, and the score stage 4.07 s (4.02–4.17, 3 repeats) against 5.31 s (5.27–5.56) plain in the
same process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # plain calls of a signature before it is captured
MAX_GRAPHS = 6  # captured signatures per forward (each holds its activations' memory)

Outputs = torch.Tensor | list[torch.Tensor]


def _kernel_state() -> tuple:
    """What picks the kernels a forward runs besides its input: a graph captured under one state
    is never replayed under another (a process that turns deterministic kernels or autocast on
    later gets new captures, as a plain call would get new kernels)."""
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"))


def _signature(value: torch.Tensor) -> tuple:
    return tuple(value.shape), value.stride(), value.dtype, str(value.device), _kernel_state()


class _Captured:
    """One signature's graph (None on a CPU), its static input and its static outputs."""

    def __init__(self, forward: Callable[[torch.Tensor], Outputs], value: torch.Tensor) -> None:
        self.forward = forward
        self.static = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        self.static.copy_(value)
        self.graph = None
        if value.device.type == "cuda":
            # on the input's device, whichever is current (a capture and its replays use the
            # current device's streams)
            with torch.cuda.device(value.device):
                torch.cuda.current_stream().synchronize()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    outputs = forward(self.static)
        else:
            outputs = forward(self.static)
        self.single = isinstance(outputs, torch.Tensor)
        self.outputs = [outputs] if self.single else list(outputs)

    def __call__(self, value: torch.Tensor) -> Outputs:
        self.static.copy_(value)
        if self.graph is not None:
            with torch.cuda.device(self.static.device):
                self.graph.replay()
        else:  # the CPU's stand-in for a replay: fresh results written into the static outputs
            fresh = self.forward(self.static)
            for static, new in zip(self.outputs, [fresh] if self.single else fresh):
                static.copy_(new)
        clones = [output.clone() for output in self.outputs]
        return clones[0] if self.single else clones


class ReplayedForward:
    """``forward`` run as a replayed CUDA graph per input signature (see the module docstring)."""

    def __init__(self, forward: Callable[[torch.Tensor], Outputs], name: str,
                 warmup: int = WARMUP_CALLS, max_graphs: int = MAX_GRAPHS) -> None:
        self.forward, self.name, self.warmup, self.max_graphs = forward, name, warmup, max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: dict[tuple, int] = {}
        self.capture_error: str | None = None
        self.replays = 0
        self._lock = threading.Lock()
        self._side: dict[str, torch.cuda.Stream] = {}

    def __call__(self, value: torch.Tensor) -> Outputs:
        signature = _signature(value)
        with self._lock:
            captured = self.graphs.get(signature)
            if captured is None:
                self.seen[signature] = count = self.seen.get(signature, 0) + 1
                if (self.capture_error is not None or count <= self.warmup
                        or len(self.graphs) >= self.max_graphs):
                    return self._plain(value, warm_up=count <= self.warmup)
                try:
                    captured = self.graphs[signature] = _Captured(self.forward, value)
                except RuntimeError as error:  # score on, uncaptured, and say so once
                    self.capture_error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    log.warning("metrics.cuda_graphs: capturing %s failed (%s); it runs uncaptured",
                                self.name, self.capture_error)
                    return self._plain(value, warm_up=False)
            self.replays += 1
            return captured(value)

    def _plain(self, value: torch.Tensor, warm_up: bool) -> Outputs:
        if value.device.type != "cuda" or not warm_up:
            return self.forward(value)
        # warm-up calls run on a side stream, as PyTorch's capture recipe does
        key = str(value.device)
        side = self._side.setdefault(key, torch.cuda.Stream(value.device))
        current = torch.cuda.current_stream(value.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            outputs = self.forward(value)
        current.wait_stream(side)
        for output in [outputs] if isinstance(outputs, torch.Tensor) else outputs:
            output.record_stream(current)  # made on the side stream, used and freed on this one
        return outputs


class Replays:
    """A backbone's replayed forwards, one per purpose ("encode", "lpips trunk"), made on first use."""

    def __init__(self) -> None:
        self.forwards: dict[str, ReplayedForward] = {}
        self._lock = threading.Lock()

    def run(self, purpose: str, forward: Callable[[torch.Tensor], Outputs], value: torch.Tensor) -> Outputs:
        """``forward(value)``, replayed; ``forward`` must compute the same thing at every call for
        one purpose (the first one given is the one captured)."""
        with self._lock:
            replayed = self.forwards.get(purpose)
            if replayed is None:
                replayed = self.forwards[purpose] = ReplayedForward(forward, purpose)
        return replayed(value)

    def summary(self) -> dict:
        """Per purpose: signatures captured, replays, a capture error (for logs and benchmarks)."""
        return {purpose: {"graphs": len(f.graphs), "replays": f.replays, "capture_error": f.capture_error}
                for purpose, f in self.forwards.items()}


def run_forward(replays: Replays | None, purpose: str, forward: Callable[[torch.Tensor], Outputs],
                value: torch.Tensor) -> Outputs:
    """``forward(value)``: replayed when the backbone has ``replays`` (``metrics.cuda_graphs`` on)."""
    return forward(value) if replays is None else replays.run(purpose, forward, value)
