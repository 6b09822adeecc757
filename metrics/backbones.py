"""Metric backbones (CLIP, DINO, LPIPS): built or loaded once per process and shared.

``weights="pretrained"`` loads the published weights: open_clip's OpenAI CLIP checkpoints and
timm's ``vit_small_patch16_224.dino`` (and, for the convention variants, ``vit_small_patch8_224.dino``
and ``vit_small_patch14_dinov2.lvd142m``) from the Hugging Face hub, the ImageNet AlexNet/VGG trunk
of LPIPS from torchvision's download site. With the hub unreachable (or ``HF_HUB_OFFLINE=1``)
a locally cached copy is used, and when there is none the load fails at once with a
``MetricWeightsError`` saying what to do, instead of hanging on a download.

``weights="random"`` builds the same architectures with random init under a fixed seed, on the
CPU, so that every process on every machine with the same torch gets the same tensors; the
``weights_sha256`` in the fingerprint proves it (and changes if torch's init ever does).
CLIP-T and CLIP-I share one CLIP instance: the cache key is (kind, arch, weights, device).

bf16 runs the fp32 model under autocast. Autocast casts a Linear's or a convolution's fp32
weight and bias to bf16 at every call (it caches casts only of weights that require grad, and
these are frozen): a cast kernel per weight per forward, on a scoring pass whose GPU waits on the
host's launches (~15 % busy on an H200). So the bf16 backbone holds those weights cast once, in a
copy of the model that shares every other tensor with the fp32 one: the very tensors autocast
would have made, so every value is bit-identical to autocast over the fp32 model (tested per
backbone). Casts per forward (CPU profile, `benchmarks/cpu/test_metrics_bench.py`): CLIP
ViT-B/32's image side 113 -> 40, DINO ViT-S/16 148 -> 50, LPIPS's alex trunk 11 -> 1. Only the image
side of CLIP is cast: open_clip's text tower takes its activations' dtype from a Linear's weight,
so casting it would change its precision. Only LPIPS's trunk (``net``) is cast: its linear heads
(``lins``) run on the trunk's float32 features outside autocast (``lpips_from_features``), in
float32. ``weights_sha256`` hashes the fp32 weights whatever the precision.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.common import UserError, check_sha256, hub_reachable
from metrics.base import MetricSettings
from metrics.preprocess import (
    CLIP_PREPROCESS,
    DINO_PREPROCESS,
    DREAMBENCH_PLUS_CROP,
    IMAGENET_SQUASH,
    ResizeCropNormalize,
    SquashNormalize,
)
from metrics.replay import Replays

RANDOM_INIT_SEED = 0
DINO_ARCH = "vit_small_patch16_224.dino"
DINO_HUB_ID = "timm/vit_small_patch16_224.dino"
CLIP_PRETRAINED_TAG = "openai"
LPIPS_VERSION = "0.1"


class MetricWeightsError(UserError, ValueError):
    """Metric weights that cannot be loaded; the message says how to get them or avoid them."""


def offline_message(what: str, source: str) -> str:
    return (
        f"{what}: pretrained weights ({source}) are not in the local cache and the network is "
        "unreachable (or HF_HUB_OFFLINE=1). Use `metrics.weights=random` (random-init backbones "
        "of the same architectures: smoke numbers, not measurements), or enable the network and "
        "unset HF_HUB_OFFLINE so they can be downloaded once."
    )


def resolve_precision(settings: MetricSettings) -> str:
    """"bf16" (autocast) or "fp32": what the backbones actually run in for these settings."""
    if settings.precision == "auto":
        return "bf16" if torch.device(settings.device).type == "cuda" else "fp32"
    return settings.precision


@dataclass
class LoadedBackbone:
    """One frozen metric backbone on one device, with what is needed to fingerprint it."""

    kind: str  # "clip" | "dino" | "lpips"
    arch: str
    weights: str  # "pretrained" | "random"
    weights_tag: str
    weights_source: str
    model: torch.nn.Module
    device: torch.device
    precision: str  # "fp32" | "bf16"
    pipeline: ResizeCropNormalize | SquashNormalize | None = None
    encode_image: Callable[[torch.Tensor], torch.Tensor] | None = None
    tokenizer: object | None = None
    extra: dict = field(default_factory=dict)
    # the submodule whose Linear/convolution weights the bf16 backbone holds in bf16 ("" = all)
    precast_part: str = ""
    # the fp32 model this one was copied from (bf16 backbones): what the weights hash reads
    fp32_model: torch.nn.Module | None = None
    # its forwards replayed as CUDA graphs (metrics.cuda_graphs; metrics/replay.py), else None
    replays: Replays | None = None

    def weights_sha256(self) -> str:
        """sha256 over the fp32 state dict (names, dtypes, shapes, bytes): identifies the weights exactly."""
        model = self.model if self.fp32_model is None else self.fp32_model
        with _LOCK:
            if model not in _SHA256:
                digest = hashlib.sha256()
                for name, tensor in model.state_dict().items():
                    array = tensor.detach().to("cpu").contiguous().numpy()
                    digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}\n".encode())
                    digest.update(memoryview(array).cast("B"))
                _SHA256[model] = digest.hexdigest()
            return _SHA256[model]

    def fingerprint(self) -> dict:
        return {
            "kind": self.kind,
            "arch": self.arch,
            "weights": self.weights,
            "weights_tag": self.weights_tag,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256(),
            "precision": "bf16-autocast" if self.precision == "bf16" else "fp32",
            **self.extra,
        }

    def key(self, pipeline: dict | None = None) -> str:
        """Short stable id of (backbone fingerprint, input pipeline): names embedding caches."""
        payload = json.dumps([self.fingerprint(), pipeline], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


_CACHE: dict[tuple, LoadedBackbone] = {}
# model -> weights sha256, shared by the precisions of one model and gone with the model.
_SHA256: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def clear_backbone_cache() -> None:
    with _LOCK:
        _CACHE.clear()
        _SHA256.clear()


@contextlib.contextmanager
def _root_log_level(level: int):
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    # Built on the CPU under a private RNG state: identical in every process, whatever the
    # caller's seeds, and the caller's RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build()


def _freeze(model: torch.nn.Module, device: torch.device, channels_last: bool = False) -> torch.nn.Module:
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    if channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def hub_weights_file(repo_id: str, filenames: tuple[str, ...], what: str) -> str:
    """Local path of the first of ``filenames`` in hub repo ``repo_id``: cached, or downloaded."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return cached
    if not hub_reachable():
        raise MetricWeightsError(offline_message(what, f"hf.co/{repo_id}"))
    last_error: Exception | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename)
        except Exception as error:  # noqa: BLE001 - try the next file name, report the last
            last_error = error
    raise MetricWeightsError(f"{what}: could not download {filenames} from hf.co/{repo_id}: {last_error}")


