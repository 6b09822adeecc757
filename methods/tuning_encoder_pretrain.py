"""One-time pre-training of the tuning encoder (``subjectbench pretrain tuning-encoder``), resumable.

Data: any image folder (recursive), ``mini`` (the bundled images), or a ``datasets`` image set by
name (``NAME`` or ``NAME:SPLIT``, needs the ``datasets`` package and the set in its cache when
offline) or as a folder written by ``Dataset.save_to_disk``. Each step sees ``batch_size`` images per process; the order is a fixed function of the
seed (a new permutation per epoch) and every sample's noise, timestep, template and flip come
from a generator seeded by (seed, global sample index), so a run resumed after a kill, or split
over several processes, sees exactly the samples and draws of an uninterrupted one.

Objective per sample: the denoising loss of the frozen UNet with the predicted word in the
prompt ("a photo of a S*" templates) and the predicted LoRA offsets on its attention
projections, plus ``reg_weight`` × the regulariser (contrastive or L2), all encoder tensors
trained with AdamW.

Resume folder ``<out>.resume/``: ``encoder-<step>.safetensors`` and ``optimizer-<step>.safetensors``
(AdamW moments) written first, then ``progress.json`` (step, data position, losses, seconds, the
options) written atomically last; a kill at any moment leaves the last complete save.
Multi-process (``gpus > 1``): ``torch.distributed`` (NCCL on CUDA, Gloo on CPU), one process
per GPU, gradients averaged by all-reduce; rank 0 writes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from data.common import UserError, atomic_write_bytes, atomic_write_text
from data.images import center_crop_resize, load_image, to_rgb, to_tensor
from data.protocol import derive_seed
from methods.attention import AttentionAdapter, AttentionController, attention_control
from methods.backbones import load_backbone, resolve_backbone
from methods.diffusion import autocast_context, diffusion_loss, encode_pixels, make_noise_scheduler
from methods.textual_inversion import IMAGENET_TEMPLATES_SMALL
from methods.training import TrainingParams, build_optimizer
from methods.tuning_encoder_net import (
    MAX_SLOTS,
    EncoderNet,
    build_net,
    build_parts,
    checkpoint_bytes,
    contrastive_loss,
    default_config,
    l2_loss,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROGRESS = "progress.json"


class PretrainError(UserError, ValueError):
    """Pre-training input that cannot be used (no images, a resume made with other options)."""


@dataclass(frozen=True)
class PretrainOptions:
    images: str
    out: str
    backbone: str = "tiny"
    steps: int = 0  # 0: the backbone's default (DEFAULT_STEPS)
    batch_size: int = 0  # per process; 0: the backbone's default
    learning_rate: float = 0.0  # 0: the backbone's default
    lora_rank: int = 4
    hidden: int = 0  # 0: the backbone's default
    reg: str = "contrastive"
    reg_weight: float = 1e-2
    neighbours: int = 5
    temperature: float = 0.07
    resolution: int = 0  # 0: the backbone's native resolution
    save_every: int = 50
    seed: int = 0
    device: str = "auto"
    gpus: int = 1

    def resolved(self) -> PretrainOptions:
        """Defaults filled in: E4T re-implementation values on SD (batch 16, lr 1.6e-5, 30k steps);
        tiny: ours, so that the bundled images train in well under a minute on a CPU."""
        tiny = self.backbone == "tiny"
        return PretrainOptions(**{
            **asdict(self),
            "steps": self.steps or (60 if tiny else 30000),
            "batch_size": self.batch_size or (2 if tiny else 16),
            "learning_rate": self.learning_rate or (1e-3 if tiny else 1.6e-5),
            "resolution": self.resolution or resolve_backbone(self.backbone).resolution,
        })

    def identity(self) -> dict:
        """What a resume must share with the run it continues (everything but where and how long)."""
        out = asdict(self)
        for key in ("out", "steps", "save_every", "device"):  # gpus stays: it sets the global batch
            out.pop(key)
        return out


# ----------------------------------------------------------------------------- data


class ImageSource:
    """Images by index from a folder, the bundled mini set, or a ``datasets`` set."""

    def __init__(self, spec: str):
        self.spec = spec
        self._paths: list[Path] = []
        self._dataset = None
        self._column = ""
        path = Path(spec).expanduser()
        if spec == "mini":
            from data.subjects import mini_dataset_dir

            path = mini_dataset_dir()
        if path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            self._open_dataset(spec, saved=path)  # a `datasets` set written with save_to_disk
            return
        if path.is_dir():
            self._paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not self._paths:
                raise PretrainError(f"--images {spec}: the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            self.description = f"folder {path} ({len(self._paths)} images)"
            return
        self._open_dataset(spec)

    def _open_dataset(self, spec: str, saved: Path | None = None) -> None:
        try:
            import datasets
        except ImportError:
            raise PretrainError(
                f"--images {spec}: not a folder, and the `datasets` package is not installed to load it as a "
                "dataset; give an image folder or `pip install datasets`"
            ) from None
        name, _, split = spec.partition(":")
        try:
            if saved is not None:
                dataset = datasets.load_from_disk(str(saved))
                if isinstance(dataset, datasets.DatasetDict):
                    dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
            else:
                dataset = datasets.load_dataset(name, split=split or "train")
        except Exception as error:  # noqa: BLE001 - the datasets library raises many kinds
            raise PretrainError(
                f"--images {spec}: not a folder, and `datasets` could not load it as a dataset "
                f"({type(error).__name__}: {error}); give an image folder, or a dataset name (NAME or NAME:SPLIT) "
                "that is in the Hugging Face cache when offline"
            ) from None
        columns = [n for n, f in dataset.features.items() if type(f).__name__ == "Image"]
        if not columns:
            raise PretrainError(f"--images {spec}: the dataset has no image column (columns: {', '.join(dataset.features)})")
        self._dataset, self._column = dataset, columns[0]
        self.description = f"dataset {spec} ({len(dataset)} images, column {columns[0]!r})"

    def __len__(self) -> int:
        return len(self._paths) if self._paths else len(self._dataset)

    def image(self, index: int, resolution: int):
        if self._paths:
            return load_image(self._paths[index], resolution)
        return center_crop_resize(to_rgb(self._dataset[index][self._column]), resolution)


def sample_index(global_index: int, count: int, seed: int) -> int:
    """The image of global sample ``global_index``: epoch e is a permutation seeded by (seed, e)."""
    epoch, position = divmod(global_index, count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(derive_seed("pretrain-epoch", seed, epoch)))
    return int(order[position])


# ----------------------------------------------------------------------------- resume files


def resume_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".resume")


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    from safetensors.torch import save

    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().float().cpu().contiguous()
    return save(tensors, metadata={"format": "pt", "param_groups": json.dumps(state["param_groups"])})


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, device: torch.device) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
        state: dict[int, dict] = {}
        for key in handle.keys():
            index, name = key.split(".", 1)
            tensor = handle.get_tensor(key)
            state.setdefault(int(index), {})[name] = tensor if name == "step" else tensor.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class PretrainResult:
    out: Path
    steps: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    record: dict = field(default_factory=dict)


def _device(options: PretrainOptions, rank: int, world: int = 1) -> torch.device:
    # One process uses "cuda" as the harness does (one shared backbone per device string).
    cuda = torch.device(f"cuda:{rank}") if world > 1 else torch.device("cuda")
    if options.device == "auto":
        return cuda if torch.cuda.is_available() else torch.device("cpu")
    if options.device == "cuda":
        return cuda
    return torch.device(options.device)


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Setup:
    options: PretrainOptions
    source: ImageSource
    backbone: object
    parts: object
    net: EncoderNet
    text: object
    scheduler: object
    adapter: AttentionAdapter


def batch_loss(setup: _Setup, global_indices) -> torch.Tensor:
    """Denoising loss + reg_weight × regulariser on the samples ``global_indices``; every draw
    (image, flip, timestep, template, noise) is a function of (seed, global index) alone. Runs
    inside ``attention_control(..., adapter=setup.adapter)``."""
    from PIL import Image

    from methods.tuning_encoder import slot_token

    options, backbone, scheduler = setup.options, setup.backbone, setup.scheduler
    images, timesteps, generators, prompts = [], [], [], []
    for slot, global_index in enumerate(global_indices):
        generator = torch.Generator().manual_seed(derive_seed("pretrain-sample", options.seed, global_index))
        image = setup.source.image(sample_index(global_index, len(setup.source), options.seed), options.resolution)
        if bool(torch.rand(1, generator=generator) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(image)
        timesteps.append(int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)))
        template = IMAGENET_TEMPLATES_SMALL[int(torch.randint(len(IMAGENET_TEMPLATES_SMALL), (1,), generator=generator))]
        prompts.append(template.format(slot_token(slot)))
        generators.append(generator)  # its noise is drawn once the latent shape is known
    pixels = to_tensor(images) * 2.0 - 1.0
    latents = encode_pixels(backbone, pixels)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    t = torch.tensor(timesteps)
    noisy = scheduler.add_noise(latents, noise.to(latents.device), t.to(latents.device))
    setup.adapter.offsets = {}  # the encoder reads the frozen UNet
    prediction = setup.parts.predict(setup.net, pixels, noisy, t.to(backbone.device))
    setup.adapter.offsets = setup.net.offsets(prediction.cores)
    with autocast_context(backbone.device, backbone.dtype):
        hidden = setup.text.encode(prompts, prediction.words)
        loss, _ = diffusion_loss(backbone.unet, scheduler, latents, hidden, None, timesteps=t, noise=noise)
        if options.reg == "l2":
            reg = l2_loss(prediction.delta)
        else:
            reg = contrastive_loss(setup.parts.vocabulary, prediction.words, options.neighbours, options.temperature)
        return loss + options.reg_weight * reg


def probe_loss(options: PretrainOptions, checkpoint: str | Path | None, samples: int = 8) -> float:
    """The pre-training objective of ``checkpoint`` (None: the untrained initial network) on the
    fixed draws of global samples 0..samples-1: a low-variance before/after comparison."""
    from methods.tuning_encoder import SlotText
    from methods.tuning_encoder_net import load_net

    options = options.resolved()
    device = _device(options, 0)
    backbone = load_backbone(resolve_backbone(options.backbone), device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = default_config(backbone, options.lora_rank, options.hidden or None, options.seed)
    parts = build_parts(backbone, config)
    net = build_net(parts, config) if checkpoint is None else load_net(checkpoint, parts)
    setup = _Setup(options, ImageSource(options.images), backbone, parts, net, SlotText(backbone),
                   make_noise_scheduler(backbone), AttentionAdapter())
    with torch.no_grad(), attention_control(backbone.unet, AttentionController(), "all", adapter=setup.adapter):
        return float(batch_loss(setup, range(samples)))


def pretrain(
    options: PretrainOptions,
    on_step: Callable[[int, int, float], None] | None = None,
    stop_after: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> PretrainResult:
    """Pre-train (or resume) and write ``options.out``. ``on_step(step, steps, loss)`` after each
    step (rank 0); ``stop_after`` ends the process's loop after that step as a kill would (tests)."""
    options = options.resolved()
    out = Path(options.out)
    if options.reg not in ("contrastive", "l2"):
        raise PretrainError(f"--reg {options.reg!r} is not one of contrastive, l2")
    if options.steps < 1 or options.batch_size < 1 or options.batch_size * world > MAX_SLOTS:
        raise PretrainError(f"steps must be >= 1 and batch size in 1..{MAX_SLOTS // world}, got {options.steps}, {options.batch_size}")
    source = ImageSource(options.images)
    device = _device(options, rank, world)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = load_backbone(resolve_backbone(options.backbone), device, dtype)
    config = default_config(backbone, options.lora_rank, options.hidden or None, options.seed)
    parts = build_parts(backbone, config)
    net = build_net(parts, config)
    from methods.tuning_encoder import SlotText

    adapter = AttentionAdapter()
    setup = _Setup(options, source, backbone, parts, net, SlotText(backbone), make_noise_scheduler(backbone), adapter)
    training = TrainingParams(steps=options.steps, learning_rate=options.learning_rate, batch_size=options.batch_size)
    parameters = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, training, options.learning_rate)
    folder = resume_dir(out)
    start, losses, seconds_before = 0, [], 0.0
    if (folder / PROGRESS).is_file():
        progress = json.loads((folder / PROGRESS).read_text())
        if progress["identity"] != options.identity():
            changed = sorted(k for k in options.identity() if progress["identity"].get(k) != options.identity()[k])
            raise PretrainError(
                f"{folder} holds a pre-training started with other options ({', '.join(changed)}); resume with the "
                f"same options, or delete {folder} to start over"
            )
        from safetensors.torch import load_file

        start = int(progress["step"])
        net.load_state_dict(load_file(str(folder / f"encoder-{start}.safetensors"), device=str(device)))
        load_optimizer(optimizer, folder / f"optimizer-{start}.safetensors", device)
        losses, seconds_before = list(progress["losses"]), float(progress["seconds"])
    global_batch = options.batch_size * world
    started = time.perf_counter()
    step = start
    with attention_control(backbone.unet, AttentionController(), "all", adapter=adapter):
        for step in range(start + 1, options.steps + 1):
            first = (step - 1) * global_batch + rank * options.batch_size
            loss = batch_loss(setup, range(first, first + options.batch_size))
            loss.backward()
            reported = loss.detach().float()
            if world > 1:
                import torch.distributed as dist

                for tensor in parameters:
                    if tensor.grad is not None:
                        dist.all_reduce(tensor.grad)
                        tensor.grad /= world
                dist.all_reduce(reported)
                reported /= world
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(reported))
            if rank == 0:
                if step % options.save_every == 0 or step == options.steps:
                    _save_progress(folder, step, net, optimizer, losses, seconds_before + time.perf_counter() - started, options)
                if on_step is not None:
                    on_step(step, options.steps, losses[-1])
            if stop_after is not None and step >= stop_after:
                return PretrainResult(out, options.steps, start, losses, seconds_before + time.perf_counter() - started,
                                      step * global_batch)
    seconds = seconds_before + time.perf_counter() - started
    record = {
        "steps": options.steps,
        "seconds": round(seconds, 3),
        "images": options.steps * global_batch,
        "distinct_images": len(source),
        "data": source.description,
        "device": f"{device.type} x{world}",
        "loss_first": sum(losses[:5]) / max(len(losses[:5]), 1),
        "loss_last": sum(losses[-5:]) / max(len(losses[-5:]), 1),
        "options": asdict(options),
    }
    if rank == 0:
        atomic_write_bytes(out, checkpoint_bytes(net, record))
        atomic_write_text(out.with_name(out.name + ".json"), json.dumps({**record, "losses": losses}, indent=1))
    return PretrainResult(out, options.steps, start, losses, seconds, options.steps * global_batch, record)


