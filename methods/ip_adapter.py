"""``ip_adapter``: IP-Adapter on SD 1.5 (Ye et al. 2023, arXiv 2308.06721), a zero-shot encoder baseline.

No training: a frozen CLIP image encoder embeds the subject's reference image, a small projection
turns the embedding into 4 extra tokens, and *decoupled* cross-attention layers (their own
``to_k_ip``/``to_v_ip`` beside each attn2's text K/V) add ``scale`` × attention over those tokens
to the text cross-attention. Everything runs through diffusers' own loader and pipeline:
``pipe.load_ip_adapter`` (safetensors weights), ``pipe.set_ip_adapter_scale``, and
``StableDiffusionPipeline(..., ip_adapter_image=...)``.

| step | where in code | value (default) | source |
|---|---|---|---|
| weights | ``adapter`` → ``adapter_source`` | ``h94``: ``h94/IP-Adapter`` ``models/ip-adapter_sd15.safetensors`` + ``models/image_encoder`` (OpenCLIP ViT-H/14) at revision ``018e4027…`` | official release; revision: the snapshot public caches hold (``models--h94--IP-Adapter/snapshots/018e402774aeeddd60609b4ecdb7e298259dc729`` in public code), **not verified against the hub here** (no network) |
| load into SD 1.5 | ``_load_adapted`` | ``pipe.load_ip_adapter(folder or repo, subfolder="models", weight_name=…)`` on a *copy* of the shared UNet | diffusers (``IPAdapterMixin``) |
| preparation | ``prepare`` | records which reference image(s) condition generation (names + sha256 in ``state.json``) | issue 13: no training step |
| reference image(s) | ``reference`` | ``first``: the subject's first image (sorted file name; in the single-image track its one training photo) | ours: the tables that report IP-Adapter / BLIP-Diffusion on DreamBench list one reference image (e.g. DreamCache, arXiv 2411.17786); the official IP-Adapter code has no way to combine several images (a list of images gives one output per image) |
| several references | ``reference=all`` | every training image, passed to the one adapter as a list: diffusers encodes them as a batch and concatenates their 4 tokens each (4·N image tokens) | diffusers (``prepare_ip_adapter_image_embeds`` + ``MultiIPAdapterImageProjection``) |
| image preprocessing | diffusers ``CLIPImageProcessor`` | resize + centre crop to the encoder's size (224 for ViT-H) from the original photo | diffusers default built by ``load_ip_adapter`` |
| unconditional branch of CFG | diffusers | zero image embedding | official code and diffusers (``encode_image``) |
| scale λ | ``scale`` (generation-only) | 0.5 | diffusers IP-Adapter guide: 1.0 = image prompt only, "0.5 typically produces balanced results between the text and image prompt"; λ = 0 is the plain text-to-image model (paper, Sec. 3.2) |
| prompt | ``render_prompt`` | the protocol prompt with the class noun and **no identifier** ("a dog in the jungle") | ours: the image carries the identity; an identifier such as "sks" means nothing to the frozen text encoder. Equals the CLIP-T text |
| negative prompt | — | none | ours: the protocol's sampler for every method; the official demo's default negative prompt is not used |
| sampling | ``methods.sampling`` | protocol sampler (DDIM 50, guidance 7.5) | official demos: DDIM 50 steps; diffusers default guidance 7.5 |

Weights (``adapter``): ``h94`` (the pinned hub release; offline it must already be in the
Hugging Face cache), a local folder laid out like the hub repository
(``FOLDER/models/ip-adapter_sd15.safetensors`` and ``FOLDER/models/image_encoder/``; keyed by its
content sha256 as local backbones are), or ``random``: random-init weights in the same format,
built once per backbone under the cache root and loaded through the same ``load_ip_adapter``
path — a tiny CLIP vision encoder for the ``tiny`` backbone, the ViT-H/14 configuration
otherwise (``sd15-random``, for timing); ``to_k_ip``/``to_v_ip`` start as copies of the UNet's
attn2 ``to_k``/``to_v`` as the official training script initializes them. Only ``h94`` or a folder
with the released weights measures IP-Adapter.

Scale sweeps: ``scale`` and ``adapter`` are generation-only, so a sweep shares one (trivial)
preparation per subject; the adapted UNet is loaded once per process and weights source, and the
scale is set under a lock just before each pipeline call.

``blip_diffusion`` is not provided, because it does not fit the protocol cleanly:
- diffusers 0.42 ships ``BlipDiffusionPipeline`` only under ``diffusers.pipelines.deprecated``
  (kept importable, no longer maintained);
- BLIP-Diffusion is its own model, not an adapter on a backbone: a BLIP-2 Q-Former, a
  ``ContextCLIPTextModel`` and a UNet its authors fine-tuned (``Salesforce/blipdiffusion``), so the
  run's ``backbone`` (SD 1.5, ``tiny``, a local folder) would be ignored and its keys would lie;
  a tiny random version can be built from diffusers' classes (as diffusers' own tests do), but it
  would exercise none of our backbones, and the released model is a hub-only download;
- its prompt format is its own: ``_build_prompt`` writes "a {target category} {prompt}" and repeats
  it ``prompt_strength × prompt_reps`` (20) times, with a source category for the Q-Former, so the
  protocol's prompts (which already contain the class noun) need rewriting choices of ours.
Its published figures are a leaderboard anchor (``reports/anchors.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from data.common import UserError, atomic_write_text, file_lock, file_sha256, hub_offline_requested
from data.images import open_image
from data.protocol import Prompt
from data.subjects import Subject, cache_root
from methods.backbones import Backbone, folder_content_sha256, load_backbone
from methods.base import Method, ParamsError, SamplerConfig, State, param
from methods.diffusion import working_copy
from methods.sampling import build_pipeline, generate_images, quiet_loading
from methods.training import save_tensors  # a full disk: DiskWriteError naming the file

ADAPTER_HUB = {
    "repo_id": "h94/IP-Adapter",
    # The snapshot that public caches of the repository hold; not checked against the hub here.
    "revision": "018e402774aeeddd60609b4ecdb7e298259dc729",
}
SUBFOLDER = "models"
WEIGHT_NAME = "ip-adapter_sd15.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"
REFERENCES = ("first", "all")
# Bump when the random weights builder changes what it writes (re-keys every random-adapter image).
RANDOM_BUILD_VERSION = "1"
RANDOM_SEED = 0

# The image encoder configurations of the built random adapters. ViT-H/14: OpenCLIP ViT-H/14 as a
# transformers CLIP vision model, the encoder in h94/IP-Adapter's models/image_encoder; the values
# are those InvokeAI's and ComfyUI's loaders use for that encoder (its config.json not read here).
VIT_H_14 = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}
TINY_VISION = {
    "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": 32, "patch_size": 4, "projection_dim": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


class IPAdapterWeightsError(UserError, ValueError):
    """IP-Adapter weights that cannot be found or loaded, naming the place and the fix."""


FOLDER_LAYOUT = f"{SUBFOLDER}/{WEIGHT_NAME} and {SUBFOLDER}/{IMAGE_ENCODER_FOLDER}/ (config.json + model.safetensors)"
DOWNLOAD_HINT = (
    f"huggingface-cli download {ADAPTER_HUB['repo_id']} --revision {ADAPTER_HUB['revision']} "
    f"--include '{SUBFOLDER}/{WEIGHT_NAME}' '{SUBFOLDER}/{IMAGE_ENCODER_FOLDER}/*' --local-dir FOLDER"
)


@dataclass(frozen=True)
class IPAdapterParams:
    scale: float = param(
        0.5,
        source="diffusers IP-Adapter guide (0.5 balances text and image prompts; 1.0 = image only)",
        doc="IP-Adapter scale λ on the image cross-attention (0 = the plain backbone)",
        generation=True,
    )
    adapter: str = param(
        "h94",
        source=f"official release {ADAPTER_HUB['repo_id']}@{ADAPTER_HUB['revision'][:8]} (revision from public caches, unverified here)",
        doc="weights: h94 (pinned hub release), random (random-init, for tests/timing), or a folder laid out like the hub repo",
        generation=True,
    )
    reference: Literal["first", "all"] = param(
        "first",
        source="ours: one reference image, as the DreamBench tables of zero-shot encoders list",
        doc="which subject images condition generation: first, or all (tokens concatenated, diffusers)",
    )

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ParamsError(f"scale must be >= 0 (0 = the plain backbone), got {self.scale}")
        if not self.adapter.strip():
            raise ParamsError("adapter must be 'h94', 'random' or a folder path, got an empty string")


# ----------------------------------------------------------------------------- weights sources


@dataclass(frozen=True)
class AdapterSource:
    """Where ``load_ip_adapter`` reads from, and what keys the images it makes."""

    kind: str  # "hub", "random" or "local"
    location: str  # repo id or folder
    revision: str | None
    identity: dict  # enters the fingerprints


def _missing_in_folder(folder: Path) -> list[str]:
    encoder = folder / SUBFOLDER / IMAGE_ENCODER_FOLDER
    missing = [str(p) for p in (folder / SUBFOLDER / WEIGHT_NAME, encoder / "config.json") if not p.is_file()]
    if encoder.is_dir() and not any(p.suffix == ".safetensors" for p in encoder.iterdir()):
        missing.append(str(encoder / "model.safetensors"))
    return missing


def adapter_source(adapter: str, backbone_spec) -> AdapterSource:
    """Resolve the ``adapter`` param; a missing folder or an uncached offline release fails here,
    at planning, with the fix."""
    if adapter == "h94":
        repo, revision = ADAPTER_HUB["repo_id"], ADAPTER_HUB["revision"]
        if hub_offline_requested():
            from huggingface_hub import try_to_load_from_cache

            wanted = (f"{SUBFOLDER}/{WEIGHT_NAME}", f"{SUBFOLDER}/{IMAGE_ENCODER_FOLDER}/config.json")
            if not all(isinstance(try_to_load_from_cache(repo, name, revision=revision), str) for name in wanted):
                raise IPAdapterWeightsError(
                    f"ip_adapter: {repo}@{revision} ({', '.join(wanted)}) is not in the local Hugging Face cache "
                    f"and HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE to download it, or download it elsewhere "
                    f"(`{DOWNLOAD_HINT}`) and pass adapter=FOLDER (or adapter=random for a smoke run)"
                )
        identity = {"source": "hub", "repo_id": repo, "revision": revision, "weight_name": f"{SUBFOLDER}/{WEIGHT_NAME}"}
        return AdapterSource("hub", repo, revision, identity)
    if adapter == "random":
        identity = {"source": "random", "version": RANDOM_BUILD_VERSION, "seed": RANDOM_SEED, "encoder": _random_encoder_name(backbone_spec)}
        return AdapterSource("random", "", None, identity)
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise IPAdapterWeightsError(
            f"ip_adapter: adapter folder {folder} does not exist; point adapter= to a folder holding {FOLDER_LAYOUT} "
            f"(`{DOWNLOAD_HINT}`), or use adapter=h94 (the pinned hub release) or adapter=random (smoke runs)"
        )
    missing = _missing_in_folder(folder)
    if missing:
        raise IPAdapterWeightsError(
            f"ip_adapter: adapter folder {folder} is incomplete: missing {', '.join(missing)}; it must hold "
            f"{FOLDER_LAYOUT} in diffusers' IP-Adapter format (`{DOWNLOAD_HINT}`)"
        )
    resolved = folder.resolve()
    identity = {"source": "local", "path": str(resolved), "content_sha256": folder_content_sha256(resolved)}
    return AdapterSource("local", str(resolved), None, identity)


def _random_encoder_name(backbone_spec) -> str:
    return "tiny" if backbone_spec.name == "tiny" else "vit-h-14"


def write_random_adapter(unet: torch.nn.Module, folder: Path, encoder: dict, seed: int = RANDOM_SEED) -> Path:
    """Random-init IP-Adapter weights for ``unet`` in diffusers' format under ``folder``:
    ``models/ip-adapter_sd15.safetensors`` (``image_proj.*`` and ``ip_adapter.{1,3,…}.to_{k,v}_ip.weight``,
    one pair per attn2 layer in ``unet.attn_processors`` order, as diffusers numbers them) and a
    CLIP vision encoder with projection saved by ``save_pretrained``. ``to_k_ip``/``to_v_ip`` copy
    the UNet's attn2 ``to_k``/``to_v`` (the official training script's initialization); the image
    projection and the encoder are random. Deterministic in (``unet`` weights, ``encoder``, ``seed``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cross_dim = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder))
        projection = torch.nn.Linear(encoder["projection_dim"], 4 * cross_dim)
    tensors = {
        "image_proj.proj.weight": projection.weight.detach(),
        "image_proj.proj.bias": projection.bias.detach(),
        "image_proj.norm.weight": torch.ones(cross_dim),
        "image_proj.norm.bias": torch.zeros(cross_dim),
    }
    key_id = 1
    modules = dict(unet.named_modules())
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attention = modules[name.removesuffix(".processor")]
            tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = attention.to_k.weight.detach().float().cpu()
            tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = attention.to_v.weight.detach().float().cpu()
            key_id += 2
    models = folder / SUBFOLDER
    models.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.contiguous().clone() for k, v in tensors.items()}, models / WEIGHT_NAME)
    image_encoder.save_pretrained(str(models / IMAGE_ENCODER_FOLDER), safe_serialization=True)
    return folder


