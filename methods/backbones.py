"""The one backbone resolver: hub ids (pinned), ``tiny``, ``sd15-random``, or a local folder.

``resolve_backbone(name)`` is cheap (no download, no weights) and gives a frozen spec whose
``fingerprint()`` enters every cache key. ``load_backbone(spec, device, dtype)`` builds or loads
the diffusers components once per process and returns the shared, frozen instance.

A local folder is keyed by its content as well as its path (``folder_content_sha256``: the
sha256 of its weight, config and tokenizer files), so replacing the weights in a folder re-keys
every state, image and class prior made from it. Each file's hash is cached by (path, size,
mtime) under the cache root, so reruns stat the files instead of reading gigabytes again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

from data.common import UserError, atomic_write_text, hub_reachable

HUB_BACKBONES: dict[str, dict[str, str | int]] = {
    # name: hub repository, pinned commit, native resolution. The commits are snapshots that
    # the community's caches hold (models--<org>--<name>/snapshots/<sha>); they are pinned for
    # reproducibility, not because they are the newest. SD 1.5 moved to stable-diffusion-v1-5/
    # when runwayml/ was taken down. Override with a local folder to use another revision.
    "sd14": {
        "repo_id": "CompVis/stable-diffusion-v1-4",
        "revision": "133a221b8aa7292a167afc5127cb63fb5005638b",
        "resolution": 512,
    },
    "sd15": {
        "repo_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "revision": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
        "resolution": 512,
    },
    "sd21-base": {
        "repo_id": "stabilityai/stable-diffusion-2-1-base",
        "revision": "5ede9e4bf3e3fd1cb0ef2f7a3fff13ee514fdf06",
        "resolution": 512,
    },
}
BUILT_BACKBONES = {"tiny": 64, "sd15-random": 512}
BACKBONE_NAMES = (*HUB_BACKBONES, *BUILT_BACKBONES)


class BackboneError(UserError, ValueError):
    """A backbone that cannot be resolved or loaded, with the fix stated."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a method fine-tunes. ``source``: 'hub', 'built' (random init from config) or 'local'."""

    name: str
    source: str
    location: str  # hub repo id, local folder, or the built config's name
    revision: str | None
    resolution: int
    seed: int = 0  # init seed of built backbones
    content_sha256: str | None = None  # local folders: hash of the files (folder_content_sha256)

    def fingerprint(self) -> dict:
        description = asdict(self)
        if self.content_sha256 is None:  # hub and built backbones keep the keys they always had
            del description["content_sha256"]
        return description

    @property
    def is_random(self) -> bool:
        return self.source == "built"


def resolve_backbone(name: str) -> BackboneSpec:
    """Name (or local path) to spec; unknown names list the valid ones."""
    if name in HUB_BACKBONES:
        entry = HUB_BACKBONES[name]
        return BackboneSpec(name, "hub", str(entry["repo_id"]), str(entry["revision"]), int(entry["resolution"]))
    if name in BUILT_BACKBONES:
        return BackboneSpec(name, "built", name, None, BUILT_BACKBONES[name])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BackboneError(
                f"backbone folder {path} has no model_index.json; point to a diffusers "
                "Stable Diffusion 1.x/2.x folder (as saved by pipe.save_pretrained)"
            )
        index = json.loads((path / "model_index.json").read_text())
        resolution = int(index.get("_subjectbench_resolution", 512))
        folder = path.resolve()
        return BackboneSpec(name, "local", str(folder), None, resolution, content_sha256=folder_content_sha256(folder))
    hint = " (it looks like a path, but no such folder exists)" if os.sep in name else ""
    raise BackboneError(
        f"unknown backbone {name!r}{hint}; valid: {', '.join(BACKBONE_NAMES)}, or a local "
        "diffusers folder"
    )


# ----------------------------------------------------------------------------- content keys

