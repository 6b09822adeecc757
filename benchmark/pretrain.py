"""``subjectbench pretrain tuning-encoder``: the one-time pre-training of the tuning encoder.

The loop lives in ``methods/tuning_encoder_pretrain.py``; this module owns the command line, the
progress bar (ETA and loss, as ``benchmark/progress.py`` does: a tqdm bar on a terminal, plain
lines at every tenth otherwise) and the loss-curve PNG written beside the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

EPILOG = """\
examples:
  subjectbench pretrain tuning-encoder --images mini --backbone tiny --out tuning_encoder.safetensors
      # the bundled images, the tiny backbone, CPU: a tiny encoder for the encoders_tiny suite
  subjectbench pretrain tuning-encoder --images /data/openimages --backbone sd15 --out te_sd15.safetensors --gpus 8
  subjectbench pretrain tuning-encoder --images imagenet-1k:train --backbone sd15 --out te.safetensors
      # a `datasets` image dataset by name (NAME or NAME:SPLIT; in the Hugging Face cache when offline)
Rerun the same command after a kill to resume from the last save (<out>.resume/). Then:
  subjectbench run encoders_tiny methods.tuning_encoder.encoder=tuning_encoder.safetensors
"""


def add_commands(commands: argparse._SubParsersAction) -> None:
    pretrain = commands.add_parser(
        "pretrain",
        help="one-time pre-training of an encoder-based method (tuning-encoder)",
        description="Pre-train the encoder of an encoder-based method once; the benchmark method then reads it.",
    )
    which = pretrain.add_subparsers(dest="model", metavar="MODEL")
    which.required = True
    encoder = which.add_parser(
        "tuning-encoder",
        help="the domain-agnostic tuning-encoder (reconstructed)",
        description=(
            "Pre-train the tuning encoder (methods/tuning_encoder.py) on any image folder or `datasets` image set. "
            "Resumable: a rerun of the same command continues from the last save."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    encoder.add_argument("--images", required=True, metavar="DIR_OR_DATASET", help="image folder (recursive), `mini` (bundled), or a `datasets` name[:split]")
    encoder.add_argument("--out", required=True, metavar="CKPT", help="checkpoint to write (safetensors)")
    encoder.add_argument("--backbone", default="tiny", help="the backbone the method will run on (tiny, sd15, sd15-random, ...); default tiny")
    encoder.add_argument("--steps", type=int, default=0, metavar="N", help="optimisation steps (default: tiny 60, others 30000)")
    encoder.add_argument("--batch-size", type=int, default=0, metavar="N", help="images per step per process (default: tiny 2, others 16)")
    encoder.add_argument("--lr", type=float, default=0.0, help="AdamW learning rate (default: tiny 1e-3, others 1.6e-5)")
    encoder.add_argument("--lora-rank", type=int, default=4, help="rank of the predicted LoRA offsets (default 4)")
    encoder.add_argument("--reg", choices=["contrastive", "l2"], default="contrastive", help="regulariser of the word (default contrastive)")
    encoder.add_argument("--reg-weight", type=float, default=1e-2)
    encoder.add_argument("--save-every", type=int, default=50, metavar="N", help="steps between resumable saves (default 50)")
    encoder.add_argument("--gpus", type=int, default=1, metavar="N", help="processes, one per GPU (torch.distributed); default 1")
    encoder.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    encoder.add_argument("--seed", type=int, default=0)
    encoder.add_argument("--quiet", action="store_true", help="no progress bar")
    encoder.set_defaults(handler=cmd_pretrain_tuning_encoder)


class PretrainProgress:
    """Step bar with ETA and the current loss; plain lines at every tenth when not on a terminal."""

    def __init__(self, total: int, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.bar = None
        self.next_tenth = 1
        self.quiet = quiet
        self.started = None

    def __call__(self, step: int, total: int, loss: float) -> None:
        if self.quiet:
            return
        if getattr(self.stream, "isatty", lambda: False)():
            if self.bar is None:
                self.bar = tqdm(total=total, initial=step - 1, desc="pretrain", unit="step", file=self.stream,
                                dynamic_ncols=True, mininterval=0.5)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        import time

        now = time.perf_counter()
        if self.started is None:
            self.started = (now, step - 1)
            self.next_tenth = (step - 1) * 10 // total + 1
        if step * 10 >= self.next_tenth * total:
            began, first = self.started
            rate = (now - began) / max(step - first, 1)
            print(f"pretrain: step {step}/{total} ({100 * step // total}%), loss {loss:.4f}, "
                  f"eta {rate * (total - step):.0f} s", file=self.stream, flush=True)
            self.next_tenth = step * 10 // total + 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_factory_loud(options) -> PretrainProgress:
    return PretrainProgress(options.resolved().steps)


def _progress_factory_quiet(options) -> PretrainProgress:
    return PretrainProgress(options.resolved().steps, quiet=True)


def loss_curve_png(losses: list[float], path: Path, title: str) -> Path:
    """The loss per step and its running mean, as a PNG (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from data.common import atomic_write_bytes

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    axis.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if len(losses) >= window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1:], smooth, lw=1.6, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (denoising + regulariser)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def cmd_pretrain_tuning_encoder(args: argparse.Namespace) -> int:
    from benchmark import environment
    from methods.backbones import resolve_backbone
    from methods.tuning_encoder_pretrain import (
        PretrainError,
        PretrainOptions,
        resume_dir,
        run_pretraining,
    )

    resolve_backbone(args.backbone)  # an unknown backbone is one error line, before anything loads
    environment.configure_cpu_threads(1)  # the project's thread rule (workers of --gpus N size their own)
    if args.gpus < 1 or args.save_every < 1:
        raise PretrainError(f"--gpus and --save-every must be >= 1, got {args.gpus}, {args.save_every}")
    options = PretrainOptions(
        images=args.images, out=args.out, backbone=args.backbone, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, lora_rank=args.lora_rank, reg=args.reg, reg_weight=args.reg_weight,
        save_every=args.save_every, seed=args.seed, device=args.device, gpus=args.gpus,
    )
    factory = _progress_factory_quiet if args.quiet else _progress_factory_loud
    result = run_pretraining(options, progress_factory=factory)
    out = Path(result.out)
    png = loss_curve_png(result.losses, out.with_name(out.stem + ".loss.png"),
                         f"tuning encoder pre-training: {out.name}, {result.record.get('distinct_images', '?')} images")
    record = result.record
    print(f"encoder:    {out} ({record['steps']} steps, {record['images']} images seen, {record['seconds']:.1f} s on {record['device']})")
    print(f"loss:       {record['loss_first']:.4f} (first 5 steps) -> {record['loss_last']:.4f} (last 5); curve {png}")
    print(f"resumable:  {resume_dir(out)} (delete it once you are done extending this run)")
    print(f"use it:     subjectbench run encoders_tiny methods.tuning_encoder.encoder={out}"
          if args.backbone == "tiny" else f"use it:     subjectbench run encoders methods.tuning_encoder.encoder={out}")
    return 0