def hub_source(repo_id: str, path: str) -> str:
    """``hf:repo/file@blob``: in the hub cache an LFS file's blob is named by its sha256."""
    blob = Path(path).resolve().name
    suffix = f"@sha256:{blob}" if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob) else ""
    return f"hf:{repo_id}/{Path(path).name}{suffix}"


def _get(key: tuple, settings: MetricSettings, load: Callable[[], LoadedBackbone]) -> LoadedBackbone:
    """The backbone for ``key`` + ``settings``' precision: the fp32 model loaded once, and for bf16 a
    copy holding its autocast weights cast once (``_with_bf16_weights``); with ``cuda_graphs`` on,
    a view of that one (the same model) whose forwards are replayed (``metrics/replay.py``)."""
    precision = resolve_precision(settings)
    with _LOCK:
        if (*key, precision) not in _CACHE:
            if (*key, "loaded") not in _CACHE:
                _CACHE[(*key, "loaded")] = load()
            loaded = _CACHE[(*key, "loaded")]
            _CACHE[(*key, precision)] = (
                _with_bf16_weights(loaded) if precision == "bf16" else dataclasses.replace(loaded, precision=precision)
            )
        if not replays_enabled(settings):
            return _CACHE[(*key, precision)]
        if (*key, precision, "replayed") not in _CACHE:
            _CACHE[(*key, precision, "replayed")] = dataclasses.replace(_CACHE[(*key, precision)], replays=Replays())
        return _CACHE[(*key, precision, "replayed")]


