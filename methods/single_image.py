"""``two_stage``: two-stage single-image personalization — a **reconstruction** of an unpublished
2024 write-up (the "seed"); no code and no hyper-parameters of it are public.

What the seed says (``METHODS.md``): from one reference image, stage I binds an identifier to
the *target scene* with prior preservation; stage II binds the *instance* with its own
identifier while keeping the scene binding (same loss form, instance-focused); learning rates
and step counts were the critical knobs. Everything below that is more specific is ours.

Reconstruction, on DreamBooth's code (``methods.dreambooth``: the same trainable modules,
checkpoint files, class-prior cache and generation) and the shared ``methods.training.train_loop``:

| step | where in code | value (default) | source |
|---|---|---|---|
| scene images | ``TwoStage.scene_images`` | the subject's ``scene`` image(s) if it has them (scene + instance task), else its training photos (the whole photo is the scene in the one-image track) | ours: the seed's setting is one photo holding both |
| stage I prompt | ``TwoStage.scene_prompt`` | "a {scene_identifier} {scene_class}" = "a zwx scene" | ours: DreamBooth's "a [V] [class]" form with a second rare token |
| stage I loss | ``TwoStage.prepare`` (``stage_one``), ``_run_stage`` | ‖ε−ε_θ(z_scene, c_scene)‖² + λ‖ε′−ε_θ(z′, "a scene")‖² | seed (scene binding with prior preservation), DreamBooth's loss form |
| stage I steps, lr | ``stage1_steps``, ``stage1_learning_rate`` | 400, 5e-6 | ours: the seed gives none; 400 = diffusers' DreamBooth example for one concept, 5e-6 = DreamBooth paper's SD lr |
| stage I checkpoint | ``unet-stage1.safetensors`` | always saved; generated from when ``generate_stage1`` | ours (per-stage checkpoints, issue 14) |
| stage II start | ``TwoStage.prepare`` | stage I's weights, a fresh AdamW | ours |
| stage II loss | ``TwoStage.prepare`` (``stage_two``), ``_run_stage`` | instance term "a {identifier} {class}" + λ · class prior "a {class}" + μ · scene replay (stage I's prompt and scene latents) | seed ("same loss form, instance-focused", "keeping the scene binding"); the replay term is our reading of "keeping" |
| μ | ``scene_loss_weight`` | 1.0 | ours: the same weight as DreamBooth's λ; 0 drops the replay |
| stage II steps, lr | ``steps``, ``learning_rate`` | 400, 5e-6 | ours, as stage I (the seed: "critical knobs", no numbers) — sweep them |
| stage II checkpoints | ``checkpoint_steps`` → ``step-N``, ``final`` | none | a sweep over stage-II steps is one training with ``checkpoint_steps`` |
| λ, class images, batch, AdamW, clipping | ``DreamBoothParams`` | 1, 200, 1, (0.9, 0.999, 1e-8, 1e-2), 1.0 | DreamBooth paper / diffusers (see ``methods.dreambooth``) |
| generation prompt | ``render_prompt`` | protocol prompt; in the scene + instance task the pair's prompt with ``{scene}`` = "zwx scene" (default "a sks dog in the zwx scene") | ours |

State: ``unet-stage1.safetensors`` (+ text encoder when trained), one file per stage-II
checkpoint, and ``state.json`` with each stage's seconds and peak memory (``stages``), which
``benchmarks/gpu_two_stage.py`` reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from data.protocol import Prompt
from data.subjects import Subject, cache_root
from methods.backbones import Backbone
from methods.base import ParamsError, SamplerConfig, State, param
from methods.class_prior import class_prior_images
from methods.diffusion import (
    CachedTextEncoding,
    cycle_indices,
    encode_text,
    gradient_checkpointing,
    image_latents,
    make_noise_scheduler,
    subject_latents,
)
from methods.dreambooth import DreamBooth, DreamBoothParams
from methods.sampling import build_pipeline, generate_images
from methods.training import TrainBatch, TrainResult, checkpoint_name, train_loop

STAGE1 = "stage1"
DISPLAY_NAME = "two-stage single-image (reconstructed)"


@dataclass(frozen=True)
class TwoStageParams(DreamBoothParams):
    # stage II: the shared training fields (steps, learning_rate, checkpoint_steps, ...)
    steps: int = 400  # ours (module docstring)
    learning_rate: float = 5e-6  # ours (DreamBooth paper's lr)
    stage1_steps: int = param(400, source="ours: diffusers DreamBooth example; the seed gives none",
                              doc="stage I (scene binding) optimisation steps")
    stage1_learning_rate: float = param(5e-6, source="ours: DreamBooth paper's lr; the seed gives none",
                                        doc="stage I learning rate")
    scene_identifier: str = param("zwx", source="ours: a second rare token, as DreamBooth's 'sks'",
                                  doc="identifier bound to the scene in stage I")
    scene_class: str = param("scene", source="ours", doc="class noun of the scene (its prior: 'a {scene_class}')")
    scene_loss_weight: float = param(1.0, source="ours: same as λ",
                                     doc="μ: weight of the stage-I scene replay in stage II (0: none)")
    generate_stage1: bool = param(False, source="ours", generation=True,
                                  doc="also generate from the stage-I checkpoint ('stage1')")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage1_steps < 1:
            raise ParamsError(f"stage1_steps must be >= 1, got {self.stage1_steps}")
        if not self.stage1_learning_rate > 0:
            raise ParamsError(f"stage1_learning_rate must be > 0, got {self.stage1_learning_rate}")
        if self.scene_loss_weight < 0:
            raise ParamsError(f"scene_loss_weight must be >= 0 (0 drops the scene replay), got {self.scene_loss_weight}")
        if not self.scene_identifier.strip() or not self.scene_class.strip():
            raise ParamsError("scene_identifier and scene_class must be non-empty words (e.g. zwx, scene)")

    def stage1_params(self) -> TwoStageParams:
        """Stage I's training knobs for ``train_loop``: its own steps and lr, no intermediate saves."""
        return dataclasses.replace(
            self, steps=self.stage1_steps, learning_rate=self.stage1_learning_rate, checkpoint_steps=()
        )


