"""``custom_diffusion``: Custom Diffusion (Kumari et al., CVPR 2023), cross-attention K/V + a modifier token.

Only the key and value projections of every cross-attention layer (attn2 ``to_k``/``to_v``)
learn, plus the input embedding of a new modifier token ``<new1>``; prompts read
"a <new1> dog in the jungle" (the modifier takes the identifier's place). Trained through the
shared ``methods.training.train_loop`` with diffusers' own ``CustomDiffusionAttnProcessor``
(the SDPA ``CustomDiffusionAttnProcessor2_0``, as the example uses) holding the trainable K/V
copies (so the paper's detail of not training through the BOS token's key/value is diffusers'
code, not ours), and saved in the diffusers example's format.

| step | where in code | value (default) | source |
|---|---|---|---|
| trainable: attn2 K/V, initialised from the base weights | ``_trainable_modules`` | ``freeze_model=crossattn_kv`` | paper; diffusers example default |
| modifier token, its embedding learns | ``modifier_token``, ``initializer`` | ``<new1>``, from ``ktn`` | diffusers example (``--modifier_token "<new1>"``, ``--initializer_token ktn``) |
| initializer of several tokens | ``initial_vector`` | mean of their embeddings | ours: the example refuses them; on the CLIP BPE "ktn" is two tokens (k, tn) |
| only the new row learns (others not parameters at all) | ``PlaceholderEmbedding`` (shared with Textual Inversion) | — | example zeroes the other rows' gradients; its AdamW still decays them (we do not) |
| learning rate | ``learning_rate`` × ``batch_size`` × 2 with prior (``scale_lr``) | 1e-5 × 2 × 2 = 4e-5 | diffusers README (``--learning_rate 1e-5 --scale_lr``, batch 2) and script's ×2 with prior |
| steps, batch | ``steps``, ``batch_size`` | 250, 2 instance (+ 2 class) images | diffusers README; paper: 250–300 steps, batch 2–4 |
| AdamW, clipping, schedule | shared trainer | (0.9, 0.999, 1e-8, wd 1e-2), clip 1.0, constant | diffusers example defaults |
| regularization images | ``class_images``, ``methods.class_prior`` | 200 **generated** "a {class}" images, λ = 1 | paper uses 200 real LAION images retrieved by caption similarity (``--real_prior``); not available offline, so the example's generated-prior path |
| augmentation | ``flip_p`` | horizontal flip p = 0.5, no random rescale/mask | example ``--hflip``; its random-rescale + loss-mask augmentation is not reproduced (as ``--noaug``) |
| sampling | ``methods.sampling`` | protocol sampler | — |

State: per checkpoint a folder ``custom-diffusion-<name>/`` with
``pytorch_custom_diffusion_weights.safetensors`` (written by ``unet.save_attn_procs``, keys
``<layer>.processor.to_{k,v}_custom_diffusion.weight``) and ``<new1>.safetensors`` (the diffusers
textual-inversion format, ``pipe.load_textual_inversion``). diffusers 0.42's
``unet.load_attn_procs`` silently installs nothing for such a file (huggingface/diffusers#9320:
the processors are only set when the private ``_pipeline`` argument is given, and then the
count check fails because safetensors cannot store the attn1 entries), so
``load_custom_diffusion_processors`` builds the same diffusers processors from the file; the
tests check that this equals the in-memory trained model and what diffusers' parser builds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from data.protocol import Prompt
from data.subjects import Subject, cache_root
from methods.backbones import Backbone, load_backbone
from methods.base import Method, ParamsError, SamplerConfig, State
from methods.class_prior import class_prior_images
from methods.diffusion import (
    cycle_indices,
    encode_text,
    gradient_checkpointing,
    image_latents,
    make_noise_scheduler,
    subject_latents,
    working_copy,
)
from methods.sampling import build_pipeline, generate_images, quiet_loading
from methods.textual_inversion import PlaceholderEmbedding, check_placeholder, save_embeddings
from methods.training import TrainBatch, TrainingParams, checkpoint_name, train_loop

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
INSTANCE_PROMPT = Prompt(template="a {0} {1}", category="instance", index=-1)


@dataclass(frozen=True)
class CustomDiffusionParams(TrainingParams):
    steps: int = 250  # diffusers README; paper 250
    learning_rate: float = 1e-5  # diffusers README, before scale_lr
    batch_size: int = 2  # diffusers README (instance images per step, plus as many class images)
    scale_lr: bool = True  # README --scale_lr: lr x batch (x2 with prior preservation, as the script does)
    max_grad_norm: float = 1.0  # diffusers example
    modifier_token: str = "<new1>"  # diffusers README
    initializer: str = "ktn"  # diffusers example's --initializer_token
    class_images: int = 200  # paper and README (real images there, generated here)
    prior_loss_weight: float = 1.0  # README
    flip_p: float = 0.5  # example --hflip
    class_image_seed: int = 0
    class_image_steps: int = 50
    class_image_guidance: float = 7.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.class_images < 0 or self.prior_loss_weight < 0:
            raise ParamsError(
                f"class_images ({self.class_images}) and prior_loss_weight ({self.prior_loss_weight}) must be >= 0; "
                "0 disables prior preservation"
            )
        if not 0.0 <= self.flip_p <= 1.0:
            raise ParamsError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if not self.initializer.strip():
            raise ParamsError("initializer must be a word whose embedding starts the modifier token, e.g. 'ktn'")
        check_placeholder(self.modifier_token)

    @property
    def with_prior_preservation(self) -> bool:
        return self.class_images > 0 and self.prior_loss_weight > 0

    @property
    def effective_learning_rate(self) -> float:
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.batch_size * (2.0 if self.with_prior_preservation else 1.0)


def custom_diffusion_processors(
    unet: torch.nn.Module,
    weights: dict[str, torch.Tensor] | None = None,
    source: torch.nn.Module | None = None,
) -> dict:
    """diffusers' Custom Diffusion processors for every layer of ``unet``: K/V copies on attn2
    (from ``weights`` in the saved-file layout, else from the to_k/to_v of ``source``, default
    ``unet`` itself), plain attention on attn1 — what the diffusers example installs (its
    SDPA variant ``CustomDiffusionAttnProcessor2_0``, as the example picks when torch has SDPA;
    diffusers' loader builds the explicit-softmax class, the same math). fp32, on the UNet's
    device."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    processors = {}
    for name in unet.attn_processors:
        layer = unet.get_submodule(name.removesuffix(".processor"))
        if not name.endswith("attn2.processor"):
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
            continue
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out=False, hidden_size=layer.to_k.out_features, cross_attention_dim=layer.to_k.in_features
        )
        if weights is None:
            origin = (source or unet).get_submodule(name.removesuffix(".processor"))
            state = {"to_k_custom_diffusion.weight": origin.to_k.weight, "to_v_custom_diffusion.weight": origin.to_v.weight}
        else:
            state = {key: weights[f"{name}.{key}"] for key in ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")}
        processor.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
        processors[name] = processor.to(device=layer.to_k.weight.device)
    return processors


def load_custom_diffusion_processors(unet: torch.nn.Module, path: Path) -> None:
    """Install the processors of a ``pytorch_custom_diffusion_weights.safetensors`` in ``unet``
    (in the UNet's dtype), as diffusers' ``load_attn_procs`` is meant to."""
    weights = load_file(str(path))
    expected = {f"{name}.to_{kv}_custom_diffusion.weight" for name in unet.attn_processors
                if name.endswith("attn2.processor") for kv in ("k", "v")}
    if set(weights) != expected:
        raise ValueError(
            f"{path} is not a Custom Diffusion K/V file for this UNet: {len(set(weights) ^ expected)} keys differ "
            f"(e.g. {sorted(set(weights) ^ expected)[:2]}); was it trained on another backbone?"
        )
    dtype = next(p.dtype for p in unet.parameters() if p.is_floating_point())
    processors = custom_diffusion_processors(unet, weights)
    unet.set_attn_processor({name: p.to(dtype=dtype) for name, p in processors.items()})


class CustomDiffusion(Method):
    name = "custom_diffusion"
    version = "1"
    Params = CustomDiffusionParams
    description = "Custom Diffusion (Kumari et al. 2023): cross-attention K/V + modifier token <new1>"

    def __init__(self, params: CustomDiffusionParams, context):
        super().__init__(params, context)
        self._generation: tuple | None = None  # ((workdir, checkpoint), unet, text_encoder, tokenizer)

    def checkpoints(self) -> Sequence[str]:
        return self.params.checkpoint_names()

    def _backbone(self) -> Backbone:
        return load_backbone(self.context.backbone, self.context.device, self.context.torch_dtype)

    def render_prompt(self, prompt: Prompt, subject: Subject) -> str:
        return prompt.render(self.params.modifier_token, subject.class_noun)

    def tokenizer(self, backbone: Backbone):
        """A copy of the backbone's tokenizer with the modifier token added (its id = len(vocab))."""
        tokenizer = copy.deepcopy(backbone.tokenizer)
        tokenizer.add_tokens([self.params.modifier_token])
        if tokenizer.convert_tokens_to_ids(self.params.modifier_token) != len(backbone.tokenizer):
            raise ValueError(f"modifier token {self.params.modifier_token!r} did not get a new id")
        return tokenizer

    def text_encoder(self, backbone: Backbone) -> torch.nn.Module:
        text_encoder = working_copy(backbone.text_encoder)
        text_encoder.set_input_embeddings(PlaceholderEmbedding(text_encoder.get_input_embeddings(), len(backbone.tokenizer)))
        return text_encoder

    def initial_vector(self, backbone: Backbone) -> tuple[torch.Tensor, list[int]]:
        ids = backbone.tokenizer(self.params.initializer, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"initializer {self.params.initializer!r} tokenizes to nothing; choose a word")
        weight = backbone.text_encoder.get_input_embeddings().weight
        return weight[torch.tensor(ids, device=weight.device)].float().mean(dim=0, keepdim=True).clone(), ids

    # ------------------------------------------------------------------ training

    def prepare(self, subject: Subject, workdir: Path, seed: int) -> None:
        p = self.params
        if not subject.class_noun or not subject.class_noun.strip():
            raise ValueError(f"subject {subject.id!r} has no class noun; Custom Diffusion prompts read '<new1> {{class}}'")
        if not subject.images:
            raise ValueError(f"subject {subject.id!r} has no images to learn from")
        self._generation = None
        backbone = self._backbone()
        device = backbone.device
        resolution = self.context.resolution
        instance_prompt = INSTANCE_PROMPT.render(p.modifier_token, subject.class_noun)
        latents = [
            subject_latents(backbone, subject, resolution, flip=flip, mode=p.vae_latents, seed=seed) for flip in (False, True)
        ]
        prior = None
        class_latents = None
        if p.with_prior_preservation:
            prior = class_prior_images(
                backbone, subject.class_noun, p.class_images, cache_dir=self.context.cache_dir or cache_root(),
                seed=p.class_image_seed, resolution=resolution,
                sampler=SamplerConfig(name="ddim", steps=p.class_image_steps, guidance=p.class_image_guidance),
            )
            class_latents = image_latents(backbone, prior.paths, resolution, mode=p.vae_latents, seed=p.class_image_seed)

        generator = torch.Generator().manual_seed(seed)
        unet = working_copy(backbone.unet)
        # Master K/V from fp32 weights (a CPU fp32 load when the backbone runs in bf16/fp16).
        fp32_unet = backbone.unet if backbone.dtype == torch.float32 else load_backbone(backbone.spec, "cpu", torch.float32).unet
        unet.set_attn_processor(custom_diffusion_processors(unet, source=fp32_unet))
        kv = [q for name, proc in unet.attn_processors.items() if name.endswith("attn2.processor") for q in proc.parameters()]
        for tensor in kv:
            tensor.requires_grad_(True)
        tokenizer = self.tokenizer(backbone)
        text_encoder = self.text_encoder(backbone)
        initial, initial_ids = self.initial_vector(backbone)
        vector = initial.to(device).requires_grad_(True)
        text_encoder.get_input_embeddings().set_vectors(vector)

        def encode(prompts: list[str]) -> torch.Tensor:
            return encode_text(text_encoder, tokenizer, prompts, device)

        draw_instance = cycle_indices(len(latents[0]), generator)
        draw_class = cycle_indices(len(class_latents), generator) if class_latents is not None else None
        n = p.batch_size
        weights = torch.tensor([1.0 / n] * n + [p.prior_loss_weight / n] * n) if prior is not None else None

        def next_batch(step: int) -> TrainBatch:
            chosen = []
            for _ in range(n):
                index = draw_instance()
                flipped = bool(torch.rand((), generator=generator) < p.flip_p)
                chosen.append(latents[int(flipped)][index])
            prompts = [instance_prompt] * n
            if class_latents is not None:
                chosen += [class_latents[draw_class()] for _ in range(n)]
                prompts += [prior.prompt] * n
            return TrainBatch(torch.stack(chosen), prompts, weights)

        files: dict[str, str] = {}

        def on_checkpoint(step: int) -> None:
            name = checkpoint_name(step, p.steps)
            files[name] = self._save_checkpoint(workdir, name, unet, vector)

        with gradient_checkpointing(unet, p.gradient_checkpointing):
            result = train_loop(
                unet=unet,
                noise_scheduler=make_noise_scheduler(backbone),
                parameters=[*kv, vector],
                params=p,
                learning_rate=p.effective_learning_rate,
                next_batch=next_batch,
                encode_prompts=encode,
                generator=generator,
                device=device,
                dtype=backbone.dtype,
                on_checkpoint=on_checkpoint,
                checkpoint_state={"files": files},  # kept by resume points
            )
        state = {
            "method": self.name,
            "version": self.version,
            "subject": subject.id,
            "seed": seed,
            "instance_prompt": instance_prompt,
            "modifier_token": p.modifier_token,
            "initializer_ids": initial_ids,
            "effective_learning_rate": p.effective_learning_rate,
            "class_prompt": prior.prompt if prior is not None else None,
            "class_prior_folder": str(prior.folder) if prior is not None else None,
            "class_images_generated": prior.generated if prior is not None else 0,
            "checkpoints": files,
            "training": result.summary(),
            "losses": result.losses,
        }
        (workdir / "state.json").write_text(json.dumps(state, indent=1))

    def _save_checkpoint(self, workdir: Path, name: str, unet: torch.nn.Module, vector: torch.Tensor) -> str:
        folder = workdir / f"custom-diffusion-{name}"
        with quiet_loading():  # save_attn_procs warns that attn1's empty entries are not stored
            unet.save_attn_procs(str(folder), weight_name=WEIGHTS_FILE, safe_serialization=True)
        save_embeddings(folder / f"{self.params.modifier_token}.safetensors", self.params.modifier_token, vector)
        return folder.name

    # ------------------------------------------------------------------ state and generation

    def load_state(self, workdir: Path, subject: Subject) -> State:
        state = json.loads((Path(workdir) / "state.json").read_text())
        for name, folder in state["checkpoints"].items():
            for filename in (WEIGHTS_FILE, f"{state['modifier_token']}.safetensors"):
                if not (Path(workdir) / folder / filename).is_file():
                    raise FileNotFoundError(f"{self.name} state {workdir}: checkpoint {name!r} lacks {folder}/{filename}")
        return State(Path(workdir), subject, state)

    def generation_modules(self, state: State, name: str) -> tuple[torch.nn.Module, torch.nn.Module, object]:
        """(UNet with the checkpoint's processors, text encoder with its token, tokenizer)."""
        key = (str(state.path), name)
        if self._generation is not None and self._generation[0] == key:
            return self._generation[1:]
        backbone = self._backbone()
        previous, self._generation = self._generation, None
        unet = previous[1] if previous is not None else working_copy(backbone.unet)
        text_encoder = previous[2] if previous is not None else self.text_encoder(backbone)
        tokenizer = previous[3] if previous is not None else self.tokenizer(backbone)
        folder = state.path / state.data["checkpoints"][name]
        load_custom_diffusion_processors(unet, folder / WEIGHTS_FILE)
        token = state.data["modifier_token"]
        vector = load_file(str(folder / f"{token}.safetensors"))[token].reshape(1, -1)
        text_encoder.get_input_embeddings().set_vectors(vector.to(backbone.device, backbone.dtype))
        self._generation = (key, unet, text_encoder, tokenizer)
        return unet, text_encoder, tokenizer

    def generate(
        self,
        state: State,
        checkpoint: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
    ) -> list[Image.Image]:
        name = self.params.stored_checkpoint(checkpoint, state.data["checkpoints"], f"{self.name} state {state.path}")
        unet, text_encoder, tokenizer = self.generation_modules(state, name)
        pipeline = build_pipeline(self._backbone(), sampler, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer)
        return generate_images(pipeline, prompts, seeds, sampler, self.context.resolution)

    def release(self) -> None:
        self._generation = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