CONTENT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")  # weights, configs, tokenizer
_HASH_CHUNK = 1 << 24
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of one file, cached in-process and on disk by (resolved path, size, mtime_ns)."""
    from data.subjects import cache_root

    resolved = path.resolve()  # hub snapshots are symlinks into blobs/
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    record = cache_root() / "file-hashes" / f"{hashlib.sha1(key[0].encode()).hexdigest()}.json"
    try:
        cached = json.loads(record.read_text())
        if (cached["path"], cached["size"], cached["mtime_ns"]) == key:
            _FILE_HASHES[key] = cached["sha256"]
            return cached["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with open(resolved, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": value}))
    except OSError:
        pass  # a read-only cache costs a re-read next time, nothing else
    _FILE_HASHES[key] = value
    return value


def folder_content_sha256(folder: Path) -> str:
    """One sha256 over the relative names and contents of a diffusers folder's weight, config and
    tokenizer files (``CONTENT_SUFFIXES``; hidden folders such as ``.cache`` are skipped).

    The same files give the same hash wherever they lie and whenever they were copied; any changed,
    added or removed file gives another."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.suffix in CONTENT_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{_file_sha256(path)}\n".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte-to-unicode table (as in the original CLIP tokenizer)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def clip_bpe_files(cache_dir: Path | None = None) -> Path:
    """vocab.json + merges.txt of the CLIP BPE (49,408 tokens) built from open_clip's vocabulary.

    The result is token-for-token the tokenizer of the SD 1.x text encoders, built offline.
    """
    import open_clip

    from data.subjects import cache_root

    source = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    target = (cache_dir or cache_root()) / "tokenizers" / "clip-bpe-49408"
    if (target / "merges.txt").is_file() and (target / "vocab.json").is_file():
        return target
    merges = gzip.open(source).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    vocab = base + [token + "</w>" for token in base]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}))
    atomic_write_text(target / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return target


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    folder = clip_bpe_files()
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


# ----------------------------------------------------------------------------- components


@dataclass
class Backbone:
    """Frozen, shared diffusers components of one backbone on one device and dtype."""

    spec: BackboneSpec
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _build_tiny():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    return unet, vae, text_encoder, dict(_SCHEDULER_CONFIG)


def _build_sd15_random():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    return unet, vae, text_encoder, dict(_SCHEDULER_CONFIG)


def _load_hub(spec: BackboneSpec):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    online = hub_reachable()
    kwargs = {"revision": spec.revision} if spec.source == "hub" else {}
    if spec.source == "hub" and not online:
        kwargs["local_files_only"] = True
    location = spec.location
    try:
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs)
        from diffusers import DDIMScheduler

        scheduler_config = dict(
            DDIMScheduler.load_config(location, subfolder="scheduler", **kwargs)
        )
    except (OSError, ValueError) as error:
        if spec.source == "hub" and not online:
            raise BackboneError(
                f"backbone {spec.name!r} ({location}@{spec.revision}) is not in the local "
                "Hugging Face cache and the hub is unreachable (or HF_HUB_OFFLINE=1). Enable the "
                "network and unset HF_HUB_OFFLINE, or download it elsewhere "
                f"(`huggingface-cli download {location}`) and pass backbone=/path/to/folder"
            ) from None
        raise BackboneError(f"backbone {spec.name!r}: could not load from {location}: {error}") from None
    scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return unet, vae, text_encoder, tokenizer, scheduler_config


_COMPONENTS = ("unet", "vae", "text_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _component_problem(folder: Path, component: str) -> str | None:
    where = folder / component
    if not (where / "config.json").is_file():
        return f"{where / 'config.json'} is missing"
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in where.iterdir()):
        return f"{where} holds no weights (*.safetensors)"
    return None


def check_backbone_available(spec: BackboneSpec) -> None:
    """Fail once, before any unit runs, when the backbone's weights cannot be loaded here.

    Cheap: looks for each component's config and weights file (local folder or the Hugging Face
    cache) without loading them. A reachable hub is fine: the workers download what is missing.
    """
    if spec.source == "built":
        return
    if spec.source == "local":
        folder = Path(spec.location)
        problems = [p for c in _COMPONENTS if (p := _component_problem(folder, c))]
        problems += [f"{folder / c} is missing" for c in ("tokenizer", "scheduler") if not (folder / c).is_dir()]
        if problems:
            raise BackboneError(
                f"backbone folder {folder} is incomplete: {'; '.join(problems)}; save a full diffusers "
                "Stable Diffusion folder there (pipe.save_pretrained) or choose another backbone"
            )
        return
    if hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    missing = []
    for component in _COMPONENTS:
        config = try_to_load_from_cache(spec.location, f"{component}/config.json", revision=spec.revision)
        if not isinstance(config, str) or _component_problem(Path(config).parent.parent, component):
            missing.append(component)
    if missing:
        raise BackboneError(
            f"backbone {spec.name!r} ({spec.location}@{spec.revision}): {', '.join(missing)} not in the "
            "local Hugging Face cache and the hub is unreachable (or HF_HUB_OFFLINE=1). Enable the "
            "network and unset HF_HUB_OFFLINE, or download it elsewhere "
            f"(`huggingface-cli download {spec.location} --revision {spec.revision}`) and pass "
            "backbone=/path/to/folder"
        )


def _cast(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``. diffusers warns on every such cast of a model whose list of
    modules to keep in fp32 exists but is empty (AutoencoderKL: ``[]``): nothing is kept, so the
    warning says nothing and would repeat in every run and worker. A non-empty list still warns."""
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(device=device, dtype=dtype)
        return
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        module.to(device=device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)


_CACHE: dict[tuple, Backbone] = {}
_CACHE_LOCK = threading.Lock()


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    """The shared, frozen components of ``spec`` on ``device``/``dtype`` (built once per process).

    Callers must not modify them: a method that fine-tunes copies the module it trains.
    """
    device = torch.device(device)
    key = (spec, str(device), dtype)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if spec.source == "built":
            builder = _build_tiny if spec.name == "tiny" else _build_sd15_random
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                unet, vae, text_encoder, scheduler_config = builder()
            tokenizer = build_clip_tokenizer()
        else:
            unet, vae, text_encoder, tokenizer, scheduler_config = _load_hub(spec)
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            module.eval()
            _cast(module, device, dtype)
        backbone = Backbone(spec, unet, vae, text_encoder, tokenizer, scheduler_config, device, dtype)
        _CACHE[key] = backbone
        return backbone


def clear_backbone_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


@cache
def describe_backbones() -> list[dict]:
    rows = []
    for name in BACKBONE_NAMES:
        spec = resolve_backbone(name)
        rows.append(
            {
                "name": name,
                "source": spec.source,
                "location": spec.location,
                "revision": spec.revision or "-",
                "resolution": spec.resolution,
            }
        )
    return rows