def replays_enabled(settings: MetricSettings) -> bool:
    """Whether ``settings.cuda_graphs`` replays the backbones' forwards on ``settings.device``."""
    return settings.cuda_graphs == "true" or (
        settings.cuda_graphs == "auto" and torch.device(settings.device).type == "cuda"
    )


# What autocast runs in bf16 with a weight it would cast per call (F.linear, conv1d/conv2d).
# nn.MultiheadAttention's packed in-projection is left fp32: with it in bf16, torch takes
# another path and the values differ.
_AUTOCAST_WEIGHT_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def _with_bf16_weights(loaded: LoadedBackbone) -> LoadedBackbone:
    """``loaded`` for bf16 autocast, its ``precast_part``'s Linear and convolution weights and
    biases cast once, in a copy of the model that shares every other tensor with the fp32 one."""
    model = loaded.model
    part = model.get_submodule(loaded.precast_part)
    own = {id(t) for t in [*part.parameters(), *part.buffers()]}
    # deepcopy's memo maps a tensor to itself: the copy shares everything outside the part
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in own}
    clone = copy.deepcopy(model, memo)
    for module in clone.get_submodule(loaded.precast_part).modules():
        if isinstance(module, _AUTOCAST_WEIGHT_MODULES):
            for parameter in (module.weight, module.bias):
                if parameter is not None:
                    parameter.data = parameter.data.to(torch.bfloat16)
    encode = loaded.encode_image
    if encode is model:
        encode = clone
    elif encode is not None:
        if getattr(encode, "__self__", None) is not model:
            raise TypeError(f"{loaded.kind} {loaded.arch}: encode_image must be the model or one of its methods")
        encode = getattr(clone, encode.__name__)
    return dataclasses.replace(loaded, model=clone, encode_image=encode, precision="bf16", fp32_model=model)


# ----------------------------------------------------------------------------- CLIP


def get_clip(settings: MetricSettings) -> LoadedBackbone:
    """The shared open_clip model (``settings.clip``: ViT-B-32 or ViT-L-14, QuickGELU as OpenAI's)."""
    device, precision = torch.device(settings.device), resolve_precision(settings)
    key = ("clip", settings.clip, settings.weights, str(device))
    return _get(key, settings, lambda: _load_clip(settings.clip, settings.weights, device, precision))


def _load_clip(arch: str, weights: str, device: torch.device, precision: str) -> LoadedBackbone:
    import open_clip

    what = f"CLIP {arch}"
    if weights == "pretrained":
        config = open_clip.get_pretrained_cfg(arch, CLIP_PRETRAINED_TAG)
        repo_id = config["hf_hub"].strip("/")
        path = hub_weights_file(repo_id, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), what)
        try:
            # OpenAI's checkpoints were trained with QuickGELU; open_clip's plain arch names use
            # nn.GELU, so it must be forced or the pretrained weights are silently mis-applied.
            model = open_clip.create_model(arch, pretrained=path, force_quick_gelu=True)
        except Exception as error:
            raise MetricWeightsError(f"{what}: could not load {path}: {error}") from None
        tag, source = CLIP_PRETRAINED_TAG, hub_source(repo_id, path)
    else:
        # open_clip warns on the root logger that no weights were loaded: that is the point here.
        with _root_log_level(logging.ERROR):
            model = _seeded(lambda: open_clip.create_model(arch, pretrained=None, force_quick_gelu=True))
        tag, source = f"random-init-seed-{RANDOM_INIT_SEED}", "built"
    model = _freeze(model, device)
    tokenizer = open_clip.get_tokenizer(arch)
    return LoadedBackbone(
        kind="clip",
        arch=arch,
        weights=weights,
        weights_tag=tag,
        weights_source=source,
        model=model,
        device=device,
        precision=precision,
        pipeline=CLIP_PREPROCESS,
        encode_image=model.encode_image,
        tokenizer=tokenizer,
        extra={"library": "open_clip", "activation": "quick_gelu"},
        precast_part="visual",
    )


# ----------------------------------------------------------------------------- DINO