def _save_progress(folder: Path, step: int, net: EncoderNet, optimizer, losses, seconds: float, options: PretrainOptions) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / f"encoder-{step}.safetensors", checkpoint_bytes(net, {"step": step}))
    atomic_write_bytes(folder / f"optimizer-{step}.safetensors", optimizer_bytes(optimizer))
    progress = {"step": step, "position": step * options.batch_size * options.gpus, "losses": losses,
                "seconds": seconds, "identity": options.identity()}
    atomic_write_text(folder / PROGRESS, json.dumps(progress))
    for old in folder.glob("*-*.safetensors"):
        if old.stem.rsplit("-", 1)[-1] != str(step):
            old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world: int, port: int, options: PretrainOptions, progress_factory) -> None:
    import torch.distributed as dist

    cuda = options.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        on_step = progress_factory(options) if (rank == 0 and progress_factory is not None) else None
        pretrain(options, on_step=on_step, rank=rank, world=world)
    finally:
        dist.destroy_process_group()


def run_pretraining(options: PretrainOptions, progress_factory=None) -> PretrainResult:
    """Pre-train in this process (``gpus <= 1``) or in one process per GPU. ``progress_factory``
    (a picklable top-level function) makes rank 0's ``on_step`` from the options."""
    if options.gpus <= 1:
        on_step = progress_factory(options) if progress_factory is not None else None
        return pretrain(options, on_step=on_step)
    if options.device not in ("cpu",) and torch.cuda.is_available() and torch.cuda.device_count() < options.gpus:
        raise PretrainError(f"--gpus {options.gpus}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(options.gpus, _free_port(), options, progress_factory), nprocs=options.gpus, join=True)
    resolved = options.resolved()
    record = json.loads(Path(resolved.out).with_name(Path(resolved.out).name + ".json").read_text())
    return PretrainResult(Path(resolved.out), resolved.steps, 0, record["losses"], record["seconds"], record["images"], record)
