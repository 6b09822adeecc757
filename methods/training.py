"""The one training loop that every fine-tuning method parameterizes, and its shared params.

A method says *which tensors train* (``parameters``), *which batches* it sees (``next_batch``:
latents, prompts, per-sample loss weights, optional masks), *how prompts become conditioning*
(``encode_prompts``: a frozen cached encoder, a text encoder being trained, a learned token) and
*which extra loss terms* apply (``extra_loss``). The loop owns everything else: the denoising
objective, mixed precision, the optimizer, gradient clipping, hooks after every step and at
checkpoint steps, loss history and timing, captured steps (``CapturedStep``) and resume points
(``resume_points``: an interrupted training continues where it stopped). See
``methods.diffusion`` for the conventions.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from data.common import TMP_PREFIX, atomic_write_json, disk_error
from methods.base import ParamsError, param
from methods.diffusion import autocast_context, diffusion_loss, draw_noise_and_timesteps

OPTIMIZERS = ("adamw", "adamw8bit")
log = logging.getLogger("subjectbench")


@dataclass(frozen=True)
class TrainingParams:
    """Knobs shared by every fine-tuning method; subclasses redeclare fields to change defaults.

    ``checkpoint_steps`` are the steps after which an intermediate state is saved (``step-N``);
    the end of training is always saved as ``final``.
    """

    steps: int = param(1000, source="ours: placeholder, each method sets its own", doc="optimisation steps")
    learning_rate: float = param(1e-4, source="ours: placeholder, each method sets its own")
    batch_size: int = param(1, source="diffusers example", doc="instance images per step")
    checkpoint_steps: tuple[int, ...] = param((), source="ours: only `final` unless a sweep asks", doc="steps after which a step-N state is also saved")
    optimizer: Literal["adamw", "adamw8bit"] = param("adamw", source="diffusers example", doc="adamw8bit needs bitsandbytes")
    adam_beta1: float = param(0.9, source="diffusers example")
    adam_beta2: float = param(0.999, source="diffusers example")
    adam_epsilon: float = param(1e-8, source="diffusers example")
    adam_weight_decay: float = param(1e-2, source="diffusers example")
    max_grad_norm: float = param(0.0, source="ours: no clipping unless the method's source clips", doc="0 disables clipping")
    gradient_checkpointing: bool = param(False, source="ours: a memory/speed trade, off")
    vae_latents: Literal["mean", "sample"] = param("mean", source="ours: the latent mean is deterministic (diffusers' scripts sample)")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ParamsError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ParamsError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ParamsError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ParamsError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.max_grad_norm < 0:
            raise ParamsError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        bad = [s for s in self.checkpoint_steps if not isinstance(s, int) or s < 1]
        if bad:
            raise ParamsError(f"checkpoint_steps must be positive integers, got {bad}")
        beyond = [s for s in self.checkpoint_steps if s > self.steps]
        if beyond:
            raise ParamsError(
                f"checkpoint_steps {beyond} are beyond the training length steps={self.steps}; "
                f"use steps >= {max(beyond)} or drop them"
            )
        # A canonical order makes equal sets of checkpoints fingerprint equally.
        object.__setattr__(self, "checkpoint_steps", tuple(sorted(set(self.checkpoint_steps))))

    def checkpoint_names(self) -> list[str]:
        """``step-N`` for each intermediate checkpoint, then ``final`` (``step-<steps>`` is final)."""
        return [f"step-{s}" for s in self.checkpoint_steps if s < self.steps] + ["final"]

    def checkpoint_step(self, name: str) -> int:
        """The training step a checkpoint name stands for; unknown names list the valid ones."""
        if name == "final" or name == f"step-{self.steps}":
            return self.steps
        if name in self.checkpoint_names():
            return int(name.removeprefix("step-"))
        raise ValueError(f"unknown checkpoint {name!r}; valid: {', '.join(self.checkpoint_names())}")

    def stored_checkpoint(self, checkpoint: str, saved, owner: str) -> str:
        """The name ``checkpoint`` is stored under in a state (``step-N`` or ``final``), checked
        against the checkpoints the state saved; ``owner`` names the state in the error."""
        name = checkpoint_name(self.checkpoint_step(checkpoint), self.steps)
        if name not in saved:
            raise ValueError(f"{owner} has no checkpoint {name!r}; it has {sorted(saved)}")
        return name

    def save_steps(self) -> list[int]:
        return [s for s in self.checkpoint_steps if s < self.steps] + [self.steps]


# Threads that write checkpoint files while training goes on; 0 writes them in line (the
# reference path, and what tests compare against).
CHECKPOINT_WRITE_THREADS = 1


class BackgroundWrites:
    """Checkpoint files written off the training's critical path.

    The caller takes its snapshot first (e.g. the weights copied to host memory: training goes on
    changing the originals), then ``submit(path, write)`` hands ``write()`` to a background
    thread. At most ``limit`` writes are queued or running; submitting beyond that waits for the
    oldest, so host memory holds at most ``limit`` snapshots beside the one being taken. ``close()``
    waits for every write and re-raises the first failure (the original exception, so disk errors
    keep their meaning, with a note naming the file); it returns the seconds it waited, which the
    caller adds to its checkpoint time. ``shutdown()`` (on the way out of a failed training) waits
    quietly, so no thread writes into a folder the caller is about to discard. With
    ``threads=0`` every write happens inside ``submit``.
    """

    def __init__(self, threads: int | None = None, limit: int = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor

        threads = CHECKPOINT_WRITE_THREADS if threads is None else threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="checkpoint") if threads > 0 else None
        self.limit = max(limit, 1)
        self.pending: list = []  # futures, oldest first
        points = _RESUME.get()
        if points is not None:  # a resume point is saved only once the checkpoints before it are on disk
            points.writers.append(self)

    def submit(self, path: Path | str, write: Callable[[], None]) -> None:
        if self.pool is None:
            _write(path, write)
            return
        while len(self.pending) >= self.limit:
            self.pending.pop(0).result()  # re-raises that write's own exception
        self.pending.append(self.pool.submit(_write, path, write))

    def wait(self) -> None:
        """Wait for every write submitted so far (re-raising a failed one); more may follow."""
        while self.pending:
            self.pending.pop(0).result()

    def close(self) -> float:
        started = time.perf_counter()
        try:
            self.wait()
        finally:
            self.shutdown()
        return time.perf_counter() - started

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.pending.clear()


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with a full or read-only disk raised as the project's
    ``DiskWriteError`` naming the file and the fix (the run stops with one ``error:`` line and
    keeps what finished). safetensors reports the operating system's error as its own
    ``SafetensorError`` ("... I/O error: No space left on device (os error 28)"), which names
    neither the file nor the fix, and the harness took it for the training's own failure. The
    partial file is removed."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        match = _OS_ERROR.search(str(error))
        code = int(match.group(1)) if match else None
        fatal = disk_error(OSError(code, os.strerror(code), str(path)), path) if code is not None else None
        if fatal is None:
            raise
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)
        raise fatal from None


def _write(path: Path | str, write: Callable[[], None]) -> None:
    try:
        write()
    except BaseException as error:
        error.add_note(f"while writing the checkpoint file {path}")
        raise


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checkpoint_name(step: int, steps: int) -> str:
    return "final" if step == steps else f"step-{step}"


@dataclass
class TrainBatch:
    """One optimisation step's data. ``weights`` (B,) combine per-sample losses (default: mean);
    ``mask`` (B,1,h,w) weights the loss spatially; ``timesteps`` (B,) fixes the noise levels
    (default: uniform draws), e.g. for HiFi Tuner's step-wise embeddings; ``noise`` fixes the
    noise (default: drawn from the loop's generator), e.g. when the conditioning is predicted
    from the noisy latent itself (the tuning encoder), or each subject's own draws in a
    multi-subject batch."""

    latents: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    noise: torch.Tensor | None = None


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = 0.0  # after the first (warm-up) step, checkpoint saving excluded
    checkpoint_seconds: float = 0.0  # time spent in on_checkpoint (writing states)
    peak_memory_bytes: int | None = None
    # training.cuda_graphs: "captured", or why not (None when not asked for); steps run uncaptured
    # because their inputs' shapes differed from the captured step's
    cuda_graphs: str | None = None
    uncaptured_steps: int = 0
    # the step an interrupted training resumed after (0: it ran from the start) and the seconds this
    # run spent saving resume points (training.resume_every); `seconds` counts every run's time
    resumed_from_step: int = 0
    resume_point_seconds: float = 0.0

    def add_checkpoint_wait(self, seconds: float) -> None:
        """Time spent after the loop waiting for checkpoint files (``BackgroundWrites.close``):
        part of the checkpoint time and of the training's wall time."""
        self.checkpoint_seconds += seconds
        self.seconds += seconds

    def summary(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("losses")
        if self.cuda_graphs is None:
            del out["cuda_graphs"], out["uncaptured_steps"]
        if not self.resumed_from_step:
            del out["resumed_from_step"]
        if not self.resume_point_seconds:
            del out["resume_point_seconds"]
        n = min(5, len(self.losses))
        out["loss_first"] = sum(self.losses[:n]) / max(n, 1)
        out["loss_last"] = sum(self.losses[-n:]) / max(n, 1)
        return out


def build_optimizer(
    parameters: Sequence[torch.Tensor], params: TrainingParams, learning_rate: float, capturable: bool = False
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW, with the method's Adam settings."""
    kwargs = dict(
        lr=learning_rate,
        betas=(params.adam_beta1, params.adam_beta2),
        eps=params.adam_epsilon,
        weight_decay=params.adam_weight_decay,
    )
    if params.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ImportError(
                "optimizer 'adamw8bit' needs bitsandbytes, which is not installed; "
                "`pip install bitsandbytes` (CUDA only) or use optimizer: adamw"
            ) from None
        return bitsandbytes.optim.AdamW8bit(list(parameters), **kwargs)
    on_cuda = all(p.is_cuda and p.dtype == torch.float32 for p in parameters)
    # The fused kernel does one launch for all tensors: the optimizer step of a full UNet is
    # memory-bound, and this is its fastest form.
    # capturable: the step counters live on the device, so the step can be captured in a CUDA graph
    # (the same update; its bias corrections are computed on the device instead of the host)
    return torch.optim.AdamW(list(parameters), fused=on_cuda or None, capturable=capturable and on_cuda, **kwargs)


GRAPH_WARMUP_STEPS = 3  # ordinary steps on a side stream before the capture (PyTorch's whole-network recipe)


def graph_refusal(params: TrainingParams, dtype: torch.dtype, extra_loss) -> str | None:
    """Why ``training.cuda_graphs`` cannot capture this training's step (None: it can). The same
    answer on a CPU, which runs the captured path's plumbing without a capture (tests)."""
    if dtype == torch.float16:
        return "fp16 needs a GradScaler, whose step is not capturable"
    if params.optimizer != "adamw":
        return f"optimizer {params.optimizer} is not capturable"
    if extra_loss is not None:
        return "the method adds a loss term computed outside the objective"
    return None


class CapturedStep:
    """A training step (``body``: forward, backward, clipping, optimizer step) run as one CUDA
    graph: ``GRAPH_WARMUP_STEPS`` ordinary steps on a side stream, then the step is captured once
    on static copies of its inputs and replayed, each later step copying its inputs into them.

    The step's arithmetic is unchanged; what goes is the host's work per kernel (a DreamBooth step
    on an H200, one process: 63 ms captured against 115 ms plain, 43 ms compiled and captured
    against 92-102 ms compiled; ``benchmarks/gpu_finetune_compile.py --graphs``).
    Everything the body reads must be in ``inputs`` as tensors on the device (noise and timesteps
    are drawn before the step); a step whose inputs differ in names, shapes or dtypes from the
    captured one runs uncaptured. On a CPU nothing is captured: a "replay" runs ``body`` on the
    static copies, so tests cover the plumbing (warm-up, copies, fresh gradients each step).
    """

    def __init__(self, body: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer,
                 device: torch.device, warmup: int = GRAPH_WARMUP_STEPS):
        self.body, self.optimizer, self.device, self.warmup = body, optimizer, device, warmup
        self.steps = 0
        self.graph = None
        self.static: dict[str, torch.Tensor] | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.uncaptured_steps = 0
        self.capture_error: str | None = None  # a capture that failed: every step then runs uncaptured
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.steps += 1
        if self.steps <= self.warmup or self.capture_error is not None:
            return self._plain(inputs)
        if self.static is None:
            try:
                self._capture(inputs)
            except RuntimeError as error:  # an op the graph cannot hold: train on, uncaptured, and say so
                self.graph, self.static, self.outputs = None, None, None
                self.capture_error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                log.warning("training.cuda_graphs: capturing the step failed (%s); this training runs uncaptured",
                            self.capture_error)
                return self._plain(inputs)
        elif _signature(inputs) != _signature(self.static):
            self.uncaptured_steps += 1
            return self._plain(inputs)
        else:
            for name, tensor in inputs.items():
                self.static[name].copy_(tensor, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return self.outputs[0].clone(), self.outputs[1].clone()
        loss, per_sample = self.body(self.static)  # the CPU's stand-in for a replay
        self.optimizer.zero_grad(set_to_none=True)  # a replay writes fresh gradients too
        return loss, per_sample

    def _plain(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # after a capture the gradients are the graph's buffers, holding the last replay's values:
        # an uncaptured step must not add to them
        self.optimizer.zero_grad(set_to_none=True)
        if self._side is None:
            outputs = self.body(inputs)
        else:  # warm-up steps run on a side stream before a capture (PyTorch's recipe)
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                outputs = self.body(inputs)
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        self.optimizer.zero_grad(set_to_none=True)
        return outputs

    def _capture(self, inputs: dict[str, torch.Tensor]) -> None:
        self.static = {name: tensor.detach().to(self.device, copy=True) for name, tensor in inputs.items()}
        if self.device.type != "cuda":
            return
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates them in the graph's pool
        torch.cuda.current_stream(self.device).synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.body(self.static)

    def close(self) -> None:
        """Free the graph and its memory pool."""
        self.graph, self.static, self.outputs = None, None, None


# ---------------------------------------------------------------------------- resume points
# A training interrupted (Ctrl-C, a killed or preempted worker, a time limit) restarts from its
# last resume point instead of step 0. The harness opens ``resume_points(directory, ...)`` around
# a method's ``prepare``; every ``train_loop`` inside it (numbered in call order: a method that
# trains in stages has several) saves, every ``every_seconds``, what the rest of the training
# depends on: the trainable tensors, the optimizer's state, the loss scaler's, the losses so far,
# the loop generator's state and the method's checkpoint bookkeeping (``checkpoint_state``). On
# a rerun the loop restores them and replays the draws of the steps already taken, in their
# order (the method's ``next_batch``, then the noise and timesteps; nothing trains: this only
# brings the method's own generators and iterators, e.g. an image order that reshuffles when it
# runs out, to where they were), so the resumed training takes exactly the steps the
# uninterrupted one would have: bit-identical on a CPU (tests/test_training_resume.py), within
# the GPU's run-to-run spread on a GPU. Files are safetensors and JSON (no pickle).
RESUME_FORMAT = 1


@dataclass
class ResumePoints:
    """Where and how often the ``train_loop`` calls of one ``prepare`` save resume points.

    ``every_seconds`` (``training.resume_every``, counted from the end of each loop's first step)
    or ``every_steps`` (tests) sets the cadence;
    ``after_save(step)`` runs after each point is on disk. ``loops`` counts the loops started, so
    each finds its own point; ``writers`` are the ``BackgroundWrites`` opened meanwhile, waited
    for before a point is saved (the checkpoints it counts as written must be on disk);
    ``restored`` lists the loops that resumed (the harness records it in the state's DONE)."""

    directory: Path
    every_seconds: float = 0.0
    every_steps: int = 0
    after_save: Callable[[int], None] | None = None
    loops: int = 0
    writers: list = field(default_factory=list)
    # the loops that resumed: {"loop", "step" resumed after, "seconds" of training before it}
    restored: list[dict] = field(default_factory=list)


_RESUME: contextvars.ContextVar[ResumePoints | None] = contextvars.ContextVar("subjectbench_resume", default=None)


@contextlib.contextmanager
def resume_points(
    directory: Path | str, every_seconds: float = 0.0, every_steps: int = 0,
    after_save: Callable[[int], None] | None = None,
):
    """Let every ``train_loop`` inside the block save and restore resume points under ``directory``."""
    points = ResumePoints(Path(directory), float(every_seconds), int(every_steps), after_save)
    token = _RESUME.set(points)
    try:
        yield points
    finally:
        _RESUME.reset(token)


def _restore_in_place(target: dict, saved: dict) -> None:
    """``target``'s entries set to ``saved``'s; a dict or list entry is refilled in place, so a
    method's references to it (e.g. one subject's ``files``) see the restored content."""
    for key, value in saved.items():
        current = target.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            current.clear()
            current.update(value)
        elif isinstance(current, list) and isinstance(value, list):
            current[:] = value
        else:
            target[key] = value


class _LoopResume:
    """One ``train_loop``'s resume point: ``loop-<i>.json`` names its tensors file (written
    first, under a new name), so a process killed while saving leaves the previous point whole."""

    def __init__(self, points: ResumePoints, identity: dict, last_step: int):
        self.points, self.identity = points, identity
        self.index = points.loops
        points.loops += 1
        self.meta_path = points.directory / f"loop-{self.index}.json"
        self.last_step = last_step  # no point at or after this step (a checkpoint hook without state)
        self.last_save = time.perf_counter()
        self.seconds = 0.0

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        from safetensors.torch import load_file

        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            tensors = load_file(self.points.directory / meta["tensors"])
        except (OSError, ValueError, KeyError) as error:
            log.warning("resume point %s is unreadable (%s); this training starts over", self.meta_path, error)
            return None
        if meta.get("format") != RESUME_FORMAT or meta.get("identity") != self.identity:
            log.warning("resume point %s is for another training; this training starts over", self.meta_path)
            return None
        return meta, tensors

    def due(self, step: int) -> bool:
        if step >= self.last_step:
            return False
        if self.points.every_steps:
            return step % self.points.every_steps == 0
        return self.points.every_seconds > 0 and time.perf_counter() - self.last_save >= self.points.every_seconds

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        started = time.perf_counter()
        for writer in self.points.writers:
            writer.wait()
        directory = self.points.directory
        directory.mkdir(parents=True, exist_ok=True)
        name = f"loop-{self.index}.step-{step}.safetensors"
        temporary = directory / f"{TMP_PREFIX}{name}.{os.getpid()}"  # streamed: a point may be ~10 GB
        save_tensors(tensors, temporary)  # a full disk: DiskWriteError, the partial file removed
        os.replace(temporary, directory / name)
        meta = {"format": RESUME_FORMAT, "identity": self.identity, "step": step, "tensors": name, **meta}
        atomic_write_json(self.meta_path, meta)  # the pointer, last: the point now counts
        for old in directory.glob(f"loop-{self.index}.step-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.last_save = time.perf_counter()
        self.seconds += self.last_save - started
        log.info("resume point saved at step %d (%s, %.1f s)", step, self.meta_path.name, self.last_save - started)
        if self.points.after_save is not None:
            self.points.after_save(step)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's per-tensor state as named host tensors, plus its non-tensor entries."""
    tensors, other = {}, {}
    for index, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(index), {})[name] = value
    return tensors, other


def _load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], other: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entry in other.items():
        state.setdefault(int(index), {}).update(entry)
    current = optimizer.state_dict()  # this optimizer's own hyperparameters (the identity matched)
    current["state"] = state
    optimizer.load_state_dict(current)  # moves each tensor to its parameter's device as torch does


def _stacked(losses: list[torch.Tensor]) -> torch.Tensor:
    """The losses so far as one fp32 host tensor (restored ones are fp32, new ones the loss's dtype)."""
    return torch.stack([loss.float() for loss in losses]).cpu()


def _signature(tensors: dict[str, torch.Tensor]) -> dict:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def train_loop(
    *,
    unet: torch.nn.Module,
    noise_scheduler,
    parameters: Sequence[torch.Tensor],
    params: TrainingParams,
    learning_rate: float,
    next_batch: Callable[[int], TrainBatch],
    encode_prompts: Callable[[list[str]], torch.Tensor],
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    on_step_end: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    problems: int = 1,
    cuda_graphs: bool = False,
    checkpoint_state: dict | None = None,
) -> TrainResult:
    """Run ``params.steps`` optimisation steps; call ``on_checkpoint(step)`` at each save step.

    Steps are numbered from 1; ``on_checkpoint`` runs after the optimizer step of every step in
    ``params.save_steps()`` (the intermediate checkpoints and the last step).

    ``problems`` > 1 runs that many independent trainings in each pass (multi-subject Textual
    Inversion): the batch is ``problems`` equal consecutive chunks, ``parameters[i]`` affects
    chunk ``i`` only, and the batch weights make the loss the sum of the chunk means, so each
    tensor gets exactly its own training's gradient. Clipping is then per tensor (a global norm
    would couple the trainings) and ``losses`` holds one list per step, one loss per chunk.

    ``cuda_graphs`` (``training.cuda_graphs``) runs each step as a replayed CUDA graph
    (``CapturedStep``) where the step allows it: the conditioning is computed before the step
    (so it must not train: a trained text encoder or token keeps the plain loop), the noise and
    timesteps are drawn before it from the same generator in the same order, and AdamW keeps its
    step counters on the device. Where it cannot (``graph_refusal``) the plain loop runs and
    ``TrainResult.cuda_graphs`` says why.

    Inside ``resume_points`` the loop saves resume points and, on a rerun, resumes from the last
    (see "resume points" above). ``checkpoint_state`` is the JSON-able bookkeeping that
    ``on_checkpoint`` fills (e.g. the files each checkpoint wrote), saved with each point and
    restored in place; a loop with an ``on_checkpoint`` hook but no ``checkpoint_state`` saves
    points only before its first intermediate checkpoint.
    """
    parameters = list(parameters)
    if not parameters:
        raise ValueError("train_loop: no trainable parameters were given")
    if problems > 1 and len(parameters) != problems:
        raise ValueError(f"train_loop: {problems} problems need one tensor each, got {len(parameters)}")
    if problems > 1 and extra_loss is not None:
        raise ValueError("train_loop: an extra loss term would couple the problems of a multi-problem pass")
    clip_groups = [[tensor] for tensor in parameters] if problems > 1 else [parameters]
    for tensor in parameters:
        if tensor.dtype != torch.float32:
            raise ValueError(f"trainable tensors must be fp32 master weights, got {tensor.dtype}")
    refusal = graph_refusal(params, dtype, extra_loss) if cuda_graphs else "off"
    optimizer = build_optimizer(parameters, params, learning_rate, capturable=refusal is None)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step_body(inputs: dict[str, torch.Tensor], cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on its conditioning (``hidden``) and batch: the loss (drawing its noise and
        timesteps where ``inputs`` has none), extra loss terms, backward (scaled in fp16),
        clipping, the optimizer; the gradients are left for the caller to clear. A captured step
        runs it without autocast's cast cache and without a scaler or extra terms (``graph_refusal``)."""
        with autocast_context(device, dtype, cache=cache):
            loss, per_sample = diffusion_loss(
                unet, noise_scheduler, inputs["latents"], inputs["hidden"], generator, inputs.get("weights"),
                inputs.get("mask"), timesteps=inputs.get("timesteps"), noise=inputs.get("noise"),
            )
            if extra_loss is not None:
                loss = loss + extra_loss()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if params.max_grad_norm > 0:
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, params.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return loss.detach(), per_sample

    captured = CapturedStep(functools.partial(step_body, cache=False), optimizer, device) if refusal is None else None
    save_steps = set(params.save_steps())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[torch.Tensor] = []
    started = time.perf_counter()
    resume, first_step, earlier_seconds, earlier_checkpoint_seconds, pending_optimizer = None, 1, 0.0, 0.0, None
    if (points := _RESUME.get()) is not None:
        intermediate = [s for s in params.save_steps() if s < params.steps]
        last_step = intermediate[0] if on_checkpoint is not None and checkpoint_state is None and intermediate else params.steps
        identity = {
            "steps": params.steps, "problems": problems, "learning_rate": learning_rate, "optimizer": params.optimizer,
            "max_grad_norm": params.max_grad_norm, "dtype": str(dtype),
            "parameters": [[list(t.shape), str(t.dtype)] for t in parameters],
        }
        resume = _LoopResume(points, identity, last_step)
        loaded = resume.load()
        if loaded is not None:
            meta, saved = loaded
            first_step = meta["step"] + 1
            with torch.no_grad():
                for index, tensor in enumerate(parameters):
                    tensor.copy_(saved[f"parameter.{index}"])
            pending_optimizer = (saved, meta["optimizer"])
            if scaler is not None and meta.get("scaler"):
                scaler.load_state_dict(meta["scaler"])
            losses = list(saved["losses"].to(device).unbind(0))
            if checkpoint_state is not None and meta.get("checkpoint_state"):
                _restore_in_place(checkpoint_state, meta["checkpoint_state"])
            earlier_seconds, earlier_checkpoint_seconds = meta["seconds"], meta["checkpoint_seconds"]
            for step in range(1, first_step):  # every draw of the steps taken, in their order; nothing trains
                batch = next_batch(step)
                draw_noise_and_timesteps(noise_scheduler, batch.latents, generator, batch.noise, batch.timesteps)
            generator.set_state(saved["generator"])  # the same state, unless something else drew from it
            log.info("training resumed at step %d of %d (%s)", first_step, params.steps, resume.meta_path)
            points.restored.append({"loop": resume.index, "step": meta["step"], "seconds": earlier_seconds})
    after_first = started
    checkpoint_seconds = checkpoint_after_first = 0.0
    for step in range(first_step, params.steps + 1):
        batch = next_batch(step)
        with autocast_context(device, dtype):
            hidden = encode_prompts(batch.prompts)
        if captured is not None and hidden.requires_grad:  # seen at the first step, before anything stepped
            refusal, captured = "the conditioning (a text encoder or token) trains", None
            optimizer = build_optimizer(parameters, params, learning_rate)
        if pending_optimizer is not None:  # into the optimizer this loop steps with
            _load_optimizer_state(optimizer, *pending_optimizer)
            pending_optimizer = None
        inputs = {"latents": batch.latents, "hidden": hidden, "noise": batch.noise, "timesteps": batch.timesteps,
                  "weights": batch.weights, "mask": batch.mask}
        if captured is not None:
            inputs["noise"], inputs["timesteps"] = draw_noise_and_timesteps(
                noise_scheduler, batch.latents, generator, batch.noise, batch.timesteps)
            loss, per_sample = captured({name: tensor for name, tensor in inputs.items() if tensor is not None})
        else:
            loss, per_sample = step_body(inputs)
            optimizer.zero_grad(set_to_none=True)
        # Kept on the device: a .item() per step would synchronise the GPU every step.
        losses.append(loss if problems == 1 else per_sample.view(problems, -1).mean(dim=1))
        if on_step_end is not None:
            on_step_end(step)
        if step in save_steps and on_checkpoint is not None:
            _synchronize(device)
            saving = time.perf_counter()
            on_checkpoint(step)
            _synchronize(device)
            saved = time.perf_counter() - saving
            checkpoint_seconds += saved
            if step > first_step:
                checkpoint_after_first += saved
        if resume is not None and resume.due(step):
            _synchronize(device)
            optimizer_tensors, optimizer_other = _optimizer_tensors(optimizer)
            # device tensors are copied to the host; host ones are saved as they are (no second
            # copy of a full UNet's 10 GB): the save is done before the next step changes them
            tensors = {f"parameter.{i}": t.detach().cpu().contiguous() for i, t in enumerate(parameters)}
            tensors.update(optimizer_tensors)
            tensors["losses"] = _stacked(losses)
            tensors["generator"] = generator.get_state()
            before = resume.seconds
            resume.save(step, tensors, {
                "optimizer": optimizer_other,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "checkpoint_state": checkpoint_state,
                "seconds": earlier_seconds + time.perf_counter() - started,
                "checkpoint_seconds": earlier_checkpoint_seconds + checkpoint_seconds,
            })
            if step > first_step:
                checkpoint_after_first += resume.seconds - before
        if step == first_step:
            _synchronize(device)
            after_first = time.perf_counter()
            if resume is not None:  # the cadence starts after the first step: its compile or capture
                resume.last_save = after_first  # is paid again by any rerun, so no point guards it
    _synchronize(device)
    finished = time.perf_counter()
    result = TrainResult(
        losses=_stacked(losses).tolist(),
        seconds=earlier_seconds + finished - started,
        seconds_per_step=(finished - after_first - checkpoint_after_first) / max(params.steps - first_step, 1),
        checkpoint_seconds=earlier_checkpoint_seconds + checkpoint_seconds,
        resumed_from_step=first_step - 1,
        resume_point_seconds=resume.seconds if resume is not None else 0.0,
    )
    if device.type == "cuda":
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    if captured is not None and captured.capture_error is not None:
        refusal = f"the capture failed ({captured.capture_error})"
    if cuda_graphs:
        result.cuda_graphs = "captured" if refusal is None and device.type == "cuda" else (
            "not captured on a CPU (same plumbing)" if refusal is None else f"not captured: {refusal}")
        if captured is not None:
            result.uncaptured_steps = captured.uncaptured_steps
            captured.close()
    return result
