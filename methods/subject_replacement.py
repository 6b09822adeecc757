"""Subject replacement (HiFi Tuner, Sec. 3.4): put a learned subject into a real photo.

Null-text-invert the photo with its caption (``methods.inversion``), swap the class word for the
learned subject, and regenerate source and edit together with Prompt-to-Prompt
(``methods.prompt_to_prompt``): every token's cross-attention map comes from the source except
the subject's tokens (the new word, and c_s's positions for HiFi Tuner's output-space embedding),
which keep their own; self-attention maps come from the source for the first steps.

States it accepts: ``hifi_tuner`` with ``embedding=output`` (the paper's case: the word becomes
the class noun and c_s^t fills the last n positions; step-wise embeddings when trained), and
Textual Inversion words (``textual_inversion``, ``hifi_tuner`` with ``embedding=token``: the word
becomes the learned token). K (null-text steps per timestep) is unknown in HiFi Tuner; we use
null-text inversion's N = 10.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.subjects import Subject
from methods.base import MethodContext, SamplerConfig, State, expand_params
from methods.prompt_to_prompt import (
    EditError,
    EditSettings,
    PromptToPrompt,
    run_edit,
    token_alignment,
)

EDITABLE = ("hifi_tuner", "textual_inversion")


@dataclass
class Replacement:
    edited: Image.Image
    reconstruction: Image.Image
    mask: np.ndarray | None
    source_prompt: str
    edited_prompt: str
    record: dict


def find_state(subject_or_state: str, run_dir: str | Path | None) -> Path:
    """A published state folder: the path itself, or the newest state of that subject in ``run_dir``."""
    path = Path(subject_or_state).expanduser()
    if path.is_dir():
        if not (path / "DONE").is_file():
            raise EditError(f"{path} is not a finished state folder (no DONE file); finish its training with `subjectbench run`")
        return path
    if run_dir is None:
        raise EditError(
            f"{subject_or_state!r} is not a state folder; give --run RUN_DIR to look the subject up "
            "among a run's trained states, or pass the state folder itself"
        )
    states = Path(run_dir).expanduser() / "states"
    found = [done.parent for done in states.glob(f"*/{subject_or_state}/*/DONE")]
    found = [f for f in found if json.loads((f / "DONE").read_text()).get("fingerprint", {}).get("method") in EDITABLE]
    if not found:
        trained = sorted({p.name for p in states.glob("*/*") if p.is_dir()}) if states.is_dir() else []
        raise EditError(
            f"subject {subject_or_state!r} has no trained hifi_tuner/textual_inversion state in {states} "
            f"(subjects with states: {', '.join(trained) or 'none'}); train it first with "
            "`subjectbench run ...` or pass a state folder"
        )
    return max(found, key=lambda f: (f / "DONE").stat().st_mtime)


def load_trained(state_dir: Path, device: str = "cpu"):
    """(method, state) rebuilt from a state folder's DONE record (its training fingerprint)."""
    from methods.backbones import resolve_backbone
    from methods.registry import get_method

    info = json.loads((state_dir / "DONE").read_text())
    fingerprint = info["fingerprint"]
    name = fingerprint["method"]
    if name not in EDITABLE:
        raise EditError(f"state {state_dir} was trained by {name!r}; subject replacement needs one of {EDITABLE}")
    cls = get_method(name)
    params = expand_params(cls.Params, fingerprint["params"], f"state {state_dir}")[0][0]
    context = MethodContext(
        backbone=resolve_backbone(fingerprint["backbone"]["name"]), device=device,
        resolution=fingerprint["resolution"], identifier=fingerprint["identifier"],
    )
    method = cls(params, context)
    data = json.loads((state_dir / "state.json").read_text())
    if getattr(params, "base", "textual_inversion") != "textual_inversion":
        raise EditError(f"state {state_dir} is HiFi Tuner on DreamBooth; subject replacement needs a learned embedding")
    class_noun = data.get("class_noun") or data.get("initializer") or ""
    subject = Subject(id=str(info.get("subject", data.get("subject"))), class_noun=class_noun, kind="object",
                      images=(), data_sha=str(info.get("data_sha", "")))
    return method, method.load_state(state_dir, subject)


def _check_word(prompt: str, word: str) -> None:
    if not word or not re.search(rf"\b{re.escape(word)}\b", prompt):
        raise EditError(f"the word {word!r} is not in the prompt {prompt!r}; give --prompt with the word, or another --word")


