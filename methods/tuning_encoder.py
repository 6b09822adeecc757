"""``tuning_encoder``: domain-agnostic tuning-encoder (reconstructed) — Arar et al., SIGGRAPH Asia 2023
(arXiv 2307.06925), on E4T (Gal et al. 2023, arXiv 2302.12228).

**Neither paper has official code.** This is a reconstruction from the papers' descriptions (the
notes in ``../shared/METHODS.md``); reports label it "tuning_encoder (reconstructed)". Where the
papers are silent the value is ours, with the reason, in the table below. The network, losses and
checkpoint file live in ``methods/tuning_encoder_net.py``; one-time pre-training in
``methods/tuning_encoder_pretrain.py`` (command ``subjectbench pretrain tuning-encoder``).

| algorithm step | where in the code | value | source |
|---|---|---|---|
| encoder input: CLIP image features of the subject image | ``tuning_encoder_net.clip_features`` | CLS token of every second layer of a frozen CLIP vision tower (OpenAI ViT-L/14 for real backbones; random-init towers for ``tiny``/``sd15-random``) | E4T re-implementation (every second layer); the tower ours (E4T: OpenCLIP ViT-H/14, not in SD 1.x's cache) |
| encoder input: UNet features of the current noisy latent | ``tuning_encoder_net.unet_features`` | frozen UNet down blocks + mid block on z_t at t (null-text conditioning), mean-pooled | E4T re-implementation (mean-pooled down/mid); frozen and null text ours |
| (a) word embedding | ``EncoderNet.forward`` | v = e(init word) + 0.1 · Δ, ``init_word="object"``, heads zero-initialised | E4T (class word + 0.1 · output); domain-agnostic, so a generic init word instead of a class word (ours) |
| (b) LoRA offsets for the attention projections via a hypernetwork | ``EncoderNet.offsets`` → ``attention.AttentionAdapter`` | ΔW = B · M(h) · A on to_q/to_k/to_v of every attention layer; A, B learned bases, M(h) ∈ R^{r×r} predicted (I + head(h)); rank 4 (``--lora-rank``) | paper (hypernetwork LoRA); q/k/v from E4T; the B·M·A factorisation, layers and rank ours (**unknown** in the paper) |
| contrastive regularisation | ``tuning_encoder_net.contrastive_loss`` | InfoNCE: positives the K=5 nearest whole-word CLIP tokens (cosine), negatives the other concepts' neighbours in the batch + 64 fixed random tokens, τ=0.07, weight 1e-2 | paper (pull to nearest tokens, away from other concepts'); K, τ, weight, random negatives ours (**unknown**) |
| switch to E4T's L2 | ``reg=l2`` → ``tuning_encoder_net.l2_loss`` | weight · ‖Δ‖² | E4T (L2 on the offset); weight ours |
| dual-path attention | ``generate`` → ``attention_control(..., adapter=AttentionAdapter(alpha))`` | every attention layer runs (soft word + offsets) and (frozen weights + nearest hard token); output α·soft + (1−α)·hard; ``alpha=0.5``, ``dual_path=true`` | paper; α **unknown** (ours: an even blend); applied at sampling only (ours), so both are generation-only knobs |
| nearest hard token | ``tuning_encoder_net.nearest_word`` | whole-word ASCII tokens (≥ 2 letters) of the CLIP vocabulary, highest cosine to v | paper (nearest token); the whole-word restriction ours, so the hard prompt is a real word |
| pre-training | ``tuning_encoder_pretrain.pretrain`` | any image folder / ``datasets`` set; batch 16, lr 1.6e-5 on SD (tiny: 60 steps, batch 2, lr 1e-3), AdamW (torch defaults, weight decay 1e-2), Textual Inversion's 27 templates ("a photo of a S*" …), horizontal flips p = 0.5, same regulariser (``--reg``) | E4T re-implementation (batch 16, lr 1.6e-5); data and steps **unknown** (paper: broad domains) |
| inference-time tuning ≤ 12 steps | ``prepare`` → ``training.train_loop`` | ``tuning_steps=12``, all encoder tensors train (CLIP tower, UNet, text encoder frozen), AdamW lr 1e-4 no weight decay, batch 1, one subject photo per step (no flips), a random template of the 27, same loss + regulariser; the contrastive negatives are then the fixed random tokens alone (one concept per batch) | paper (≤ 12 steps); lr, batch ours (**unknown**) |
| stored per-subject prediction | ``_predict_state`` | the encoder's outputs averaged over the subject's photos × 10 timesteps (evenly spaced, fixed noise): one word + one set of offsets per subject | ours: E4T re-predicts at every sampling step from the current latent; a fixed state keeps generation one pipeline call and the state a plain word + LoRA file |

Prompts: like Textual Inversion's ``prompt_style=token``, the predicted word stands for the
subject ("a <tuning-encoder-0> in the jungle"); ``token_class`` keeps the class noun.

State: ``state.safetensors`` ({word, down.i, up.i}), ``state.json`` (slots, hard token, tuning
losses, the encoder's sha256 and pre-training record). The encoder file's sha256 enters every
key, and its pre-training record (steps, seconds, images) reaches the report's cost table as
one-time cost.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from safetensors.torch import load_file

from data.images import load_image, to_tensor
from data.protocol import Prompt, derive_seed
from data.subjects import Subject
from methods.attention import AttentionAdapter, AttentionController, attention_control
from methods.backbones import Backbone, _file_sha256, load_backbone
from methods.base import Method, ParamsError, SamplerConfig, State, param
from methods.diffusion import (
    cycle_indices,
    encode_text,
    make_noise_scheduler,
    subject_latents,
    working_copy,
)
from methods.sampling import build_pipeline, generate_images
from methods.textual_inversion import IMAGENET_TEMPLATES_SMALL, PlaceholderEmbedding
from methods.training import TrainBatch, TrainingParams, save_tensors, train_loop
from methods.tuning_encoder_net import (
    MAX_SLOTS,
    SLOT_PREFIX,
    EncoderCheckpointError,
    EncoderNet,
    EncoderParts,
    build_parts,
    check_backbone,
    contrastive_loss,
    l2_loss,
    load_net,
    nearest_word,
    pretrain_command,
    read_metadata,
)

PREDICTION_TIMESTEPS = 10


def slot_token(index: int) -> str:
    return f"{SLOT_PREFIX}{index}>"


def missing_encoder_message(backbone: str, given: str = "") -> str:
    """Names the command that makes the missing encoder (for ``given``, or a default file name)."""
    if given:
        return (
            f"tuning encoder checkpoint {given} does not exist; make it with "
            f"`{pretrain_command(backbone, given)}` (pre-training is one-time; the tiny one is about a minute on a CPU)"
        )
    out = f"tuning_encoder_{backbone}.safetensors"
    return (
        f"tuning_encoder needs a pre-trained encoder (encoder=CKPT); make one with `{pretrain_command(backbone, out)}` "
        f"and add methods.tuning_encoder.encoder={out}"
    )


@dataclass(frozen=True)
class TuningEncoderParams:
    encoder: str = param("", source="ours: made by `subjectbench pretrain tuning-encoder`", doc="path of the pre-trained encoder checkpoint (safetensors)")
    tuning_steps: int = param(12, source="paper", doc="inference-time tuning steps per subject (<= 12 in the paper); 0 = the encoder's prediction alone")
    tuning_lr: float = param(1e-4, source="ours: unknown in the paper", doc="AdamW learning rate of the tuning steps")
    reg: Literal["contrastive", "l2"] = param("contrastive", source="paper", doc="contrastive: toward the nearest CLIP tokens; l2: E4T's penalty on the offset")
    reg_weight: float = param(1e-2, source="ours: unknown in the paper")
    neighbours: int = param(5, source="ours: unknown in the paper", doc="nearest whole-word tokens pulled toward (contrastive)")
    temperature: float = param(0.07, source="ours: CLIP's initial temperature", doc="contrastive temperature")
    lora_rank: int = param(0, source="ours: fixed at pre-training (--lora-rank)", doc="0 = the encoder's rank; another value must equal it")
    dual_path: bool = param(True, source="paper", doc="blend (soft word + offsets) with (frozen model + nearest hard token)", generation=True)
    alpha: float = param(0.5, source="ours: unknown in the paper", doc="weight of the soft path in the dual-path blend", generation=True)
    prompt_style: Literal["token", "token_class"] = param("token", source="paper", doc="token: the word stands for the subject; token_class keeps the class noun")

    def __post_init__(self) -> None:
        if self.tuning_steps < 0:
            raise ParamsError(f"tuning_steps must be >= 0 (0 = no tuning), got {self.tuning_steps}")
        if not self.tuning_lr > 0:
            raise ParamsError(f"tuning_lr must be > 0, got {self.tuning_lr}")
        if self.reg_weight < 0:
            raise ParamsError(f"reg_weight must be >= 0, got {self.reg_weight}")
        if self.neighbours < 1 or not self.temperature > 0:
            raise ParamsError(f"neighbours must be >= 1 and temperature > 0, got {self.neighbours}, {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ParamsError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.lora_rank < 0:
            raise ParamsError(f"lora_rank must be >= 0 (0 = the encoder's), got {self.lora_rank}")
        # A missing encoder file is reported while the run is planned (``encoder_record``), where
        # the backbone is known, so the error can give the exact pre-training command.


class SlotText:
    """A text-encoder copy whose placeholder words ``<tuning-encoder-i>`` take per-sample vectors
    (``textual_inversion.PlaceholderEmbedding``): sample i of a batch writes slot i."""

    def __init__(self, backbone: Backbone):
        self.device = backbone.device
        self.tokenizer = copy.deepcopy(backbone.tokenizer)
        self.tokenizer.add_tokens([slot_token(i) for i in range(MAX_SLOTS)])
        self.text_encoder = working_copy(backbone.text_encoder)
        base = self.text_encoder.get_input_embeddings()
        self.embedding = PlaceholderEmbedding(base, len(backbone.tokenizer))
        self.text_encoder.set_input_embeddings(self.embedding)

    def encode(self, prompts: Sequence[str], words: torch.Tensor) -> torch.Tensor:
        """E(prompts) with slot i = ``words[i]`` (a (B, d) tensor; gradients flow into it)."""
        self.embedding.set_vectors(words)
        try:
            return encode_text(self.text_encoder, self.tokenizer, prompts, self.device)
        finally:
            self.embedding.set_vectors(None)


def regularizer(parts: EncoderParts, prediction, reg: str, neighbours: int, temperature: float) -> torch.Tensor:
    if reg == "l2":
        return l2_loss(prediction.delta)
    return contrastive_loss(parts.vocabulary, prediction.words, neighbours, temperature)


class TuningEncoder(Method):
    name = "tuning_encoder"
    version = "1"
    Params = TuningEncoderParams
    default_label = "tuning_encoder (reconstructed)"
    description = (
        "Domain-agnostic tuning-encoder (reconstructed; Arar et al. 2023, on E4T): a pre-trained encoder predicts a "
        "word and LoRA offsets, <= 12 tuning steps per subject, contrastive regularisation, dual-path attention"
    )

    def __init__(self, params: TuningEncoderParams, context):
        super().__init__(params, context)
        self._text: SlotText | None = None

    # ------------------------------------------------------------------ keys

    def encoder_record(self) -> dict:
        """The encoder's metadata, checked against the run's backbone; the missing-file error
        names the command that makes one (raised while planning, before any unit runs)."""
        path = self.params.encoder
        if not path or not Path(path).expanduser().is_file():
            raise EncoderCheckpointError(missing_encoder_message(self.context.backbone.name, path))
        record = read_metadata(Path(path).expanduser())
        check_backbone(record, self.context.backbone, path)
        rank = record["config"]["lora_rank"]
        if self.params.lora_rank and self.params.lora_rank != rank:
            raise EncoderCheckpointError(
                f"lora_rank={self.params.lora_rank}, but encoder {path} was pre-trained with rank {rank}; set "
                f"lora_rank: 0 (or {rank}), or pre-train another with --lora-rank {self.params.lora_rank}"
            )
        return record

    def _identity(self, name: str, version: str, params: dict) -> dict:
        fingerprint = super()._identity(name, version, params)
        if name == self.name:  # the encoder's bytes change every output; its record is the one-time cost
            record = self.encoder_record()
            fingerprint["pretraining"] = {
                "sha256": _file_sha256(Path(self.params.encoder).expanduser()),
                "config": record["config"],
                **{k: record["pretraining"].get(k) for k in ("steps", "seconds", "images", "device")},
            }
        return fingerprint

    def checkpoints(self) -> Sequence[str]:
        return ["final"]

    def render_prompt(self, prompt: Prompt, subject: Subject) -> str:
        token_only = self.params.prompt_style == "token" and "{0}" in prompt.template
        return prompt.render(slot_token(0), "" if token_only else subject.class_noun)

    # ------------------------------------------------------------------ shared modules

    def _backbone(self) -> Backbone:
        return load_backbone(self.context.backbone, self.context.device, self.context.torch_dtype)

    def _slot_text(self, backbone: Backbone) -> SlotText:
        if self._text is None:
            self._text = SlotText(backbone)
        return self._text

    def _parts_and_net(self, backbone: Backbone) -> tuple[EncoderParts, EncoderNet]:
        record = self.encoder_record()
        from methods.tuning_encoder_net import EncoderConfig

        parts = build_parts(backbone, EncoderConfig.from_dict(record["config"]))
        return parts, load_net(Path(self.params.encoder).expanduser(), parts)

    # ------------------------------------------------------------------ training

    def prepare(self, subject: Subject, workdir: Path, seed: int) -> None:
        p = self.params
        if not subject.images:
            raise ValueError(f"subject {subject.id!r} has no images to encode")
        backbone = self._backbone()
        parts, net = self._parts_and_net(backbone)
        text = self._slot_text(backbone)
        resolution = self.context.resolution
        pixels = to_tensor([load_image(path, resolution) for path in subject.images]) * 2.0 - 1.0
        from methods.tuning_encoder_net import clip_features

        clip = clip_features(parts.image_encoder, pixels)
        latents = subject_latents(backbone, subject, resolution, seed=seed)
        scheduler = make_noise_scheduler(backbone)
        losses, summary = [], None
        if p.tuning_steps > 0:
            result = self._tune(backbone, parts, net, text, scheduler, clip, latents, seed)
            losses, summary = result.losses, result.summary()
        word, offsets = self._predict_state(parts, net, scheduler, clip, latents, seed)
        hard_id, hard_word = nearest_word(parts.vocabulary, word)
        tensors = {"word": word.detach().float().cpu().contiguous()}
        for index, (layer, target) in enumerate(net.slots):
            down, up = offsets[layer][target]
            tensors[f"down.{index}"] = down.detach().float().cpu().contiguous()
            tensors[f"up.{index}"] = up.detach().float().cpu().contiguous()
        save_tensors(tensors, workdir / "state.safetensors", metadata={"format": "pt"})
        state = {
            "method": self.name,
            "version": self.version,
            "subject": subject.id,
            "seed": seed,
            "slots": [list(slot) for slot in net.slots],
            "hard_token_id": hard_id,
            "hard_token": hard_word,
            "tuning_steps": p.tuning_steps,
            "tuning": summary,
            "losses": losses,
            "encoder": str(p.encoder),
        }
        (workdir / "state.json").write_text(json.dumps(state, indent=1))

    def _tune(self, backbone, parts, net, text, scheduler, clip, latents, seed: int):
        """``tuning_steps`` optimisation steps of every encoder tensor on the subject's photos,
        through the shared trainer (the word and offsets are re-predicted from each noisy latent)."""
        p = self.params
        generator = torch.Generator().manual_seed(seed)
        draw = cycle_indices(latents.shape[0], generator)
        adapter = AttentionAdapter()
        current: dict = {}
        device = backbone.device

        def next_batch(step: int) -> TrainBatch:
            index = draw()
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
            noise = torch.randn(latents[index : index + 1].shape, generator=generator)
            template = IMAGENET_TEMPLATES_SMALL[int(torch.randint(len(IMAGENET_TEMPLATES_SMALL), (1,), generator=generator))]
            sample = latents[index : index + 1]
            noisy = scheduler.add_noise(sample, noise.to(sample.device), timesteps.to(sample.device))
            adapter.offsets = {}  # the encoder reads the frozen UNet
            prediction = parts.predict(net, None, noisy, timesteps.to(device), clip=clip[index : index + 1])
            adapter.offsets = net.offsets(prediction.cores)
            current["prediction"] = prediction
            return TrainBatch(sample, [template.format(slot_token(0))], timesteps=timesteps, noise=noise)

        training = TrainingParams(steps=p.tuning_steps, learning_rate=p.tuning_lr, batch_size=1, adam_weight_decay=0.0)
        with attention_control(backbone.unet, AttentionController(), "all", adapter=adapter):
            return train_loop(
                unet=backbone.unet,
                noise_scheduler=scheduler,
                parameters=[t for t in net.parameters() if t.requires_grad],
                params=training,
                learning_rate=p.tuning_lr,
                next_batch=next_batch,
                encode_prompts=lambda prompts: text.encode(prompts, current["prediction"].words),
                generator=generator,
                device=device,
                dtype=backbone.dtype,
                extra_loss=lambda: p.reg_weight * regularizer(parts, current["prediction"], p.reg, p.neighbours, p.temperature),
            )

    def _predict_state(self, parts, net, scheduler, clip, latents, seed: int):
        """One word and one set of offsets: the encoder's outputs averaged over the subject's
        photos × ``PREDICTION_TIMESTEPS`` evenly spaced timesteps (fixed noise per photo/timestep)."""
        total = scheduler.config.num_train_timesteps
        steps = torch.linspace(0, total - 1, PREDICTION_TIMESTEPS).round().long()
        words, cores = [], []
        with torch.no_grad():
            for index in range(latents.shape[0]):
                sample = latents[index : index + 1]
                for t in steps.tolist():
                    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(derive_seed("tuning-encoder", seed, index, t)))
                    timestep = torch.tensor([t])
                    noisy = scheduler.add_noise(sample, noise.to(sample.device), timestep.to(sample.device))
                    prediction = parts.predict(net, None, noisy, timestep.to(sample.device), clip=clip[index : index + 1])
                    words.append(prediction.words[0])
                    cores.append(prediction.cores[0])
        word = torch.stack(words).mean(dim=0)
        return word, net.offsets(torch.stack(cores).mean(dim=0))

    def load_state(self, workdir: Path, subject: Subject) -> State:
        state = json.loads((Path(workdir) / "state.json").read_text())
        tensors = load_file(str(Path(workdir) / "state.safetensors"))
        offsets: dict = {}
        for index, (layer, target) in enumerate(state["slots"]):
            offsets.setdefault(layer, {})[target] = (tensors[f"down.{index}"], tensors[f"up.{index}"])
        return State(Path(workdir), subject, {**state, "word": tensors["word"], "offsets": offsets})

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        state: State,
        checkpoint: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
    ) -> list[Image.Image]:
        if checkpoint != "final":
            raise ValueError(f"unknown checkpoint {checkpoint!r}; valid: final")
        return self.sample(state, prompts, seeds, sampler)

    def sample(self, state: State, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig, **pipeline_kwargs):
        """The images (or, with ``output_type="latent"``, the latents) of ``prompts``: soft word +
        offsets, blended with the frozen model and the hard token when ``dual_path``."""
        backbone = self._backbone()
        text = self._slot_text(backbone)
        device, dtype = backbone.device, backbone.dtype
        offsets = {
            layer: {target: (down.to(device, dtype), up.to(device, dtype)) for target, (down, up) in targets.items()}
            for layer, targets in state.data["offsets"].items()
        }
        prompts = list(prompts)
        word = state.data["word"].to(device, dtype).unsqueeze(0)
        pipeline = build_pipeline(backbone, sampler, text_encoder=text.text_encoder, tokenizer=text.tokenizer)
        alpha = self.params.alpha if self.params.dual_path else None
        kwargs = dict(pipeline_kwargs)
        with torch.no_grad():
            if alpha is not None:
                weight = backbone.text_encoder.get_input_embeddings().weight
                hard = weight[state.data["hard_token_id"]].unsqueeze(0).to(dtype)
                soft_embeds = text.encode(prompts, word.expand(len(prompts), -1))
                hard_embeds = text.encode(prompts, hard.expand(len(prompts), -1))
                null = encode_text(backbone.text_encoder, backbone.tokenizer, [""] * len(prompts), device)
                kwargs["prompt_embeds"] = torch.cat([soft_embeds, hard_embeds], dim=1)
                kwargs["negative_prompt_embeds"] = torch.cat([null, null], dim=1)
        # Slot 0 of every prompt holds the subject's word (single-path sampling encodes in the pipeline).
        text.embedding.set_vectors(word)
        try:
            with attention_control(backbone.unet, AttentionController(), "all", adapter=AttentionAdapter(offsets, alpha)):
                return generate_images(pipeline, prompts, seeds, sampler, self.context.resolution, **kwargs)
        finally:
            text.embedding.set_vectors(None)

    def release(self) -> None:
        self._text = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
