"""Issue 17 item 2, a feasibility probe: K subjects' DreamBooth steps as one computation in one process.

Four DreamBooth trainings at once in four processes reach ~20 steps/s together on an H200
(``gpu_speed.py --concurrency``) and no more: the processes time-share the GPU, and one training's
batch of 2 latents cannot fill it. This probe stacks K subjects' fp32 master UNets
(``torch.func.stack_module_state``) and runs one step for all K with ``vmap`` over
``grad_and_value`` of the same loss (bf16 autocast; each subject its own 1 instance + 1 class
latent, noise, timesteps and text), then per-subject gradient clipping (max norm 1.0 over each
subject's gradients, as the trainer) and one fused AdamW over the stacked tensors (element-wise,
so equal to K separate optimizers). It measures, in one process:

- ``reference``: the plain module step for one subject (forward, backward, clip, fused AdamW:
  what one DreamBooth training does per step in ``methods.training.train_loop``), s/step, and with
  ``--profile N`` where its time goes (the GPU's busy share, the top operators by device time):
  whether batch-2 kernels, the optimizer or the host is what leaves the GPU idle;
- ``stacked_K`` for each ``--counts`` K: s per stacked step, s per subject-step, peak memory,
  amortized seconds per 1000-step training; and optionally (``--compile``) the same through
  ``torch.compile``;
- agreement: subject k's loss and gradients from the stacked step against the plain step of
  subject k's module on the same inputs (relative L2 of all gradients).

``--streams K,...`` times a third way, K trainings in one process on K CUDA streams from K
threads (``streams_arm``): processes time-share the GPU, streams of one process can overlap
their kernels; the same K one after another in one thread is its reference.

Nothing in the harness uses this: it answered whether stacking beats processes before a method
was built on it, and on an H200 it did not (2 subjects 0.44×, 4 subjects 0.75× a plain step per
subject; ``benchmarks/results/README.md``, seventh session). Known cost: PyTorch has no vmap batching rule for the fused SDPA kernels,
so attention falls back to a loop over the K subjects (a warning says so); the convolutions and
linear layers run batched.

CPU check: ``python benchmarks/gpu_db_stacked.py --tiny --device cpu --out /tmp/st.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_methods import environment, peak_gib, reset_peak, synchronize  # noqa: E402
from benchmarks.gpu_metrics import profile_steps, save_partial  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402
from methods.diffusion import fp32_trainable_copy  # noqa: E402

MAX_GRAD_NORM = 1.0
LEARNING_RATE = 5e-6


def subject_inputs(count: int, unet, resolution: int, device, seed: int = 0) -> dict:
    """Per subject: 1 instance + 1 class latent, noise, timesteps, text states (random, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    size = resolution // 8
    shape = (count, 2, unet.config.in_channels, size, size)
    return {
        "latents": torch.randn(shape, generator=generator).to(device),
        "noise": torch.randn(shape, generator=generator).to(device),
        "timesteps": torch.randint(0, 1000, (count, 2), generator=generator).to(device),
        "hidden": torch.randn(count, 2, 77, unet.config.cross_attention_dim, generator=generator).to(device),
    }


def _loss(pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # instance and class sample weighted 1/2 each (prior_loss_weight 1), as the trainer's DreamBooth loss
    return torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)).mean()