def replace_subject(
    method, state: State, image_path: str | Path, word: str, prompt: str | None = None,
    sampler: SamplerConfig | None = None, cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
) -> Replacement:
    """Edit one photo; replace-mode alignment when the swap keeps the token count, refine otherwise."""
    from data.images import load_image, to_tensor
    from methods.attention import word_token_positions
    from methods.diffusion import encode_pixels, encode_text
    from methods.hifi_tuner import with_subject
    from methods.inversion import DdimSchedule, null_text_inversion
    from methods.sampling import build_pipeline

    sampler = sampler or SamplerConfig()
    EditSettings(cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps)  # validate early
    image_path = Path(image_path).expanduser()
    if not image_path.is_file():
        raise EditError(f"image {image_path} does not exist; give --image a photo file")
    prompt = prompt or f"a photo of a {word}"
    _check_word(prompt, word)
    backbone = method._backbone()
    resolution = method.context.resolution
    output_space = "c_s" in state.data
    if output_space:
        tokenizer, text_encoder = backbone.tokenizer, backbone.text_encoder
        new_word = state.data["class_noun"]
    else:
        tokenizer = method._tokenizer(backbone, state.data["tokens"])
        text_encoder = method._text_encoder_copy(backbone)
        new_word = " ".join(state.data["tokens"])
        vectors = state.data["vectors"]["final"]
        text_encoder.get_input_embeddings().set_vectors(vectors.to(backbone.device, backbone.dtype))
    try:
        edited_prompt = re.sub(rf"\b{re.escape(word)}\b", new_word, prompt, count=1)
        with torch.no_grad():
            cond = encode_text(text_encoder, tokenizer, [prompt, edited_prompt], backbone.device)
            null = encode_text(text_encoder, tokenizer, [""], backbone.device)
        own_positions = word_token_positions(tokenizer, edited_prompt, new_word)
        schedule = DdimSchedule.from_config(backbone.scheduler_config, sampler.steps)
        per_step = method._subject_vectors(state, sampler) if output_space else None
        if output_space:
            n = per_step[0].shape[0]
            own_positions = own_positions + list(range(cond.shape[1] - n, cond.shape[1]))

        def conditioning(step: int) -> torch.Tensor:
            if per_step is None:
                return cond
            edited = with_subject(cond[1:], per_step[min(step, len(per_step) - 1)].to(backbone.device))
            return torch.cat([cond[:1], edited])

        picture = load_image(image_path, resolution)
        latents = encode_pixels(backbone, to_tensor([picture]) * 2.0 - 1.0)
        inversion = null_text_inversion(backbone.unet, schedule, latents, cond[:1], null[0], guidance=sampler.guidance)
        mode = "replace"
        try:
            mapper, own = token_alignment(tokenizer, prompt, edited_prompt, "replace")
        except EditError:
            mode = "refine"
            mapper, own = token_alignment(tokenizer, prompt, edited_prompt, "refine")
        own[own_positions] = True
        settings = EditSettings(mode=mode, cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps)
        controller = PromptToPrompt(sampler.steps, mapper, own, settings, mask_positions=tuple(own_positions))
        nulls = [torch.cat([n, n]) for n in inversion.null_embeddings]
        pipeline = build_pipeline(backbone, sampler, text_encoder=text_encoder, tokenizer=tokenizer)
        images = run_edit(pipeline, controller, inversion.trajectory[-1].expand(2, -1, -1, -1), conditioning, nulls,
                          sampler.steps, sampler.guidance, resolution)
    finally:
        if not output_space:
            text_encoder.get_input_embeddings().set_vectors(None)
    record = {
        "image": str(image_path), "word": word, "source_prompt": prompt, "edited_prompt": edited_prompt,
        "subject": state.subject.id, "state": str(state.path), "steps": sampler.steps, "guidance": sampler.guidance,
        "mode": settings.mode, "cross_replace_steps": settings.cross_replace_steps,
        "self_replace_steps": settings.self_replace_steps, "own_token_positions": own_positions,
        "null_text_final_loss": float(inversion.final_losses[-1].mean()),
        "embedding": "output (c_s)" if output_space else "token",
    }
    return Replacement(images[1], images[0], controller.subject_mask(resolution), prompt, edited_prompt, record)
