"""``textual_inversion``: Textual Inversion (Gal et al., ICLR 2023), one new learned word per subject.

Faithful to the paper and its official code (rinongal/textual_inversion, SD config
``v1-finetune.yaml``) unless a field says otherwise:

- ``num_vectors`` new tokens ``<tok>``, ``<tok>_1``, ... (diffusers' multi-vector naming), each
  initialised from the embedding of ``initializer`` (default: the class noun). The official code
  refuses initializers of several tokens; we take the **mean** of their embeddings (our choice,
  so that classes like "stuffed animal" work), recorded in the state.
- Only the new vectors learn. They are a separate fp32 tensor spliced into the token embeddings
  of a private text-encoder copy, so the rows of every other token are not parameters at all and
  stay bit-identical (the tests check it). AdamW's weight decay therefore acts on the new vectors
  only, as in the official code (diffusers decays the whole matrix and restores the old rows).
- Learning rate: official base lr 5e-3 at batch 2, scaled by batch x GPUs (``--scale_lr`` is on by
  default in its ``main.py``), i.e. **1e-2** on one GPU. We take ``learning_rate=5e-3``,
  ``batch_size=2``, ``scale_lr=true`` -> effective lr = learning_rate x batch_size = 1e-2
  (single process). The paper's LDM runs used 2 GPUs x batch 4 -> 0.04. Constant schedule.
- 5000 steps (paper; the official SD config stops at 6100). AdamW with torch defaults
  (betas 0.9/0.999, eps 1e-8, weight decay 1e-2), no gradient clipping.
- Prompts: the official ``imagenet_templates_small`` (81 entries, duplicates kept so the sampling
  frequencies match), or the 27 of diffusers' example (``templates: diffusers``); images flipped
  horizontally with p=0.5 (official ``flip_p``).

| algorithm step | where in the code | value | source |
|---|---|---|---|
| a new word S* (``num_vectors`` tokens) in the tokenizer | ``placeholder_tokens``, ``_tokenizer`` | 1 vector, ``<{identifier}-{subject id}>`` | paper (one word); the name ours; ``<tok>_1`` naming diffusers' example |
| v₀ = embedding of the initializer | ``initial_vectors`` | the class noun; several tokens: their mean | official code (one token); the mean ours |
| only v learns, every other row frozen | ``PlaceholderEmbedding``, ``_text_encoder_copy`` | fp32 vectors spliced into a private text-encoder copy | official code (decay on v only) |
| training images → latents (and mirrored) | ``training_latents`` (``methods.diffusion.subject_latents``) | VAE latent mean (``vae_latents=mean``), × the VAE scale | ours: deterministic (the official code samples) |
| a batch: shuffled images, flips, a random template around S* | ``batch_source`` | ``batch_size=2``, ``flip_p=0.5``, ``imagenet_templates_small`` (81) | official code (``v1-finetune.yaml``, ``PersonalizedBase``) |
| L = ‖ε − ε_θ(z_t, t, c_θ(y))‖², t ~ U{0..999}, UNet and text encoder frozen | ``_train`` → ``methods.training.train_loop`` → ``diffusion_loss`` | the backbone's DDPM noise schedule, ε-prediction | paper (eq. 2) |
| optimiser | ``train_loop`` | AdamW (0.9, 0.999, 1e-8, decay 1e-2), lr 5e-3 × batch 2 = 1e-2 constant, no clipping | official code (``main.py`` ``scale_lr``; torch AdamW defaults) |
| length | ``TextualInversionParams.steps`` | 5000 | paper (the SD config stops at 6100) |
| sampling prompt | ``render_prompt`` | "a S* in the jungle" (``prompt_style=token``) | paper ("a photo of S*") |
| sampling | ``generate`` → ``methods.sampling`` | the run's sampler (protocol: DDIM 50, guidance 7.5) with the learned vectors | the DreamBooth protocol |
| several subjects per pass | ``_train`` (``prepare_many``) | up to ``training.subjects_per_batch`` = 8 | ours, for speed (below) |
| compiled frozen UNet | ``_train`` | ``training.compile=auto``: on for CUDA | ours, for speed: kernels change, not the algorithm (tested within fp32 rounding on tiny) |

Multi-subject passes (ours, for speed; the algorithm is unchanged): the UNet and text encoder
are frozen, so ``prepare_many`` trains several subjects' vectors in one batched pass (the harness
groups up to ``training.subjects_per_batch`` subjects with equal training fingerprints). Each
subject keeps its own generator (image order, flips, templates, then noise and timesteps, drawn
in the order the alone path draws them), the loss is the **sum of per-subject means** (weights
1/batch_size, whose backward equals the mean's), Adam/AdamW, weight decay and gradient clipping
act per subject tensor, and each state is written exactly as ``prepare`` writes it. Tolerance
against training alone (tests/test_multi_subject_ti.py): tiny fp32 on CPU, vectors within 1e-5
(measured <= 4e-7 after 10 steps: the batched GEMMs round differently) and images within one
8-bit level; in bf16 on a GPU the rounding of a batched pass is that of bf16 kernels, measured by
``benchmarks/gpu_ti_multi.py``. fp16 trains alone (one gradient scaler would skip every
subject's step when one overflows); subclasses (HiFi Tuner) train alone unless they opt in.

Protocol prompts (``render_prompt``): the learned word stands for the subject itself, as S* does
in the paper ("a photo of S*"), so the DreamBooth phrase "{identifier} {class}" becomes the token
alone: "a <sks-dog> in the jungle" (``prompt_style: token``, default). ``token_class`` keeps the
class noun ("a <sks-dog> dog in the jungle").

State: ``learned_embeds.safetensors`` (final) and ``learned_embeds-step-N.safetensors``, in the
diffusers textual-inversion format ({token: (num_vectors, dim)} fp32), loadable with
``StableDiffusionPipeline.load_textual_inversion(path)``; ``state.json`` holds the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from safetensors.torch import load_file

from data.protocol import Prompt
from data.subjects import Subject
from methods.backbones import Backbone, load_backbone
from methods.base import Method, ParamsError, SamplerConfig, State, param
from methods.diffusion import (
    cycle_indices,
    gradient_checkpointing,
    make_noise_scheduler,
    subject_latents,
    tokenize,
    working_copy,
)
from methods.sampling import build_pipeline, compile_failure, generate_images, maybe_compiled
from methods.training import (
    TrainBatch,
    TrainingParams,
    TrainResult,
    checkpoint_name,
    save_tensors,
    train_loop,
)

# The 27 templates of the official code's ``imagenet_templates_small`` head (the whole list of
# diffusers' example); "{}" is the placeholder.
IMAGENET_TEMPLATES_SMALL = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def _official_templates() -> tuple[str, ...]:
    """The official list: the 27 above, then twice more with "a photo of" read as
    "an illustration of" and "a depiction of" (other templates repeated unchanged)."""
    out = list(IMAGENET_TEMPLATES_SMALL)
    for medium in ("an illustration of", "a depiction of"):
        out += [re.sub(r"^a photo of", medium, t) for t in IMAGENET_TEMPLATES_SMALL]
    return tuple(out)


TEMPLATE_SETS = {"paper": _official_templates(), "diffusers": IMAGENET_TEMPLATES_SMALL}


class PlaceholderError(ParamsError):
    """A placeholder token that cannot be used (already a word of the tokenizer, malformed)."""


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from methods.backbones import build_clip_tokenizer

    return build_clip_tokenizer()


def existing_token(tokenizer, token: str) -> bool:
    """Whether ``token`` already means something to the tokenizer (a vocabulary entry or a word
    that tokenizes to one existing entry), so that adding it would not create a new word."""
    vocabulary = tokenizer.get_vocab()
    if token in vocabulary or f"{token}</w>" in vocabulary:
        return True
    pieces = tokenizer.tokenize(token)
    return len(pieces) == 1 and pieces[0] in vocabulary


def check_placeholder(token: str, tokenizer=None) -> None:
    if not token or re.search(r"\s", token):
        raise PlaceholderError(f"placeholder_token {token!r} must be one non-empty word without spaces")
    if token != token.lower():
        raise PlaceholderError(
            f"placeholder_token {token!r} must be lowercase: the CLIP tokenizer lowercases prompts, "
            f"so it would never match; use {token.lower()!r}"
        )
    if existing_token(tokenizer if tokenizer is not None else _clip_tokenizer(), token):
        raise PlaceholderError(
            f"placeholder_token {token!r} is already in the tokenizer's vocabulary; Textual "
            "Inversion needs a new word, e.g. '<my-subject>'"
        )


@dataclass(frozen=True)
class TextualInversionParams(TrainingParams):
    steps: int = param(5000, source="paper", doc="the official SD config stops at 6100")
    learning_rate: float = param(5e-3, source="official code", doc="base lr, multiplied by batch_size when scale_lr")
    batch_size: int = param(2, source="official code", doc="SD config v1-finetune.yaml")
    scale_lr: bool = param(True, source="official code", doc="main.py: lr x batch x GPUs (one process here)")
    num_vectors: int = param(1, source="paper", doc="one word S*")
    placeholder_token: str = param("", source='ours: "" means <{identifier}-{subject id}>')
    initializer: str = param("", source="official code", doc='"" means the class noun; several tokens: their mean (ours)')
    prompt_style: Literal["token", "token_class"] = param("token", source="paper", doc="token: S* stands for the subject (a photo of S*); token_class keeps the class noun")
    templates: Literal["paper", "diffusers"] = param("paper", source="official code", doc="imagenet_templates_small (81); diffusers: the example's 27")
    flip_p: float = param(0.5, source="official code", doc="PersonalizedBase")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_vectors < 1:
            raise ParamsError(f"num_vectors must be >= 1, got {self.num_vectors}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ParamsError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if self.placeholder_token:
            check_placeholder(self.placeholder_token)

    @property
    def effective_learning_rate(self) -> float:
        return self.learning_rate * self.batch_size if self.scale_lr else self.learning_rate


class PlaceholderEmbedding(torch.nn.Module):
    """Token embeddings with learned rows for ids >= ``first_id`` (the added placeholder tokens).

    ``vectors`` is a buffer, not a parameter, so the text encoder's dtype stays that of its
    frozen weights and no optimizer can see the original rows.
    """

    def __init__(self, base: torch.nn.Embedding, first_id: int):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.register_buffer("vectors", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # read by code that asks for the embedding matrix
        return self.base.weight

    def set_vectors(self, vectors: torch.Tensor | None) -> None:
        self.vectors = vectors

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        added = input_ids >= self.first_id
        embeddings = self.base(torch.where(added, 0, input_ids))
        if self.vectors is None:
            if bool(added.any()):
                raise RuntimeError("a prompt uses a placeholder token but no learned vectors are loaded")
            return embeddings
        # No data-dependent checks here: they would synchronise the GPU on every forward. The
        # tokenizer copy only knows as many added tokens as there are vectors.
        index = (input_ids - self.first_id).clamp(0, self.vectors.shape[0] - 1)
        learned = self.vectors[index].to(embeddings.dtype)
        return torch.where(added.unsqueeze(-1), learned, embeddings)


@dataclass
class _SubjectTraining:
    """One subject's part of a training pass: its tokens, learned vectors and own generator."""

    subject: Subject
    seed: int
    tokens: list[str]
    tokenizer: object
    vectors: torch.Tensor
    init_ids: list[int]
    generator: torch.Generator
    next_batch: Callable[[int], TrainBatch]
    files: dict[str, str] = field(default_factory=dict)


