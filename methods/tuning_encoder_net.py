"""The tuning encoder's network, frozen parts, losses and checkpoint file (see ``methods/tuning_encoder.py``).

Shared by the benchmark method (per-subject tuning and prediction) and the pre-training command
(``methods/tuning_encoder_pretrain.py``):

- ``EncoderNet``: CLIP image features of the subject image (CLS token of every second layer of a
  frozen CLIP vision tower) + mean-pooled features of the frozen UNet's down and mid blocks on
  the current noisy latent → a shared trunk → (a) a word embedding ``init + word_scale · Δ`` and
  (b) per attention layer and projection a r×r core M(h) of LoRA offsets ΔW = B · M(h) · A, with
  A, B learned bases (the hypernetwork).
- ``contrastive_loss`` (pull toward the K nearest whole-word CLIP tokens, push from other
  concepts' neighbours), ``l2_loss`` (E4T's penalty on the offset Δ), ``nearest_word``.
- The checkpoint: one safetensors file of the trainable tensors, with the architecture and the
  pre-training record (steps, seconds, images, device) in its metadata.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from data.common import UserError, atomic_write_bytes
from methods.backbones import Backbone, BackboneSpec

FORMAT = "subjectbench-tuning-encoder/1"
TARGETS = ("to_q", "to_k", "to_v")  # E4T (re-implementation): offsets on q, k, v
SLOT_PREFIX = "<tuning-encoder-"  # per-sample placeholder words: <tuning-encoder-0>, -1, ...
MAX_SLOTS = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The CLIP image tower per backbone: built ones are random-init (offline, like the backbone);
# real backbones use OpenAI's ViT-L/14 (SD 1.x's text tower's twin; E4T used OpenCLIP ViT-H/14).
HUB_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
# Pinned commit: the snapshot hash found in several unrelated public projects' Hugging Face caches;
# not checked against the hub from here (no network). Changing it changes outputs: bump
# TuningEncoder.version with it.
HUB_IMAGE_ENCODER_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"


class EncoderCheckpointError(UserError, ValueError):
    """An encoder checkpoint that is missing, unreadable or made for another backbone."""


def pretrain_command(backbone: str, out: str = "tuning_encoder.safetensors") -> str:
    """The exact command that makes an encoder for ``backbone`` (printed by every missing-file error)."""
    images = "mini" if backbone == "tiny" else "IMAGE_FOLDER_OR_DATASET"
    return f"subjectbench pretrain tuning-encoder --images {images} --backbone {backbone} --out {out}"


@dataclass(frozen=True)
class EncoderConfig:
    """The architecture of one encoder (stored in the checkpoint's metadata)."""

    backbone: str  # the backbone name it was pre-trained for
    backbone_fingerprint: dict
    image_encoder: str  # "built:tiny", "built:vit-l-14" or "hub:<repo id>"
    hidden: int
    lora_rank: int
    word_scale: float = 0.1  # E4T: class word + 0.1 · encoder output
    init_word: str = "object"
    targets: tuple[str, ...] = TARGETS
    seed: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        return cls(**{**data, "targets": tuple(data.get("targets", TARGETS))})


def default_config(backbone: Backbone, lora_rank: int = 4, hidden: int | None = None, seed: int = 0) -> EncoderConfig:
    spec = backbone.spec
    if spec.name == "tiny":
        image_encoder, default_hidden = "built:tiny", 64
    elif spec.is_random:
        image_encoder, default_hidden = "built:vit-l-14", 768
    else:
        image_encoder, default_hidden = f"hub:{HUB_IMAGE_ENCODER}", 768
    return EncoderConfig(
        backbone=spec.name, backbone_fingerprint=spec.fingerprint(), image_encoder=image_encoder,
        hidden=hidden or default_hidden, lora_rank=lora_rank, seed=seed,
    )


# ----------------------------------------------------------------------------- frozen parts

_IMAGE_ENCODERS: dict[tuple, torch.nn.Module] = {}
_LOCK = threading.Lock()


def load_image_encoder(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen CLIP vision tower ``name`` (cached per process)."""
    key = (name, str(device), dtype)
    with _LOCK:
        if key in _IMAGE_ENCODERS:
            return _IMAGE_ENCODERS[key]
    from transformers import CLIPVisionConfig, CLIPVisionModel

    kind, _, location = name.partition(":")
    if kind == "built":
        configs = {
            "tiny": CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8),
            "vit-l-14": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14),
        }
        if location not in configs:
            raise EncoderCheckpointError(f"unknown built image encoder {location!r}; valid: {', '.join(configs)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CLIPVisionModel(configs[location])
    elif kind == "hub":
        try:
            revision = HUB_IMAGE_ENCODER_REVISION if location == HUB_IMAGE_ENCODER else None
            model = CLIPVisionModel.from_pretrained(location, revision=revision)
        except OSError as error:
            raise EncoderCheckpointError(
                f"the tuning encoder needs the CLIP image tower {location} (revision {revision or 'main'}) and "
                f"it could not be loaded ({str(error).splitlines()[0]}); download it once with network access: "
                f"huggingface-cli download {location} --revision {revision or 'main'}"
            ) from None
    else:
        raise EncoderCheckpointError(f"image encoder {name!r} is not 'built:NAME' or 'hub:REPO'")
    model.requires_grad_(False)
    model.eval()
    model.to(device=device, dtype=dtype)
    with _LOCK:
        _IMAGE_ENCODERS[key] = model
    return model


def clip_features(image_encoder: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, n·D) fp32: CLS tokens of every second hidden layer for images in [-1, 1] (B,3,H,W)."""
    size = image_encoder.config.image_size
    parameter = next(image_encoder.parameters())
    images = (pixels.to(parameter.device, torch.float32) + 1.0) / 2.0
    images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = image_encoder(((images - mean) / std).to(parameter.dtype), output_hidden_states=True).hidden_states
    layers = hidden[2::2]  # after layers 2, 4, ... (hidden[0] is the embedding output)
    return torch.cat([layer[:, 0].float() for layer in layers], dim=1)


class _FeaturesTaken(Exception):
    """Stops the UNet forward once the mid block has run (the up blocks are not needed)."""


def unet_features(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(B, F) fp32: the frozen UNet's down-block and mid-block outputs on ``noisy`` at
    ``timesteps``, mean-pooled over space (E4T re-implementation: mean-pooled down/mid features).

    Runs the UNet's own forward (so its time embedding and any installed attention processors
    behave as in sampling) and stops it after the mid block."""
    parameter = next(unet.parameters())
    pooled: list[torch.Tensor] = []

    def keep(module, args, output):
        pooled.append((output[0] if isinstance(output, tuple) else output).float().mean(dim=(2, 3)))

    def keep_and_stop(module, args, output):
        keep(module, args, output)
        raise _FeaturesTaken

    hooks = [block.register_forward_hook(keep) for block in unet.down_blocks]
    if unet.mid_block is not None:
        hooks.append(unet.mid_block.register_forward_hook(keep_and_stop))
    try:
        with torch.no_grad():
            unet(noisy.to(parameter.device, parameter.dtype), timesteps.to(parameter.device),
                 context.to(parameter.device, parameter.dtype), return_dict=False)
    except _FeaturesTaken:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(pooled, dim=1)


def attention_slots(unet: torch.nn.Module, targets: Sequence[str]) -> list[tuple[str, str, int, int]]:
    """(processor key, projection, in features, out features) for every attention layer and target."""
    slots = []
    for key in unet.attn_processors:
        attn = unet.get_submodule(key.removesuffix(".processor"))
        for target in targets:
            linear = getattr(attn, target)
            slots.append((key, target, linear.in_features, linear.out_features))
    return slots


@dataclass
class WordVocabulary:
    """Whole-word CLIP tokens ("dog</w>" → "dog", alphabetic ASCII, ≥ 2 letters) and their rows."""

    ids: torch.Tensor  # (V,)
    words: list[str]
    unit_rows: torch.Tensor  # (V, d) L2-normalised fp32 embeddings
    negatives: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # fixed random indices


_VOCABULARIES: dict[tuple, WordVocabulary] = {}
RANDOM_NEGATIVES = 64


def word_vocabulary(backbone: Backbone) -> WordVocabulary:
    key = (backbone.spec, str(backbone.device))
    if key in _VOCABULARIES:
        return _VOCABULARIES[key]
    pairs = sorted(
        (token_id, token[:-4])
        for token, token_id in backbone.tokenizer.get_vocab().items()
        if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalpha() and len(token) >= 6
    )
    ids = torch.tensor([p[0] for p in pairs])
    weight = backbone.text_encoder.get_input_embeddings().weight
    rows = F.normalize(weight[ids.to(weight.device)].detach().float(), dim=-1)
    generator = torch.Generator().manual_seed(0)
    negatives = torch.randperm(len(pairs), generator=generator)[:RANDOM_NEGATIVES]
    vocabulary = WordVocabulary(ids, [p[1] for p in pairs], rows, negatives.to(rows.device))
    _VOCABULARIES[key] = vocabulary
    return vocabulary


def nearest_word(vocabulary: WordVocabulary, word: torch.Tensor) -> tuple[int, str]:
    """(token id, text) of the whole-word token nearest to ``word`` (d,) by cosine."""
    cos = vocabulary.unit_rows @ F.normalize(word.detach().float().to(vocabulary.unit_rows.device), dim=-1)
    index = int(cos.argmax())
    return int(vocabulary.ids[index]), vocabulary.words[index]


def contrastive_loss(vocabulary: WordVocabulary, words: torch.Tensor, neighbours: int, temperature: float) -> torch.Tensor:
    """InfoNCE toward each embedding's ``neighbours`` nearest whole-word tokens (positives), against
    the other concepts' neighbours in the batch plus a fixed random set of vocabulary tokens
    (negatives; with one concept per batch, as in tuning, the random set alone)."""
    cos = F.normalize(words.float(), dim=-1) @ vocabulary.unit_rows.T  # (B, V)
    logits = cos / temperature
    positives = cos.detach().topk(neighbours, dim=1).indices  # (B, K)
    batch, size = cos.shape
    own = torch.zeros(batch, size, dtype=torch.bool, device=cos.device)
    own.scatter_(1, positives, True)
    negative = torch.zeros(size, dtype=torch.bool, device=cos.device)
    negative[vocabulary.negatives] = True
    negative = negative.unsqueeze(0) | own.any(dim=0, keepdim=True)  # every concept's neighbours
    negative = negative & ~own
    lse_negative = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)  # (B,1)
    positive_logits = logits.gather(1, positives)  # (B, K)
    return (torch.logaddexp(positive_logits, lse_negative) - positive_logits).mean()


def l2_loss(delta: torch.Tensor) -> torch.Tensor:
    """E4T's penalty: the squared norm of the predicted offset Δ (mean over the batch)."""
    return delta.float().pow(2).sum(dim=-1).mean()


# ----------------------------------------------------------------------------- the network


@dataclass
class Prediction:
    words: torch.Tensor  # (B, d) word embeddings
    delta: torch.Tensor  # (B, d) the offsets Δ (words = init + word_scale · Δ)
    cores: torch.Tensor  # (B, slots, r, r)


class EncoderNet(torch.nn.Module):
    """Trunk + word head + hypernetwork head + LoRA bases (every tensor here is trained)."""

    def __init__(self, config: EncoderConfig, clip_dim: int, unet_dim: int, init_embedding: torch.Tensor,
                 slots: list[tuple[str, str, int, int]]):
        super().__init__()
        self.config = config
        self.slots = [(key, target) for key, target, _, _ in slots]
        hidden, rank = config.hidden, config.lora_rank
        generator = torch.Generator().manual_seed(config.seed)
        self.clip_proj = torch.nn.Linear(clip_dim, hidden)
        self.unet_proj = torch.nn.Linear(unet_dim, hidden)
        self.trunk = torch.nn.Sequential(
            torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden)
        )
        self.word_head = torch.nn.Linear(hidden, init_embedding.shape[-1])
        self.hyper_head = torch.nn.Linear(hidden, len(slots) * rank * rank)
        # LoRA convention: A random, B zero, so every offset starts at 0; heads start at 0 (Δ = 0,
        # M = I) so an untrained encoder is the frozen model with the init word.
        self.lora_down = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(rank, n_in, generator=generator) / n_in**0.5) for _, _, n_in, _ in slots
        )
        self.lora_up = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(n_out, rank)) for _, _, _, n_out in slots)
        self.register_buffer("init_embedding", init_embedding.detach().float().clone())
        for module in (self.clip_proj, self.unet_proj, *self.trunk):
            if isinstance(module, torch.nn.Linear):
                bound = 1.0 / module.in_features**0.5
                torch.nn.init.uniform_(module.weight, -bound, bound, generator=generator)
                torch.nn.init.zeros_(module.bias)
        for head in (self.word_head, self.hyper_head):
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)

    def forward(self, clip: torch.Tensor, unet: torch.Tensor) -> Prediction:
        h = self.trunk(self.clip_proj(clip) + self.unet_proj(unet))
        delta = self.word_head(h)
        rank = self.config.lora_rank
        eye = torch.eye(rank, device=h.device, dtype=h.dtype)
        cores = eye + self.hyper_head(h).view(h.shape[0], len(self.slots), rank, rank)
        return Prediction(self.init_embedding + self.config.word_scale * delta, delta, cores)

    def offsets(self, cores: torch.Tensor) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per-sample offsets {layer: {target: (down (B,r,in) = M·A, up (out,r) = B)}} from cores
        (B, slots, r, r); a cores tensor of (slots, r, r) gives one (r,in) down for every sample."""
        out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for index, (layer, target) in enumerate(self.slots):
            core = cores[..., index, :, :]
            out.setdefault(layer, {})[target] = (core @ self.lora_down[index], self.lora_up[index])
        return out


@dataclass
class EncoderParts:
    """The frozen pieces around an ``EncoderNet``: backbone, CLIP tower, vocabulary, null text."""

    backbone: Backbone
    image_encoder: torch.nn.Module
    vocabulary: WordVocabulary
    null_context: torch.Tensor  # (1, 77, d) E("")

    def predict(self, net: EncoderNet, pixels: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                clip: torch.Tensor | None = None) -> Prediction:
        """The encoder's prediction for images ``pixels`` whose noisy latents at ``timesteps`` are ``noisy``."""
        if clip is None:
            clip = clip_features(self.image_encoder, pixels)
        context = self.null_context.expand(noisy.shape[0], -1, -1)
        features = unet_features(self.backbone.unet, noisy, timesteps, context)
        device = next(net.parameters()).device
        return net(clip.to(device), features.to(device))