@dataclass(frozen=True)
class VitModel:
    """One timm self-supervised ViT the DINO metrics use: the CLS token after the final norm."""

    arch: str
    hub_id: str
    what: str
    tag: str  # weights tag of the pretrained checkpoint
    crop: ResizeCropNormalize  # its resize-and-crop input ("crop"); "squash" is IMAGENET_SQUASH
    create_kwargs: tuple[tuple[str, object], ...] = ()
    extra: tuple[tuple[str, object], ...] = ()  # fingerprint fields beyond library/embedding
    random_kwargs: tuple[tuple[str, object], ...] = ()  # init choices of the random-init build only


# Hub ids as timm names them; like DINO ViT-S/16 (and CLIP), no hub revision is pinned: the
# loaded file's blob sha256 goes into ``weights_source`` and the state dict's sha256 into every
# fingerprint, so changed weights change every key (revisions need a machine with hub access).
DINO_MODELS = {
    "s16": VitModel(DINO_ARCH, DINO_HUB_ID, "DINO ViT-S/16", "dino", DINO_PREPROCESS),
    "s8": VitModel("vit_small_patch8_224.dino", "timm/vit_small_patch8_224.dino", "DINO ViT-S/8", "dino",
                   DREAMBENCH_PLUS_CROP),
    "v2_s14": VitModel(
        "vit_small_patch14_dinov2.lvd142m", "timm/vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14", "lvd142m",
        DREAMBENCH_PLUS_CROP,
        create_kwargs=(("img_size", 224),),
        # The checkpoint's 37 x 37 position grid (518 px) is resampled once, by timm at load time,
        # to 16 x 16 (224 px); transformers' Dinov2Model (DreamBench++) interpolates per forward.
        extra=(("img_size", 224), ("position_embedding", "timm resample_abs_pos_embed at load (bicubic)")),
        # DINOv2 starts its layer scale at 1e-5: a random-init model is then the identity plus
        # noise and every image embeds alike (cosine 1.0 to everything), useless as a smoke
        # number or a test. The random build starts it at 1 (same architecture and state dict).
        random_kwargs=(("init_values", 1.0),),
    ),
}
DINO_INPUTS = ("crop", "squash")


def get_dino(settings: MetricSettings) -> LoadedBackbone:
    """The shared DINO ViT-S/16 (timm ``vit_small_patch16_224.dino``): CLS token after the final norm."""
    return get_vit(settings, "s16")


def get_vit(settings: MetricSettings, model: str) -> LoadedBackbone:
    """The shared self-supervised ViT ``model`` (a key of ``DINO_MODELS``) with its crop input."""
    spec = DINO_MODELS[model]
    device, precision = torch.device(settings.device), resolve_precision(settings)
    key = ("dino", spec.arch, settings.weights, str(device))
    return _get(key, settings, lambda: _load_vit(spec, settings.weights, device, precision))


def dino_backbone(settings: MetricSettings, model: str, image_input: str) -> LoadedBackbone:
    """``get_vit(settings, model)`` fed by its resize-and-crop ("crop") or by a 224 x 224 squash.

    Both inputs share one model; the pipeline is part of the backbone key, so their embeddings
    are cached apart.
    """
    if image_input not in DINO_INPUTS:
        raise ValueError(f"image_input={image_input!r}: expected one of {', '.join(DINO_INPUTS)}")
    backbone = get_vit(settings, model)
    return backbone if image_input == "crop" else dataclasses.replace(backbone, pipeline=IMAGENET_SQUASH)


def _load_dino(weights: str, device: torch.device, precision: str) -> LoadedBackbone:
    """DINO ViT-S/16 built afresh (bypassing the process cache)."""
    return _load_vit(DINO_MODELS["s16"], weights, device, precision)