class TextualInversion(Method):
    name = "textual_inversion"
    version = "1"
    Params = TextualInversionParams
    description = "Textual Inversion (Gal et al. 2023): one new token embedding, frozen model"

    samples_compiled = True  # generate() passes context.compile_unet to build_pipeline

    def __init__(self, params: TextualInversionParams, context):
        super().__init__(params, context)
        self._text_encoder: torch.nn.Module | None = None
        self._tokenizers: OrderedDict[tuple[str, ...], object] = OrderedDict()

    # ------------------------------------------------------------------ naming and prompts

    def checkpoints(self) -> Sequence[str]:
        return self.params.checkpoint_names()

    def placeholder(self, subject: Subject) -> str:
        if self.params.placeholder_token:
            return self.params.placeholder_token
        name = re.sub(r"\s+", "-", f"{self.context.identifier}-{subject.id}".lower())
        return f"<{name}>"

    def placeholder_tokens(self, subject: Subject) -> list[str]:
        token = self.placeholder(subject)
        return [token] + [f"{token}_{i}" for i in range(1, self.params.num_vectors)]

    def render_prompt(self, prompt: Prompt, subject: Subject) -> str:
        # The token replaces "{identifier} {class}"; a template without the identifier slot
        # (e.g. the class prompt "a {class}") is not about the subject and keeps its class noun.
        token_only = self.params.prompt_style == "token" and "{0}" in prompt.template
        return prompt.render(self.placeholder(subject), "" if token_only else subject.class_noun)

    # ------------------------------------------------------------------ shared modules

    def _backbone(self) -> Backbone:
        return load_backbone(self.context.backbone, self.context.device, self.context.torch_dtype)

    def _tokenizer(self, backbone: Backbone, tokens: list[str]):
        """A copy of the backbone's tokenizer with ``tokens`` added (cached per token set)."""
        key = tuple(tokens)
        if key in self._tokenizers:
            self._tokenizers.move_to_end(key)
            return self._tokenizers[key]
        for token in tokens:
            check_placeholder(token, backbone.tokenizer)
        tokenizer = copy.deepcopy(backbone.tokenizer)
        first_id = len(backbone.tokenizer)
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(first_id, first_id + len(tokens))):
            raise PlaceholderError(f"placeholder tokens {tokens} did not get new ids (got {ids})")
        self._tokenizers[key] = tokenizer
        while len(self._tokenizers) > 8:
            self._tokenizers.popitem(last=False)
        return tokenizer

    def _text_encoder_copy(self, backbone: Backbone) -> torch.nn.Module:
        if self._text_encoder is None:
            text_encoder = working_copy(backbone.text_encoder)
            base = text_encoder.get_input_embeddings()
            text_encoder.set_input_embeddings(PlaceholderEmbedding(base, len(backbone.tokenizer)))
            self._text_encoder = text_encoder
        return self._text_encoder

    def initial_vectors(self, backbone: Backbone, subject: Subject) -> tuple[torch.Tensor, list[int]]:
        """(num_vectors, dim) fp32 copies of the initializer's embedding (mean over its tokens).

        Read from the shared text encoder, so in a bf16 context the start is the bf16 rounding of
        the embedding (as the frozen encoder itself sees it)."""
        initializer = self.params.initializer or subject.class_noun
        if not initializer or not initializer.strip():
            raise ValueError(
                f"subject {subject.id!r} has no class noun to initialise the token from; give the "
                "subject a class or set textual_inversion.initializer"
            )
        ids = backbone.tokenizer(initializer, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"initializer {initializer!r} tokenizes to nothing; choose a word")
        weight = backbone.text_encoder.get_input_embeddings().weight
        vector = weight[torch.tensor(ids, device=weight.device)].float().mean(dim=0)
        return vector.unsqueeze(0).repeat(self.params.num_vectors, 1).clone(), ids

    # ------------------------------------------------------------------ training

    def training_latents(self, backbone: Backbone, subject: Subject, seed: int) -> list[torch.Tensor]:
        """[latents, mirrored latents] of the subject's images (the mirrored set only if flip_p > 0)."""
        p, resolution = self.params, self.context.resolution
        latents = [subject_latents(backbone, subject, resolution, mode=p.vae_latents, seed=seed)]
        if p.flip_p > 0:
            latents.append(
                subject_latents(backbone, subject, resolution, flip=True, mode=p.vae_latents, seed=seed)
            )
        return latents

    def training_masks(self, subject: Subject) -> list[torch.Tensor] | None:
        """Loss masks parallel to ``training_latents`` ((N,1,h,w) each), or None: Textual
        Inversion has none; mask-guided methods (HiFi Tuner) override this."""
        return None

    def batch_source(
        self,
        subject: Subject,
        latents: list[torch.Tensor],
        generator: torch.Generator,
        subject_text: str,
        masks: list[torch.Tensor] | None = None,
    ) -> Callable[[int], TrainBatch]:
        """The official data pipeline: shuffled images, flips with p = flip_p, a random template
        per sample with ``subject_text`` in its slot; masks follow their images and flips."""
        p = self.params
        draw = cycle_indices(len(subject.images), generator)
        templates = TEMPLATE_SETS[p.templates]

        def next_batch(step: int) -> TrainBatch:
            indices = [draw() for _ in range(p.batch_size)]
            flips = (torch.rand(p.batch_size, generator=generator) < p.flip_p).tolist()
            choices = torch.randint(len(templates), (p.batch_size,), generator=generator).tolist()
            batch_latents = torch.stack([latents[int(f)][i] for i, f in zip(indices, flips)])
            batch_masks = None
            if masks is not None:
                batch_masks = torch.stack([masks[int(f)][i] for i, f in zip(indices, flips)])
            return TrainBatch(
                batch_latents, [templates[c].format(subject_text) for c in choices], mask=batch_masks
            )

        return next_batch

    def _training_setup(self, backbone: Backbone, subject: Subject, seed: int) -> _SubjectTraining:
        """Everything one subject's training draws on, its generator seeded by its own seed."""
        if not subject.images:
            raise ValueError(f"subject {subject.id!r} has no images to learn from")
        tokens = self.placeholder_tokens(subject)
        tokenizer = self._tokenizer(backbone, tokens)
        init, init_ids = self.initial_vectors(backbone, subject)
        latents = self.training_latents(backbone, subject, seed)
        generator = torch.Generator().manual_seed(seed)
        next_batch = self.batch_source(subject, latents, generator, " ".join(tokens), self.training_masks(subject))
        return _SubjectTraining(
            subject, seed, tokens, tokenizer, init.to(backbone.device).requires_grad_(True), init_ids,
            generator, next_batch,
        )

    def _save_checkpoint(self, training: _SubjectTraining, workdir: Path, step: int) -> None:
        name = checkpoint_name(step, self.params.steps)
        filename = "learned_embeds.safetensors" if name == "final" else f"learned_embeds-{name}.safetensors"
        save_embeddings(workdir / filename, training.tokens[0], training.vectors)
        training.files[name] = filename

    def _write_state(self, training: _SubjectTraining, workdir: Path, result: TrainResult) -> None:
        state = {
            "method": self.name,
            "version": self.version,
            "subject": training.subject.id,
            "seed": training.seed,
            "placeholder_token": training.tokens[0],
            "tokens": training.tokens,
            "initializer": self.params.initializer or training.subject.class_noun,
            "initializer_token_ids": training.init_ids,
            "effective_learning_rate": self.params.effective_learning_rate,
            "checkpoints": training.files,
            "training": result.summary(),
            "losses": result.losses,
        }
        (workdir / "state.json").write_text(json.dumps(state, indent=1))

    def _train(self, backbone: Backbone, trainings: list[_SubjectTraining], workdirs: Sequence[Path]) -> TrainResult:
        """One ``train_loop`` over ``trainings`` (one subject, or several in one pass)."""
        p, device = self.params, backbone.device
        text_encoder = self._text_encoder_copy(backbone)
        embedding = text_encoder.get_input_embeddings()
        first_id = len(backbone.tokenizer)
        count = len(trainings)

        def next_batch(step: int) -> TrainBatch:
            if count == 1:
                return trainings[0].next_batch(step)
            # Each subject draws its batch, then its noise and timesteps, from its own generator
            # in the order diffusion_loss draws them alone: position in the pass changes nothing.
            parts = []
            for training in trainings:
                batch = training.next_batch(step)
                noise = torch.randn(batch.latents.shape, generator=training.generator, dtype=torch.float32)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (p.batch_size,), generator=training.generator)
                parts.append((batch, noise, timesteps))
            return TrainBatch(
                torch.cat([batch.latents for batch, _, _ in parts]),
                [prompt for batch, _, _ in parts for prompt in batch.prompts],
                # 1/B per sample: the loss is the sum of per-subject means, so each subject's
                # vectors get exactly the gradient of its own mean (1/B is mean's backward too).
                weights=torch.full((count * p.batch_size,), 1.0 / p.batch_size),
                noise=torch.cat([noise for _, noise, _ in parts]),
                timesteps=torch.cat([timesteps for _, _, timesteps in parts]),
            )

        def encode_prompts(prompts: list[str]) -> torch.Tensor:
            # Every subject's tokenizer gives its placeholders the ids first_id...; subject i's
            # are moved to rows i*num_vectors... of the stacked table, one text-encoder pass.
            ids = []
            for i, training in enumerate(trainings):
                own = tokenize(training.tokenizer, prompts[i * p.batch_size : (i + 1) * p.batch_size])
                ids.append(torch.where(own >= first_id, own + i * p.num_vectors, own))
            embedding.set_vectors(trainings[0].vectors if count == 1 else torch.cat([t.vectors for t in trainings]))
            return text_encoder(torch.cat(ids).to(device), return_dict=False)[0]

        def on_checkpoint(step: int) -> None:
            for training, workdir in zip(trainings, workdirs):
                self._save_checkpoint(training, workdir, step)

        scheduler = make_noise_scheduler(backbone)
        try:
            with gradient_checkpointing(backbone.unet, p.gradient_checkpointing), gradient_checkpointing(
                text_encoder, p.gradient_checkpointing
            ):
                return train_loop(
                    # training.compile (auto: on for CUDA): the frozen UNet's compiled view, same weights
                    unet=maybe_compiled(backbone.unet, self.context.compile_training),
                    noise_scheduler=scheduler,
                    parameters=[t.vectors for t in trainings],
                    params=p,
                    learning_rate=p.effective_learning_rate,
                    next_batch=next_batch,
                    encode_prompts=encode_prompts,
                    generator=trainings[0].generator,
                    device=device,
                    dtype=backbone.dtype,
                    on_checkpoint=on_checkpoint,
                    problems=count,
                    # each subject's checkpoint files, kept by resume points
                    checkpoint_state={str(i): t.files for i, t in enumerate(trainings)},
                )
        finally:
            embedding.set_vectors(None)

    def _train_fresh(
        self, backbone: Backbone, subjects: Sequence[Subject], seeds: Sequence[int], workdirs: Sequence[Path]
    ) -> tuple[list[_SubjectTraining], TrainResult]:
        """Set up and train; if the compiled UNet (``training.compile``) fails to compile, warn
        once and train again from a fresh setup, eagerly (the failure comes at the first UNet
        call, before any step; the redo draws exactly what the first attempt drew)."""
        def setup() -> list[_SubjectTraining]:
            return [self._training_setup(backbone, s, seed) for s, seed in zip(subjects, seeds)]

        trainings = setup()
        try:
            return trainings, self._train(backbone, trainings, workdirs)
        except Exception as error:  # noqa: BLE001 - only compiler failures are absorbed
            if not (self.context.compile_training and compile_failure(error, "training UNet", "training.compile")):
                raise
        trainings = setup()  # compile_failure turned compiling off: this pass runs eagerly
        return trainings, self._train(backbone, trainings, workdirs)

    def prepare(self, subject: Subject, workdir: Path, seed: int) -> None:
        backbone = self._backbone()
        (training,), result = self._train_fresh(backbone, [subject], [seed], [workdir])
        self._write_state(training, workdir, result)

    def prepares_many(self) -> bool:
        # Subclasses change the training (masks, extra losses, step-wise vectors) and must opt in
        # themselves. fp16's gradient scaler skips a step for every subject when one overflows.
        return type(self) is TextualInversion and self.context.dtype != "float16"

    def prepare_many(self, subjects: Sequence[Subject], workdirs: Sequence[Path], seeds: Sequence[int]) -> None:
        """Train several subjects' vectors in one pass of the frozen text encoder and UNet.

        Equal to training each alone (module docstring, "Multi-subject passes"): per-subject
        draws, loss = sum of per-subject means, per-tensor Adam, clipping and weight decay."""
        if not self.prepares_many():
            raise NotImplementedError(f"{self.name} with these settings prepares one subject at a time")
        if not len(subjects) == len(workdirs) == len(seeds):
            raise ValueError("prepare_many: subjects, workdirs and seeds must have one entry each")
        backbone = self._backbone()
        trainings, result = self._train_fresh(backbone, subjects, seeds, workdirs)
        for i, (training, workdir) in enumerate(zip(trainings, workdirs)):
            # Timings are the pass's (the harness's DONE records each subject's share).
            self._write_state(training, workdir, dataclasses.replace(result, losses=[row[i] for row in result.losses]))

    def load_state(self, workdir: Path, subject: Subject) -> State:
        state = json.loads((Path(workdir) / "state.json").read_text())
        vectors = {}
        for name, filename in state["checkpoints"].items():
            vectors[name] = load_file(str(Path(workdir) / filename))[state["placeholder_token"]]
        return State(Path(workdir), subject, {**state, "vectors": vectors})

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        state: State,
        checkpoint: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
    ) -> list[Image.Image]:
        step = self.params.checkpoint_step(checkpoint)
        name = checkpoint_name(step, self.params.steps)
        backbone = self._backbone()
        tokenizer = self._tokenizer(backbone, state.data["tokens"])
        text_encoder = self._text_encoder_copy(backbone)
        embedding = text_encoder.get_input_embeddings()
        embedding.set_vectors(state.data["vectors"][name].to(backbone.device, backbone.dtype))
        try:
            pipeline = build_pipeline(
                backbone, sampler, text_encoder=text_encoder, tokenizer=tokenizer, compile_unet=self.context.compile_unet
            )
            return generate_images(pipeline, prompts, seeds, sampler, self.context.resolution)
        finally:
            embedding.set_vectors(None)

    def release(self) -> None:
        self._text_encoder = None
        self._tokenizers.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def save_embeddings(path: Path, token: str, vectors: torch.Tensor) -> None:
    """The diffusers textual-inversion file: {token: (num_vectors, dim)} in fp32 safetensors."""
    save_tensors({token: vectors.detach().float().cpu().contiguous()}, path, metadata={"format": "pt"})