def random_adapter_folder(backbone: Backbone) -> Path:
    """The built random adapter of ``backbone`` (written once, atomically, under the cache root)."""
    name = _random_encoder_name(backbone.spec)
    key = hashlib.sha256(
        json.dumps([backbone.spec.fingerprint(), name, RANDOM_BUILD_VERSION, RANDOM_SEED], sort_keys=True).encode()
    ).hexdigest()[:16]
    root = cache_root() / "ip-adapter"
    folder = root / f"random-{name}-{key}"
    if (folder / "DONE").is_file():
        return folder
    with file_lock(root / f".random-{key}.lock"):
        if (folder / "DONE").is_file():
            return folder
        # fp32 weights of the backbone's UNet, whatever dtype the run uses
        unet = load_backbone(backbone.spec, "cpu", torch.float32).unet
        encoder = TINY_VISION if name == "tiny" else VIT_H_14
        staging = Path(tempfile.mkdtemp(prefix=".tmp-random-", dir=root))
        try:
            with quiet_loading():
                write_random_adapter(unet, staging, encoder)
            atomic_write_text(staging / "DONE", "")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- loaded adapters

# (backbone spec, device, dtype, adapter identity) -> (adapted UNet, image encoder, feature extractor)
_LOADED: dict[tuple, tuple] = {}
_LOAD_LOCK = threading.Lock()
# The adapted UNet's scale is state on shared modules: set and used under this lock.
_GENERATE_LOCK = threading.Lock()