@dataclass
class Component:
    """One term of a stage's loss: latents, the prompt they are bound to, the term's weight."""

    latents: torch.Tensor
    prompt: str
    weight: float


class TwoStage(DreamBooth):
    samples_compiled = False  # its generate() samples eagerly
    compiles_finetune = False  # its own stages (_run_stage) train eagerly, training.compile or not
    name = "two_stage"
    default_label = "two_stage (reconstructed)"  # what reports show unless a suite labels it
    version = "1"
    Params = TwoStageParams
    description = (
        "Two-stage single-image personalization (reconstructed from an unpublished 2024 write-up): "
        "stage I binds the scene with prior preservation, stage II the instance, scene replay kept"
    )

    def checkpoints(self) -> Sequence[str]:
        names = self.params.checkpoint_names()
        return [STAGE1, *names] if self.params.generate_stage1 else names

    def scene_images(self, subject: Subject) -> tuple[Path, ...]:
        return tuple(getattr(subject, "scene", None) or ()) or tuple(subject.images)

    def scene_prompt(self) -> str:
        return f"a {self.params.scene_identifier} {self.params.scene_class}"

    def render_prompt(self, prompt: Prompt, subject: Subject) -> str:
        """The protocol prompt; in the scene + instance task its ``{scene}`` slot becomes stage I's
        "zwx scene" (other methods and CLIP-T read plain "scene")."""
        bound = f"{self.params.scene_identifier} {self.params.scene_class}"
        return super().render_prompt(dataclasses.replace(prompt, template=prompt.template.replace("{scene}", bound)), subject)

    # ------------------------------------------------------------------ training

    def _prior(self, backbone: Backbone, class_noun: str) -> Component | None:
        p = self.params
        if not p.with_prior_preservation:
            return None
        prior = class_prior_images(
            backbone, class_noun, p.class_images, cache_dir=self.context.cache_dir or cache_root(),
            seed=p.class_image_seed, resolution=self.context.resolution, sampler=self.class_sampler(),
        )
        latents = image_latents(backbone, prior.paths, self.context.resolution, mode=p.vae_latents, seed=p.class_image_seed)
        return Component(latents, prior.prompt, p.prior_loss_weight)

    def prepare(self, subject: Subject, workdir: Path, seed: int) -> None:
        p = self.params
        if not subject.class_noun or not subject.class_noun.strip():
            raise ValueError(f"subject {subject.id!r} has no class noun; two_stage needs one (e.g. class: dog)")
        self._generation = None
        backbone = self._backbone()
        resolution = self.context.resolution
        scene_paths = self.scene_images(subject)
        scene = Component(
            image_latents(backbone, scene_paths, resolution, mode=p.vae_latents, seed=seed,
                          cache_key=("scene", subject.data_sha, tuple(map(str, scene_paths)))),
            self.scene_prompt(), 1.0,
        )
        instance = Component(
            subject_latents(backbone, subject, resolution, mode=p.vae_latents, seed=seed), self.instance_prompt(subject), 1.0
        )
        scene_prior, instance_prior = self._prior(backbone, p.scene_class), self._prior(backbone, subject.class_noun)
        generator = torch.Generator().manual_seed(seed)
        unet, text_encoder, parameters = self._trainable_modules(backbone, generator)
        files: dict[str, dict] = {}

        def save(name: str) -> None:
            files[name] = self._save_checkpoint(workdir, name, unet, text_encoder, backbone.dtype)

        stage_one = [scene, *([scene_prior] if scene_prior else [])]
        with self._background_writes() as writes:  # checkpoint files written while training goes on
            first = self._run_stage(backbone, unet, text_encoder, parameters, stage_one, p.stage1_params(), generator,
                                    lambda step: save(STAGE1) if step == p.stage1_steps else None, {"files": files})
            stage_two = [instance, *([instance_prior] if instance_prior else [])]
            if p.scene_loss_weight > 0:
                stage_two.append(dataclasses.replace(scene, weight=p.scene_loss_weight))
            second = self._run_stage(backbone, unet, text_encoder, parameters, stage_two, p, generator,
                                     lambda step: save(checkpoint_name(step, p.steps)), {"files": files})
            waited = writes.close()
        second.add_checkpoint_wait(waited)
        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()
        state = {
            "method": self.name,
            "version": self.version,
            "display_name": DISPLAY_NAME,
            "subject": subject.id,
            "seed": seed,
            "instance_prompt": instance.prompt,
            "scene_prompt": scene.prompt,
            "scene_images": [str(path) for path in scene_paths],
            "checkpoints": files,
            "stages": {STAGE1: first.summary(), "stage2": second.summary()},
            "losses": {STAGE1: first.losses, "stage2": second.losses},
        }
        (workdir / "state.json").write_text(json.dumps(state, indent=1))

    def _run_stage(self, backbone, unet, text_encoder, parameters, components: list[Component], params,
                   generator: torch.Generator, on_checkpoint, checkpoint_state: dict) -> TrainResult:
        """One stage through the shared ``train_loop``: each step draws ``batch_size`` samples of
        every component; sample weights are weight/batch (DreamBooth's 1/n and λ/n)."""
        device = backbone.device
        if text_encoder is not None:

            def encode(prompts: list[str]) -> torch.Tensor:
                return encode_text(text_encoder, backbone.tokenizer, prompts, device)

        else:
            encode = CachedTextEncoding(backbone.text_encoder, backbone.tokenizer, device)
        n = params.batch_size
        draws = [cycle_indices(len(c.latents), generator) for c in components]
        weights = torch.tensor([c.weight / n for c in components for _ in range(n)])

        def next_batch(step: int) -> TrainBatch:
            latents = [c.latents[draw()] for c, draw in zip(components, draws) for _ in range(n)]
            prompts = [c.prompt for c in components for _ in range(n)]
            return TrainBatch(torch.stack(latents), prompts, weights)

        with contextlib.ExitStack() as stack:
            for module in (unet, text_encoder):
                if module is not None:
                    stack.enter_context(gradient_checkpointing(module, params.gradient_checkpointing))
            return train_loop(
                unet=unet, noise_scheduler=make_noise_scheduler(backbone), parameters=parameters, params=params,
                learning_rate=params.learning_rate, next_batch=next_batch, encode_prompts=encode,
                generator=generator, device=device, dtype=backbone.dtype, on_checkpoint=on_checkpoint,
                checkpoint_state=checkpoint_state,
            )

    # ------------------------------------------------------------------ generation

    def generate(self, state: State, checkpoint: str, prompts: Sequence[str], seeds: Sequence[int],
                 sampler: SamplerConfig):
        name = STAGE1 if checkpoint == STAGE1 else checkpoint_name(self.params.checkpoint_step(checkpoint), self.params.steps)
        if name not in state.data["checkpoints"]:
            raise ValueError(f"{self.name} state {state.path} has no checkpoint {name!r}; it has {sorted(state.data['checkpoints'])}")
        unet, text_encoder = self._generation_modules(state, name)
        pipeline = build_pipeline(self._backbone(), sampler, unet=unet, text_encoder=text_encoder)
        return generate_images(pipeline, prompts, seeds, sampler, self.context.resolution)