def _load_vit(spec: VitModel, weights: str, device: torch.device, precision: str) -> LoadedBackbone:
    import timm

    kwargs = dict(spec.create_kwargs)
    if weights == "pretrained":
        path = hub_weights_file(spec.hub_id, ("model.safetensors", "pytorch_model.bin"), spec.what)
        try:
            model = timm.create_model(
                spec.arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": path}, **kwargs
            )
        except Exception as error:
            raise MetricWeightsError(f"{spec.what}: could not load {path}: {error}") from None
        tag, source = spec.tag, hub_source(spec.hub_id, path)
    else:
        random_kwargs = {**kwargs, **dict(spec.random_kwargs)}
        model = _seeded(lambda: timm.create_model(spec.arch, pretrained=False, num_classes=0, **random_kwargs))
        tag = f"random-init-seed-{RANDOM_INIT_SEED}" + "".join(f"-{k}-{v}" for k, v in spec.random_kwargs)
        source = "built"
    if model.global_pool != "token":
        raise MetricWeightsError(f"{spec.what}: expected CLS-token pooling, timm built {model.global_pool!r}")
    model = _freeze(model, device)
    return LoadedBackbone(
        kind="dino",
        arch=spec.arch,
        weights=weights,
        weights_tag=tag,
        weights_source=source,
        model=model,
        device=device,
        precision=precision,
        pipeline=spec.crop,
        encode_image=model,
        extra={"library": "timm", "embedding": "CLS token after final norm (num_classes=0)", **dict(spec.extra)},
    )


# ----------------------------------------------------------------------------- LPIPS


def get_lpips(settings: MetricSettings) -> LoadedBackbone:
    """The shared ``lpips.LPIPS`` (v0.1, ``settings.lpips_net``: alex or vgg)."""
    device, precision = torch.device(settings.device), resolve_precision(settings)
    key = ("lpips", settings.lpips_net, settings.weights, str(device))
    return _get(key, settings, lambda: _load_lpips(settings.lpips_net, settings.weights, device, precision))


def _torchvision_trunk_url(net: str) -> str:
    from torchvision import models

    weights = models.AlexNet_Weights if net == "alex" else models.VGG16_Weights
    return weights.IMAGENET1K_V1.url


def _quiet_lpips(**kwargs) -> torch.nn.Module:
    import lpips

    # lpips calls torchvision's alexnet/vgg16 with the deprecated ``pretrained=`` argument;
    # the warnings are about its code, not the caller's, and would repeat in every process.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(version=LPIPS_VERSION, verbose=False, **kwargs)


def _load_trunk(model: torch.nn.Module, net: str, path: Path) -> None:
    """Copy torchvision's ImageNet ``features`` from ``path`` into the lpips trunk's slices,
    which hold those very modules under their ``features`` indices."""
    from torchvision import models

    features = (models.alexnet() if net == "alex" else models.vgg16()).features
    state = torch.load(path, map_location="cpu", weights_only=True)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    for number in range(1, model.net.N_slices + 1):
        for index, module in getattr(model.net, f"slice{number}").named_children():
            module.load_state_dict(features[int(index)].state_dict())


def _load_lpips(net: str, weights: str, device: torch.device, precision: str) -> LoadedBackbone:

    what = f"LPIPS {net}"
    if weights == "pretrained":
        url = _torchvision_trunk_url(net)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if not cached.is_file() and not hub_reachable():
            raise MetricWeightsError(offline_message(what, url))
        # torchvision pins each trunk by URL, whose file name ends in its sha256 prefix
        # (alexnet-owt-7be5be79.pth); check the cached file before lpips loads it.
        expected = Path(url).stem.rsplit("-", 1)[-1]
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=expected, progress=False)
        check_sha256(cached, expected, f"{what} ImageNet trunk")
        try:
            # The checked file itself is loaded (lpips would look the trunk up by name again).
            model = _quiet_lpips(net=net, pretrained=True, pnet_rand=True)
            _load_trunk(model, net, cached)
        except Exception as error:
            raise MetricWeightsError(f"{what}: could not load the ImageNet trunk ({cached}): {error}") from None
        tag, source = f"imagenet-trunk+lpips-v{LPIPS_VERSION}-linear", url
    else:
        # The linear heads ship inside the lpips package, so only the trunk is random.
        model = _seeded(lambda: _quiet_lpips(net=net, pretrained=True, pnet_rand=True))
        tag = f"random-trunk-seed-{RANDOM_INIT_SEED}+lpips-v{LPIPS_VERSION}-linear"
        source = "built"
    model = _freeze(model, device, channels_last=True)
    return LoadedBackbone(
        kind="lpips",
        arch=f"lpips-{net}",
        weights=weights,
        weights_tag=tag,
        weights_source=source,
        model=model,
        device=device,
        precision=precision,
        extra={"library": "lpips", "version": LPIPS_VERSION},
        precast_part="net",  # the trunk; the heads run in float32 outside autocast
    )