def build_parts(backbone: Backbone, config: EncoderConfig) -> EncoderParts:
    from methods.diffusion import encode_text

    image_encoder = load_image_encoder(config.image_encoder, backbone.device, backbone.dtype)
    with torch.no_grad():
        null = encode_text(backbone.text_encoder, backbone.tokenizer, [""], backbone.device)
    return EncoderParts(backbone, image_encoder, word_vocabulary(backbone), null)


def init_embedding(backbone: Backbone, word: str) -> torch.Tensor:
    ids = backbone.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"init word {word!r} tokenizes to nothing; choose a word")
    weight = backbone.text_encoder.get_input_embeddings().weight
    return weight[torch.tensor(ids, device=weight.device)].float().mean(dim=0).cpu()


def build_net(parts: EncoderParts, config: EncoderConfig) -> EncoderNet:
    """A freshly initialised network for ``config`` on the backbone's device (fp32)."""
    backbone = parts.backbone
    image_size = parts.image_encoder.config.image_size
    probe = torch.zeros(1, 3, image_size, image_size, device=backbone.device)
    clip_dim = clip_features(parts.image_encoder, probe).shape[1]
    channels = backbone.unet.config.block_out_channels
    unet_dim = sum(channels) + (channels[-1] if backbone.unet.mid_block is not None else 0)
    net = EncoderNet(config, clip_dim, unet_dim, init_embedding(backbone, config.init_word),
                     attention_slots(backbone.unet, config.targets))
    return net.to(backbone.device)