def step_body(module, optimizer, latents, noise, timesteps, hidden, autocast) -> torch.Tensor:
    """Forward, loss, backward, clipping at ``MAX_GRAD_NORM``, optimizer step: the trainer's step
    without zeroing the gradients (``plain_step`` zeroes them; a captured step must not)."""
    with autocast():
        pred = module(latents + noise, timesteps, hidden).sample
        loss = _loss(pred, noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    return loss.detach()


def plain_step(module, optimizer, inputs: dict, k: int, autocast) -> torch.Tensor:
    loss = step_body(module, optimizer, inputs["latents"][k], inputs["noise"][k], inputs["timesteps"][k],
                     inputs["hidden"][k], autocast)
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_stacked_step(base, autocast):
    from torch.func import functional_call, grad_and_value, vmap

    def loss_fn(params, buffers, latents, noise, timesteps, hidden):
        with autocast():
            pred = functional_call(base, (params, buffers), (latents + noise, timesteps, hidden)).sample
            return _loss(pred, noise)

    batched = vmap(grad_and_value(loss_fn))

    def step(params, buffers, optimizer, inputs):
        grads, losses = batched(params, buffers, inputs["latents"], inputs["noise"], inputs["timesteps"], inputs["hidden"])
        # per-subject clipping: each subject's norm over all its gradients
        norms = torch.sqrt(sum((g.float() ** 2).flatten(1).sum(dim=1) for g in grads.values()))
        scale = (MAX_GRAD_NORM / (norms + 1e-6)).clamp(max=1.0)
        for name, tensor in params.items():
            tensor.grad = grads[name] * scale.view(-1, *([1] * (grads[name].dim() - 1))).to(grads[name].dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return losses.detach()

    return step, batched


def timed_steps(step, steps: int, device) -> float:
    step()  # warm-up (and the compile, if any)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


VARIANTS = ("channels_last", "compiled", "compiled_channels_last")


def variant_arm(backbone, variant: str, args, device, autocast) -> dict:
    """The reference step with the UNet (and its inputs) in channels-last layout and/or through
    ``torch.compile``: s/step, peak memory, and with ``--profile`` where its device time goes."""
    unet = fp32_trainable_copy(backbone, "unet")
    inputs = subject_inputs(1, unet, args.resolution, device)
    if "channels_last" in variant:
        unet = unet.to(memory_format=torch.channels_last)
        # per subject a channels-last 4-d tensor (a stacked 5-d tensor cannot hold that layout)
        inputs = {k: ([x.contiguous(memory_format=torch.channels_last) for x in v] if v.dim() == 5 else v)
                  for k, v in inputs.items()}
    module = torch.compile(unet) if variant.startswith("compiled") else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, weight_decay=1e-2, fused=device.type == "cuda")
    step = functools.partial(plain_step, module, optimizer, inputs, 0, autocast)
    first = time.perf_counter()
    seconds = timed_steps(step, args.steps, device)
    row = {"variant": variant, "subjects": 1, "s_per_step": seconds, "amortized_s_per_1000_steps": 1000 * seconds,
           "peak_gib": peak_gib(device), "wall_s_incl_warmup": time.perf_counter() - first}
    if args.profile:
        row["profile"] = profile_steps(step, args.profile, device)
    return row


def streams_arm(backbone, count: int, args, device, autocast, compiled: bool) -> dict:
    """K plain trainings in one process (own fp32 UNet, fused AdamW, inputs), each ``--steps``
    steps: first one after another in the main thread (the reference), then again from the same
    weights with each training in its own thread on its own CUDA stream, so the GPU may run one
    training's kernels beside another's (separate processes only time-share it: without MPS
    their kernels never overlap). Aggregate subject-steps per second of both, and the largest
    difference between a subject's losses in the two runs (same inputs, same start)."""
    import contextlib
    import threading

    unets = [fp32_trainable_copy(backbone, "unet") for _ in range(count)]
    start = [copy.deepcopy(unet.state_dict()) for unet in unets]
    inputs = subject_inputs(count, unets[0], args.resolution, device)
    modules = [torch.compile(unet) if compiled else unet for unet in unets]
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in range(count)]

    def fresh_optimizers() -> list:
        for unet, state in zip(unets, start):
            unet.load_state_dict(state)
        return [torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, weight_decay=1e-2, fused=device.type == "cuda")
                for unet in unets]

    def train(k: int, optimizers: list, steps: int, losses: list) -> None:
        with torch.cuda.stream(streams[k]) if streams[k] is not None else contextlib.nullcontext():
            for _ in range(steps):
                losses[k].append(plain_step(modules[k], optimizers[k], inputs, k, autocast))

    runs = {}
    for mode in ("sequential", "threads"):
        optimizers = fresh_optimizers()
        synchronize(device)  # the weights were reloaded on the default stream; the trainings read them on theirs
        losses: list = [[] for _ in range(count)]
        for k in range(count):  # warm-up step of each (the compile, in the main thread), not timed
            train(k, optimizers, 1, losses)
        synchronize(device)
        started = time.perf_counter()
        if mode == "sequential":
            for k in range(count):
                train(k, optimizers, args.steps, losses)
        else:
            threads = [threading.Thread(target=train, args=(k, optimizers, args.steps, losses)) for k in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        synchronize(device)
        seconds = time.perf_counter() - started
        runs[mode] = {"seconds": seconds, "s_per_subject_step": seconds / (count * args.steps),
                      "losses": [[float(x) for x in row] for row in losses]}
    difference = max(abs(a - b) / max(abs(a), 1e-12) for s_row, t_row in zip(runs["sequential"]["losses"], runs["threads"]["losses"])
                     for a, b in zip(s_row, t_row))
    return {"subjects": count, "compiled": compiled, "steps_each": args.steps,
            "sequential_s_per_subject_step": runs["sequential"]["s_per_subject_step"],
            "threads_s_per_subject_step": runs["threads"]["s_per_subject_step"],
            "threads_speedup": runs["sequential"]["s_per_subject_step"] / runs["threads"]["s_per_subject_step"],
            "amortized_s_per_1000_steps_threads": 1000 * runs["threads"]["s_per_subject_step"],
            "max_relative_loss_difference": difference, "peak_gib": peak_gib(device)}


def agreement(backbone, batched, count: int, inputs: dict, autocast) -> dict:
    """Subject k's gradients from the stacked computation vs its own module's backward."""
    from torch.func import stack_module_state

    copies = [fp32_trainable_copy(backbone, "unet") for _ in range(count)]
    params, buffers = stack_module_state(copies)
    grads, losses = batched(params, buffers, inputs["latents"], inputs["noise"], inputs["timesteps"], inputs["hidden"])
    grads, losses = {n: g.detach() for n, g in grads.items()}, losses.detach()
    rows = []
    for k, module in enumerate(copies):
        with autocast():
            pred = module(inputs["latents"][k] + inputs["noise"][k], inputs["timesteps"][k], inputs["hidden"][k]).sample
            loss = _loss(pred, inputs["noise"][k])
        loss.backward()
        names = [n for n, _ in module.named_parameters()]
        difference = sum(float(((grads[n][k].float() - p.grad.float()) ** 2).sum()) for n, p in zip(names, module.parameters()))
        size = sum(float((p.grad.float() ** 2).sum()) for p in module.parameters())
        rows.append({"loss_stacked": float(losses[k].detach()), "loss_plain": float(loss.detach()),
                     "gradient_relative_l2": (difference / size) ** 0.5 if size else None})
    del copies, params, buffers, grads
    return {"subjects": rows, "max_gradient_relative_l2": max(r["gradient_relative_l2"] or 0.0 for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--counts", default="2,4", help="subjects per stacked step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm, after one warm-up step")
    parser.add_argument("--compile", action="store_true", help="also time the stacked step through torch.compile")
    parser.add_argument("--profile", type=int, default=0,
                        help="also profile this many reference steps (GPU busy share, top operators by device time)")
    parser.add_argument("--variants", default="",
                        help="more one-subject arms, comma-separated: channels_last, compiled, compiled_channels_last "
                             "(profiled too with --profile)")
    parser.add_argument("--streams", default="",
                        help="comma list of K: K trainings in one process on K CUDA streams from K threads, beside "
                             "the same K one after another (with --compile also through torch.compile)")
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 64 px, 2 steps, counts 2")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "gpu_db_stacked.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.resolution, args.steps, args.counts = "tiny", 64, 2, "2"
    counts = [int(c) for c in args.counts.split(",") if c]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # SDPA's loop fallback, documented above

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    backbone = load_backbone(resolve_backbone(args.backbone), args.device, dtype)
    document: dict = {"benchmark": "gpu_db_stacked", "environment": environment(device),
                      "settings": {k: v for k, v in vars(args).items() if k != "out"}, "arms": {}}

    def save():  # after every arm: a call cut off by its time limit keeps the arms before
        save_partial(document, args.out, "gpu_db_stacked.json")

    # reference: one subject, its plain module, fused AdamW (the trainer's step)
    reset_peak(device)
    unet = fp32_trainable_copy(backbone, "unet")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, weight_decay=1e-2,
                                  fused=device.type == "cuda")
    reference_step = functools.partial(
        plain_step, unet, optimizer, subject_inputs(1, unet, args.resolution, device), 0, autocast)
    seconds = timed_steps(reference_step, args.steps, device)
    document["arms"]["reference"] = {"subjects": 1, "s_per_step": seconds, "s_per_subject_step": seconds,
                                     "amortized_s_per_1000_steps": 1000 * seconds, "peak_gib": peak_gib(device)}
    if args.profile:
        document["arms"]["reference"]["profile"] = profile_steps(reference_step, args.profile, device)
    print("reference", document["arms"]["reference"], flush=True)
    base = copy.deepcopy(unet).to("meta")
    del reference_step, unet, optimizer  # free the reference's weights and optimizer state
    save()

    def run_arm(name: str, measure, **identity) -> None:
        """One arm: its row (or its error, the other arms go on), memory released, JSON saved."""
        try:
            reset_peak(device)
            row = measure()
        except Exception as error:  # noqa: BLE001 - keep the other arms
            row = {**identity, "error": f"{type(error).__name__}: {str(error)[:1500]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        document["arms"][name] = row
        print(name, {k: v for k, v in row.items() if k != "profile"}, flush=True)
        save()

    # one-subject variants of the trainer's step: memory layout, torch.compile
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in VARIANTS:
            parser.error(f"--variants: unknown {variant!r}; choose from {', '.join(VARIANTS)}")
        run_arm(variant, functools.partial(variant_arm, backbone, variant, args, device, autocast), variant=variant)

    def stacked_arm(count: int, compiled: bool) -> dict:
        from torch.func import stack_module_state

        step, batched = make_stacked_step(base, autocast)
        params, buffers = stack_module_state([fp32_trainable_copy(backbone, "unet") for _ in range(count)])
        optimizer = torch.optim.AdamW(list(params.values()), lr=LEARNING_RATE, weight_decay=1e-2,
                                      fused=device.type == "cuda")
        stacked_step = functools.partial(torch.compile(step) if compiled else step, params, buffers, optimizer,
                                         subject_inputs(count, base, args.resolution, device))
        first = time.perf_counter()
        seconds = timed_steps(stacked_step, args.steps, device)
        row = {"subjects": count, "compiled": compiled, "s_per_step": seconds, "s_per_subject_step": seconds / count,
               "amortized_s_per_1000_steps": 1000 * seconds / count, "peak_gib": peak_gib(device),
               "wall_s_incl_warmup": time.perf_counter() - first,
               "speedup_vs_reference": document["arms"]["reference"]["s_per_step"] / (seconds / count)}
        del stacked_step, params, buffers, optimizer
        if not compiled:
            row["agreement"] = agreement(backbone, batched, count, subject_inputs(count, base, args.resolution, device, 1), autocast)
        return row

    def streams(count: int, compiled: bool) -> dict:
        return streams_arm(backbone, count, args, device, autocast, compiled)

    arms = [("streams", int(c), streams) for c in args.streams.split(",") if c] + [("stacked", c, stacked_arm) for c in counts]
    for kind, count, arm in arms:
        for compiled in ([False, True] if args.compile else [False]):
            run_arm(f"{kind}_{count}" + ("_compiled" if compiled else ""), functools.partial(arm, count, compiled),
                    subjects=count, compiled=compiled)
    print(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