def _load_adapted(backbone: Backbone, source: AdapterSource) -> tuple:
    """Load the adapter into a copy of the backbone's UNet through ``pipe.load_ip_adapter``
    (once per process, backbone, device, dtype and weights)."""
    key = (backbone.spec, str(backbone.device), backbone.dtype, json.dumps(source.identity, sort_keys=True))
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        pipeline = build_pipeline(backbone, SamplerConfig(), unet=working_copy(backbone.unet))
        location = str(random_adapter_folder(backbone)) if source.kind == "random" else source.location
        kwargs = {"revision": source.revision} if source.kind == "hub" else {}
        if source.kind == "hub" and hub_offline_requested():
            kwargs["local_files_only"] = True
        try:
            with quiet_loading():
                pipeline.load_ip_adapter(
                    location, subfolder=SUBFOLDER, weight_name=WEIGHT_NAME, image_encoder_folder=IMAGE_ENCODER_FOLDER, **kwargs
                )
        except (OSError, ValueError, KeyError) as error:
            raise IPAdapterWeightsError(
                f"ip_adapter: could not load IP-Adapter weights from {location} ({type(error).__name__}: {error}); "
                f"expected {FOLDER_LAYOUT} in diffusers' format, made for this backbone's UNet "
                f"(cross-attention dim {backbone.unet.config.cross_attention_dim})"
            ) from None
        pipeline.image_encoder.requires_grad_(False)
        pipeline.image_encoder.eval()
        pipeline.unet.requires_grad_(False)
        loaded = (pipeline.unet, pipeline.image_encoder, pipeline.feature_extractor)
        _LOADED[key] = loaded
        return loaded