# ----------------------------------------------------------------------------- checkpoint file


def checkpoint_bytes(net: EncoderNet, pretraining: dict) -> bytes:
    from safetensors.torch import save

    tensors = {name: value.detach().float().cpu().contiguous() for name, value in net.state_dict().items()}
    metadata = {"format": "pt", "subjectbench": json.dumps({"format": FORMAT, "config": net.config.to_dict(), "pretraining": pretraining})}
    return save(tensors, metadata=metadata)


def save_checkpoint(path: Path, net: EncoderNet, pretraining: dict) -> None:
    atomic_write_bytes(Path(path), checkpoint_bytes(net, pretraining))


def read_metadata(path: str | Path) -> dict:
    """{"format", "config", "pretraining"} of an encoder checkpoint; a clear error otherwise."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EncoderCheckpointError(f"tuning encoder checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        record = json.loads(metadata["subjectbench"])
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same fix
        raise EncoderCheckpointError(
            f"{path} is not a tuning encoder checkpoint ({type(error).__name__}: {error}); make one with "
            f"`{pretrain_command('BACKBONE', str(path))}`"
        ) from None
    if record.get("format") != FORMAT:
        raise EncoderCheckpointError(f"{path}: format {record.get('format')!r}, expected {FORMAT!r}")
    return record


def check_backbone(record: dict, spec: BackboneSpec, path: str | Path) -> None:
    config = record["config"]
    if config["backbone_fingerprint"] != spec.fingerprint():
        raise EncoderCheckpointError(
            f"tuning encoder {path} was pre-trained for backbone {config['backbone']!r}, but this run uses "
            f"{spec.name!r}; make one for it with `{pretrain_command(spec.name, str(path))}`"
        )


def load_net(path: str | Path, parts: EncoderParts) -> EncoderNet:
    from safetensors.torch import load_file

    record = read_metadata(path)
    check_backbone(record, parts.backbone.spec, path)
    net = build_net(parts, EncoderConfig.from_dict(record["config"]))
    net.load_state_dict(load_file(str(path), device=str(parts.backbone.device)))
    return net