def clear_adapter_cache() -> None:
    with _LOAD_LOCK:
        _LOADED.clear()


# ----------------------------------------------------------------------------- method


class IPAdapter(Method):
    name = "ip_adapter"
    version = "1"
    Params = IPAdapterParams
    description = "IP-Adapter SD 1.5 (Ye et al. 2023): zero-shot image-prompt adapter, no training (diffusers)"

    def __init__(self, params: IPAdapterParams, context):
        super().__init__(params, context)
        self._source: AdapterSource | None = None

    def source(self) -> AdapterSource:
        if self._source is None:
            self._source = adapter_source(self.params.adapter, self.context.backbone)
        return self._source

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "adapter_weights": self.source().identity}

    def generation_fingerprint(self) -> dict:
        return {**super().generation_fingerprint(), "adapter_weights": self.source().identity}

    def _backbone(self) -> Backbone:
        return load_backbone(self.context.backbone, self.context.device, self.context.torch_dtype)

    def render_prompt(self, prompt: Prompt, subject: Subject) -> str:
        return prompt.render("", subject.class_noun)

    def reference_paths(self, subject: Subject) -> tuple[Path, ...]:
        if not subject.images:
            raise UserError(f"ip_adapter: subject {subject.id!r} has no images to condition on")
        return subject.images[:1] if self.params.reference == "first" else tuple(subject.images)

    def prepare(self, subject: Subject, workdir: Path, seed: int) -> None:
        references = [
            {"name": path.name, "sha256": file_sha256(path)} for path in self.reference_paths(subject)
        ]
        atomic_write_text(workdir / "state.json", json.dumps({"reference": self.params.reference, "images": references}, indent=1))

    def load_state(self, workdir: Path, subject: Subject) -> State:
        recorded = json.loads((workdir / "state.json").read_text())
        by_name = {path.name: path for path in subject.images}
        images = []
        for entry in recorded["images"]:
            path = by_name.get(entry["name"])
            if path is None or file_sha256(path) != entry["sha256"]:
                raise UserError(
                    f"ip_adapter: reference image {entry['name']!r} of subject {subject.id!r} is missing or changed "
                    f"since {workdir} was prepared; rerun with --force to prepare it again"
                )
            images.append(open_image(path))
        return State(workdir, subject, {"reference": recorded["reference"], "images": images})

    def generate(
        self,
        state: State,
        checkpoint: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
    ) -> list[Image.Image]:
        backbone = self._backbone()
        unet, image_encoder, feature_extractor = _load_adapted(backbone, self.source())
        pipeline = build_pipeline(backbone, sampler, unet=unet)
        pipeline.register_modules(image_encoder=image_encoder, feature_extractor=feature_extractor)
        with _GENERATE_LOCK:
            pipeline.set_ip_adapter_scale(self.params.scale)
            # one adapter, conditioned on the list of reference images (one for reference=first)
            return generate_images(
                pipeline, prompts, seeds, sampler, self.context.resolution, ip_adapter_image=[list(state.data["images"])]
            )
